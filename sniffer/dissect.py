"""Dissect one captured link-layer frame into a `Record`: the one routine every reader calls.

Readers only find frames (pcap and pcapng records, ring slots, socket
reads); this module turns each into the record the model takes
(`sniffer.records`), fast and without scapy: scapy's dissection costs about
130 us a packet, which makes a million-packet file take minutes. A frame is
read with precompiled `struct.Struct` objects straight out of the reader's
buffer, at an offset, so no packet is copied.

Only the TCP header is needed. The payload length is taken from the IP
header, so a frame cut short by a snaplen still gives the true length as long
as the 20-byte TCP base header was captured.

``dissect = make_dissector(linktype)`` gives
``dissect(buf, off, end, frame, t, wirelen=0) -> Record | None`` for the
frame at ``buf[off:end]``. For Ethernet it is `dissect_ethernet`, whose
first lines are the common case (untagged IPv4 without options carrying
TCP, nearly every packet of a capture) in one unpack; everything else goes
through the general path (VLAN tags, IPv6 with extension headers, IP
options, other link layers).

The same link-layer knowledge finds where a frame's headers end, for the
headers-only writer (`frame_snap_end`) and for recognising one packet
captured on several interfaces (`header_bytes`).
"""
from __future__ import annotations

from struct import Struct
from typing import Callable

from sniffer.records import CaptureError, Record

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_DLT12 = 12
LINKTYPE_RAW_DLT14 = 14
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ARPHRD_LOOPBACK = 772
ARPHRD_LINKTYPE = {
    1: LINKTYPE_ETHERNET,  # ARPHRD_ETHER
    ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,  # a zeroed Ethernet header
    65534: LINKTYPE_RAW,  # ARPHRD_NONE: tun, wireguard
    776: LINKTYPE_RAW,  # ARPHRD_SIT
    778: LINKTYPE_RAW,  # ARPHRD_IPGRE
}
"""ARPHRD_* (an interface's hardware type) -> pcap link type of what an AF_PACKET SOCK_RAW socket reads on it."""

Dissector = Callable[..., "Record | None"]
"""``dissect(buf, off, end, frame, t, wirelen=0) -> Record | None``."""

_NAMES = {
    LINKTYPE_NULL: "BSD loopback",
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_RAW_DLT12: "raw IP",
    LINKTYPE_RAW_DLT14: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked v1",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2",
}
_OTHER_NAMES = {
    6: "IEEE 802.5",
    9: "PPP",
    50: "PPP in HDLC",
    104: "Cisco HDLC",
    105: "IEEE 802.11",
    119: "Prism 802.11",
    127: "802.11 radiotap",
    189: "Linux USB",
    195: "IEEE 802.15.4",
    201: "Bluetooth H4",
    220: "Linux USB mmapped",
    249: "Linux netlink",
    253: "NFLOG",
}

_TCP = 6
_NOT_FIRST_FRAGMENT = -1

_U16 = Struct("!H")
_U32 = Struct("!I")
ETHER_IPV4_TCP = Struct("!3sxHIHxx12sIIBBH")
"""The common frame in one unpack, from the EtherType (offset 12) on: EtherType and IPv4
version/IHL as one 3-byte field (b"\\x08\\x00\\x45": IPv4 without options), total length,
IP ID and fragment field as one 32-bit field, TTL and protocol as one 16-bit field, the flow
(addresses, then ports: contiguous when the IP header has no options), seq, ack, data offset
byte, flags, window. 54 bytes make the TCP base header complete."""
IPV4_HEAD = b"\x08\x00\x45"
_IP4 = Struct("!BxHHHBBxx8s")
_IP6 = Struct("!BxxxHBB32s")
_TCP_AFTER_PORTS = Struct("!IIBBH")

_VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))
_ETHERTYPE_VERSION = {0x0800: 4, 0x86DD: 6}
# BSD loopback address families: AF_INET everywhere, AF_INET6 differs by OS
# (Linux 10, Windows 23, NetBSD/OpenBSD 24, FreeBSD 28, macOS 30).
_FAMILY_VERSION = {2: 4, 10: 6, 23: 6, 24: 6, 28: 6, 30: 6}
# IPv6 extension headers that may sit between the fixed header and TCP.
_HOP_BY_HOP, _ROUTING, _FRAGMENT, _AH, _DEST_OPTS = 0, 43, 44, 51, 60
_MAX_EXTENSION_HEADERS = 8

