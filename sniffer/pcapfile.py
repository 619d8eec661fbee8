"""Read pcap and pcapng files, streaming, in constant memory: frames in, records out.

A capture of a long keepalive run can hold millions of packets, so the file is
read in large chunks and each frame is handed, in place in the chunk, to a
handler: for analysis the one dissection routine every packet source shares
(`sniffer.dissect`), which gives the `Record`s the model takes; for rewriting
(`sniffer.pcapwrite`) a writer. The walkers here only find frames and their
timestamps, as dpkt's and scapy's readers keep reading apart from dissection.

A damaged file should still give what it holds: a capture cut off mid-record
(tcpdump killed, disk full) or with a corrupt record length ends with a warning
after the packets before the damage. Only a file that cannot be read at all
raises `CaptureError`.

Frame numbers count every packet record from 1, as Wireshark numbers them,
so a segment can be looked up with tshark's ``frame.number``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from struct import Struct
from typing import Callable, Iterator

from sniffer.dedupe import CopyFilter
from sniffer.dissect import LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, make_dissector
from sniffer.records import CaptureError, Record, TcpSegment, segment_of

Warn = Callable[[str], None]
# handler(buf, start, end, frame, t, wirelen) -> something to yield, or None
Handler = Callable[..., object]
# handler_for(linktype, timestamp units per second) -> Handler
HandlerFactory = Callable[[int, int], Handler]

MAX_CAPLEN = 256 * 1024
"""Larger than any snaplen tcpdump or dumpcap use: a bigger record length is corruption."""

_CHUNK = 1 << 20
_MAX_BUFFERED_BLOCK = 1 << 20
_HEAD = 64


# Classic pcap magic -> (byte order, timestamp units per second, record header size).
_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 10**6, 16),
    b"\xa1\xb2\xc3\xd4": (">", 10**6, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 10**9, 16),
    b"\xa1\xb2\x3c\x4d": (">", 10**9, 16),
    # Alexey Kuznetzov's patched libpcap: 8 more bytes per record header.
    b"\x34\xcd\xb2\xa1": ("<", 10**6, 24),
    b"\xa1\xb2\xcd\x34": (">", 10**6, 24),
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_BYTE_ORDER_MAGIC = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
_IDB, _PB, _SPB, _EPB = 1, 2, 3, 6
_PACKET_BLOCKS = frozenset((_PB, _SPB, _EPB))
_MIN_BLOCK = {_IDB: 20, _PB: 32, _SPB: 16, _EPB: 32, _PCAPNG_SHB: 28}
_OPT_TSRESOL, _OPT_TSOFFSET = 9, 14
_COOKED = frozenset((LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2))


class CaptureWarning(UserWarning):
    """A capture was only partly readable; what came before the damage was used."""


@dataclass
class CaptureStats:
    """What one pass over a capture found."""

    format: str = ""
    packets: int = 0
    segments: int = 0
    duplicates: int = 0
    linktypes: set[int] = field(default_factory=set)
    complete: bool = True
    warnings: list[str] = field(default_factory=list)


def _default_warn(message: str) -> None:
    warnings.warn(message, CaptureWarning, stacklevel=3)


def _open(path: str | os.PathLike, name: str):
    """Open for reading, turning the usual OS errors into one-line CaptureErrors."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CaptureError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise CaptureError(f"{name} is a directory, not a capture file") from None
    except PermissionError:
        raise CaptureError(f"{name}: permission denied") from None
    except OSError as e:
        raise CaptureError(f"{name}: cannot open: {e.strerror or e}") from None


def _sniff(head: bytes, name: str) -> str:
    """Tell "pcap" from "pcapng" by the first bytes, or say why it is neither."""
    if not head:
        raise CaptureError(f"{name} is empty")
    magic = head[:4]
    if magic in _PCAP_MAGICS:
        if len(head) < 24:
            raise CaptureError(f"{name}: capture is cut off inside its 24-byte file header")
        return "pcap"
    if magic == _PCAPNG_MAGIC:
        if len(head) < 12:
            raise CaptureError(f"{name}: capture is cut off inside its section header")
        if head[8:12] in _BYTE_ORDER_MAGIC:
            if len(head) < _MIN_BLOCK[_PCAPNG_SHB]:
                raise CaptureError(f"{name}: capture is cut off inside its section header")
            return "pcapng"
    hint = " (gzip-compressed? decompress it first)" if head[:2] == b"\x1f\x8b" else ""
    raise CaptureError(
        f"{name} is not a pcap or pcapng file (starts with {head[:4].hex(' ')}){hint}")


