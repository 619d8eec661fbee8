"""Build capture files byte by byte, so the reader's tests do not trust the reader.

Everything here is written from the file-format specifications (pcap,
pcapng, Linux cooked v1/v2, IPv4/IPv6, TCP) with `struct`, independently of
`sniffer.dissect`. A test describes a packet once as a `Tcp` and gets both the
frame bytes and the `TcpSegment` kaobs must read back from them.

Times are integer nanoseconds, so every timestamp resolution can be written
exactly; the reader returns float seconds.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from sniffer.records import ACK, TcpSegment

ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8
T0_NS = 1_764_000_000_123_456_000
"""A timestamp in late 2025 whose microsecond part is non-zero."""

# Linux cooked packet types.
HOST, OUTGOING = 0, 4


# --- network and transport layers ---------------------------------------------

@dataclass
class Tcp:
    """One TCP segment with its IP header options; the expected reading is `segment`."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int = 0
    flags: int = ACK
    window: int = 502
    payload: bytes = b""
    tcp_options: bytes = b""
    ip_options: bytes = b""  # IPv4 only
    ext: Sequence[tuple[int, bytes]] = ()  # IPv6 extension headers (type, body)
    ident: int = 1
    ttl: int = 64

    @property
    def version(self) -> int:
        return 6 if ":" in self.src else 4

    @property
    def ethertype(self) -> int:
        return ETH_IPV6 if self.version == 6 else ETH_IPV4

    def tcp_header(self) -> bytes:
        options = self.tcp_options + b"\x00" * (-len(self.tcp_options) % 4)
        offset = (20 + len(options)) // 4
        return struct.pack("!HHIIBBHHH", self.sport, self.dport, self.seq, self.ack,
                           offset << 4, self.flags, self.window, 0, 0) + options

    def ip_packet(self) -> bytes:
        body = self.tcp_header() + self.payload
        if self.version == 4:
            return ipv4(self.src, self.dst, body, options=self.ip_options,
                        ident=self.ident, ttl=self.ttl)
        return ipv6(self.src, self.dst, body, ext=self.ext, hlim=self.ttl)

    def segment(self, frame: int, t_ns: int) -> TcpSegment:
        return TcpSegment(frame, t_ns / 1e9, self.src, self.sport, self.dst, self.dport,
                          self.seq, self.ack, self.flags, self.window, len(self.payload),
                          self.ttl, self.ident if self.version == 4 else 0)


def ipv4(src: str, dst: str, body: bytes, *, proto: int = 6, options: bytes = b"",
         ident: int = 1, ttl: int = 64, df: bool = True, mf: bool = False,
         frag_offset: int = 0, total: int | None = None) -> bytes:
    options = options + b"\x00" * (-len(options) % 4)
    ihl = (20 + len(options)) // 4
    frag = (0x4000 if df else 0) | (0x2000 if mf else 0) | (frag_offset // 8)
    length = ihl * 4 + len(body) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, ident, frag, ttl, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + options + body


def ipv6(src: str, dst: str, body: bytes, *, nh: int = 6,
         ext: Sequence[tuple[int, bytes]] = (), hlim: int = 64) -> bytes:
    """IPv6 with extension headers: `ext` is [(type, body)], bodies padded to 8n-2 bytes.

    Fragment headers (44) are 8 bytes whatever their body says: pass 6 bytes.
    """
    chain = b""
    types = [t for t, _ in ext] + [nh]
    for (kind, data), following in zip(ext, types[1:]):
        if kind == 44:
            chain += struct.pack("!BB", following, 0) + data[:6].ljust(6, b"\x00")
        else:
            data = data + b"\x00" * (-(len(data) + 2) % 8)
            chain += struct.pack("!BB", following, (len(data) + 2) // 8 - 1) + data
    payload = chain + body
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), types[0], hlim,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


# --- link layers ----------------------------------------------------------------

def ether(l3: bytes, ethertype: int = ETH_IPV4, vlans: Sequence[tuple[int, int]] = ()) -> bytes:
    """Ethernet II; `vlans` is [(TPID, VLAN id)] outermost first."""
    tags = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in vlans)
    return (b"\x02\x42\xac\x11\x00\x02" + b"\x02\x42\xac\x11\x00\x01" + tags
            + struct.pack("!H", ethertype) + l3)