# Link layers: each returns (offset of the IP header, IP version), with version
# 0 when the frame carries something else; the offset is then the end of the
# link header, which is where the headers-only writer cuts such a frame.

def _link_ethernet(buf, off: int, end: int) -> tuple[int, int]:
    return _ethertype_chain(buf, off + 12, end)


def _link_sll(buf, off: int, end: int) -> tuple[int, int]:
    return _ethertype_chain(buf, off + 14, end)


def _link_sll2(buf, off: int, end: int) -> tuple[int, int]:
    if off + 20 > end:
        return end, 0
    return off + 20, _ETHERTYPE_VERSION.get(_U16.unpack_from(buf, off)[0], 0)


def _ethertype_chain(buf, p: int, end: int) -> tuple[int, int]:
    """Follow an EtherType at `p` through any stacked 802.1Q/802.1ad tags."""
    while p + 2 <= end:
        (ethertype,) = _U16.unpack_from(buf, p)
        if ethertype not in _VLAN_TPIDS:
            return p + 2, _ETHERTYPE_VERSION.get(ethertype, 0)
        p += 4
    return end, 0


def _link_raw(buf, off: int, end: int) -> tuple[int, int]:
    if off >= end:
        return end, 0
    version = buf[off] >> 4
    return off, version if version in (4, 6) else 0


def _link_ipv4(buf, off: int, end: int) -> tuple[int, int]:
    return off, 4


def _link_ipv6(buf, off: int, end: int) -> tuple[int, int]:
    return off, 6


def _link_null(buf, off: int, end: int) -> tuple[int, int]:
    """BSD loopback: a 4-byte address family in the capturing host's byte order."""
    if off + 4 > end:
        return end, 0
    family = buf[off] or buf[off + 3]
    return off + 4, _FAMILY_VERSION.get(family, 0)


def _link_loop(buf, off: int, end: int) -> tuple[int, int]:
    """OpenBSD loopback: the same family, always big-endian."""
    if off + 4 > end:
        return end, 0
    return off + 4, _FAMILY_VERSION.get(buf[off + 3], 0)


_LINKS = {
    LINKTYPE_NULL: _link_null,
    LINKTYPE_ETHERNET: _link_ethernet,
    LINKTYPE_RAW: _link_raw,
    LINKTYPE_RAW_DLT12: _link_raw,
    LINKTYPE_RAW_DLT14: _link_raw,
    LINKTYPE_LOOP: _link_loop,
    LINKTYPE_LINUX_SLL: _link_sll,
    LINKTYPE_IPV4: _link_ipv4,
    LINKTYPE_IPV6: _link_ipv6,
    LINKTYPE_LINUX_SLL2: _link_sll2,
}


def supported_linktypes() -> dict[int, str]:
    """Link types this module reads, with a short name for messages."""
    return dict(_NAMES)


def linktype_name(linktype: int) -> str:
    return _NAMES.get(linktype) or _OTHER_NAMES.get(linktype) or (
        f"USER{linktype - 147}" if 147 <= linktype <= 162 else "unknown")


def _link_for(linktype: int):
    link = _LINKS.get(linktype)
    if link is None:
        raise CaptureError(
            f"unsupported link type {linktype} ({linktype_name(linktype)}; "
            "readable: Ethernet, raw IP, Linux cooked SLL/SLL2, BSD loopback)")
    return link


# Network layer.

def _transport(buf, ip: int, version: int, end: int, wire_end: int = 0):
    """Find the transport header of the IP packet at `ip`.

    Returns (protocol, transport offset, transport length, address bytes) or
    None when the IP header is malformed or cut short. Protocol is
    `_NOT_FIRST_FRAGMENT` for a fragment other than the first, which holds no
    transport header. A zero length field (TSO/GSO packets captured before
    segmentation) falls back to the frame's length on the wire, `wire_end`,
    or to what was captured.
    """
    wire_end = max(wire_end, end)
    if version == 4:
        if ip + 20 > end:
            return None
        vihl, total, ip_id, frag, ttl, proto, addrs = _IP4.unpack_from(buf, ip)
        ihl = (vihl & 15) << 2
        if vihl >> 4 != 4 or ihl < 20 or ip + ihl > end:
            return None
        if frag & 0x1FFF:
            proto = _NOT_FIRST_FRAGMENT
        return proto, ip + ihl, (total or wire_end - ip) - ihl, addrs, ttl << 16 | ip_id
    if version == 6:
        return _ipv6_transport(buf, ip, end, wire_end)
    return None