def _pcap_linktype(head: bytes) -> int:
    """The link type in a classic pcap header, without the FCS bits above bit 15."""
    order = _PCAP_MAGICS[head[:4]][0]
    return Struct(order + "I").unpack_from(head, 20)[0] & 0xFFFF


def _check(path: str | os.PathLike) -> tuple[str, str]:
    """Open and identify a capture now, so that errors surface before iteration."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    with _open(path, name) as f:
        try:
            head = f.read(_HEAD)
        except OSError as e:
            raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
    fmt = _sniff(head, name)
    if fmt == "pcap":
        _parser_or_error(_pcap_linktype(head), name)
    return name, fmt


def _parser_or_error(linktype: int, name: str):
    try:
        return make_dissector(linktype)
    except CaptureError as e:
        raise CaptureError(f"{name}: {e}") from None


def _walk(path: str | os.PathLike, name: str, fmt: str, stats: CaptureStats,
          warn: Warn, handler_for: HandlerFactory) -> Iterator[object]:
    """Yield what the handlers return for each packet record of the file."""
    stats.format = fmt
    walker = _walk_pcap if fmt == "pcap" else _walk_pcapng
    return walker(path, name, stats, warn, handler_for)


def _read_error(name: str, e: OSError) -> CaptureError:
    return CaptureError(f"{name}: read failed: {e.strerror or e}")


def _ended(name: str, stats: CaptureStats, warn: Warn, packets: int, what: str) -> None:
    message = f"{name}: {what} after {packets} packets; analysed what was there"
    stats.complete = False
    stats.warnings.append(message)
    warn(message)


def _mid_record(name, stats, warn, packets) -> None:
    _ended(name, stats, warn, packets, "capture ends mid-record")


def _walk_pcap(path, name: str, stats: CaptureStats, warn: Warn,
               handler_for: HandlerFactory) -> Iterator[object]:
    """Classic pcap: a 24-byte header, then records of header + captured bytes."""
    f = _open(path, name)
    pos = n = frame = skipped = 0
    try:
        head = f.read(24)
        order, units, header_size = _PCAP_MAGICS[head[:4]]
        linktype = _pcap_linktype(head)
        stats.linktypes.add(linktype)
        handle = handler_for(linktype, units)
        record = Struct(order + "IIII").unpack_from
        read = f.read
        units = float(units)
        max_caplen = MAX_CAPLEN
        buf = b""
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                break
            buf = buf[pos:] + chunk if pos < n else chunk
            pos, n = 0, len(buf)
            last_header = n - header_size
            while pos <= last_header:
                sec, frac, caplen, wirelen = record(buf, pos)
                start = pos + header_size
                end = start + caplen
                if end > n or caplen > max_caplen:
                    if caplen > max_caplen:
                        _ended(name, stats, warn, frame, f"corrupt record length {caplen}")
                        return
                    break
                frame += 1
                pos = end
                item = handle(buf, start, end, frame, sec + frac / units, wirelen)
                if item is None:
                    skipped += 1
                else:
                    yield item
        if pos < n:
            _mid_record(name, stats, warn, frame)
    except OSError as e:
        raise _read_error(name, e) from None
    finally:
        f.close()
        stats.packets += frame
        stats.segments += frame - skipped


def _idb_options(buf, p: int, stop: int, order: str) -> tuple[int, int]:
    """Timestamp units per second and offset in seconds from an IDB's options."""
    option = Struct(order + "HH").unpack_from
    units, offset = 10**6, 0
    while p + 4 <= stop:
        code, length = option(buf, p)
        p += 4
        if code == 0 or p + length > stop:
            break
        if code == _OPT_TSRESOL and length >= 1:
            value = buf[p]
            units = 2 ** (value & 0x7F) if value & 0x80 else 10**value
        elif code == _OPT_TSOFFSET and length >= 8:
            offset = Struct(order + "q").unpack_from(buf, p)[0]
        p += (length + 3) & ~3
    return units, offset