def sll(l3: bytes, ethertype: int = ETH_IPV4, pkttype: int = HOST) -> bytes:
    """Linux cooked v1: packet type, ARPHRD, address length, 8 address bytes, protocol."""
    return struct.pack("!HHH8sH", pkttype, 1, 6, b"\x02\x42\xac\x11\x00\x02", ethertype) + l3


def sll2(l3: bytes, ethertype: int = ETH_IPV4, ifindex: int = 2, pkttype: int = HOST) -> bytes:
    """Linux cooked v2: protocol, reserved, ifindex, ARPHRD, packet type, address length, address."""
    return struct.pack("!HHIHBB8s", ethertype, 0, ifindex, 1, pkttype, 6,
                       b"\x02\x42\xac\x11\x00\x02") + l3


def null_loopback(l3: bytes, family: int, *, big: bool = False) -> bytes:
    """BSD loopback (DLT_NULL 0): the address family in the capturing host's byte order;
    OpenBSD loopback (DLT_LOOP 108) is the same header, always big-endian."""
    return struct.pack(">I" if big else "<I", family) + l3


LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_SLL, LINKTYPE_SLL2 = 1, 101, 113, 276
LINKTYPE_NULL, LINKTYPE_LOOP, LINKTYPE_IPV4, LINKTYPE_IPV6 = 0, 108, 228, 229
LINUX_AF_INET6, BSD_AF_INET6 = 10, (24, 28, 30)  # NetBSD/OpenBSD, FreeBSD, macOS


def frame_for(linktype: int, packet: Tcp, **link) -> bytes:
    l3 = packet.ip_packet()
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        family = 2 if packet.version == 4 else link.pop("family6", BSD_AF_INET6[0])
        return null_loopback(l3, family, big=linktype == LINKTYPE_LOOP or link.pop("big", False))
    if linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6, 12, 14):
        return l3
    if linktype == LINKTYPE_ETHERNET:
        return ether(l3, packet.ethertype, **link)
    if linktype == LINKTYPE_SLL:
        return sll(l3, packet.ethertype, **link)
    if linktype == LINKTYPE_SLL2:
        return sll2(l3, packet.ethertype, **link)
    if linktype == LINKTYPE_RAW:
        return l3
    raise ValueError(linktype)


# --- files ------------------------------------------------------------------------

@dataclass
class Record:
    t_ns: int
    data: bytes
    wirelen: int | None = None  # None: len(data)