def _ipv6_transport(buf, ip: int, end: int, wire_end: int):
    if ip + 40 > end:
        return None
    vtc, length, nh, hops, addrs = _IP6.unpack_from(buf, ip)
    if vtc >> 4 != 6:
        return None
    p = ip + 40
    if not length:
        length = wire_end - p
    for _ in range(_MAX_EXTENSION_HEADERS):
        if nh in (_HOP_BY_HOP, _ROUTING, _DEST_OPTS, _AH):
            if p + 8 > end:
                return None
            size = (buf[p + 1] + 2) << 2 if nh == _AH else (buf[p + 1] + 1) << 3
        elif nh == _FRAGMENT:
            if p + 8 > end:
                return None
            if _U16.unpack_from(buf, p + 2)[0] & 0xFFF8:
                return _NOT_FIRST_FRAGMENT, p + 8, length - 8, addrs, hops << 16
            size = 8
        else:
            break
        nh = buf[p]
        p += size
        length -= size
    return nh, p, length, addrs, hops << 16


# Dissection.

def _record_at(buf, ip: int, version: int, end: int, frame: int, t: float,
               wire_end: int) -> Record | None:
    """The general path: any IP version, options, extension headers."""
    found = _transport(buf, ip, version, end, wire_end)
    if found is None:
        return None
    proto, tcp, length, addrs, ttl_id = found
    if proto != _TCP or tcp + 20 > end:
        return None
    seq, ack, offset, flags, window = _TCP_AFTER_PORTS.unpack_from(buf, tcp + 4)
    if offset < 0x50:
        return None
    payload = length - ((offset >> 4) << 2)
    return (frame, t, addrs + bytes(buf[tcp:tcp + 4]), seq, ack, flags, window,
            payload if payload > 0 else 0, ttl_id)


def dissect_ethernet(buf, off: int, end: int, frame: int, t: float, wirelen: int = 0,
                     _common=ETHER_IPV4_TCP.unpack_from, _head=IPV4_HEAD) -> Record | None:
    """An Ethernet frame: the common untagged IPv4/TCP frame in one unpack, anything else the general way."""
    if end - off >= 54:
        head, total, id_frag, ttl_proto, flow, seq, ack, offset, flags, window = _common(buf, off + 12)
        if head == _head and ttl_proto & 0xFF == 6 and not id_frag & 0x1FFF and offset >= 0x50:
            payload = total - 20 - ((offset >> 4) << 2)
            if payload >= 0:
                return (frame, t, flow, seq, ack, flags, window, payload, (ttl_proto >> 8) << 16 | id_frag >> 16)
    ip, version = _ethertype_chain(buf, off + 12, end)
    if not version:
        return None
    return _record_at(buf, ip, version, end, frame, t, off + wirelen)


def make_dissector(linktype: int) -> Dissector:
    """``dissect(buf, off, end, frame, t, wirelen=0) -> Record | None`` for frames of this link type.

    None means the frame is not TCP, is a non-first fragment, or was cut
    short inside the IP or TCP base header. `wirelen` is the frame's length
    on the wire, used when an IP length field is 0 (TSO/GSO packets
    captured before segmentation). Raises CaptureError for a link type this
    module cannot read.
    """
    link = _link_for(linktype)
    if link is _link_ethernet:
        return dissect_ethernet

    def dissect(buf, off: int, end: int, frame: int, t: float, wirelen: int = 0) -> Record | None:
        ip, version = link(buf, off, end)
        if not version:
            return None
        return _record_at(buf, ip, version, end, frame, t, off + wirelen)

    return dissect


def dissect_frame(linktype: int, data: bytes | memoryview, frame: int = 1, t: float = 0.0) -> Record | None:
    """One whole frame, for tests and tools: ``make_dissector(linktype)(data, 0, len(data), frame, t, len(data))``."""
    return make_dissector(linktype)(data, 0, len(data), frame, t, len(data))


# Frames cut by a snaplen before their TCP header: what to tell the user.

TCP_HEADER_MAX = 60
"""The longest TCP header (40 bytes of options): a snaplen that keeps it keeps everything kaobs reads."""
SAFE_SNAPLEN = 128
"""What to suggest when a frame is cut too early to tell its layout (kaobs's own live capture keeps 128)."""