def _walk_pcapng(path, name: str, stats: CaptureStats, warn: Warn,
                 handler_for: HandlerFactory) -> Iterator[object]:
    """pcapng: blocks of type, length, body, length; sections may switch byte order.

    An Enhanced Packet Block that passes every check is framed by a fast path
    first (one unpack for its header); anything else, including every damaged
    block, goes through the general code.
    """
    f = _open(path, name)
    read = f.read
    buf = b""
    pos = n = frame = skipped = to_skip = 0
    t = 0.0
    # (handler, units per second, offset, snaplen)
    interfaces: list[tuple[Handler, int, int, int]] = []
    max_caplen = MAX_CAPLEN
    order = "<"
    u32 = block = epb = pb = idb = epb_head = None

    def structs(o: str):
        return (Struct(o + "I").unpack_from, Struct(o + "II").unpack_from,
                Struct(o + "IIIII").unpack_from, Struct(o + "HHIIII").unpack_from,
                Struct(o + "HxxI").unpack_from, Struct(o + "IIIIIII").unpack_from)

    u32, block, epb, pb, idb, epb_head = structs(order)
    try:
        while True:
            if to_skip:
                data = read(min(to_skip, _CHUNK))
                if not data:
                    break
                to_skip -= len(data)
                continue
            chunk = read(_CHUNK)
            if not chunk:
                break
            buf = buf[pos:] + chunk if pos < n else chunk
            pos, n = 0, len(buf)
            while pos + 12 <= n:
                if pos + 28 > n:
                    btype = 0  # too short for an EPB: the general code decides
                else:
                    btype, blen, iface, high, low, caplen, wirelen = epb_head(buf, pos)
                    bend = pos + blen
                if (btype == 6 and bend <= n and blen >= 32 and not blen & 3
                        and u32(buf, bend - 4)[0] == blen):
                    start = pos + 28
                    end = start + caplen
                    if caplen <= max_caplen and end <= bend - 4 and iface < len(interfaces):
                        handle, units, offset, _ = interfaces[iface]
                        t = ((high << 32) | low) / units + offset
                        frame += 1
                        pos = bend
                        item = handle(buf, start, end, frame, t, wirelen)
                        if item is None:
                            skipped += 1
                        else:
                            yield item
                        continue
                btype, blen = block(buf, pos)
                if btype == _PCAPNG_SHB:
                    new_order = _BYTE_ORDER_MAGIC.get(buf[pos + 8:pos + 12])
                    if new_order is None:
                        _ended(name, stats, warn, frame, "corrupt section header")
                        return
                    if new_order != order:
                        order = new_order
                        u32, block, epb, pb, idb, epb_head = structs(order)
                        btype, blen = block(buf, pos)
                if blen < 12 or blen & 3:
                    _ended(name, stats, warn, frame, f"corrupt block length {blen}")
                    return
                bend = pos + blen
                if bend > n:
                    if blen <= _MAX_BUFFERED_BLOCK:
                        break
                    if btype in _PACKET_BLOCKS or btype == _IDB or btype == _PCAPNG_SHB:
                        _ended(name, stats, warn, frame, f"corrupt block length {blen}")
                        return
                    to_skip = bend - n
                    pos = n
                    break
                if u32(buf, bend - 4)[0] != blen:
                    _ended(name, stats, warn, frame, "corrupt block (lengths disagree)")
                    return
                if blen < _MIN_BLOCK.get(btype, 12):
                    _ended(name, stats, warn, frame, f"corrupt block length {blen}")
                    return
                if btype == _EPB or btype == _PB:
                    if btype == _EPB:
                        iface, high, low, caplen, wirelen = epb(buf, pos + 8)
                    else:
                        iface, _, high, low, caplen, wirelen = pb(buf, pos + 8)
                    start = pos + 28
                    end = start + caplen
                    if caplen > MAX_CAPLEN or end > bend - 4:
                        _ended(name, stats, warn, frame, f"corrupt packet length {caplen}")
                        return
                    if iface >= len(interfaces):
                        _ended(name, stats, warn, frame,
                               f"packet on undeclared interface {iface}")
                        return
                    handle, units, offset, _ = interfaces[iface]
                    t = ((high << 32) | low) / units + offset
                elif btype == _SPB:
                    if not interfaces:
                        _ended(name, stats, warn, frame, "packet on undeclared interface 0")
                        return
                    handle, units, offset, snaplen = interfaces[0]
                    (wirelen,) = u32(buf, pos + 8)
                    start = pos + 12
                    caplen = min(wirelen, blen - 16, snaplen or MAX_CAPLEN)
                    end = start + caplen
                else:
                    if btype == _IDB:
                        linktype, snaplen = idb(buf, pos + 8)
                        units, offset = _idb_options(buf, pos + 16, bend - 4, order)
                        stats.linktypes.add(linktype)
                        interfaces.append((handler_for(linktype, units), units, offset, snaplen))
                    elif btype == _PCAPNG_SHB:
                        interfaces = []
                    pos = bend
                    continue
                frame += 1
                item = handle(buf, start, end, frame, t, wirelen)
                pos = bend
                if item is None:
                    skipped += 1
                else:
                    yield item
        if to_skip or pos < n:
            _mid_record(name, stats, warn, frame)
    except OSError as e:
        raise _read_error(name, e) from None
    finally:
        f.close()
        stats.packets += frame
        stats.segments += frame - skipped


