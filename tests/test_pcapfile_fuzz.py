"""Mangled captures: the reader gives TcpSegments, a CaptureError or a warning, nothing else.

A capture handed to kaobs may be cut off, corrupted on disk or not a capture
at all; a traceback would be a bug. Hypothesis mangles valid files built by
`tests.pcap_builders` (truncation, byte flips, random record lengths, random
bytes after a valid magic) and random frames are fed to every link-type
parser. Each test is bounded (max_examples) so the module stays fast.

The last test checks that reading streams: a 200k-packet file is read with a
small memory peak, not one proportional to the file.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sniffer.dissect import (
    dissect_frame,
    frame_header_end,
    frame_snap_end,
    make_dissector,
    make_header_key,
    supported_linktypes,
)
from sniffer.pcapfile import CaptureReader
from sniffer.records import CaptureError, TcpSegment
from tests.pcap_builders import (
    CLIENT6,
    LINKTYPE_SLL2,
    SERVER6,
    Record,
    conversation,
    epb,
    frame_for,
    idb,
    pcap,
    shb,
    spb,
    times,
)

# KAOBS_FUZZ_EXAMPLES=20000 runs a deeper, randomised search locally; CI runs a fixed, fast set.
EXAMPLES = int(os.environ.get("KAOBS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 200, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid_pcap(nsec: bool = False, big: bool = False) -> bytes:
    packets = conversation() + conversation(CLIENT6, SERVER6)
    return pcap([Record(t, frame_for(1, p)) for t, p in zip(times(len(packets)), packets)], 1, nsec=nsec, big=big)


def _valid_pcapng(big: bool = False) -> bytes:
    packets = conversation() + conversation(CLIENT6, SERVER6)
    stamps = times(len(packets))
    blocks = [shb(big=big), idb(1, big=big), idb(LINKTYPE_SLL2, tsresol=9, big=big)]
    for i, (t, p) in enumerate(zip(stamps, packets)):
        if i % 3 == 2:
            blocks.append(spb(frame_for(1, p), big=big))
        else:
            linktype = 1 if i % 3 == 0 else LINKTYPE_SLL2
            blocks.append(epb(i % 3, t, frame_for(linktype, p), tsresol=None if linktype == 1 else 9, big=big))
    # A second section in the other byte order.
    blocks += [shb(big=not big), idb(101, big=not big), epb(0, stamps[0], frame_for(101, packets[0]), big=not big)]
    return b"".join(blocks)


VALID = {
    "pcap": _valid_pcap(),
    "pcap-nsec-big": _valid_pcap(nsec=True, big=True),
    "pcapng": _valid_pcapng(),
    "pcapng-big": _valid_pcapng(big=True),
}
valid_files = st.sampled_from(sorted(VALID))


def read_mangled(path: Path, data: bytes) -> tuple[list[TcpSegment] | None, list[str]]:
    """Read `data` as a capture: segments and warnings, or None if it raised CaptureError."""
    path.write_bytes(data)
    warned: list[str] = []
    try:
        reader = CaptureReader(path, warn=warned.append)
        segments = list(reader)
    except CaptureError as error:
        message = str(error)
        assert message and "\n" not in message
        return None, warned
    frames = [s.frame for s in segments]
    assert frames == sorted(set(frames)) and (not frames or frames[0] >= 1)
    assert reader.stats.packets >= len(segments) and reader.stats.segments >= len(segments)
    damage = [message for message in warned if "analysed what was there" in message]
    assert reader.stats.complete == (not damage) and reader.stats.warnings == warned
    for s in segments:
        assert isinstance(s, TcpSegment)
        assert 0 <= s.sport < 65536 and 0 <= s.dport < 65536 and 0 <= s.window < 65536
        assert 0 <= s.seq < 2**32 and 0 <= s.ack < 2**32 and 0 <= s.flags < 256
        assert 0 <= s.payload_len < 2**32 and isinstance(s.t, float)
    for message in warned:
        assert message and "\n" not in message
    return segments, warned


@FUZZ
@given(name=valid_files, cut=st.integers(min_value=0, max_value=4000))
def test_truncation_gives_a_prefix(tmp_path, name, cut):
    data = VALID[name]
    whole, _ = read_mangled(tmp_path / "whole", data)
    cut = min(cut, len(data))
    segments, warned = read_mangled(tmp_path / "cut", data[:cut])
    if segments is None:  # only a cut inside the file/section header may be an error
        assert cut < 28
        return
    assert segments == whole[:len(segments)]
    assert len([message for message in warned if "analysed what was there" in message]) <= 1


@FUZZ
@given(name=valid_files, flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
                                        min_size=1, max_size=8))
def test_byte_flips(tmp_path, name, flips):
    data = bytearray(VALID[name])
    for position, mask in flips:
        data[position % len(data)] ^= mask
    read_mangled(tmp_path / "flipped", bytes(data))


@FUZZ
@given(magic=st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
                              b"\x34\xcd\xb2\xa1", b"\x0a\x0d\x0d\x0a"]),
       rest=st.binary(max_size=600), linktype=st.sampled_from([0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 105, 9999]))
def test_random_bytes_after_a_valid_magic(tmp_path, magic, rest, linktype):
    if magic == b"\x0a\x0d\x0d\x0a":
        head = magic + rest[:4] + b"\x4d\x3c\x2b\x1a"
    else:
        order = "<" if magic[0] in (0xD4, 0x4D, 0x34) else ">"
        head = magic + struct.pack(order + "HHiIII", 2, 4, 0, 0, 65535, linktype)[:20]
    read_mangled(tmp_path / "random", head + rest)


@FUZZ
@given(lengths=st.lists(st.one_of(st.integers(min_value=0, max_value=120), st.integers(min_value=0, max_value=2**32 - 1)),
                        min_size=1, max_size=12),
       body=st.binary(min_size=0, max_size=2000), fmt=st.sampled_from(["pcap", "pcapng"]))
def test_random_record_lengths(tmp_path, lengths, body, fmt):
    """Records whose caplen/block length fields say anything at all, over random or real packet bytes."""
    frame = frame_for(1, conversation()[3])
    out = bytearray(_valid_pcap()[:24] if fmt == "pcap" else shb() + idb(1))
    for i, length in enumerate(lengths):
        data = (frame + body)[: length % 200]
        if fmt == "pcap":
            out += struct.pack("<IIII", 1_764_000_000 + i, 0, length, len(data)) + data
        else:
            kind = (6, 3, 2, 5, 1)[i % 5]
            out += struct.pack("<II", kind, length) + data + struct.pack("<I", length)
    read_mangled(tmp_path / "lengths", bytes(out))


@settings(max_examples=EXAMPLES or 600, deadline=None, derandomize=not EXAMPLES)
@given(linktype=st.sampled_from(sorted(supported_linktypes())), frame=st.binary(max_size=120),
       prefix=st.sampled_from([b"", "ether4", "ether6", "sll2"]), wirelen=st.integers(min_value=0, max_value=70000))
def test_frame_parsers_on_random_frames(linktype, frame, prefix, wirelen):
    """Every link type's parser, the header cutter and the dedupe key on arbitrary frames."""
    if prefix == "ether4":
        frame = b"\x00" * 12 + b"\x08\x00\x45" + frame
    elif prefix == "ether6":
        frame = b"\x00" * 12 + b"\x86\xdd\x60" + frame
    elif prefix == "sll2":
        frame = b"\x08\x00" + frame
    record = dissect_frame(linktype, frame, 1, 0.0)
    assert record is None or isinstance(record, tuple) and record[7] >= 0
    padded = b"\xff" * 5 + frame + b"\xee" * 7  # dissected in place inside a larger buffer
    record_in_place = make_dissector(linktype)(padded, 5, 5 + len(frame), 1, 0.0, wirelen)
    assert (record is None) == (record_in_place is None)
    snap = frame_snap_end(linktype, frame)
    header = frame_header_end(linktype, frame)
    assert 0 <= snap <= len(frame)
    assert header is None or header == snap
    if record is not None:
        assert header is not None  # every segment has a TCP header to keep
    key = make_header_key(linktype)(padded, 5, 5 + len(frame))
    assert key is None or isinstance(key, bytes)


