"""Write classic pcap files that keep packet headers only, for live capture and rewriting.

kaobs needs the TCP header and the lengths, never the payload: a capture of a
Postgres connection holds query text, results and sometimes passwords, so a
file kaobs writes keeps, by default, each frame up to the end of its TCP
header (for other IP packets, the end of the IP header; for anything else, the
link header). The record's original length on the wire is kept, and the IP
header still says how long the packet was, so kaobs, tcpdump and tshark still
see the true sizes and payload lengths ("[Packet size limited during capture]").

The file is written with unbuffered writes of whole records, flushed after
every record by default: a writer killed with SIGKILL leaves a readable file
in which at most the last record is cut, and the reader reports such a cut
as a warning.

Output is always classic pcap (one link type per file): it is what every tool
reads. `strip_payloads` therefore refuses a pcapng whose interfaces have
different link types, rather than writing several files, and names the way to
split it.
"""
from __future__ import annotations

import os
import stat
import time as time_module
from struct import Struct
from types import TracebackType

from sniffer.dissect import frame_snap_end, linktype_name, make_dissector
from sniffer.pcapfile import CaptureStats, Warn, walk_records
from sniffer.records import CaptureError

PRIVATE_MODE = 0o600
"""Who may read a capture kaobs writes, by default: only its owner. Even headers-only files say who talked to
the database and when; with --full-packets they hold query text and passwords."""

DEFAULT_SNAPLEN = 262144
"""tcpdump's default: a whole frame fits, so `full=True` keeps everything."""

_USEC_MAGIC, _NSEC_MAGIC = 0xA1B2C3D4, 0xA1B23C4D
_FILE_HEADER = Struct("=IHHiIII")
_RECORD_HEADER = Struct("=IIII")


def _readable(linktype: int) -> bool:
    """True if `sniffer.dissect` can find the headers in frames of this link type."""
    try:
        make_dissector(linktype)
    except CaptureError:
        return False
    return True


