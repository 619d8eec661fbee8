"""A user's filter on a capture file: a tcpdump filter expression and a time range, applied per frame.

``kaobs analyze big.pcap 'host 10.0.0.5'`` means what ``tcpdump -r big.pcap
'host 10.0.0.5'`` means: the expression is compiled by libpcap for the
capture's link type and run on each frame before it is dissected, through
pcapy-ng (a maintained libpcap binding whose wheel bundles libpcap): no
filter language of our own. `--since`/`--until` keep frames by time.

Only built when the user gives a filter: without one the reader pays nothing.
"""
from __future__ import annotations

from typing import Callable

from sniffer.records import CaptureError

SNAPLEN = 262144
_NETMASK_UNKNOWN = 0xFFFFFFFF
_DLT_EN10MB = 1
_DLT_RAW = 12
# A file's LINKTYPE is libpcap's DLT but for raw IP: LINKTYPE_RAW (101) and BSD's DLT 14 are DLT_RAW (12) on Linux.
_DLT_OF_LINKTYPE = {101: _DLT_RAW, 14: _DLT_RAW}

Keep = Callable[..., bool]
"""``keep(buf, start, end, t, wirelen) -> bool`` for the frame at ``buf[start:end]``."""


class FilterError(CaptureError):
    """A filter expression libpcap refuses, or no libpcap binding: one line for the user."""


def _pcapy():
    try:
        import pcapy  # pcapy-ng
    except ImportError as error:  # pragma: no cover - a dependency of kaobs
        raise FilterError(f"a filter expression needs the pcapy-ng package (pip install pcapy-ng): {error}") from None
    return pcapy


def compile_expression(expression: str, linktype: int = _DLT_EN10MB):
    """libpcap's program for `expression` on frames of `linktype` (a file's LINKTYPE); raises FilterError."""
    pcapy = _pcapy()
    dlt = _DLT_OF_LINKTYPE.get(linktype, linktype)
    try:
        return pcapy.compile(dlt, SNAPLEN, expression, 1, _NETMASK_UNKNOWN)
    except pcapy.PcapError as error:
        said = " ".join(str(error).split()) or "libpcap refuses it"
        raise FilterError(f"bad filter expression {expression!r}: {said}") from None


class PacketFilter:
    """Which frames to analyse: those the expression matches (if any) within [since, until] (if given).

    The expression is compiled once at construction for Ethernet, so a
    syntax error is one line before anything is read, and again for each
    other link type a capture declares (`matcher`).
    """

    def __init__(self, expression: str | None = None, since: float | None = None, until: float | None = None):
        self.expression = expression.strip() if expression and expression.strip() else None
        self.since = since
        self.until = until
        self._programs: dict[int, object] = {}
        if self.expression is not None:
            self._programs[_DLT_EN10MB] = compile_expression(self.expression)

    def __bool__(self) -> bool:
        return self.expression is not None or self.since is not None or self.until is not None

    def matcher(self, linktype: int) -> Keep:
        """``keep(buf, start, end, t, wirelen)`` for frames of this link type."""
        since = float("-inf") if self.since is None else self.since
        until = float("inf") if self.until is None else self.until
        if self.expression is None:
            return lambda buf, start, end, t, wirelen: since <= t <= until
        program = self._programs.get(linktype)
        if program is None:
            program = self._programs[linktype] = compile_expression(self.expression, linktype)
        match = program.filter  # type: ignore[attr-defined]
        if self.since is None and self.until is None:
            return lambda buf, start, end, t, wirelen: match(buf[start:end]) != 0
        return lambda buf, start, end, t, wirelen: since <= t <= until and match(buf[start:end]) != 0

    def describe(self) -> dict:
        return {"expression": self.expression, "since": self.since, "until": self.until}
