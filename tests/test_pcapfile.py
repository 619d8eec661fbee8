"""The capture reader against files built byte by byte from the format specifications.

Each test writes a capture with `tests.pcap_builders` (or scapy, as a second
independent writer) and checks every field of every TcpSegment read back,
frame numbers counted as Wireshark counts them (every packet record from 1).
Where tshark is installed, the same files are cross-checked against it.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kaobs.cli import run as kaobs_run
from sniffer.dissect import dissect_frame
from sniffer.pcapfile import CaptureReader, CaptureStats, read_segments, walk_records
from sniffer.records import ACK, CaptureError, TcpSegment
from tests.pcap_builders import (
    CLIENT4,
    CLIENT6,
    ETH_ARP,
    ETH_QINQ,
    ETH_VLAN,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_SLL,
    LINKTYPE_SLL2,
    OUTGOING,
    SERVER4,
    SERVER6,
    Record,
    Tcp,
    conversation,
    custom_block,
    epb,
    ether,
    frame_for,
    idb,
    ipv4,
    ipv6,
    pb,
    pcap,
    shb,
    sll,
    sll2,
    spb,
    times,
    udp,
    units_per_second,
)

LINKTYPES = [LINKTYPE_ETHERNET, LINKTYPE_SLL, LINKTYPE_SLL2, LINKTYPE_RAW]


# --- helpers ----------------------------------------------------------------------

def written_t(t_ns: int, units: int) -> int:
    """The timestamp in ns as a file of `units` per second stores it."""
    return t_ns * units // 10**9 * 10**9 // units


def expected(packets: list[Tcp], frames: list[int], stamps: list[int], units: int = 10**6) -> list[TcpSegment]:
    return [p.segment(f, written_t(t, units)) for p, f, t in zip(packets, frames, stamps)]


def read(path: Path, **kwargs) -> tuple[list[TcpSegment], CaptureStats, list[str]]:
    warned: list[str] = []
    reader = CaptureReader(path, warn=warned.append, **kwargs)
    segments = list(reader)
    return segments, reader.stats, warned


def assert_same(actual: list[TcpSegment], wanted: list[TcpSegment]) -> None:
    """Every field equal; times to within float precision at today's epoch (~0.25 us)."""
    assert [dataclasses.replace(s, t=0.0) for s in actual] == [dataclasses.replace(s, t=0.0) for s in wanted]
    for got, want in zip(actual, wanted):
        assert got.t == pytest.approx(want.t, abs=5e-7), (got, want)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def one_line_capture_error(path, needle: str = "") -> str:
    with pytest.raises(CaptureError) as caught:
        list(CaptureReader(path, warn=lambda m: pytest.fail(f"unexpected warning {m}")))
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message and message
    assert needle.lower() in message.lower(), message
    return message


# --- classic pcap ---------------------------------------------------------------------

@pytest.mark.parametrize("nsec", [False, True], ids=["usec", "nsec"])
@pytest.mark.parametrize("big", [False, True], ids=["little", "big"])
def test_pcap_magics_and_byte_orders(tmp_path, nsec, big):
    packets = conversation()
    stamps = times(len(packets))
    data = pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, packets)], 1, nsec=nsec, big=big)
    segments, stats, warned = read(write(tmp_path, "c.pcap", data))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps, 10**9 if nsec else 10**6))
    assert (stats.format, stats.packets, stats.segments, stats.complete, warned) == ("pcap", 9, 9, True, [])
    assert stats.linktypes == {1}
    if nsec:  # sub-microsecond digits survive
        assert segments[1].t - segments[0].t == pytest.approx(1.000123457, abs=5e-7)


@pytest.mark.parametrize("linktype", LINKTYPES, ids=["ether", "sll", "sll2", "raw"])
@pytest.mark.parametrize("family", [4, 6])
def test_link_types_and_ip_versions(tmp_path, linktype, family):
    packets = conversation(CLIENT6, SERVER6) if family == 6 else conversation()
    stamps = times(len(packets))
    data = pcap([Record(t, frame_for(linktype, p)) for t, p in zip(stamps, packets)], linktype)
    segments, stats, _ = read(write(tmp_path, "c.pcap", data))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))
    assert stats.duplicates == 0  # cooked captures are deduplicated, but nothing here is a copy


@pytest.mark.parametrize("linktype, options", [
    (LINKTYPE_NULL, {"family6": 10}), (LINKTYPE_NULL, {"big": True}), (LINKTYPE_NULL, {"family6": 24}),
    (LINKTYPE_NULL, {"family6": 28, "big": True}), (LINKTYPE_NULL, {"family6": 30}),
    (LINKTYPE_LOOP, {}), (LINKTYPE_LOOP, {"family6": 10}), (12, {}), (14, {}),
], ids=["null-linux-af", "null-big-endian-host", "null-netbsd", "null-freebsd-big", "null-macos", "loop", "loop-linux-af",
        "dlt12", "dlt14"])
def test_loopback_and_raw_variants(tmp_path, linktype, options):
    packets = conversation() + conversation(CLIENT6, SERVER6)
    stamps = times(len(packets))
    data = pcap([Record(t, frame_for(linktype, p, **options)) for t, p in zip(stamps, packets)], linktype)
    segments, _, _ = read(write(tmp_path, "lo.pcap", data))
    assert_same(segments, expected(packets, list(range(1, 19)), stamps))


@pytest.mark.parametrize("linktype, family", [(LINKTYPE_IPV4, 4), (LINKTYPE_IPV6, 6)])
def test_raw_ipv4_and_ipv6_link_types(tmp_path, linktype, family):
    packets = conversation(CLIENT6, SERVER6) if family == 6 else conversation()
    stamps = times(len(packets))
    segments, _, _ = read(write(tmp_path, "raw.pcap", pcap([Record(t, frame_for(linktype, p))
                                                             for t, p in zip(stamps, packets)], linktype)))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))


