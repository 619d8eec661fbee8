"""The TPACKET_V3 ring (`sniffer.ring`) and LiveCapture's use of it.

Pure: the BPF snap-length patch. Privileged (root): a real ring on loopback
against the plain socket path on the same traffic (same segments, same
kernel timestamps, payload lengths from the IP header although only 128
bytes are copied), loopback's outgoing copies skipped, the headers-only pcap
numbered like the delivered records, a prompt stop, and the fallback.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import sniffer.ring as ring_module
from sniffer.capture import LiveCapture
from sniffer.records import segment_of
from sniffer.ring import (
    SNAPLEN,
    PacketRing,
    RingUnavailable,
    compile_bpf,
    patched_filter,
)

_INSN = struct.Struct("HBBI")
_RET_K = 0x06


def _returns(program: bytes) -> list[int]:
    return [k for code, _, _, k in _INSN.iter_unpack(program) if code == _RET_K]


# -- pure ------------------------------------------------------------------------------


def test_patch_caps_accepting_returns_and_keeps_rejections_and_other_instructions():
    load = _INSN.pack(0x28, 0, 0, 12)  # ldh [12]
    jump = _INSN.pack(0x15, 0, 1, 0x800)  # jeq #0x800
    program = load + jump + _INSN.pack(_RET_K, 0, 0, 262144) + _INSN.pack(_RET_K, 0, 0, 0) + _INSN.pack(_RET_K, 0, 0, 64)
    patched = patched_filter(program, 128)
    assert _returns(patched) == [128, 0, 64]
    assert patched[:16] == program[:16]
    assert len(patched) == len(program)


def test_libpcap_filter_accepts_whole_packets_until_patched():
    program = compile_bpf("tcp port 5432", "lo")
    assert max(_returns(program)) >= 65535  # scapy compiles with its MTU, 65535: the whole packet
    assert 0 in _returns(program)
    assert max(_returns(patched_filter(program, SNAPLEN))) == SNAPLEN


def test_bad_filter_is_ring_unavailable():
    with pytest.raises(RingUnavailable):
        compile_bpf("tcp port", "lo")


# -- on loopback (root) ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conversation(port: int, payload: bytes, rounds: int = 5) -> None:
    """A short bounded TCP exchange on loopback: connect, `rounds` request/answer pairs, close."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1)
    server.settimeout(5)

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(5)
        with conn:
            for _ in range(rounds):
                got = 0
                while got < len(payload):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    got += len(chunk)
                conn.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        for _ in range(rounds):
            client.sendall(payload)
            assert client.recv(2) == b"ok"
    thread.join(5)
    server.close()


def _drain_until_quiet(read, quiet: float = 0.4, limit: float = 5.0) -> list:
    """Read until nothing came for `quiet` seconds (a ring block is handed over after 50 ms)."""
    out: list = []
    deadline = time.monotonic() + limit
    last = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        got = read(0.1)
        if got:
            out += got
            last = time.monotonic()
    return out


@pytest.mark.privileged
def test_ring_and_socket_paths_see_the_same_segments_with_the_same_kernel_times(monkeypatch):
    port = _free_port()
    ring_capture = LiveCapture(["lo"], [port])
    monkeypatch.setenv("KAOBS_CAPTURE", "socket")
    socket_capture = LiveCapture(["lo"], [port])
    with socket_capture:
        monkeypatch.delenv("KAOBS_CAPTURE")
        with ring_capture:
            assert ring_capture.path == "ring"
            assert socket_capture.path == "socket"
            assert socket_capture.path_notes == ["KAOBS_CAPTURE=socket"]
            _conversation(port, b"q" * 3000)
            records = _drain_until_quiet(ring_capture.read)
            segments = [segment_of(r) for r in _drain_until_quiet(socket_capture.read)]
            ring_stats, socket_stats = ring_capture.stats(), socket_capture.stats()
    assert len(records) == len(segments) >= 3 + 5 + 5  # handshake, requests, answers (ACKs, FINs besides)
    from_ring = [segment_of(r) for r in records]
    assert [s.frame for s in from_ring] == list(range(1, len(records) + 1))
    def shape(s):
        return (s.src, s.sport, s.dst, s.dport, s.seq, s.ack, s.flags, s.window, s.payload_len)
    assert [shape(s) for s in from_ring] == [shape(s) for s in segments]
    # Both are kernel times of the packet's arrival; the ring's is taken a moment apart (<1 us seen).
    assert max(abs(a.t - b.t) for a, b in zip(from_ring, segments)) < 1e-4
    # 3000-byte requests, though only SNAPLEN bytes were copied: the length comes from the IP header.
    assert sum(s.payload_len for s in from_ring if s.dport == port) == 5 * 3000
    assert ring_stats.drops == socket_stats.drops == 0
    assert ring_stats.packets == ring_stats.segments == len(records)  # loopback's outgoing copies not counted
    assert ring_stats.kernel_packets == 2 * len(records)  # ...though the kernel passed both through the filter