def pcap(records: Iterable[Record], linktype: int, *, nsec: bool = False, big: bool = False,
         snaplen: int = 262144, kuznetzov: bool = False) -> bytes:
    """A classic pcap file; records longer than `snaplen` are cut as libpcap would.

    `kuznetzov`: the patched-libpcap variant (magic a1b2cd34) whose record
    headers carry 8 more bytes (ifindex, protocol, packet type, padding).
    """
    o = ">" if big else "<"
    magic = 0xA1B2CD34 if kuznetzov else 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = [struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    per_second = 10**9 if nsec else 10**6
    for r in records:
        units = r.t_ns * per_second // 10**9
        data = r.data[:snaplen]
        wirelen = len(r.data) if r.wirelen is None else r.wirelen
        out.append(struct.pack(o + "IIII", units // per_second, units % per_second, len(data), wirelen))
        if kuznetzov:
            out.append(struct.pack(o + "IHBx", 3, 0x0800, 0))
        out.append(data)
    return b"".join(out)


def _block(o: str, kind: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(o + "II", kind, length) + body + struct.pack(o + "I", length)


def _option(o: str, code: int, value: bytes) -> bytes:
    return struct.pack(o + "HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def shb(*, big: bool = False, comment: bytes = b"") -> bytes:
    o = ">" if big else "<"
    body = struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    if comment:
        body += _option(o, 1, comment) + _option(o, 0, b"")
    return _block(o, 0x0A0D0D0A, body)


def idb(linktype: int, *, snaplen: int = 0, tsresol: int | None = None,
        tsoffset: int | None = None, big: bool = False) -> bytes:
    """Interface description; `tsresol` is the raw if_tsresol byte (6 = usec, 9 = nsec, 0x80|n = 2^-n)."""
    o = ">" if big else "<"
    body = struct.pack(o + "HHI", linktype, 0, snaplen)
    options = b""
    if tsresol is not None:
        options += _option(o, 9, bytes([tsresol]))
    if tsoffset is not None:
        options += _option(o, 14, struct.pack(o + "q", tsoffset))
    if options:
        body += options + _option(o, 0, b"")
    return _block(o, 1, body)


def units_per_second(tsresol: int | None) -> int:
    if tsresol is None:
        return 10**6
    return 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10**tsresol


def epb(interface: int, t_ns: int, data: bytes, *, wirelen: int | None = None,
        tsresol: int | None = None, big: bool = False, comment: bytes = b"") -> bytes:
    o = ">" if big else "<"
    ts = t_ns * units_per_second(tsresol) // 10**9
    body = struct.pack(o + "IIIII", interface, ts >> 32, ts & 0xFFFFFFFF, len(data),
                       len(data) if wirelen is None else wirelen) + data
    body += b"\x00" * (-len(body) % 4)
    if comment:
        body += _option(o, 1, comment) + _option(o, 0, b"")
    return _block(o, 6, body)


def spb(data: bytes, *, wirelen: int | None = None, big: bool = False) -> bytes:
    """Simple packet block: no timestamp, interface 0; wirelen may exceed the data (snaplen)."""
    o = ">" if big else "<"
    return _block(o, 3, struct.pack(o + "I", len(data) if wirelen is None else wirelen) + data)


def pb(interface: int, t_ns: int, data: bytes, *, big: bool = False) -> bytes:
    """The obsolete packet block (type 2)."""
    o = ">" if big else "<"
    ts = t_ns // 1000
    return _block(o, 2, struct.pack(o + "HHIIII", interface, 0, ts >> 32, ts & 0xFFFFFFFF,
                                    len(data), len(data)) + data)


def custom_block(kind: int, body: bytes, *, big: bool = False) -> bytes:
    """Any other block (name resolution 4, interface statistics 5, ...): readers skip it."""
    return _block(">" if big else "<", kind, body)


# --- a conversation ---------------------------------------------------------------

CLIENT4, SERVER4 = "172.18.0.3", "172.18.0.2"
CLIENT6, SERVER6 = "fd00:42::3", "fd00:42::2"


def conversation(client: str = CLIENT4, server: str = SERVER4, *, sport: int = 45734,
                 dport: int = 5432) -> list[Tcp]:
    """A handshake, a query with its answer, a keepalive probe and its answer, a RST.

    Sequence numbers and flags vary packet by packet so that a field read from
    the wrong offset cannot pass by luck.
    """
    from sniffer.records import PSH, RST, SYN

    c, s = 0x10000000, 0xF0000000
    query = b"Q\x00\x00\x00\x19SELECT secret FROM t\x00"
    answer = b"T" + bytes(range(60))
    return [
        Tcp(client, server, sport, dport, c, 0, SYN, 64240, tcp_options=b"\x02\x04\x05\xb4", ident=11),
        Tcp(server, client, dport, sport, s, c + 1, SYN | ACK, 65160, tcp_options=b"\x02\x04\x05\xb4", ident=0),
        Tcp(client, server, sport, dport, c + 1, s + 1, ACK, 502, ident=12),
        Tcp(client, server, sport, dport, c + 1, s + 1, PSH | ACK, 502, query, ident=13),
        Tcp(server, client, dport, sport, s + 1, c + 1 + len(query), PSH | ACK, 509, answer, ident=1),
        Tcp(client, server, sport, dport, c + 1 + len(query), s + 1 + len(answer), ACK, 501, ident=14),
        Tcp(server, client, dport, sport, s + len(answer), c + 1 + len(query), ACK, 509, ident=2),
        Tcp(client, server, sport, dport, c + 1 + len(query), s + 1 + len(answer), ACK, 501, ident=15),
        Tcp(server, client, dport, sport, s + 1 + len(answer), 0, RST, 0, ident=3),
    ]


def times(count: int, start_ns: int = T0_NS, step_ns: int = 1_000_123_457) -> list[int]:
    """Timestamps about a second apart with sub-microsecond parts."""
    return [start_ns + i * step_ns for i in range(count)]