def test_kuznetzov_pcap(tmp_path):
    """The patched-libpcap format: 24-byte record headers."""
    packets = conversation()
    stamps = times(len(packets))
    data = pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, packets)], 1, kuznetzov=True)
    segments, stats, warned = read(write(tmp_path, "kuz.pcap", data))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))
    assert stats.complete and warned == []


def test_ipv6_extension_headers(tmp_path):
    hop_by_hop = (0, b"\x05\x02\x00\x00")  # router alert, padded to 8 bytes
    routing = (43, b"\x00\x00" + b"\x00" * 4 + bytes(16))  # type 0, no segments left, one address
    dest_opts = (60, b"\x01\x0a" + bytes(10))  # PadN, then 6 more bytes to 16
    atomic_fragment = (44, b"\x00\x00\x00\x00\x12\x34")  # offset 0, M=0: a whole packet
    variants = [(hop_by_hop,), (hop_by_hop, routing, dest_opts), (dest_opts, atomic_fragment)]
    packets = []
    for i, ext in enumerate(variants):
        p = conversation(CLIENT6, SERVER6)[3]
        packets.append(dataclasses.replace(p, ext=ext, seq=p.seq + i))
    stamps = times(len(packets))
    data = pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, packets)], 1)
    segments, _, _ = read(write(tmp_path, "ext.pcap", data))
    assert_same(segments, expected(packets, [1, 2, 3], stamps))
    assert all(s.payload_len == len(packets[0].payload) for s in segments)


def test_ipv4_options(tmp_path):
    packets = conversation()
    record_route = b"\x07\x0b\x04" + bytes(8)  # 11 bytes, padded to 12
    packets = [dataclasses.replace(p, ip_options=record_route if i % 2 else b"\x01" * 40)
               for i, p in enumerate(packets)]
    stamps = times(len(packets))
    data = pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, packets)], 1)
    segments, _, _ = read(write(tmp_path, "opts.pcap", data))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))


@pytest.mark.parametrize("vlans", [
    [(ETH_VLAN, 100)],
    [(ETH_QINQ, 200), (ETH_VLAN, 100)],
    [(ETH_VLAN, 1), (ETH_VLAN, 2), (ETH_VLAN, 3)],
], ids=["802.1Q", "QinQ", "three-tags"])
@pytest.mark.parametrize("family", [4, 6])
def test_vlan_tags(tmp_path, vlans, family):
    packets = conversation(CLIENT6, SERVER6) if family == 6 else conversation()
    stamps = times(len(packets))
    data = pcap([Record(t, ether(p.ip_packet(), p.ethertype, vlans)) for t, p in zip(stamps, packets)], 1)
    segments, _, _ = read(write(tmp_path, "vlan.pcap", data))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))


@pytest.mark.parametrize("linktype, family, link_len", [
    (LINKTYPE_ETHERNET, 4, 14), (LINKTYPE_ETHERNET, 6, 14), (LINKTYPE_SLL2, 4, 20), (LINKTYPE_RAW, 6, 0),
])
def test_snaplen_truncation(tmp_path, linktype, family, link_len):
    """Payload length comes from the IP header; a frame cut inside the TCP base header is skipped."""
    packets = [dataclasses.replace(p, ip_options=b"\x01\x01\x01\x01" if family == 4 and i == 4 else b"")
               for i, p in enumerate(conversation(CLIENT6, SERVER6) if family == 6 else conversation())]
    stamps = times(len(packets))
    frames = [frame_for(linktype, p) for p in packets]
    ip_header = [40 if family == 6 else 20 + len(p.ip_options) for p in packets]
    for snaplen in range(0, max(map(len, frames)) + 2):
        data = pcap([Record(t, f) for t, f in zip(stamps, frames)], linktype, snaplen=snaplen)
        segments, stats, warned = read(write(tmp_path, f"snap{snaplen}.pcap", data))
        whole = [i for i in range(len(packets)) if link_len + ip_header[i] + 20 <= snaplen]
        assert_same(segments, expected([packets[i] for i in whole], [i + 1 for i in whole], [stamps[i] for i in whole]))
        assert (stats.packets, stats.segments, stats.complete) == (9, len(whole), True)
        # What was cut is counted and said, with a snaplen that keeps every TCP header whole.
        assert stats.cut_by_snaplen == 9 - len(whole)
        if whole == list(range(9)):
            assert warned == []
        else:
            [warning] = warned
            assert f"{9 - len(whole)} packet(s) were cut by the capture's snaplen" in warning
            needed = max(link_len + ip_header[i] + 60 for i in range(9) if i not in whole)
            assert stats.snaplen_needed >= needed and f"tcpdump -s {stats.snaplen_needed})" in warning
            assert stats.snaplen_needed <= 128


def test_non_tcp_is_skipped_but_numbered(tmp_path):
    tcp = conversation()[:3]
    arp = ether(bytes(28), ETH_ARP)
    udp4 = ether(ipv4(CLIENT4, SERVER4, udp(5353, 53, b"question"), proto=17))
    icmp6 = ether(ipv6(CLIENT6, SERVER6, b"\x80\x00\x00\x00" + bytes(4), nh=58), 0x86DD)
    unknown = ether(b"\x45" + bytes(30), 0x88CC)  # LLDP ethertype with an IPv4-looking body
    frames = [arp, frame_for(1, tcp[0]), udp4, icmp6, frame_for(1, tcp[1]), unknown, frame_for(1, tcp[2])]
    stamps = times(len(frames))
    data = pcap([Record(t, f) for t, f in zip(stamps, frames)], 1)
    segments, stats, _ = read(write(tmp_path, "mixed.pcap", data))
    assert_same(segments, expected(tcp, [2, 5, 7], [stamps[1], stamps[4], stamps[6]]))
    assert (stats.packets, stats.segments) == (7, 3)


