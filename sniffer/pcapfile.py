"""Read pcap and pcapng captures, streaming, in constant memory: frames in, records out.

A capture of a long keepalive run can hold millions of packets, so it is
read in large chunks and each frame is handed, in place in the chunk, to a
handler: for analysis the one dissection routine every packet source shares
(`sniffer.dissect`), which gives the `Record`s the model takes; for rewriting
(`sniffer.pcapwrite`) a writer. The walkers here only find frames and their
timestamps, as dpkt's and scapy's readers keep reading apart from dissection.

A capture is opened once and read front to back, never seeking, so what users
really hand over works: a file, ``-`` (standard input: ``tcpdump -w - | kaobs
analyze -``), ``/dev/stdin``, a pipe (``<(zcat x.pcap.gz)``), a fifo (waited
on, as tcpdump waits), and gzip, zstd, xz or bzip2 compressed captures,
recognised by their first bytes whatever their name.

A damaged file should still give what it holds: a capture cut off mid-record
(tcpdump killed, disk full), with a corrupt record length or a compressed
stream cut short ends with a warning after the packets before the damage.
What cannot be read is counted and said, never silently dropped: packets on a
pcapng interface of a link type kaobs does not read, packets in Simple Packet
Blocks (no timestamp), frames a snaplen cut before their TCP header, and time
going backwards. Only a capture that cannot be read at all raises
`CaptureError`.

Frame numbers count every packet record from 1, as Wireshark numbers them,
so a segment can be looked up with tshark's ``frame.number``.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from struct import Struct
from typing import BinaryIO, Callable, Iterator

from sniffer.dedupe import CopyFilter
from sniffer.dissect import (
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    linktype_name,
    make_cut_check,
    make_dissector,
)
from sniffer.records import CaptureError, Record, TcpSegment, segment_of

Warn = Callable[[str], None]
# handler(buf, start, end, frame, t, wirelen) -> something to yield, or None
Handler = Callable[..., object]
# handler_for(linktype, timestamp units per second) -> Handler
HandlerFactory = Callable[[int, int], Handler]
# untimed(handle, linktype, buf, start, end, frame, t_before, wirelen) -> something to yield, or None (pcapng SPBs)
Untimed = Callable[..., object]
# cut(linktype, buf, start, end) -> None: a frame captured short gave nothing
CutHook = Callable[..., None]

MAX_CAPLEN = 256 * 1024
"""Larger than any snaplen tcpdump or dumpcap use: a bigger record length is corruption."""

STDIN = "-"
"""The capture name that means standard input, as for tcpdump -r -."""

_NOT_YET = float("inf")
"""A walker's newest time before its first packet: ``t < newest`` sends the first packet down the rare
branch (time going backwards), which notes it as the first; every later packet costs one comparison."""
_CHUNK = 1 << 20
_PEEK_CHUNK = 64 << 10
_MAX_BUFFERED_BLOCK = 1 << 20
_MAGIC_BYTES = 6


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

# Compressed captures, by their first bytes (not their names): (what, how to open a decompressing stream).
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = b"BZh"


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
    compression: str | None = None
    """"gzip", "zstd", "xz", "bzip2" when the capture was compressed."""
    first_t: float | None = None
    """The first timed packet's time (None: no timed packet)."""
    newest_t: float | None = None
    """The latest time of any packet (not the last one's, when time went backwards)."""
    backwards: int = 0
    """Packets whose time is earlier than a packet before them in the file."""
    backwards_max: float = 0.0
    backwards_frame: int = 0
    """The first frame that went back in time."""
    untimed: int = 0
    """Packets in pcapng Simple Packet Blocks: no timestamp, so not analysed."""
    untimed_flows: set[bytes] = field(default_factory=set)
    """The flow keys (`sniffer.records`) of those packets that are TCP: their connections cannot be judged."""
    unsupported: dict[int, int] = field(default_factory=dict)
    """Link type -> packets skipped on pcapng interfaces of that link type, which kaobs cannot read."""
    cut_by_snaplen: int = 0
    """Packets captured too short to hold their TCP header (a small snaplen): not analysed."""
    snaplen_needed: int = 0
    """The snaplen that would have kept the whole TCP header of every such packet."""
    filtered: int = 0
    """Packets the user's filter (BPF expression, --since/--until) left out."""