class CaptureReader:
    """A capture file as an iterable of records (`records`) or TcpSegments, with what was found in `stats`.

    The file is opened and identified at construction, so a missing file or
    a non-capture raises CaptureError right away; iterating reads it. `stats`
    is complete once iteration ends.

    `dedupe` drops the copies of one packet captured on several interfaces;
    None means "only for Linux cooked captures" (``tcpdump -i any``), where
    a packet crossing a bridge is seen once per interface, and for pcapng
    files that declare several interfaces (``dumpcap -i veth0 -i docker0``).
    """

    def __init__(self, path: str | os.PathLike, *, warn: Warn | None = None,
                 dedupe: bool | None = None):
        self.path = path
        self.name, self.format = _check(path)
        self.warn = warn or _default_warn
        self.dedupe = dedupe
        self.stats = CaptureStats(format=self.format)
        self._copies = CopyFilter()
        self._interfaces = 0

    def __iter__(self) -> Iterator[TcpSegment]:
        return map(segment_of, self.records())

    def records(self) -> Iterator[Record]:
        """The records (`sniffer.records`), the form `KeepaliveModel.feed_records` takes."""
        self.stats = CaptureStats(format=self.format)
        self._copies = CopyFilter()
        self._interfaces = 0
        return _walk(self.path, self.name, self.format, self.stats, self.warn,
                     self._handler_for)  # type: ignore[return-value]

    def _handler_for(self, linktype: int, units: int) -> Handler:
        dissect = _parser_or_error(linktype, self.name)
        self._interfaces += 1
        if self.dedupe is False or (self.dedupe is None and linktype not in _COOKED
                                    and self.format != "pcapng"):
            return dissect
        copies, stats = self._copies, self.stats
        if linktype in _COOKED or self.format != "pcapng":
            # The cooked v2 header names the interface; v1 and classic pcap do not (None).
            interface = None
        else:
            # pcapng holding one packet on several interfaces (dumpcap -i veth -i docker0): the
            # interface is the IDB; with dedupe=None, only once a second interface is declared.
            interface = ("idb", self._interfaces)
        always = self.dedupe is True or interface is None

        def handle(buf, start: int, end: int, frame: int, t: float, wirelen: int):
            record = dissect(buf, start, end, frame, t, wirelen)
            if record is not None and (always or self._interfaces > 1) and copies.is_copy(
                    linktype, buf, start, end, t, interface):
                stats.duplicates += 1
                return None
            return record

        return handle


def read_segments(path: str | os.PathLike, *, warn: Warn | None = None,
                  dedupe: bool | None = None) -> Iterator[TcpSegment]:
    """The TCP segments of a pcap or pcapng file, in file order.

    Raises CaptureError (now, not at the first `next`) if the file cannot be
    read as a capture; a damaged tail is reported through `warn`.
    """
    return iter(CaptureReader(path, warn=warn, dedupe=dedupe))


def walk_records(path: str | os.PathLike, handler_for: HandlerFactory, *,
                 warn: Warn | None = None) -> tuple[Iterator[object], CaptureStats]:
    """Lower level: call a handler on every packet record, for rewriting captures.

    `handler_for(linktype, units)` is called for each link type declared (once
    for a classic pcap, per interface for pcapng) and returns
    ``handler(buf, start, end, frame, t, wirelen)``; the record's captured
    bytes are ``buf[start:end]``. The iterator yields what the handlers return
    other than None.
    """
    name, fmt = _check(path)
    stats = CaptureStats(format=fmt)
    return _walk(path, name, fmt, stats, warn or _default_warn, handler_for), stats