def test_fragments(tmp_path):
    """First fragment: a segment with that fragment's bytes (as tshark without reassembly); later ones skipped."""
    whole = conversation()[3]
    tcp_bytes = whole.tcp_header() + whole.payload
    first = ipv4(CLIENT4, SERVER4, tcp_bytes[:24], df=False, mf=True, ident=77)
    second = ipv4(CLIENT4, SERVER4, tcp_bytes[24:], df=False, frag_offset=24, ident=77)
    # A non-first fragment whose bytes look like a TCP header must not be read as one.
    decoy = ipv4(CLIENT4, SERVER4, tcp_bytes, df=False, frag_offset=1480, ident=78)
    v6_first = ipv6(CLIENT6, SERVER6, tcp_bytes[:24], ext=[(44, b"\x00\x01\x00\x00\x00\x09")])
    v6_second = ipv6(CLIENT6, SERVER6, tcp_bytes, ext=[(44, b"\x00\x18\x00\x00\x00\x09")])
    frames = [ether(first), ether(second), ether(decoy), ether(v6_first, 0x86DD), ether(v6_second, 0x86DD)]
    stamps = times(len(frames))
    segments, stats, _ = read(write(tmp_path, "frag.pcap", pcap([Record(t, f) for t, f in zip(stamps, frames)], 1)))
    assert [(s.frame, s.seq, s.payload_len) for s in segments] == [(1, whole.seq, 4), (4, whole.seq, 4)]
    assert (stats.packets, stats.segments) == (5, 2)


def test_ethernet_padding_and_zero_ip_length(tmp_path):
    """A short frame padded to 60 bytes keeps payload 0; a zero IPv4 length (TSO) falls back to the wire length."""
    probe = conversation()[6]
    padded = frame_for(1, probe) + bytes(6)
    tso = dataclasses.replace(conversation()[4], payload=bytes(3000))
    tso_frame = bytearray(frame_for(1, tso))
    tso_frame[16:18] = b"\x00\x00"
    stamps = times(2)
    data = pcap([Record(stamps[0], padded), Record(stamps[1], bytes(tso_frame[:200]), wirelen=len(tso_frame))], 1,
                snaplen=200)
    segments, _, _ = read(write(tmp_path, "pad.pcap", data))
    assert [s.payload_len for s in segments] == [0, 3000]


# --- pcapng ---------------------------------------------------------------------------

def test_pcapng_epb_spb_pb_and_other_blocks(tmp_path):
    packets = conversation()
    stamps = times(len(packets))
    f = [frame_for(1, p) for p in packets]
    blocks = [shb(comment=b"built by hand"), idb(1), custom_block(4, b"\x00" * 4),  # empty name resolution
              epb(0, stamps[0], f[0], comment=b"first"), epb(0, stamps[1], f[1]),
              pb(0, stamps[2], f[2]),
              custom_block(5, struct.pack("<III", 0, 0, 0)),  # interface statistics
              *[epb(0, t, x) for t, x in zip(stamps[3:], f[3:])]]
    segments, stats, warned = read(write(tmp_path, "c.pcapng", b"".join(blocks)))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))
    assert (stats.format, stats.packets, stats.complete, warned) == ("pcapng", 9, True, [])


def test_pcapng_simple_packet_blocks_are_counted_not_timed(tmp_path):
    """SPBs carry no timestamp: their packets are numbered and counted, their flows noted, never analysed."""
    packets = conversation()
    stamps = times(2)
    f = [frame_for(1, p) for p in packets]
    snap = 60
    blocks = [shb(), idb(1, snaplen=snap), epb(0, stamps[0], f[0]),
              *[spb(x[:snap], wirelen=len(x)) for x in f[1:8]], epb(0, stamps[1], f[8])]
    segments, stats, warned = read(write(tmp_path, "spb.pcapng", b"".join(blocks)))
    assert [s.frame for s in segments] == [1, 9]
    assert (stats.packets, stats.segments, stats.untimed) == (9, 2, 7)
    assert segments[1].t == pytest.approx(stamps[1] / 1e9, abs=5e-7)
    # The data is cut at the IDB's snaplen; the headers are there, and name both directions of the flow.
    assert stats.untimed_flows == {dissect_frame(1, x)[2] for x in f[1:8]} and len(stats.untimed_flows) == 2
    [warning] = warned
    assert "7 packet(s) in pcapng Simple Packet Blocks" in warning and "no timestamp" in warning