def _default_warn(message: str) -> None:
    warnings.warn(message, CaptureWarning, stacklevel=3)


class _Damaged(Exception):
    """A compressed stream could not be decompressed further: the walkers end with a warning."""


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - a dependency; only .zst files need it
        pass
    return tuple(errors)


class _Stream:
    """A capture opened once and read front to back, never seeking; its first bytes were read to identify it.

    `read(n)` returns up to n bytes as soon as some are there (a pipe fed by
    tcpdump gives what it has, not n bytes after minutes), b"" at the end.
    """

    def __init__(self, head: bytes, file: BinaryIO, closers: list, compression: str | None):
        self._head = head
        self._file = file
        self._read1 = getattr(file, "read1", file.read)
        self._closers = closers
        self.compression = compression
        self._errors = _decompress_errors() if compression else ()

    def read(self, n: int) -> bytes:
        head = self._head
        if head:
            self._head = b""
            if len(head) >= n:
                head, self._head = head[:n], head[n:]
                return head
            return head + self._more(n - len(head))
        return self._more(n)

    def _more(self, n: int) -> bytes:
        if not self._errors:
            return self._read1(n)
        try:
            return self._read1(n)
        except self._errors as error:
            what = "cut off" if isinstance(error, EOFError) else f"damaged ({error})"
            raise _Damaged(f"{self.compression} stream {what}") from None

    @property
    def head(self) -> bytes:
        """The bytes read to identify the capture and not yet handed out."""
        return self._head

    def fill_head(self, n: int) -> bytes:
        """Read until `head` holds n bytes (fewer only at the end of the stream); they are still to be read."""
        if len(self._head) < n:
            head, self._head = self._head, b""
            self._head = head + self.read_exactly(n - len(head))
        return self._head

    def read_exactly(self, n: int) -> bytes:
        """n bytes, or fewer only at the end of the stream (for file headers)."""
        data = self.read(n)
        while len(data) < n:
            more = self.read(n - len(data))
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except (OSError, *self._errors):
                pass
        self._closers = []


class _Prefixed:
    """Bytes already read, then the rest of a file: what a decompressor reads from (it never seeks)."""

    def __init__(self, head: bytes, file: BinaryIO):
        self._head = head
        self._file = file
        self.mode = "rb"

    def read(self, n: int = -1) -> bytes:
        head, self._head = self._head, b""
        if n is None or n < 0:
            return head + self._file.read()
        if len(head) > n:
            head, self._head = head[:n], head[n:]
            return head
        return head + (self._file.read(n - len(head)) if n > len(head) else b"")

    def readable(self) -> bool:
        return True


def display_name(path: str | os.PathLike) -> str:
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return "standard input" if name == STDIN else name


def _open_file(path: str | os.PathLike, name: str) -> tuple[BinaryIO, bool]:
    """Open for reading (a fifo waits for its writer, as tcpdump does); (file, is a regular file)."""
    if os.fspath(path) in (STDIN, STDIN.encode()):
        stdin = sys.stdin
        if stdin is None:
            raise CaptureError("standard input is closed: nothing to read")
        if stdin.isatty():
            raise CaptureError("standard input is a terminal: pipe a capture into it (tcpdump -w - ... | kaobs analyze -)")
        return stdin.buffer, False
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CaptureError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise CaptureError(f"{name} is a directory, not a capture file") from None
    except PermissionError:
        raise CaptureError(f"{name}: permission denied") from None
    except OSError as e:
        raise CaptureError(f"{name}: cannot open: {e.strerror or e}") from None
    try:
        regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except OSError:
        regular = False
    return f, regular


def _decompressor(kind: str, raw: _Prefixed, name: str) -> tuple[BinaryIO, Callable[[], None]]:
    if kind == "gzip":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    elif kind == "xz":
        stream = lzma.LZMAFile(raw)  # type: ignore[assignment]
    elif kind == "bzip2":
        stream = bz2.BZ2File(raw)  # type: ignore[assignment]
    else:
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a dependency of kaobs
            raise CaptureError(f"{name} is zstd-compressed and the zstandard package is missing "
                               "(pip install zstandard, or decompress it with zstd -d)") from None
        # read_across_frames: zstd -c of several files, or a file appended to, holds several frames.
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[assignment]
    return stream, stream.close  # type: ignore[return-value]