@pytest.mark.privileged
def test_read_gives_records_numbered_like_the_headers_only_pcap(tmp_path):
    from sniffer.pcapfile import CaptureReader

    port = _free_port()
    pcap = tmp_path / "ring.pcap"
    with LiveCapture(["lo"], [port], write=str(pcap)) as capture:
        assert capture.path == "ring"
        _conversation(port, b"secret" * 500, rounds=3)
        segments = [segment_of(r) for r in _drain_until_quiet(capture.read)]
    offline = list(CaptureReader(str(pcap)))
    assert [(s.frame, s.seq, s.ack, s.flags, s.payload_len) for s in offline] == \
        [(s.frame, s.seq, s.ack, s.flags, s.payload_len) for s in segments]
    assert b"secret" not in pcap.read_bytes()  # headers only
    with open(pcap, "rb") as f:
        data = f.read()
    # Record headers: the original length of a 3000-byte request is kept although its bytes are not.
    offset, lengths = 24, []
    while offset < len(data):
        _, _, incl, orig = struct.unpack_from("<IIII", data, offset)
        lengths.append((incl, orig))
        offset += 16 + incl
    assert any(orig > 3000 and incl < SNAPLEN for incl, orig in lengths)


@pytest.mark.privileged
def test_stop_wakes_a_blocked_read_promptly():
    with LiveCapture(["lo"], [_free_port()]) as capture:
        assert capture.path == "ring"
        threading.Timer(0.2, capture.stop).start()
        started = time.monotonic()
        assert capture.read(5.0) == []
        assert time.monotonic() - started < 0.4
        assert capture.read(5.0) == []  # stopped: returns at once


@pytest.mark.privileged
def test_duration_bounds_read():
    with LiveCapture(["lo"], [_free_port()], duration=0.3) as capture:
        started = time.monotonic()
        while not capture.stopped:
            capture.read(5.0)
        assert time.monotonic() - started < 0.6


@pytest.mark.privileged
def test_no_ring_falls_back_to_the_socket_and_says_why(monkeypatch):
    def refuse(*args, **kwargs):
        raise RingUnavailable("no TPACKET_V3 ring on lo: Operation not supported")

    monkeypatch.setattr(ring_module, "PacketRing", refuse)
    with LiveCapture(["lo"], [_free_port()]) as capture:
        assert capture.path == "socket"
        assert capture.path_notes == ["no TPACKET_V3 ring on lo: Operation not supported"]


@pytest.mark.privileged
def test_ring_on_a_missing_interface_is_unavailable():
    with pytest.raises(RingUnavailable):
        PacketRing("kaobs-none0", "tcp port 5432")


@pytest.mark.privileged
def test_watch_report_warns_when_no_ring_could_be_had(monkeypatch):
    import threading as _threading

    from kaobs.watch import run_live

    def refuse(*args, **kwargs):
        raise RingUnavailable("no TPACKET_V3 ring on lo: Operation not supported")

    monkeypatch.setattr(ring_module, "PacketRing", refuse)
    port = _free_port()
    with LiveCapture(["lo"], [port]) as capture:
        run, _ = run_live(capture, expectations=None, ports=[port], hz=250, output_format="json",
                          duration=0.3, stop=_threading.Event())
    assert run.capture_path == "socket" and run.kernel_drops == 0
    assert any("no packet ring (no TPACKET_V3 ring on lo: Operation not supported)" in w for w in run.warnings)
    monkeypatch.setenv("KAOBS_CAPTURE", "socket")
    with LiveCapture(["lo"], [port]) as capture:  # asked for: no warning
        assert capture.path_notes == ["KAOBS_CAPTURE=socket"]
        run, _ = run_live(capture, expectations=None, ports=[port], hz=250, output_format="json",
                          duration=0.3, stop=_threading.Event())
    assert not any("packet ring" in w for w in run.warnings)
