"""The headers-only pcap writer: what kaobs reads back, what is left in the file, how it survives a kill."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniffer.dissect import frame_snap_end, make_dissector
from sniffer.pcapwrite import PcapWriter, strip_payloads
from sniffer.records import CaptureError, segment_of
from tests.pcap_builders import (
    CLIENT4,
    CLIENT6,
    ETH_ARP,
    ETH_QINQ,
    ETH_VLAN,
    LINKTYPE_ETHERNET,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_SLL,
    LINKTYPE_SLL2,
    SERVER4,
    SERVER6,
    Record,
    conversation,
    epb,
    ether,
    frame_for,
    idb,
    ipv4,
    ipv6,
    pcap,
    shb,
    times,
    udp,
)
from tests.test_pcapfile import assert_same, read, tshark_segments

SECRET = b"SELECT secret FROM t"
TSHARK = shutil.which("tshark")
LINKTYPES = [LINKTYPE_ETHERNET, LINKTYPE_SLL, LINKTYPE_SLL2, LINKTYPE_RAW, LINKTYPE_NULL, LINKTYPE_LOOP]


def packets_and_frames(linktype: int):
    packets = conversation() + conversation(CLIENT6, SERVER6)
    packets[4] = dataclasses.replace(packets[4], ip_options=b"\x01" * 4, tcp_options=b"\x01\x01\x08\x0a" + bytes(8))
    return packets, [frame_for(linktype, p) for p in packets]


def rounded_t(t_ns: int, units: int) -> int:
    """The timestamp in ns as the writer stores it: rounded to its unit, not truncated."""
    return (t_ns * units * 2 + 10**9) // (2 * 10**9) * 10**9 // units


def stamps_for(count: int) -> list[int]:
    """Times a second apart on whole microseconds, far from any rounding boundary.

    The writer gets float seconds (about 0.24 us apart at today's epoch), so a
    time within that of a rounding boundary could round either way.
    """
    return times(count, step_ns=1_000_100_000)


def write_frames(path: Path, linktype: int, frames, stamps, **kwargs) -> PcapWriter:
    options = {k: kwargs.pop(k) for k in ("nsec", "flush_every") if k in kwargs}
    with PcapWriter(path, linktype, kwargs.pop("snaplen", 262144), **options) as writer:
        for frame, t in zip(frames, stamps):
            writer.write(frame, t / 10**9, **kwargs)  # int / int: the float nearest the exact time
    return writer


def record_lengths(data: bytes) -> list[tuple[int, int]]:
    """(caplen, wirelen) of each record of a little-endian classic pcap."""
    out, pos = [], 24
    while pos + 16 <= len(data):
        _, _, caplen, wirelen = struct.unpack_from("<IIII", data, pos)
        out.append((caplen, wirelen))
        pos += 16 + caplen
    assert pos == len(data)
    return out


@pytest.mark.parametrize("linktype", LINKTYPES, ids=["ether", "sll", "sll2", "raw", "null", "loop"])
@pytest.mark.parametrize("nsec", [False, True], ids=["usec", "nsec"])
def test_round_trip_headers_only(tmp_path, linktype, nsec):
    packets, frames = packets_and_frames(linktype)
    stamps = stamps_for(len(frames))
    path = tmp_path / "out.pcap"
    writer = write_frames(path, linktype, frames, stamps, nsec=nsec)
    assert writer.closed and writer.records == len(frames)
    segments, stats, warned = read(path, dedupe=False)
    units = 10**9 if nsec else 10**6
    assert_same(segments, [p.segment(i + 1, rounded_t(t, units)) for i, (p, t) in enumerate(zip(packets, stamps))])
    assert stats.complete and warned == []
    data = path.read_bytes()
    assert data[:4] == struct.pack("<I", 0xA1B23C4D if nsec else 0xA1B2C3D4)
    assert SECRET not in data and bytes(range(60)) not in data
    # Each record ends exactly where its TCP header ends (options included) and keeps the wire length.
    link = len(frames[0]) - len(packets[0].ip_packet())
    assert record_lengths(data) == [(link + len(p.ip_packet()) - len(p.payload), len(f)) for p, f in zip(packets, frames)]
    assert writer.bytes_dropped == sum(len(p.payload) for p in packets)


def test_full_keeps_the_payload_and_snaplen_cuts(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_ETHERNET)
    stamps = stamps_for(len(frames))
    path = tmp_path / "full.pcap"
    write_frames(path, 1, frames, stamps, full=True)
    data = path.read_bytes()
    assert SECRET in data
    assert record_lengths(data) == [(len(f), len(f)) for f in frames]
    assert data[24 + 16:24 + 16 + len(frames[0])] == frames[0]
    cut = tmp_path / "cut.pcap"
    write_frames(cut, 1, frames, stamps, full=True, snaplen=80)  # every header fits, most payloads do not
    assert record_lengths(cut.read_bytes()) == [(min(80, len(f)), len(f)) for f in frames]
    segments, _, _ = read(cut)
    assert [s.payload_len for s in segments] == [len(p.payload) for p in packets]


def test_other_frames_keep_ip_or_link_header_only(tmp_path):
    secret_udp = ether(ipv4(CLIENT4, SERVER4, udp(5353, 53, SECRET), proto=17))
    secret_v6 = ether(ipv6(CLIENT6, SERVER6, udp(1, 2, SECRET), nh=17, ext=[(0, b"")]), 0x86DD)
    arp = ether(b"\x00\x01" + SECRET.ljust(26), ETH_ARP)
    vlan_tcp = ether(conversation()[3].ip_packet(), vlans=[(ETH_QINQ, 1), (ETH_VLAN, 2)])
    short = frame_for(1, conversation()[3])[:30]  # cut inside the IP header: only the link header is sure
    frames = [secret_udp, secret_v6, arp, vlan_tcp, short]
    path = tmp_path / "other.pcap"
    write_frames(path, 1, frames, times(len(frames)))
    data = path.read_bytes()
    assert SECRET not in data
    assert record_lengths(data) == [(14 + 20, len(secret_udp)), (14 + 48, len(secret_v6)), (14, len(arp)),
                                    (22 + 20 + 20, len(vlan_tcp)), (14, 30)]


def test_wirelen_of_an_already_cut_frame_is_kept(tmp_path):
    p = conversation()[4]
    frame = frame_for(1, p)
    path = tmp_path / "w.pcap"
    with PcapWriter(path, 1) as writer:
        writer.write(frame[:70], 1_764_000_000.5, wirelen=len(frame))
        writer.write(frame[:70], 1_764_000_001.5, wirelen=3)  # nonsense: never below what was captured
    assert record_lengths(path.read_bytes()) == [(54, len(frame)), (54, 70)]
    [first, second], _, _ = read(path)
    assert first.payload_len == second.payload_len == len(p.payload)


def test_timestamps_round_to_the_unit(tmp_path):
    path = tmp_path / "t.pcap"
    frame = frame_for(1, conversation()[0])
    stamps = [1_764_000_000.9999996, 1_764_000_001.0000004, 1_764_000_002.25]
    with PcapWriter(path, 1) as writer:
        for t in stamps:
            writer.write(frame, t)
    data = path.read_bytes()
    heads = [struct.unpack_from("<II", data, 24 + i * (16 + 58)) for i in range(3)]  # SYN: 58-byte header
    assert heads == [(1_764_000_001, 0), (1_764_000_001, 0), (1_764_000_002, 250_000)]


def test_unwritable_path_is_one_line_capture_error(tmp_path):
    for path in (tmp_path / "no" / "such" / "dir" / "x.pcap", tmp_path):
        with pytest.raises(CaptureError) as caught:
            PcapWriter(path, 1)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message and "cannot write" in message
    with pytest.raises(CaptureError, match="105"):
        PcapWriter(tmp_path / "wifi.pcap", 105)
    assert not (tmp_path / "wifi.pcap").exists()


def test_write_after_close_is_an_error(tmp_path):
    writer = PcapWriter(tmp_path / "c.pcap", 1)
    writer.close()
    writer.close()
    with pytest.raises(ValueError):
        writer.write(b"x" * 60, 1.0)


def test_readable_without_close(tmp_path):
    """A writer that is never closed (process killed): everything flushed is a valid capture."""
    packets, frames = packets_and_frames(LINKTYPE_ETHERNET)
    stamps = stamps_for(len(frames))
    path = tmp_path / "killed.pcap"
    writer = PcapWriter(path, 1)  # flushes every record
    assert len(path.read_bytes()) == 24  # the header is on disk before any packet
    for frame, t in zip(frames[:7], stamps):
        writer.write(frame, t / 10**9)
    segments, stats, warned = read(path)
    assert len(segments) == 7 and stats.complete and warned == []
    batched = tmp_path / "batched.pcap"
    writer2 = PcapWriter(batched, 1, flush_every=5)
    for frame, t in zip(frames[:12], stamps):
        writer2.write(frame, t / 10**9)
    segments, stats, _ = read(batched)
    assert len(segments) == 10 and stats.complete  # two batches of 5 written, 2 records pending
    writer2.flush()
    assert len(read(batched)[0]) == 12
    writer.close()
    writer2.close()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from sniffer.pcapwrite import PcapWriter
    from tests.pcap_builders import conversation, frame_for
    frames = [frame_for(1, p) for p in conversation()]
    writer = PcapWriter(sys.argv[1], 1, flush_every=int(sys.argv[2]))
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    i = 0
    while time.monotonic() < deadline:
        writer.write(frames[i % len(frames)], 1_764_000_000 + i * 0.001)
        i += 1
""")