def test_pcapng_interfaces_with_different_link_types_and_resolutions(tmp_path):
    packets = conversation() + conversation(CLIENT6, SERVER6)
    stamps = times(len(packets))
    interfaces = [  # (linktype, if_tsresol)
        (LINKTYPE_ETHERNET, None), (LINKTYPE_SLL2, 9), (LINKTYPE_RAW, 0x80 | 20), (LINKTYPE_SLL, 3)]
    blocks = [shb(), *[idb(lt, tsresol=r) for lt, r in interfaces]]
    want = []
    for i, (p, t) in enumerate(zip(packets, stamps)):
        iface = i % len(interfaces)
        linktype, resol = interfaces[iface]
        blocks.append(epb(iface, t, frame_for(linktype, p), tsresol=resol))
        want.append(p.segment(i + 1, written_t(t, units_per_second(resol))))
    segments, stats, _ = read(write(tmp_path, "multi.pcapng", b"".join(blocks)))
    assert_same(segments, want)
    assert stats.linktypes == {1, 101, 113, 276}
    # Millisecond resolution (if_tsresol 3) really drops the sub-millisecond digits.
    assert segments[3].t == pytest.approx(stamps[3] // 10**6 / 1e3, abs=5e-7)


def test_pcapng_tsoffset(tmp_path):
    p = conversation()[0]
    blocks = [shb(), idb(1, tsoffset=1_700_000_000), epb(0, 2_500_000_000, frame_for(1, p))]
    [segment], _, _ = read(write(tmp_path, "off.pcapng", b"".join(blocks)))
    assert segment.t == pytest.approx(1_700_000_002.5)


@pytest.mark.parametrize("first_big", [False, True], ids=["little-then-big", "big-then-little"])
def test_pcapng_second_section_other_byte_order(tmp_path, first_big):
    packets = conversation()
    stamps = times(len(packets))
    second_big = not first_big
    blocks = [shb(big=first_big), idb(LINKTYPE_SLL2, tsresol=9, big=first_big), idb(1, big=first_big)]
    blocks += [epb(i % 2, t, frame_for(LINKTYPE_SLL2 if i % 2 == 0 else 1, p),
                   tsresol=9 if i % 2 == 0 else None, big=first_big)
               for i, (t, p) in enumerate(zip(stamps[:4], packets[:4]))]
    # The new section declares its interfaces afresh: interface 0 is now raw IP, microseconds.
    blocks += [shb(big=second_big), idb(LINKTYPE_RAW, big=second_big)]
    blocks += [epb(0, t, frame_for(LINKTYPE_RAW, p), big=second_big) for t, p in zip(stamps[4:], packets[4:])]
    segments, stats, warned = read(write(tmp_path, "two.pcapng", b"".join(blocks)))
    units = [10**9, 10**6, 10**9, 10**6] + [10**6] * 5
    assert_same(segments, [p.segment(i + 1, written_t(t, u)) for i, (p, t, u) in enumerate(zip(packets, stamps, units))])
    assert (stats.packets, stats.complete, warned, stats.linktypes) == (9, True, [], {1, 101, 276})


def test_pcapng_packet_on_undeclared_interface_warns(tmp_path):
    p = conversation()[0]
    blocks = [shb(), idb(1), epb(0, times(1)[0], frame_for(1, p)), epb(3, times(1)[0], frame_for(1, p))]
    segments, stats, warned = read(write(tmp_path, "undeclared.pcapng", b"".join(blocks)))
    assert [s.frame for s in segments] == [1]
    assert stats.complete is False and len(warned) == 1 and "interface 3" in warned[0]


# --- scapy as a second, independent writer ----------------------------------------------

@pytest.mark.parametrize("ng", [False, True], ids=["wrpcap", "PcapNgWriter"])
def test_files_written_by_scapy(tmp_path, ng):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.utils import PcapNgWriter, wrpcap

    built = [
        Ether() / IP(src="10.1.0.1", dst="10.1.0.2", options=b"\x01\x01\x01\x01") / TCP(sport=5432, dport=40000, seq=7, ack=9, flags="PA", window=300) / (b"x" * 13),
        Ether() / Dot1Q(vlan=5) / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / TCP(sport=1, dport=5432, seq=2**32 - 1, flags="S", window=65535, options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]),
        Ether() / IP(src="10.1.0.2", dst="10.1.0.1") / TCP(sport=40000, dport=5432, seq=9, ack=20, flags="FA", window=0),
    ]
    for i, packet in enumerate(built):
        packet.time = 1_764_000_000 + i + 0.25
    path = tmp_path / ("scapy.pcapng" if ng else "scapy.pcap")
    if ng:
        with PcapNgWriter(str(path)) as writer:
            for packet in built:
                writer.write(packet)
    else:
        wrpcap(str(path), built)
    segments, stats, _ = read(path)
    assert stats.format == ("pcapng" if ng else "pcap")
    assert len(segments) == 3
    for frame, (segment, packet) in enumerate(zip(segments, built), 1):
        ip = packet[IP] if IP in packet else packet[IPv6]
        tcp = packet[TCP]
        assert (segment.frame, segment.src, segment.dst, segment.sport, segment.dport) == (frame, ip.src, ip.dst, tcp.sport, tcp.dport)
        assert (segment.seq, segment.ack, segment.flags, segment.window) == (tcp.seq, tcp.ack, int(tcp.flags), tcp.window)
        assert segment.payload_len == len(tcp.payload)
        assert segment.t == pytest.approx(float(packet.time), abs=1e-6)


# --- duplicate copies from `tcpdump -i any` ---------------------------------------------

def test_sll2_copies_on_veth_and_bridge_count_once(tmp_path):
    """One packet seen on the veth and on the bridge 15 us later is one segment; the same
    headers a second later (a repeated keepalive probe, a retransmission) are a new one."""
    convo = conversation()
    probe, answer = convo[6], convo[7]
    t0 = times(1)[0]
    veth, bridge = 7, 3
    records = []
    for k in range(3):  # the probe repeated each second, unanswered, identical headers (IP ID too)
        t = t0 + k * 1_000_000_000
        records += [Record(t, sll2(probe.ip_packet(), ifindex=bridge, pkttype=OUTGOING)),
                    Record(t + 15_000, sll2(probe.ip_packet(), ifindex=veth, pkttype=OUTGOING))]
    t = t0 + 3_000_000_000
    records += [Record(t, sll2(answer.ip_packet(), ifindex=veth)),
                Record(t + 9_000_000, sll2(answer.ip_packet(), ifindex=bridge))]
    path = write(tmp_path, "any.pcap", pcap(records, LINKTYPE_SLL2))
    segments, stats, _ = read(path)
    assert [s.frame for s in segments] == [1, 3, 5, 7]
    assert (stats.packets, stats.duplicates) == (8, 4)
    assert [s.seq for s in segments] == [probe.seq] * 3 + [answer.seq]
    everything, stats_all, _ = read(path, dedupe=False)
    assert len(everything) == 8 and stats_all.duplicates == 0