def _compression(head: bytes) -> str | None:
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if head.startswith(_BZIP2_MAGIC) and len(head) >= 4 and head[3:4] in b"123456789":
        return "bzip2"
    return None


def _open_stream(path: str | os.PathLike, name: str) -> tuple[_Stream, str, bool]:
    """Open a capture once, decompress it if it is compressed, identify it: (stream, "pcap"/"pcapng", regular)."""
    file, regular = _open_file(path, name)
    closers: list = [] if file is getattr(sys.stdin, "buffer", None) else [file.close]
    try:
        try:
            head = _Stream(b"", file, [], None).read_exactly(_MAGIC_BYTES)
        except OSError as e:
            raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
        kind = _compression(head)
        stream_file: BinaryIO = file
        if kind is not None:
            stream_file, close = _decompressor(kind, _Prefixed(head, file), name)
            closers.append(close)
            try:
                head = _Stream(b"", stream_file, [], kind).read_exactly(_MAGIC_BYTES)
            except (_Damaged, OSError) as e:
                raise CaptureError(f"{name}: looks {kind}-compressed but cannot be decompressed ({e})") from None
        stream = _Stream(head, stream_file, closers, kind)
        try:
            fmt = _sniff(stream, name, kind)
        except _Damaged as e:
            raise CaptureError(f"{name}: {e}") from None
        except OSError as e:
            raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
    except BaseException:
        _Stream(b"", file, closers, None).close()
        raise
    return stream, fmt, regular


def _sniff(stream: _Stream, name: str, compression: str | None) -> str:
    """Tell "pcap" from "pcapng" by the first bytes, or say why it is neither; the bytes stay in the stream."""
    head = stream.head
    inside = f" ({compression}-compressed)" if compression else ""
    if not head:
        raise CaptureError(f"{name} is empty{inside}")
    magic = head[:4]
    if magic in _PCAP_MAGICS:
        if len(stream.fill_head(24)) < 24:
            raise CaptureError(f"{name}: capture is cut off inside its 24-byte file header")
        return "pcap"
    if magic == _PCAPNG_MAGIC:
        head = stream.fill_head(12)
        if len(head) < 12:
            raise CaptureError(f"{name}: capture is cut off inside its section header")
        if head[8:12] in _BYTE_ORDER_MAGIC:
            if len(stream.fill_head(_MIN_BLOCK[_PCAPNG_SHB])) < _MIN_BLOCK[_PCAPNG_SHB]:
                raise CaptureError(f"{name}: capture is cut off inside its section header")
            return "pcapng"
    if compression:
        raise CaptureError(f"{name} is {compression}-compressed but what it holds is not a pcap or pcapng "
                           f"capture (starts with {head[:4].hex(' ')})")
    raise CaptureError(f"{name} is not a pcap or pcapng file (starts with {head[:4].hex(' ')})")


def _read_error(name: str, e: OSError) -> CaptureError:
    return CaptureError(f"{name}: read failed: {e.strerror or e}")


def _ended(name: str, stats: CaptureStats, warn: Warn, packets: int, what: str) -> None:
    message = f"{name}: {what} after {packets} packets; analysed what was there"
    stats.complete = False
    stats.warnings.append(message)
    warn(message)


def _mid_record(name, stats, warn, packets) -> None:
    _ended(name, stats, warn, packets, "capture ends mid-record")


def _keep_last_time(stats: CaptureStats, first: float | None, newest: float | None, back: int,
                    back_max: float, back_frame: int) -> None:
    if stats.first_t is None:
        stats.first_t = first
    if newest is not None and (stats.newest_t is None or newest > stats.newest_t):
        stats.newest_t = newest
    if back and not stats.backwards:
        stats.backwards_frame = back_frame
    stats.backwards += back
    stats.backwards_max = max(stats.backwards_max, back_max)