@pytest.mark.parametrize("flush_every", [1, 7])
def test_file_valid_after_sigkill(tmp_path, flush_every):
    """A real kill -9 in the middle of writing: at most the last record is cut, the rest reads."""
    path = tmp_path / "killed.pcap"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(flush_every)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while path.stat().st_size < 200_000 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    segments, stats, warned = read(path)
    assert len(segments) > 1000
    assert len(warned) == (0 if stats.complete else 1)
    pattern = conversation()
    for i, s in enumerate(segments):
        assert (s.frame, s.seq, s.payload_len) == (i + 1, pattern[i % 9].seq, len(pattern[i % 9].payload))
        assert s.t == pytest.approx(1_764_000_000 + i * 0.001, abs=1e-6)
    assert SECRET not in path.read_bytes()


@pytest.mark.tshark
@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_tshark_reads_the_output(tmp_path):
    for linktype in LINKTYPES:
        packets, frames = packets_and_frames(linktype)
        path = tmp_path / f"out{linktype}.pcap"
        write_frames(path, linktype, frames, times(len(frames)), nsec=linktype == LINKTYPE_SLL2)
        done = subprocess.run([TSHARK, "-r", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "cut short" not in done.stderr and "Malformed" not in done.stdout, done
        theirs = tshark_segments(path)
        ours, _, _ = read(path, dedupe=False)
        assert [s.payload_len for s in theirs] == [len(p.payload) for p in packets]
        assert_same(ours, theirs)


# --- strip_payloads -------------------------------------------------------------------

def test_strip_pcap(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_SLL2)
    stamps = stamps_for(len(frames))
    records = []
    for f, t in zip(frames, stamps):  # each packet on two interfaces, as tcpdump -i any sees a bridge
        records += [Record(t, f), Record(t + 20_000, f[:4] + b"\x00\x00\x00\x09" + f[8:])]
    src = tmp_path / "any.pcap"
    src.write_bytes(pcap(records, LINKTYPE_SLL2))
    dst = tmp_path / "stripped.pcap"
    stats = strip_payloads(src, dst)
    assert stats.packets == len(records) and stats.complete
    data = dst.read_bytes()
    assert SECRET in src.read_bytes() and SECRET not in data
    before, before_stats, _ = read(src)
    after, after_stats, _ = read(dst)
    assert after == before
    assert (after_stats.packets, after_stats.duplicates) == (before_stats.packets, before_stats.duplicates) == (36, 18)
    assert sorted(os.listdir(tmp_path)) == ["any.pcap", "stripped.pcap"]  # no temporary file left


def test_strip_pcapng_same_link_type_several_interfaces(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_ETHERNET)
    stamps = stamps_for(len(frames))
    blocks = [shb(), idb(1, tsresol=9), idb(1)]
    blocks += [epb(i % 2, t, f, tsresol=9 if i % 2 == 0 else None) for i, (t, f) in enumerate(zip(stamps, frames))]
    blocks += [shb(big=True), idb(1, big=True), epb(0, stamps[0], frames[3], big=True)]
    src = tmp_path / "multi.pcapng"
    src.write_bytes(b"".join(blocks))
    dst = tmp_path / "multi.pcap"
    strip_payloads(src, dst)
    data = dst.read_bytes()
    assert data[:4] == struct.pack("<I", 0xA1B23C4D)  # the first interface has nanoseconds
    assert SECRET not in data
    before, _, _ = read(src)
    after, stats, _ = read(dst)
    assert stats.format == "pcap" and len(after) == len(frames) + 1
    assert_same(after, before)


def test_strip_full_converts_pcapng_to_pcap(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_RAW)
    src = tmp_path / "raw.pcapng"
    src.write_bytes(b"".join([shb(), idb(LINKTYPE_RAW), *[epb(0, t, f) for t, f in zip(times(len(frames)), frames)]]))
    dst = tmp_path / "raw.pcap"
    strip_payloads(src, dst, full=True)
    assert record_lengths(dst.read_bytes()) == [(len(f), len(f)) for f in frames]
    assert read(dst)[0] == read(src)[0]


def test_strip_refuses_mixed_link_types_and_leaves_nothing(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_ETHERNET)
    stamps = times(4)
    src = tmp_path / "mixed.pcapng"
    src.write_bytes(b"".join([shb(), idb(1), epb(0, stamps[0], frames[0]), epb(0, stamps[1], frames[1]),
                              idb(LINKTYPE_SLL2), epb(1, stamps[2], frame_for(LINKTYPE_SLL2, packets[2]))]))
    dst = tmp_path / "out.pcap"
    with pytest.raises(CaptureError) as caught:
        strip_payloads(src, dst)
    message = str(caught.value)
    assert "\n" not in message and "mixed.pcapng" in message and "276" in message and "interface_id" in message
    assert sorted(os.listdir(tmp_path)) == ["mixed.pcapng"]


def test_strip_errors(tmp_path):
    good = tmp_path / "good.pcap"
    good.write_bytes(pcap([Record(times(1)[0], frame_for(1, conversation()[3]))], 1))
    with pytest.raises(CaptureError, match="no such file"):
        strip_payloads(tmp_path / "missing.pcap", tmp_path / "out.pcap")
    with pytest.raises(CaptureError, match="cannot write .*nodir"):
        strip_payloads(good, tmp_path / "nodir" / "out.pcap")
    wifi = tmp_path / "wifi.pcapng"
    wifi.write_bytes(shb() + idb(105) + epb(0, 0, bytes(40)))
    with pytest.raises(CaptureError, match="wifi.pcapng.*105"):
        strip_payloads(wifi, tmp_path / "out.pcap")
    assert sorted(os.listdir(tmp_path)) == ["good.pcap", "wifi.pcapng"]


def test_strip_a_cut_capture_warns_and_keeps_whole_records(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_ETHERNET)
    data = pcap([Record(t, f) for t, f in zip(times(len(frames)), frames)], 1)
    src = tmp_path / "cut.pcap"
    src.write_bytes(data[:-10])
    dst = tmp_path / "out.pcap"
    warned: list[str] = []
    stats = strip_payloads(src, dst, warn=warned.append)
    assert len(warned) == 1 and "mid-record" in warned[0] and not stats.complete
    after, after_stats, after_warned = read(dst)
    assert len(after) == len(frames) - 1 and after_stats.complete and after_warned == []


def test_strip_in_place(tmp_path):
    packets, frames = packets_and_frames(LINKTYPE_ETHERNET)
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap([Record(t, f) for t, f in zip(times(len(frames)), frames)], 1))
    before, _, _ = read(path)
    strip_payloads(path, path)
    assert SECRET not in path.read_bytes()
    assert read(path)[0] == before
    assert os.listdir(tmp_path) == ["c.pcap"]


def test_strip_empty_pcapng(tmp_path):
    src = tmp_path / "empty.pcapng"
    src.write_bytes(shb())
    dst = tmp_path / "empty.pcap"
    assert strip_payloads(src, dst).packets == 0
    assert read(dst)[0] == [] and len(dst.read_bytes()) == 24


# --- the cut never changes what kaobs reads ----------------------------------------------

_tcp_packets = st.builds(
    lambda v6, sport, dport, seq, ack, flags, window, payload, tcp_options, ip_options, hop: dataclasses.replace(
        conversation(CLIENT6, SERVER6)[0] if v6 else conversation()[0], sport=sport, dport=dport, seq=seq, ack=ack,
        flags=flags, window=window, payload=payload, tcp_options=tcp_options,
        ip_options=b"" if v6 else ip_options, ext=[(0, hop)] if v6 and hop else ()),
    st.booleans(), st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 255), st.integers(0, 65535), st.binary(max_size=300), st.binary(max_size=40).map(lambda b: b[:40]),
    st.binary(max_size=40), st.binary(max_size=20))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(packet=_tcp_packets, linktype=st.sampled_from(LINKTYPES), vlans=st.integers(0, 2))