def test_sll2_same_interface_twice_is_not_a_copy(tmp_path):
    """IPv6 has no IP ID: a fast retransmission on the same interface 2 ms later has identical headers."""
    p = conversation(CLIENT6, SERVER6)[3]
    t0 = times(1)[0]
    records = [Record(t0, sll2(p.ip_packet(), 0x86DD, ifindex=4)),
               Record(t0 + 2_000_000, sll2(p.ip_packet(), 0x86DD, ifindex=4))]
    segments, stats, _ = read(write(tmp_path, "rexmit.pcap", pcap(records, LINKTYPE_SLL2)))
    assert len(segments) == 2 and stats.duplicates == 0


def test_sll2_router_changes_ttl_still_a_copy(tmp_path):
    """A packet routed between two interfaces of the host: TTL and checksum differ, the rest is equal."""
    p = conversation()[3]
    t0 = times(1)[0]
    records = [Record(t0, sll2(p.ip_packet(), ifindex=2)),
               Record(t0 + 30_000, sll2(dataclasses.replace(p, ttl=63).ip_packet(), ifindex=5))]
    segments, stats, _ = read(write(tmp_path, "routed.pcap", pcap(records, LINKTYPE_SLL2)))
    assert len(segments) == 1 and stats.duplicates == 1


def test_sll_v1_copies_count_once(tmp_path):
    convo = conversation()
    probe = convo[6]
    t0 = times(1)[0]
    records = []
    for k in range(2):
        t = t0 + k * 2_000_000_000
        records += [Record(t, sll(probe.ip_packet(), pkttype=OUTGOING)), Record(t + 20_000, sll(probe.ip_packet()))]
    records.append(Record(t0 + 5_000_000_000, sll(convo[7].ip_packet())))
    segments, stats, _ = read(write(tmp_path, "any1.pcap", pcap(records, LINKTYPE_SLL)))
    assert [s.frame for s in segments] == [1, 3, 5]
    assert stats.duplicates == 2


def test_ethernet_is_not_deduplicated_by_default(tmp_path):
    p = conversation()[6]
    t0 = times(1)[0]
    data = pcap([Record(t0, frame_for(1, p)), Record(t0 + 1000, frame_for(1, p))], 1)
    path = write(tmp_path, "eth.pcap", data)
    assert len(read(path)[0]) == 2
    assert len(read(path, dedupe=True)[0]) == 1


def test_pcapng_any_capture_dedupes_across_interfaces(tmp_path):
    """dumpcap -i any writes pcapng with one SLL2 interface: the same rule applies."""
    p = conversation()[6]
    t0 = times(1)[0]
    blocks = [shb(), idb(LINKTYPE_SLL2, tsresol=9),
              epb(0, t0, sll2(p.ip_packet(), ifindex=3), tsresol=9),
              epb(0, t0 + 5000, sll2(p.ip_packet(), ifindex=8), tsresol=9),
              epb(0, t0 + 10**9, sll2(p.ip_packet(), ifindex=3), tsresol=9)]
    segments, stats, _ = read(write(tmp_path, "any.pcapng", b"".join(blocks)))
    assert [s.frame for s in segments] == [1, 3] and stats.duplicates == 1


def _two_interface_capture(linktypes=(LINKTYPE_ETHERNET, LINKTYPE_ETHERNET)) -> tuple[bytes, list[Tcp], list[int]]:
    """A server probing a dead client, captured by dumpcap on the veth and on the bridge."""
    c, s = 1000, 900000
    packets = [Tcp(CLIENT4, SERVER4, 45734, 5432, c, 0, 0x02, 64240, ident=1),
               Tcp(SERVER4, CLIENT4, 5432, 45734, s, c + 1, 0x12, 65160, ident=0),
               Tcp(CLIENT4, SERVER4, 45734, 5432, c + 1, s + 1, ACK, 502, ident=2)]
    offsets = [0.0, 0.0001, 0.0002]
    for i, t in enumerate([3.0, 5.0, 7.0]):  # unanswered probes: identical but for the IP ID
        packets.append(Tcp(SERVER4, CLIENT4, 5432, 45734, s, c + 1, ACK, 509, ident=10 + i))
        offsets.append(t)
    packets.append(Tcp(SERVER4, CLIENT4, 5432, 45734, s + 1, c + 1, 0x14, 509, ident=20))
    offsets.append(9.0)
    stamps = [times(1)[0] + int(o * 1e9) for o in offsets]
    blocks = [shb(), idb(linktypes[0]), idb(linktypes[1])]
    for p, t in zip(packets, stamps):
        blocks += [epb(0, t, frame_for(linktypes[0], p)), epb(1, t + 20_000, frame_for(linktypes[1], p))]
    return b"".join(blocks), packets, stamps


@pytest.mark.parametrize("linktypes", [(1, 1), (1, LINKTYPE_SLL2), (LINKTYPE_SLL2, 1), (LINKTYPE_RAW, 1)],
                         ids=["ether+ether", "ether+sll2", "sll2+ether", "raw+ether"])