def _keep_time_old_untimed(handle: Handler, linktype: int, buf, start: int, end: int, frame: int, t: float,
                           wirelen: int):
    """For rewriting: an SPB's frame keeps the time of the packet before it (what it was written with)."""
    return handle(buf, start, end, frame, t, wirelen)


@dataclass
class _Walk:
    """What a walker needs besides the stream: where it reports, how frames are handled."""

    stream: _Stream
    name: str
    stats: CaptureStats
    warn: Warn
    handler_for: HandlerFactory
    untimed: Untimed = _keep_time_old_untimed
    cut: CutHook | None = None
    chunk: int = _CHUNK
    on_end: Callable[[], None] | None = None
    """Called when the capture was read to its end (or its damage), not when reading stopped early or failed."""

    def ended(self) -> None:
        if self.on_end is not None:
            self.on_end()


def _walk(walk: _Walk, fmt: str) -> Iterator[object]:
    """Yield what the handlers return for each packet record of the capture; the stream is closed when it ends.

    A generator's finally runs on exhaustion, on an error and on close(), so
    the stream is closed in every case without another layer per item.
    """
    walk.stats.format = fmt
    walk.stats.compression = walk.stream.compression
    return _walk_pcap(walk) if fmt == "pcap" else _walk_pcapng(walk)


def _walk_pcap(walk: _Walk) -> Iterator[object]:
    """Classic pcap: a 24-byte header, then records of header + captured bytes."""
    stream, name, stats, warn = walk.stream, walk.name, walk.stats, walk.warn
    pos = n = frame = skipped = back = back_frame = 0
    first = newest = None
    failed = False
    back_max = 0.0
    try:
        head = stream.read_exactly(24)
        if len(head) < 24:
            raise CaptureError(f"{name}: capture is cut off inside its 24-byte file header")
        order, units, header_size = _PCAP_MAGICS[head[:4]]
        linktype = Struct(order + "I").unpack_from(head, 20)[0] & 0xFFFF  # FCS bits above bit 15
        stats.linktypes.add(linktype)
        handle = walk.handler_for(linktype, units)
        cut = walk.cut
        record = Struct(order + "IIII").unpack_from
        read, chunk_size = stream.read, walk.chunk
        units = float(units)
        max_caplen = MAX_CAPLEN
        newest = _NOT_YET  # see _NOT_YET: the first packet takes the rare branch
        buf = b""
        while True:
            chunk = read(chunk_size)
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
                t = sec + frac / units
                if t < newest:
                    if first is None:
                        first = newest = t
                    else:
                        if not back:
                            back_frame = frame
                        back += 1
                        if newest - t > back_max:
                            back_max = newest - t
                else:
                    newest = t
                item = handle(buf, start, end, frame, t, wirelen)
                if item is None:
                    skipped += 1
                    if caplen < wirelen and cut is not None:
                        cut(linktype, buf, start, end)
                else:
                    yield item
        if pos < n:
            _mid_record(name, stats, warn, frame)
    except _Damaged as e:
        _ended(name, stats, warn, frame, str(e))
    except OSError as e:
        failed = True
        raise _read_error(name, e) from None
    except BaseException:
        failed = True  # an error, Ctrl-C, or the caller stopped reading (GeneratorExit)
        raise
    finally:
        stream.close()
        _keep_last_time(stats, first, newest if first is not None else None, back, back_max, back_frame)
        stats.packets += frame
        stats.segments += frame - skipped
        if not failed:
            walk.ended()


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


