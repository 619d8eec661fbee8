"""The one record every packet source produces and the analysis consumes.

Every reader (pcap, pcapng, the live ring, the live socket) turns a frame into
the same `Record` with `sniffer.dissect`: a plain tuple

    (frame, t, flow, seq, ack, flags, window, payload_len, ttl_id)

where `flow` is the source and destination addresses (4+4 or 16+16 bytes)
followed by the two ports, as bytes: a dict key that needs no conversion, and
`ttl_id` the IP header's TTL (IPv6: hop limit) shifted left by 16 bits, or'ed
with the IPv4 ID: what tells a side's own packets from a middlebox's that
answers in its name (`ttl_of`, `ip_id_of`). A
capture can hold millions of packets, and a tuple is what Python builds
fastest; only the TCP header fields the keepalive model needs are kept, and no
payload ever is.

`TcpSegment` is the same record with printable addresses and named fields,
for the model's readable path, tests and anything that is not the hot loop:
`segment_of(record)` and `record_of(segment)` convert.
"""
from __future__ import annotations

from dataclasses import dataclass
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from struct import Struct

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

Record = tuple
"""``(frame, t, flow, seq, ack, flags, window, payload_len, ttl_id)``; see the module docstring."""


@dataclass(slots=True)
class TcpSegment:
    """One TCP segment as seen at the capture point: a `Record` with its addresses written out.

    `src`/`dst` are printable addresses ("172.17.0.2", "::1"); `window` is the
    raw 16-bit field (unscaled: a zero stays zero whatever the scale);
    `payload_len` is the TCP payload length from the IP header, so it stays
    right when the capture was truncated by a snaplen. `ttl` is the IP TTL
    (IPv6 hop limit) as the packet crossed the capture point, `ip_id` the
    IPv4 identification field (0 for IPv6); 0 and 0 when unknown.
    """

    frame: int
    t: float
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload_len: int
    ttl: int = 0
    ip_id: int = 0


class CaptureError(Exception):
    """A capture cannot be read at all (missing, not a capture, unknown link type).

    The message is one line meant for the user, without a traceback.
    """


_CACHE_LIMIT = 65536
_PORTS = Struct("!HH")
_flow_endpoints: dict[bytes, tuple[str, int, str, int]] = {}


def flow_endpoints(flow: bytes) -> tuple[str, int, str, int]:
    """(src, sport, dst, dport) of a record's flow key, cached: inet_ntop per packet is slow."""
    found = _flow_endpoints.get(flow)
    if found is None:
        if len(_flow_endpoints) >= _CACHE_LIMIT:
            _flow_endpoints.clear()
        half = (len(flow) - 4) // 2
        family = AF_INET if half == 4 else AF_INET6
        sport, dport = _PORTS.unpack_from(flow, 2 * half)
        found = (inet_ntop(family, flow[:half]), sport, inet_ntop(family, flow[half:2 * half]), dport)
        _flow_endpoints[flow] = found
    return found


def segment_of(record: Record) -> TcpSegment:
    """The `TcpSegment` a record stands for."""
    frame, t, flow, seq, ack, flags, window, payload_len, ttl_id = record
    src, sport, dst, dport = flow_endpoints(flow)
    return TcpSegment(frame, t, src, sport, dst, dport, seq, ack, flags, window, payload_len,
                      ttl_id >> 16, ttl_id & 0xFFFF)


def record_of(segment: TcpSegment) -> Record:
    """The record of a `TcpSegment` (tests and tools that build segments by hand)."""
    flow = flow_key(segment.src, segment.sport, segment.dst, segment.dport)
    return (segment.frame, segment.t, flow, segment.seq, segment.ack, segment.flags, segment.window,
            segment.payload_len, segment.ttl << 16 | segment.ip_id)


def flow_key(src: str, sport: int, dst: str, dport: int) -> bytes:
    """The flow bytes of a record sent from (src, sport) to (dst, dport): the inverse of `flow_endpoints`."""
    family = AF_INET6 if ":" in src else AF_INET
    return inet_pton(family, src) + inet_pton(family, dst) + _PORTS.pack(sport, dport)