def test_pcapng_one_packet_on_two_interfaces_counts_once(tmp_path, linktypes):
    data, packets, stamps = _two_interface_capture(linktypes)
    path = write(tmp_path, "two.pcapng", data)
    segments, stats, _ = read(path)
    assert_same(segments, expected(packets, list(range(1, 14, 2)), stamps))
    assert (stats.packets, stats.duplicates) == (14, 7)
    assert len(read(path, dedupe=False)[0]) == 14


def test_pcapng_interfaces_written_out_of_time_order(tmp_path):
    """dumpcap flushes each interface's buffer in turn: here the bridge's copies follow
    100 ms of the veth's packets, so the file goes back in time; each copy is still one."""
    packets = conversation()
    stamps = [times(1)[0] + i * 20_000_000 for i in range(len(packets))]
    blocks = [shb(), idb(1), idb(1)]
    blocks += [epb(0, t, frame_for(1, p)) for t, p in zip(stamps, packets)]
    blocks += [epb(1, t + 15_000, frame_for(1, p)) for t, p in zip(stamps, packets)]
    segments, stats, _ = read(write(tmp_path, "late.pcapng", b"".join(blocks)))
    assert_same(segments, expected(packets, list(range(1, 10)), stamps))
    assert stats.duplicates == 9


def test_pcapng_single_interface_repeats_are_kept(tmp_path):
    """One interface: identical headers 1 us apart are two packets (same as in a classic pcap)."""
    p = conversation(CLIENT6, SERVER6)[6]
    t0 = times(1)[0]
    path = write(tmp_path, "one.pcapng", b"".join([shb(), idb(1), epb(0, t0, frame_for(1, p)),
                                                    epb(0, t0 + 1000, frame_for(1, p))]))
    assert len(read(path)[0]) == 2
    assert len(read(path, dedupe=True)[0]) == 2  # the interface is known: never a copy of itself


def test_cli_two_interface_pcapng_gives_the_verdict_of_one(tmp_path, capsys):
    data, _, _ = _two_interface_capture()
    expect = ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=2",
              "--expect", "tcp_keepalives_count=3", "--format", "json"]
    code, out, err = cli(capsys, "analyze", str(write(tmp_path, "two.pcapng", data)), *expect)
    assert code == 0, err
    doc = json.loads(out)
    [conn] = doc["connections"]
    assert conn["verdict"] == "match" and conn["sides"]["server"]["keepalive_probes"] == 3
    assert doc["input"]["duplicates_dropped"] == 7


# --- errors and damaged files -------------------------------------------------------------

def test_errors_are_one_line_capture_errors(tmp_path):
    good = pcap([Record(times(1)[0], frame_for(1, conversation()[0]))], 1)
    cases = {
        "missing": (tmp_path / "nope.pcap", "no such file"),
        "directory": (tmp_path, "directory"),
        "empty": (write(tmp_path, "empty.pcap", b""), "empty"),
        "text": (write(tmp_path, "notes.pcap", b"hello, this is not a capture\n"), "not a pcap"),
        "gzip of text": (write(tmp_path, "notes.gz", gzip.compress(b"hello, not a capture\n")), "gzip-compressed"),
        "ieee80211": (write(tmp_path, "wifi.pcap", pcap([], 105)), "105"),
        "ieee80211 in pcapng": (write(tmp_path, "wifi.pcapng", shb() + idb(105)), "105"),
        "cut pcap header": (write(tmp_path, "short.pcap", good[:20]), "file header"),
        "cut pcapng header": (write(tmp_path, "short.pcapng", shb()[:10]), "section header"),
        "pcapng cut after the byte-order magic": (write(tmp_path, "short2.pcapng", shb()[:20]), "section header"),
        "pcapng without byte-order magic": (write(tmp_path, "bad.pcapng", b"\x0a\x0d\x0d\x0a" + bytes(24)), "not a pcap"),
    }
    for what, (path, needle) in cases.items():
        message = one_line_capture_error(path, needle)
        assert Path(path).name in message, (what, message)


def test_unknown_link_type_message_names_it(tmp_path):
    message = one_line_capture_error(write(tmp_path, "wifi.pcap", pcap([], 105)), "802.11")
    assert "Ethernet" in message  # says what is readable


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_cut_mid_record_keeps_whole_packets_before(tmp_path, fmt):
    packets = conversation()
    stamps = times(len(packets))
    frames = [frame_for(1, p) for p in packets]
    if fmt == "pcap":
        data = pcap([Record(t, f) for t, f in zip(stamps, frames)], 1)
        last_start = len(data) - 16 - len(frames[-1])
    else:
        last = epb(0, stamps[-1], frames[-1])
        data = b"".join([shb(), idb(1), *[epb(0, t, f) for t, f in zip(stamps[:-1], frames[:-1])], last])
        last_start = len(data) - len(last)
    wanted = expected(packets[:-1], list(range(1, 9)), stamps[:-1])
    for cut in range(last_start + 1, len(data)):
        segments, stats, warned = read(write(tmp_path, f"cut{cut}", data[:cut]))
        assert_same(segments, wanted)
        assert stats.complete is False and stats.packets == 8
        assert len(warned) == 1 and "mid-record" in warned[0] and "after 8 packets" in warned[0]
        assert stats.warnings == warned
    segments, stats, warned = read(write(tmp_path, "whole", data))
    assert len(segments) == 9 and stats.complete and warned == []


def test_cut_at_a_record_boundary_is_complete(tmp_path):
    packets = conversation()[:3]
    data = pcap([Record(t, frame_for(1, p)) for t, p in zip(times(3), packets)], 1)
    segments, stats, warned = read(write(tmp_path, "header-only.pcap", data[:24]))
    assert segments == [] and stats.complete and warned == []