def _walk_pcapng(walk: _Walk) -> Iterator[object]:
    """pcapng: blocks of type, length, body, length; sections may switch byte order.

    An Enhanced Packet Block that passes every check is framed by a fast path
    first (one unpack for its header); anything else, including every damaged
    block, goes through the general code.
    """
    stream, name, stats, warn, handler_for = walk.stream, walk.name, walk.stats, walk.warn, walk.handler_for
    untimed, cut = walk.untimed, walk.cut
    read, chunk_size = stream.read, walk.chunk
    buf = b""
    pos = n = frame = skipped = to_skip = back = back_frame = 0
    t = 0.0
    first = None
    newest = _NOT_YET
    back_max = 0.0
    failed = False
    # (handler, units per second, offset, snaplen, linktype)
    interfaces: list[tuple[Handler, int, int, int, int]] = []
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
                data = read(min(to_skip, chunk_size))
                if not data:
                    break
                to_skip -= len(data)
                continue
            chunk = read(chunk_size)
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
                        handle, units, offset, _, linktype = interfaces[iface]
                        t = ((high << 32) | low) / units + offset
                        if t < newest:
                            if first is None:
                                first = newest = t
                            else:
                                if not back:
                                    back_frame = frame + 1
                                back += 1
                                if newest - t > back_max:
                                    back_max = newest - t
                        else:
                            newest = t
                        frame += 1
                        pos = bend
                        item = handle(buf, start, end, frame, t, wirelen)
                        if item is None:
                            skipped += 1
                            if caplen < wirelen and cut is not None:
                                cut(linktype, buf, start, end)
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
                    handle, units, offset, _, linktype = interfaces[iface]
                    t = ((high << 32) | low) / units + offset
                    if t < newest:
                        if first is None:
                            first = newest = t
                        else:
                            if not back:
                                back_frame = frame + 1
                            back += 1
                            if newest - t > back_max:
                                back_max = newest - t
                    else:
                        newest = t
                elif btype == _SPB:
                    if not interfaces:
                        _ended(name, stats, warn, frame, "packet on undeclared interface 0")
                        return
                    handle, units, offset, snaplen, linktype = interfaces[0]
                    (wirelen,) = u32(buf, pos + 8)
                    start = pos + 12
                    caplen = min(wirelen, blen - 16, snaplen or MAX_CAPLEN)
                    end = start + caplen
                    frame += 1
                    pos = bend
                    # No timestamp: not a packet any timer can be judged on (see CaptureReader).
                    item = untimed(handle, linktype, buf, start, end, frame, t, wirelen)
                    if item is None:
                        skipped += 1
                    else:
                        yield item
                    continue
                else:
                    if btype == _IDB:
                        linktype, snaplen = idb(buf, pos + 8)
                        units, offset = _idb_options(buf, pos + 16, bend - 4, order)
                        stats.linktypes.add(linktype)
                        interfaces.append((handler_for(linktype, units), units, offset, snaplen, linktype))
                    elif btype == _PCAPNG_SHB:
                        interfaces = []
                    pos = bend
                    continue
                frame += 1
                item = handle(buf, start, end, frame, t, wirelen)
                pos = bend
                if item is None:
                    skipped += 1
                    if caplen < wirelen and cut is not None:
                        cut(linktype, buf, start, end)
                else:
                    yield item
        if to_skip or pos < n:
            _mid_record(name, stats, warn, frame)
    except _Damaged as e:
        _ended(name, stats, warn, frame, str(e))
    except OSError as e:
        failed = True
        raise _read_error(name, e) from None
    except BaseException:
        failed = True  # an error, Ctrl-C, or the caller stopped reading (GeneratorExit)
        raise
    finally:
        stream.close()
        _keep_last_time(stats, first, newest if first is not None else None, back, back_max, back_frame)
        stats.packets += frame
        stats.segments += frame - skipped
        if not failed:
            walk.ended()


def _parser_or_error(linktype: int, name: str):
    try:
        return make_dissector(linktype)
    except CaptureError as e:
        raise CaptureError(f"{name}: {e}") from None


def _pcap_linktype(head: bytes) -> int:
    """The link type in a classic pcap header, without the FCS bits above bit 15."""
    order = _PCAP_MAGICS[head[:4]][0]
    return Struct(order + "I").unpack_from(head, 20)[0] & 0xFFFF