_MEASURE = """
import sys
from sniffer.pcapfile import CaptureReader

def peak():
    # VmHWM, not ru_maxrss: the latter carries the forking parent's peak across exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

reader = CaptureReader(sys.argv[1])
before = peak()
if sys.argv[2] == "keep":  # the control: what holding every segment costs
    held = list(reader)
    count, payload = len(held), sum(s.payload_len for s in held)
else:
    count = payload = 0
    for segment in reader:
        count += 1
        payload += segment.payload_len
print(count, payload, peak() - before, reader.stats.complete)
"""


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_reading_streams_in_constant_memory(tmp_path, fmt):
    """200k packets (about 16 MB) read in a child process whose peak memory grows by a few MB.

    The peak resident size is measured around the read (tracemalloc would make
    it ten times slower); holding the segments instead, the control, costs
    far more, which shows the measurement can see a leak.
    """
    count = 200_000
    packets = conversation()
    frames = [frame_for(1, p) for p in packets]
    if fmt == "pcap":
        head = _valid_pcap()[:24]
        chunk = b"".join(struct.pack("<IIII", 1_764_000_000, 0, len(f), len(f)) + f for f in frames)
    else:
        head = shb() + idb(1)
        chunk = b"".join(epb(0, 1_764_000_000 * 10**9, f) for f in frames)
    repeats = count // len(frames)
    path = tmp_path / f"big.{fmt}"
    path.write_bytes(head + chunk * repeats)
    size = path.stat().st_size
    assert size > 10_000_000
    root = Path(__file__).resolve().parents[1]
    results = {}
    for mode in ("stream", "keep"):
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                              cwd=root, timeout=120)
        assert done.returncode == 0, done.stderr
        seen, payload, grown, complete = done.stdout.split()
        assert int(seen) == repeats * len(frames) and complete == "True"
        assert int(payload) == repeats * sum(len(p.payload) for p in packets)
        results[mode] = int(grown)
    print(f"{fmt}: read {size} bytes, {count} packets: peak grew {results['stream']} bytes streaming, "
          f"{results['keep']} holding the segments")
    assert results["stream"] < 20_000_000 and results["stream"] < size / 2
    assert results["keep"] > 2 * results["stream"] + 20_000_000