def test_corrupt_pcap_record_length(tmp_path):
    packets = conversation()
    stamps = times(len(packets))
    data = bytearray(pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, packets)], 1))
    # Record 5's caplen (after 4 records) becomes absurd.
    offset = 24 + sum(16 + len(frame_for(1, p)) for p in packets[:4])
    struct.pack_into("<I", data, offset + 8, 0x7FFFFFF0)
    segments, stats, warned = read(write(tmp_path, "corrupt.pcap", bytes(data)))
    assert_same(segments, expected(packets[:4], [1, 2, 3, 4], stamps[:4]))
    assert stats.complete is False and len(warned) == 1 and "corrupt record length" in warned[0]


@pytest.mark.parametrize("damage", ["not-multiple-of-4", "too-small", "trailer-disagrees", "huge", "caplen-beyond-block"])
def test_corrupt_pcapng_block_length(tmp_path, damage):
    packets = conversation()
    stamps = times(len(packets))
    head = shb() + idb(1)
    blocks = [epb(0, t, frame_for(1, p)) for t, p in zip(stamps, packets)]
    bad = bytearray(blocks[5])
    if damage == "not-multiple-of-4":
        struct.pack_into("<I", bad, 4, len(bad) + 2)
    elif damage == "too-small":
        struct.pack_into("<I", bad, 4, 8)
    elif damage == "trailer-disagrees":
        struct.pack_into("<I", bad, len(bad) - 4, len(bad) + 4)
    elif damage == "huge":
        struct.pack_into("<I", bad, 4, 0x7FFFFFFC)
    else:
        struct.pack_into("<I", bad, 20, len(bad))
    data = head + b"".join(blocks[:5]) + bytes(bad) + b"".join(blocks[6:])
    segments, stats, warned = read(write(tmp_path, "corrupt.pcapng", data))
    assert_same(segments, expected(packets[:5], [1, 2, 3, 4, 5], stamps[:5]))
    assert stats.complete is False and len(warned) == 1 and "after 5 packets" in warned[0]


def test_read_segments_and_default_warning(tmp_path):
    data = pcap([Record(t, frame_for(1, p)) for t, p in zip(times(9), conversation())], 1)
    path = write(tmp_path, "cut.pcap", data[:-5])
    with pytest.warns(UserWarning, match="mid-record"):
        assert len(list(read_segments(path))) == 8
    with pytest.raises(CaptureError):
        read_segments(tmp_path / "missing.pcap")  # raises now, not at the first next()


def test_reader_can_be_iterated_twice(tmp_path):
    path = write(tmp_path, "c.pcap", pcap([Record(t, frame_for(1, p)) for t, p in zip(times(9), conversation())], 1))
    reader = CaptureReader(path)
    assert list(reader) == list(reader)
    assert reader.stats.packets == 9


def test_walk_records_gives_every_record_with_its_bytes(tmp_path):
    packets = conversation()
    stamps = times(len(packets))
    frames = [frame_for(LINKTYPE_SLL2, p) for p in packets]
    path = write(tmp_path, "w.pcapng", b"".join([shb(), idb(LINKTYPE_SLL2, tsresol=9),
                                                  *[epb(0, t, f, tsresol=9) for t, f in zip(stamps, frames)]]))
    seen = []

    def handler_for(linktype, units):
        seen.append((linktype, units))
        return lambda buf, start, end, frame, t, wirelen: (frame, bytes(buf[start:end]), wirelen, t)

    items, stats = walk_records(path, handler_for)
    got = list(items)
    assert seen == [(LINKTYPE_SLL2, 10**9)]
    assert [(f, data, w) for f, data, w, _ in got] == [(i + 1, fr, len(fr)) for i, fr in enumerate(frames)]
    assert [t for *_, t in got] == pytest.approx([s / 1e9 for s in stamps], abs=5e-7)
    assert stats.packets == 9


# --- the CLI on these files (tests/test_cli.py covers missing, empty, text, directory, link 147, a cut tail) ---

def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = kaobs_run(list(args))
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, make, needle", [
    ("c.pcap.gz", lambda: gzip.compress(b"not a capture, compressed"), "gzip-compressed"),
    ("short.pcap", lambda: pcap([], 1)[:13], "file header"),
    ("wifi.pcapng", lambda: shb() + idb(105) + epb(0, 0, bytes(40)), "105"),
    ("bad.pcapng", lambda: b"\x0a\x0d\x0d\x0a" + bytes(40), "not a pcap"),
])
def test_cli_unreadable_capture_exit_2_one_line(tmp_path, capsys, name, make, needle):
    code, out, err = cli(capsys, "analyze", str(write(tmp_path, name, make())))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kaobs: error: ") and needle in lines[0], err
    assert name in lines[0] and "Traceback" not in err


