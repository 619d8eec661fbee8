"""The one record every packet source produces and the analysis consumes.

A capture can hold millions of packets; only the TCP header fields that the
keepalive model needs are kept, in a slotted dataclass, so that a segment costs
a few hundred bytes at most and no payload is ever retained.
"""
from __future__ import annotations

from dataclasses import dataclass

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20


@dataclass(slots=True)
class TcpSegment:
    """One TCP segment as seen at the capture point.

    `src`/`dst` are printable addresses ("172.17.0.2", "::1"); `window` is the
    raw 16-bit field (unscaled: a zero stays zero whatever the scale);
    `payload_len` is the TCP payload length from the IP header, so it stays
    right when the capture was truncated by a snaplen.
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


class CaptureError(Exception):
    """A capture cannot be read at all (missing, not a capture, unknown link type).

    The message is one line meant for the user, without a traceback.
    """