class PcapWriter:
    """A classic pcap being written; use as a context manager or call `close()`.

    ``PcapWriter(path, linktype, snaplen)`` creates (or truncates) `path` and
    writes the file header at once, so even a capture that sees no packet
    leaves a valid file, readable by its owner only unless `mode` says
    otherwise. `nsec` writes nanosecond timestamps; `name` is
    what messages call the file (default: `path`). Records are
    written to the file every `flush_every` records (1: each record, the
    default, which is what a capture that may be killed wants) and on
    `flush()`/`close()`. Host byte order, as libpcap writes.

    Raises CaptureError (one line) for a path that cannot be written or a
    link type whose headers kaobs cannot find.
    """

    def __init__(self, path: str | os.PathLike, linktype: int, snaplen: int = DEFAULT_SNAPLEN, *,
                 nsec: bool = False, flush_every: int = 1, name: str | None = None, mode: int = PRIVATE_MODE):
        if not 0 < snaplen <= 0x7FFFFFFF:
            raise ValueError(f"snaplen must be positive, not {snaplen}")
        if not _readable(linktype):  # the headers-only cut must understand the frames
            raise CaptureError(f"cannot write headers-only captures of link type {linktype} "
                               f"({linktype_name(linktype)})")
        self.path = path
        self.name = name or os.fsdecode(os.fspath(path))
        self.linktype = linktype
        self.snaplen = snaplen
        self.nsec = nsec
        self.units = 10**9 if nsec else 10**6
        self.flush_every = max(1, flush_every)
        self.records = 0
        self.bytes_dropped = 0
        """Captured bytes not written because they were payload (or beyond the snaplen)."""
        self._pending: list[bytes] = []
        try:
            self._file = _open_private(path, mode)
        except OSError as error:
            raise self._error("cannot write", error) from None
        self._pending.append(_FILE_HEADER.pack(_NSEC_MAGIC if nsec else _USEC_MAGIC, 2, 4, 0, 0,
                                               snaplen, linktype))
        self.flush()

    def _error(self, what: str, error: OSError) -> CaptureError:
        return CaptureError(f"{what} {self.name}: {error.strerror or error}")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, frame: bytes | bytearray | memoryview, t: float, wirelen: int | None = None,
              full: bool = False) -> int:
        """Append one frame captured at `t` (seconds since the epoch); returns the bytes kept.

        `wirelen` is the frame's length on the wire (default: ``len(frame)``);
        pass the original one when the frame was already cut by a snaplen.
        Without `full`, the frame is cut where its headers end.
        """
        if self._file.closed:
            raise ValueError(f"write to closed PcapWriter for {self.name}")
        size = len(frame)
        keep = size if full else frame_snap_end(self.linktype, frame)
        if keep > self.snaplen:
            keep = self.snaplen
        self.bytes_dropped += size - keep
        if wirelen is None or wirelen < size:
            wirelen = size
        seconds = int(t)
        fraction = round((t - seconds) * self.units)
        if fraction >= self.units:  # 0.9999999996 s rounds up into the next second
            seconds, fraction = seconds + 1, fraction - self.units
        elif fraction < 0:
            seconds, fraction = seconds - 1, fraction + self.units
        self._pending.append(_RECORD_HEADER.pack(seconds & 0xFFFFFFFF, fraction, keep, wirelen))
        self._pending.append(bytes(frame[:keep]))
        self.records += 1
        if self.records % self.flush_every == 0:
            self.flush()
        return keep

    def flush(self) -> None:
        """Write what is pending, whole records in one system call."""
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        try:
            while data:
                written = self._file.write(data)
                data = data[written:]
        except OSError as error:
            raise self._error("cannot write", error) from None

    def close(self) -> None:
        """Flush and close; closing twice is harmless."""
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _open_private(path: str | os.PathLike, mode: int):
    """Create or truncate `path` for writing with permissions `mode` (unbuffered).

    A new file gets `mode` (less the umask); an existing regular file is set
    to exactly `mode` too, since truncating keeps its old, maybe wider,
    permissions. Anything else (a fifo, /dev/null, a terminal) is left as it is.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, mode)
        return os.fdopen(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def strip_payloads(src: str | os.PathLike, dst: str | os.PathLike, *, warn: Warn | None = None,
                   full: bool = False) -> CaptureStats:
    """Rewrite any capture kaobs reads (pcap, pcapng) as a headers-only classic pcap.

    Every packet record is kept, in order, with its timestamp and original
    length; only the bytes after the headers go (with `full`, nothing goes:
    a plain pcapng-to-pcap conversion). The output has one link type, so a
    pcapng whose interfaces have different link types is refused with a
    CaptureError naming them. Timestamps are nanoseconds if the first
    interface's are finer than microseconds, else microseconds.

    `dst` is written through a temporary file beside it and renamed at the
    end: an error never leaves a half-written `dst`, and `dst` may be `src`.
    A damaged tail of `src` is reported through `warn` (see CaptureReader);
    the records before it are written. Returns the reader's statistics;
    ``stats.packets`` records were written.
    """
    dst_name = os.fsdecode(os.fspath(dst))
    src_name = os.fsdecode(os.fspath(src))
    directory = os.path.dirname(os.path.abspath(dst_name))
    partial = os.path.join(directory, f".{os.path.basename(dst_name)}.{os.getpid()}.partial")
    writers: list[PcapWriter] = []
    linktypes: list[int] = []

    def handler_for(linktype: int, units: int):
        if not writers:
            if not _readable(linktype):
                raise CaptureError(f"{src_name}: cannot write headers-only captures of link type "
                                   f"{linktype} ({linktype_name(linktype)})")
            writers.append(PcapWriter(partial, linktype, nsec=units > 10**6, flush_every=4096, name=dst_name))
            linktypes.append(linktype)
        elif linktype != linktypes[0]:
            raise CaptureError(
                f"{src_name} has interfaces of different link types ({linktypes[0]} "
                f"{linktype_name(linktypes[0])}, {linktype} {linktype_name(linktype)}); a pcap holds one: "
                f"split it first, e.g. tshark -r {src_name} -Y 'frame.interface_id == 0' -w PART.pcapng")
        writer = writers[0]
        write = writer.write

        def handle(buf, start: int, end: int, frame: int, t: float, wirelen: int):
            write(memoryview(buf)[start:end], t, wirelen, full)
            return None

        return handle

    records, stats = walk_records(src, handler_for, warn=warn)
    try:
        for _ in records:
            pass
        if not writers:  # no interface at all (a pcapng with only a section header)
            writers.append(PcapWriter(partial, 1, name=dst_name))
        writers[0].close()
        try:
            os.replace(partial, dst_name)
        except OSError as error:
            raise CaptureError(f"cannot write {dst_name}: {error.strerror or error}") from None
    except BaseException:
        for writer in writers:
            writer.close()
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    return stats


class RotatingPcapWriter:
    """`PcapWriter` over a series of files, as ``tcpdump -w FILE -C MB -G S -W N`` writes them, so a long capture
    does not fill the disk.

    * `file_size` (bytes; tcpdump's -C counts millions): a new file before
      a record that would take the current one past it (tcpdump starts one
      once the file is already past it: at most one record smaller here).
      Files after the first are FILE1, FILE2, ...
    * `rotate_seconds` (-G): a new file once a packet's time is that far
      past the current file's start (intervals of `rotate_seconds` from the
      first); the name is `path` through strftime(3) with the local time of
      the interval's start. With `file_size` too, FILE<count>
      (the count restarts at each time rotation, the first one unnumbered).
    * `file_count` (-W): at most that many files stay. With `file_size` the
      names are numbered from 0, zero-padded to sort, and reused in a ring
      (tcpdump's rotating buffer); with `rotate_seconds` alone the oldest
      file is deleted (tcpdump would stop the capture instead: a watch is
      meant to run on).

    Every file is a whole pcap (header first, whole records only), written
    with `mode`; `files` lists those written and not deleted, oldest first.
    `start` is when the first file's interval begins (default: now; packet
    times are wall-clock times).
    """

    def __init__(self, path: str, linktype: int, snaplen: int = DEFAULT_SNAPLEN, *, nsec: bool = False,
                 flush_every: int = 1, mode: int = PRIVATE_MODE, file_size: int | None = None,
                 rotate_seconds: float | None = None, file_count: int | None = None,
                 start: float | None = None) -> None:
        self.pattern = path
        self.linktype, self.snaplen, self.nsec = linktype, snaplen, nsec
        self.flush_every, self.mode = flush_every, mode
        self.file_size, self.rotate_seconds, self.file_count = file_size, rotate_seconds, file_count
        self._digits = len(str(file_count)) if file_count and file_size else 0
        self._count = 0  # the -C number of the current file
        self._started = time_module.time() if start is None else start  # -G: start of the current file's interval
        self._size = 0
        self.records = 0
        self.bytes_dropped = 0
        self.files: list[str] = []
        self._writer: PcapWriter | None = None
        # The first file exists from the start, as tcpdump's (a capture that sees no packet leaves a valid pcap).
        self._open(self._started)

    @property
    def name(self) -> str:
        return self.files[-1]

    @property
    def closed(self) -> bool:
        return self._writer is None or self._writer.closed

    def _name(self, t: float | None) -> str:
        base = self.pattern
        if self.rotate_seconds and t is not None:
            base = time_module.strftime(self.pattern, time_module.localtime(t))
        if self._count == 0 and not self._digits:
            return base
        return f"{base}{self._count:0{self._digits}d}"

    def _open(self, t: float | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self.bytes_dropped += self._writer.bytes_dropped
        name = self._name(t)
        self._writer = PcapWriter(name, self.linktype, self.snaplen, nsec=self.nsec, flush_every=self.flush_every,
                                  mode=self.mode)
        self._size = _FILE_HEADER.size
        if name in self.files:
            self.files.remove(name)  # written over (the ring, or a name the time pattern gave again)
        self.files.append(name)
        while self.file_count and len(self.files) > self.file_count:
            oldest = self.files.pop(0)
            try:
                os.unlink(oldest)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise CaptureError(f"cannot delete {oldest} (--file-count): {error.strerror or error}") from None

    def write(self, frame: bytes | bytearray | memoryview, t: float, wirelen: int | None = None,
              full: bool = False) -> int:
        if self.rotate_seconds:
            if t - self._started >= self.rotate_seconds:
                self._started += (t - self._started) // self.rotate_seconds * self.rotate_seconds
                self._count = 0
                self._open(self._started)
        if self.file_size:
            size = len(frame)
            keep = min(size if full else frame_snap_end(self.linktype, frame), self.snaplen)
            if self._size > _FILE_HEADER.size and self._size + _RECORD_HEADER.size + keep > self.file_size:
                self._count += 1
                if self.file_count and self._count >= self.file_count:
                    self._count = 0
                self._open(self._started)  # -G's name stays the interval's
        assert self._writer is not None
        kept = self._writer.write(frame, t, wirelen, full)
        self._size += _RECORD_HEADER.size + kept
        self.records += 1
        return kept

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None and not self._writer.closed:
            self._writer.close()
            self.bytes_dropped += self._writer.bytes_dropped

    def __enter__(self) -> "RotatingPcapWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