def test_cli_counts_sll2_copies_once(tmp_path, capsys):
    packets = conversation()
    stamps = times(len(packets))
    records = []
    for t, p in zip(stamps, packets):
        records += [Record(t, sll2(p.ip_packet(), ifindex=3)), Record(t + 12_000, sll2(p.ip_packet(), ifindex=9))]
    code, out, err = cli(capsys, "analyze", str(write(tmp_path, "any.pcap", pcap(records, LINKTYPE_SLL2))), "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["input"]["packets"], doc["input"]["tcp_segments"], doc["input"]["duplicates_dropped"]) == (18, 9, 9)
    [conn] = doc["connections"]
    assert conn["client"] == f"{CLIENT4}:45734" and conn["server"] == f"{SERVER4}:5432"


# --- tshark, where installed --------------------------------------------------------------

TSHARK = shutil.which("tshark")
FIELDS = ["frame.number", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst", "tcp.dstport",
          "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "tcp.window_size_value", "tcp.len", "frame.time_epoch",
          "ip.ttl", "ipv6.hlim", "ip.id"]


def tshark_segments(path: Path) -> list[TcpSegment]:
    done = subprocess.run(
        [TSHARK, "-n", "-r", str(path), "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE",
         "-o", "tcp.analyze_sequence_numbers:FALSE", "-Y", "tcp", "-T", "fields", "-E", "occurrence=f",
         *[a for f in FIELDS for a in ("-e", f)]],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "malformed" not in done.stdout.lower()
    result = []
    for line in done.stdout.splitlines():
        frame, src4, src6, sport, dst4, dst6, dport, seq, ack, flags, window, length, t, ttl, hlim, ip_id = line.split("\t")
        result.append(TcpSegment(int(frame), float(t), src4 or src6, int(sport), dst4 or dst6, int(dport), int(seq),
                                 int(ack or 0), int(flags, 16), int(window), int(length) if length else -1,
                                 int(ttl or hlim), int(ip_id, 16) if ip_id else 0))
    return result


def tshark_cases(tmp_path: Path) -> dict[str, Path]:
    c4, c6 = conversation(), conversation(CLIENT6, SERVER6)
    stamps = times(18)
    both = c4 + c6
    files = {
        "ether-usec": pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, both)], 1),
        "ether-nsec-big": pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, both)], 1, nsec=True, big=True),
        "sll-v1": pcap([Record(t, frame_for(LINKTYPE_SLL, p)) for t, p in zip(stamps, both)], LINKTYPE_SLL),
        "sll-v2": pcap([Record(t, frame_for(LINKTYPE_SLL2, p)) for t, p in zip(stamps, both)], LINKTYPE_SLL2),
        "raw": pcap([Record(t, frame_for(LINKTYPE_RAW, p)) for t, p in zip(stamps, both)], LINKTYPE_RAW),
        "null": pcap([Record(t, frame_for(LINKTYPE_NULL, p, family6=30)) for t, p in zip(stamps, both)], LINKTYPE_NULL),
        "loop": pcap([Record(t, frame_for(LINKTYPE_LOOP, p, family6=24)) for t, p in zip(stamps, both)], LINKTYPE_LOOP),
        "ipv4-228": pcap([Record(t, frame_for(LINKTYPE_IPV4, p)) for t, p in zip(stamps, c4)], LINKTYPE_IPV4),
        "ipv6-229": pcap([Record(t, frame_for(LINKTYPE_IPV6, p)) for t, p in zip(stamps, c6)], LINKTYPE_IPV6),
        "kuznetzov": pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, both)], 1, kuznetzov=True),
        "qinq-and-options": pcap([Record(t, ether(dataclasses.replace(p, ip_options=b"\x01" * 8 if p.version == 4 else b"",
                                                                       ext=[(0, b"")] if p.version == 6 else ()).ip_packet(),
                                                   p.ethertype, [(ETH_QINQ, 10), (ETH_VLAN, 20)]))
                                   for t, p in zip(stamps, both)], 1),
        "snaplen-74": pcap([Record(t, frame_for(1, p)) for t, p in zip(stamps, both)], 1, snaplen=74),
        "mixed-pcapng": b"".join([shb(), idb(1), idb(LINKTYPE_SLL2, tsresol=9), idb(LINKTYPE_RAW, tsresol=0x80 | 16),
                                  *[epb(i % 3, t, frame_for([1, LINKTYPE_SLL2, LINKTYPE_RAW][i % 3], p),
                                        tsresol=[None, 9, 0x80 | 16][i % 3])
                                    for i, (t, p) in enumerate(zip(stamps[:9], c4))],
                                  shb(big=True), idb(1, big=True),
                                  *[epb(0, t, frame_for(1, p), big=True) for t, p in zip(stamps[9:], c6)]]),
    }
    files["other-blocks-pcapng"] = b"".join([
        shb(comment=b"built by hand"), idb(1), custom_block(4, b"\x00" * 4),
        epb(0, stamps[0], frame_for(1, c4[0]), comment=b"first"), pb(0, stamps[1], frame_for(1, c4[1])),
        custom_block(5, struct.pack("<III", 0, 0, 0)), *[epb(0, t, frame_for(1, p)) for t, p in zip(stamps[2:], c4[2:])]])
    tcp_bytes = c4[3].tcp_header() + c4[3].payload
    files["fragments"] = pcap([Record(stamps[0], ether(ipv4(CLIENT4, SERVER4, tcp_bytes[:24], df=False, mf=True, ident=5))),
                               Record(stamps[1], ether(ipv4(CLIENT4, SERVER4, tcp_bytes[24:], df=False, frag_offset=24, ident=5))),
                               Record(stamps[2], frame_for(1, c4[4]))], 1)
    paths = {}
    for name, data in files.items():
        paths[name] = write(tmp_path, name + (".pcapng" if "pcapng" in name else ".pcap"), data)
    return paths


@pytest.mark.tshark
@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_same_segments_as_tshark(tmp_path):
    for name, path in tshark_cases(tmp_path).items():
        ours, stats, warned = read(path, dedupe=False)
        theirs = tshark_segments(path)
        assert warned == [] and stats.complete, name
        assert len(ours) == len(theirs) > 0, name
        # tshark leaves tcp.len empty for an unreassembled first fragment (test_fragments covers it).
        theirs = [dataclasses.replace(t, payload_len=o.payload_len) if t.payload_len < 0 else t
                  for o, t in zip(ours, theirs)]
        assert sum(t.payload_len > 0 for t in theirs) >= 2, name
        assert_same(ours, theirs)