def make_cut_check(linktype: int) -> Callable[..., "int | None"]:
    """``needed(buf, off, end) -> int | None`` for a frame that gave no record and was captured short.

    For a frame that is (or, cut too early to tell, may be) a TCP segment cut
    before the end of its 20-byte TCP base header: the snaplen that would have
    kept its whole TCP header. None for a frame that is complete enough to be
    something else (UDP, ARP, a later fragment). Called only for frames the
    dissector gave nothing for, so it costs nothing on the common path.
    """
    link = _link_for(linktype)

    def needed(buf, off: int, end: int) -> int | None:
        ip, version = link(buf, off, end)
        if not version:
            return SAFE_SNAPLEN if ip >= end else None  # cut inside the link header: cannot tell
        if version == 4:
            if ip >= end:  # not one byte of the IP header: its options are unknown
                return max(SAFE_SNAPLEN, ip - off + 20 + TCP_HEADER_MAX)
            if ip + 20 > end:
                return ip - off + max((buf[ip] & 15) << 2, 20) + TCP_HEADER_MAX
            ihl = (buf[ip] & 15) << 2
            frag, proto = _U16.unpack_from(buf, ip + 6)[0], buf[ip + 9]
            if proto != _TCP or frag & 0x1FFF or ihl < 20:
                return None
            return ip - off + ihl + TCP_HEADER_MAX if ip + ihl + 20 > end else None
        found = _ipv6_transport(buf, ip, end, end)
        if found is None:
            return max(end - off, ip - off + 40) + TCP_HEADER_MAX
        proto, tcp = found[0], found[1]
        if proto != _TCP:
            return None
        return tcp - off + TCP_HEADER_MAX if tcp + 20 > end else None

    return needed


# Header boundaries, for the headers-only writer and for duplicate detection.

def _header_ends(link, buf, off: int, end: int) -> tuple[int, int, int | None]:
    """(IP header offset or -1, where headers end, TCP header end or None).

    "Where headers end" is the end of the TCP header for TCP, of the IP header
    (with extension headers) for other IP packets, and of the link header for
    anything else, clamped to what was captured.
    """
    ip, version = link(buf, off, end)
    if not version:
        return -1, min(ip, end), None
    found = _transport(buf, ip, version, end)
    if found is None:
        return -1, min(ip, end), None
    proto, l4 = found[0], found[1]
    l4 = min(l4, end)
    if proto != _TCP or l4 + 20 > end or buf[l4 + 12] < 0x50:
        return ip, l4, None
    tcp_end = min(l4 + ((buf[l4 + 12] >> 4) << 2), end)
    return ip, tcp_end, tcp_end


def frame_header_end(linktype: int, data: bytes | memoryview) -> int | None:
    """Offset where the TCP header ends in `data` (clamped to its length), None if not TCP."""
    return _header_ends(_link_for(linktype), data, 0, len(data))[2]


def frame_snap_end(linktype: int, data: bytes | memoryview) -> int:
    """Offset after which `data` holds only payload: end of TCP, else IP, else link header."""
    return _header_ends(_link_for(linktype), data, 0, len(data))[1]


def make_header_key(linktype: int) -> Callable[..., "bytes | None"]:
    """``key(buf, off, end) -> bytes | None``: a frame's IP and TCP headers without what a router changes.

    For spotting one packet captured on several interfaces (`sniffer.dedupe`).
    Left out: IPv4 TTL, protocol and checksum; IPv6 hop limit. The IP ID, the
    lengths and the TCP options stay in, so a retransmission or a repeated
    keepalive probe gets a new key. None for a frame that is not a parseable
    TCP segment.
    """
    link = _link_for(linktype)

    def key(buf, off: int, end: int) -> bytes | None:
        ip, _, tcp_end = _header_ends(link, buf, off, end)
        if tcp_end is None:
            return None
        if buf[ip] >> 4 == 4:
            return bytes(buf[ip:ip + 8]) + bytes(buf[ip + 12:tcp_end])
        return bytes(buf[ip:ip + 7]) + bytes(buf[ip + 8:tcp_end])

    return key


def sll2_ifindex(buf, off: int) -> int:
    """The interface index in a Linux cooked v2 header: copies of one packet come from different ones."""
    return _U32.unpack_from(buf, off + 4)[0]
