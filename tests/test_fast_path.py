"""The fast path (`CaptureReader.records` into `KeepaliveModel.feed_records`) against the segment path.

`kaobs analyze` feeds the model plain tuples and inlines the common case
twice (in `feed` and in `feed_records`), for speed: these tests hold the two
paths to the same result, field by field, on every recorded capture, on a
generated Postgres-like capture with keepalive and zero-window probes, and on
files built to reach the rare branches (a reused port, a flow on no server
port, IPv6, link types parsed outside the inlined Ethernet/IPv4 case).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import struct
import sys
from pathlib import Path

import pytest

from analysis.model import KeepaliveModel
from sniffer.pcapfile import CaptureReader
from sniffer.records import flow_endpoints, segment_of
from tests.pcap_builders import (
    CLIENT4,
    CLIENT6,
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    LINKTYPE_SLL2,
    SERVER4,
    SERVER6,
    Record,
    conversation,
    epb,
    frame_for,
    idb,
    pcap,
    shb,
    times,
)

ROOT = Path(__file__).resolve().parent.parent
RECORDED = sorted(ROOT.glob("captures/*.pcap")) + sorted(ROOT.glob("captures/*.pcapng"))


def state(model: KeepaliveModel) -> dict:
    return {
        "connections": [dataclasses.asdict(c) for c in model.connections],
        "ignored": model.segments_ignored,
        "first_t": model.first_t,
        "last_t": model.last_t,
    }


def both_paths(path: Path, ports=(5432,)) -> tuple[dict, dict]:
    slow = KeepaliveModel(ports).feed_all(CaptureReader(path, warn=lambda m: None))
    slow.finish()
    fast = KeepaliveModel(ports).feed_records(CaptureReader(path, warn=lambda m: None).records())
    fast.finish()
    return state(slow), state(fast)


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.name)
def test_recorded_captures_give_the_same_model(path):
    slow, fast = both_paths(path)
    assert slow["connections"], "a recorded capture with no Postgres connection"
    assert fast == slow


def _make_capture_module():
    if "make_capture" in sys.modules:
        return sys.modules["make_capture"]
    spec = importlib.util.spec_from_file_location("make_capture", ROOT / "bench" / "make_capture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_capture"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generated_traffic_gives_the_same_model_and_the_truth(tmp_path):
    path = tmp_path / "generated.pcap"
    truth = _make_capture_module().generate(str(path), 40_000, seed=7, snaplen=128)
    slow, fast = both_paths(path)
    assert fast == slow
    probes = [p for c in fast["connections"] for side in ("server", "client") for p in c[side]["probes"]]
    keepalive = {p["frame"] for p in probes if p["kind"] == "keepalive"}
    window = {p["frame"] for p in probes if p["kind"] == "window"}
    assert keepalive == {p["frame"] for p in truth["keepalive_probes"]}
    assert window == set(truth["zero_window_probes"])
    assert keepalive and window


def _write(tmp_path: Path, name: str, linktype: int, packets) -> Path:
    stamps = times(len(packets), step_ns=1_000_000)
    path = tmp_path / name
    path.write_bytes(pcap([Record(t, frame_for(linktype, p)) for t, p in zip(stamps, packets)], linktype))
    return path


@pytest.mark.parametrize("linktype", [LINKTYPE_ETHERNET, LINKTYPE_SLL2, LINKTYPE_RAW])
@pytest.mark.parametrize("client, server", [(CLIENT4, SERVER4), (CLIENT6, SERVER6)])
def test_reused_port_and_ignored_flow(tmp_path, linktype, client, server):
    # The same 4-tuple twice (a SYN after the RST starts a new connection),
    # with a conversation on port 80 (not Postgres) in between.
    packets = conversation(client, server) + conversation(client, server, dport=80) + conversation(client, server)
    path = _write(tmp_path, "reuse.pcap", linktype, packets)
    slow, fast = both_paths(path)
    assert fast == slow
    assert len(fast["connections"]) == 2
    assert fast["ignored"] == len(conversation())
    assert all(c["client"]["probes"] for c in fast["connections"]) is False  # the client never probes
    assert all(len(c["server"]["probes"]) == 1 for c in fast["connections"])


def test_records_stand_for_the_segments(tmp_path):
    path = _write(tmp_path, "one.pcap", LINKTYPE_SLL2, conversation(CLIENT6, SERVER6))
    reader = CaptureReader(path)
    assert [segment_of(r) for r in reader.records()] == list(reader)
    flow = next(iter(reader.records()))[2]
    assert flow_endpoints(flow) == (CLIENT6, 45734, SERVER6, 5432)


def _pcap_frames(path: Path) -> list[tuple[int, bytes, int]]:
    """(timestamp ns, captured bytes, wire length) of every record of a classic µs pcap."""
    data = path.read_bytes()
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, usec, caplen, wirelen = struct.unpack_from("<IIII", data, pos)
        out.append(((sec * 10**6 + usec) * 1000, data[pos + 16:pos + 16 + caplen], wirelen))
        pos += 16 + caplen
    return out


def _without_t(records) -> list[tuple]:
    return [(r[0],) + tuple(r[2:]) for r in records]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "generated.pcap"
    _make_capture_module().generate(str(path), 30_000, seed=3, snaplen=128)
    return path


@pytest.mark.parametrize("big", [False, True])
def test_pcapng_fast_path_gives_the_pcap_records(tmp_path, generated, big):
    # Several MB: blocks straddle the reader's 1 MB chunks.
    frames = _pcap_frames(generated)
    path = tmp_path / "generated.pcapng"
    path.write_bytes(shb(big=big) + idb(LINKTYPE_ETHERNET, big=big)
                     + b"".join(epb(0, t, data, wirelen=wire, big=big) for t, data, wire in frames))
    assert path.stat().st_size > 3 << 20
    from_pcap = list(CaptureReader(generated).records())
    from_pcapng = list(CaptureReader(path).records())
    assert _without_t(from_pcapng) == _without_t(from_pcap)
    assert [r[1] for r in from_pcapng] == pytest.approx([r[1] for r in from_pcap], abs=1e-6)
    slow, fast = both_paths(path)
    assert fast == slow


@pytest.mark.parametrize("cut", [1, 12, 27, 28, 40])
def test_pcapng_cut_inside_the_last_block(tmp_path, generated, cut):
    frames = _pcap_frames(generated)[:200]
    blocks = [epb(0, t, data, wirelen=wire) for t, data, wire in frames]
    path = tmp_path / "cut.pcapng"
    path.write_bytes(shb() + idb(LINKTYPE_ETHERNET) + b"".join(blocks[:-1]) + blocks[-1][:cut])
    warned: list[str] = []
    reader = CaptureReader(path, warn=warned.append)
    records = list(reader.records())
    assert len(records) == len(frames) - 1
    assert reader.stats.packets == len(frames) - 1 and not reader.stats.complete
    assert len(warned) == 1 and "mid-record" in warned[0]


def test_pcapng_second_interface_switches_duplicate_removal_on(tmp_path):
    # One interface: the inline path; a second declared later: every packet
    # seen on both is counted once, also those of the first interface.
    packets = conversation()
    stamps = times(len(packets), step_ns=1_000_000)
    first = [epb(0, t, frame_for(LINKTYPE_ETHERNET, p)) for t, p in zip(stamps[:3], packets[:3])]
    both = [epb(i, t + 1000 * i, frame_for(LINKTYPE_ETHERNET, p))
            for t, p in zip(stamps[3:], packets[3:]) for i in (0, 1)]
    path = tmp_path / "two.pcapng"
    path.write_bytes(shb() + idb(LINKTYPE_ETHERNET) + b"".join(first) + idb(LINKTYPE_ETHERNET)
                     + b"".join(both))
    reader = CaptureReader(path)
    records = list(reader.records())
    assert [r[0] for r in records] == [1, 2, 3] + list(range(4, 4 + 2 * len(packets[3:]), 2))
    assert reader.stats.duplicates == len(packets[3:])