class CaptureReader:
    """A capture as an iterable of records (`records`) or TcpSegments, with what was found in `stats`.

    The capture is opened and identified at construction, so a missing file
    or a non-capture raises CaptureError right away; iterating reads it, once,
    front to back (a second iteration opens a regular file again; a pipe or
    standard input can be read only once). `stats` is complete once iteration
    ends.

    `dedupe` drops the copies of one packet captured on several interfaces;
    None means "only for Linux cooked captures" (``tcpdump -i any``), where
    a packet crossing a bridge is seen once per interface, and for pcapng
    files that declare several interfaces (``dumpcap -i veth0 -i docker0``).

    `packet_filter` (`sniffer.bpf.PacketFilter`) is applied to every frame
    before it is dissected: only frames it keeps are analysed, the others are
    counted in ``stats.filtered``.

    What cannot be read is counted and said through `warn` when the capture
    has been read: packets on pcapng interfaces of a link type kaobs does not
    read (a capture with no readable interface at all is a CaptureError),
    packets in Simple Packet Blocks (no timestamp: not analysed, their flows
    in ``stats.untimed_flows``), frames a snaplen cut before their TCP header
    (with the snaplen that would have kept it), and time going backwards.
    """

    def __init__(self, path: str | os.PathLike, *, warn: Warn | None = None,
                 dedupe: bool | None = None, packet_filter=None, chunk: int = _CHUNK):
        self.path = path
        self.name = display_name(path)
        self.warn = warn or _default_warn
        self.dedupe = dedupe
        self.packet_filter = packet_filter
        self.chunk = chunk
        self._stream, self.format, self._regular = _open_stream(path, self.name)
        self.compression = self._stream.compression
        if self.format == "pcap":
            try:
                _parser_or_error(_pcap_linktype(self._stream.head), self.name)
            except CaptureError:
                self._stream.close()
                raise
        self.stats = CaptureStats(format=self.format)
        self._reset()

    def _reset(self) -> None:
        self._copies = CopyFilter()
        self._interfaces = 0
        self._readable_interfaces = 0
        self._unsupported_error: str | None = None
        self._cut_checks: dict[int, Callable] = {}
        self._dissectors: dict[int, Callable] = {}
        self._concluded = False

    def __iter__(self) -> Iterator[TcpSegment]:
        return map(segment_of, self.records())

    def records(self) -> Iterator[Record]:
        """The records (`sniffer.records`), the form `KeepaliveModel.feed_records` takes."""
        stream = self._stream
        if stream is None:
            if not self._regular:
                raise CaptureError(f"{self.name} was read already: a pipe or standard input can be read only once")
            stream, self.format, _ = _open_stream(self.path, self.name)
        self._stream = None
        self.stats = CaptureStats(format=self.format)
        self._reset()
        walk = _Walk(stream, self.name, self.stats, self.warn, self._handler_for, untimed=self._untimed,
                     cut=self._cut, chunk=self.chunk, on_end=self.conclude)
        return _walk(walk, self.format)  # type: ignore[return-value]

    def close(self) -> None:
        """Close a capture opened but never read (iterating to the end closes it)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def conclude(self) -> None:
        """Say what could not be read (once); called when the capture was read, or by a caller that stopped early."""
        if self._concluded:
            return
        self._concluded = True
        stats, name = self.stats, self.name
        if self._unsupported_error is not None and not self._readable_interfaces:
            raise CaptureError(self._unsupported_error)
        notes = []
        for linktype, count in sorted(stats.unsupported.items()):
            notes.append(f"{name}: {count} packet(s) on interfaces of link type {linktype} "
                         f"({linktype_name(linktype)}) skipped: kaobs reads Ethernet, raw IP, Linux cooked "
                         "SLL/SLL2 and BSD loopback")
        if stats.untimed:
            notes.append(f"{name}: {stats.untimed} packet(s) in pcapng Simple Packet Blocks, which carry no "
                         "timestamp: they cannot be timed, so they were left out and nothing is judged on "
                         "their connections")
        if stats.cut_by_snaplen:
            notes.append(f"{name}: {stats.cut_by_snaplen} packet(s) were cut by the capture's snaplen before the end "
                         f"of their TCP header and could not be read: capture with a snaplen of at least "
                         f"{stats.snaplen_needed} bytes (tcpdump -s {stats.snaplen_needed})")
        if stats.backwards:
            harmless = stats.backwards_max < 0.05
            notes.append(
                f"{name}: time goes backwards at {stats.backwards} packet(s), by up to "
                f"{stats.backwards_max * 1000:.3f} ms (first at frame {stats.backwards_frame}): "
                + ("usual when several interfaces are written to one file; too little to change a keepalive "
                   "timing" if harmless else
                   "packets are analysed in file order, so durations and timings around them are wrong"))
        for note in notes:
            stats.warnings.append(note)
            self.warn(note)

    # -- per interface ----------------------------------------------------------

    def _handler_for(self, linktype: int, units: int) -> Handler:
        self._interfaces += 1
        try:
            dissect = make_dissector(linktype)
        except CaptureError as error:
            if self.format == "pcap":
                raise CaptureError(f"{self.name}: {error}") from None
            # pcapng: tshark reads the other interfaces; so does kaobs, and counts what it skipped.
            self._unsupported_error = self._unsupported_error or f"{self.name}: {error}"
            return self._skipper(linktype)
        self._readable_interfaces += 1
        self._dissectors.setdefault(linktype, dissect)
        if linktype not in self._cut_checks:
            self._cut_checks[linktype] = make_cut_check(linktype)
        handle = dissect
        if not (self.dedupe is False or (self.dedupe is None and linktype not in _COOKED
                                         and self.format != "pcapng")):
            handle = self._deduplicating(dissect, linktype)
        if self.packet_filter is not None:
            handle = self._filtering(handle, linktype)
        return handle

    def _skipper(self, linktype: int) -> Handler:
        unsupported = self.stats.unsupported
        unsupported.setdefault(linktype, 0)

        def skip(buf, start: int, end: int, frame: int, t: float, wirelen: int):
            unsupported[linktype] += 1
            return None

        return skip

    def _deduplicating(self, dissect: Handler, linktype: int) -> Handler:
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

    def _filtering(self, inner: Handler, linktype: int) -> Handler:
        try:
            keep = self.packet_filter.matcher(linktype)
        except CaptureError as error:
            raise CaptureError(f"{self.name}: {error}") from None
        stats = self.stats

        def handle(buf, start: int, end: int, frame: int, t: float, wirelen: int):
            if keep(buf, start, end, t, wirelen):
                return inner(buf, start, end, frame, t, wirelen)
            stats.filtered += 1
            return None

        return handle

    def _untimed(self, handle: Handler, linktype: int, buf, start: int, end: int, frame: int, t: float,
                 wirelen: int) -> None:
        """A packet without a timestamp (pcapng SPB): counted, its flow noted, never analysed."""
        self.stats.untimed += 1
        dissect = self._dissectors.get(linktype)
        if dissect is not None:
            record = dissect(buf, start, end, frame, 0.0, wirelen)
            if record is not None and len(self.stats.untimed_flows) < 65536:
                self.stats.untimed_flows.add(record[2])
        return None

    def _cut(self, linktype: int, buf, start: int, end: int) -> None:
        check = self._cut_checks.get(linktype)
        if check is None:
            return
        needed = check(buf, start, end)
        if needed is not None:
            stats = self.stats
            stats.cut_by_snaplen += 1
            if needed > stats.snaplen_needed:
                stats.snaplen_needed = needed


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
    other than None. A packet in a Simple Packet Block (no timestamp) gets the
    time of the packet before it.
    """
    name = display_name(path)
    stream, fmt, _ = _open_stream(path, name)
    stats = CaptureStats(format=fmt)
    walk = _Walk(stream, name, stats, warn or _default_warn, handler_for)
    return _walk(walk, fmt), stats


def first_packet_time(path: str | os.PathLike) -> float | None:
    """The time of a capture's first timed packet, reading no further than it; None when it has none.

    For putting files in time order (tcpdump -C/-G rotations given in the
    wrong order); reads a regular file, which is opened again to be analysed.
    """
    def handler_for(linktype: int, units: int) -> Handler:
        return lambda buf, start, end, frame, t, wirelen: t

    name = display_name(path)
    stream, fmt, _ = _open_stream(path, name)
    walk = _Walk(stream, name, CaptureStats(format=fmt), lambda message: None, handler_for,
                 untimed=lambda *args: None, chunk=_PEEK_CHUNK)
    items = _walk(walk, fmt)
    try:
        return next(items, None)  # type: ignore[return-value]
    finally:
        items.close()  # type: ignore[attr-defined]