def test_headers_only_cut_reads_the_same(packet, linktype, vlans):
    """For any TCP packet, the frame cut where the writer cuts it parses to the same segment."""
    if linktype == LINKTYPE_ETHERNET:
        frame = ether(packet.ip_packet(), packet.ethertype, [(ETH_VLAN, 7)] * vlans)
    else:
        frame = frame_for(linktype, packet)
    dissect = make_dissector(linktype)
    whole = dissect(frame, 0, len(frame), 1, 0.0, len(frame))
    snap = frame_snap_end(linktype, frame)
    cut = dissect(frame, 0, snap, 1, 0.0, len(frame))
    assert whole is not None and cut == whole
    cut = segment_of(cut)
    assert (cut.seq, cut.ack, cut.payload_len) == (packet.seq, packet.ack, len(packet.payload))
    assert snap == len(frame) - len(packet.payload)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(linktype=st.sampled_from(LINKTYPES), frame=st.binary(max_size=200), wirelen=st.integers(0, 70000))
def test_headers_only_cut_of_random_frames(linktype, frame, wirelen):
    dissect = make_dissector(linktype)
    wirelen = max(wirelen, len(frame))
    snap = frame_snap_end(linktype, frame)
    assert dissect(frame, 0, snap, 1, 0.0, wirelen) == dissect(frame, 0, len(frame), 1, 0.0, wirelen)
