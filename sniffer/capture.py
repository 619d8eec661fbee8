"""Live capture: records off one or more interfaces, as packets arrive.

scapy opens the packet sockets (`L2ListenSocket`: AF_PACKET, promiscuous,
kernel timestamps) and compiles the BPF filter with libpcap; the kernel then
drops everything but the Postgres ports before a packet is ever copied to us.
Frames are read raw and parsed by `sniffer.frames` — scapy's per-packet
dissection costs ~100x more and would lose packets under load.

Design choices, each for a reason:

* Where the kernel allows it, an interface is read through a TPACKET_V3
  memory-mapped ring (`sniffer.ring`): one wake-up per block of packets
  instead of a system call per packet, only the first 128 bytes copied, and
  records for the model's fast path: ~1.4 us of CPU per packet against ~6 us
  for a packet socket and a TcpSegment each, which is
  what keeps up with a busy bridge (bench/bench_watch_load.py). Blocks are
  handed over when full or after 50 ms, so events can be that late. The
  plain socket below is the fallback (`path` says which, `path_notes` why;
  KAOBS_CAPTURE=socket forces it).
* Every socket is non-blocking and polled with `select` and a short timeout,
  so `stop()` (from a signal handler or another thread) or a duration is
  honoured within about `POLL_S` even when no packet comes.
* A bigger receive buffer (`SO_RCVBUFFORCE`, root) absorbs bursts while the
  model or the terminal is busy; what the kernel still dropped is reported
  from `PACKET_STATISTICS`, never hidden.
* On loopback every packet is seen twice (outgoing and incoming); the
  outgoing copy is dropped as libpcap does. Across several interfaces (a
  bridge and one of its veths) copies of one packet are dropped by header
  key, as the capture reader does for ``tcpdump -i any`` files. A bridge in
  promiscuous mode shows a container-to-container packet once.
* Frame numbers count the packets delivered (after copies are dropped), so
  frame N in a report is frame N of the pcap written with `write`.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from sniffer.dedupe import CopyFilter
from sniffer.discovery import ANY, interface_exists
from sniffer.dissect import ARPHRD_LINKTYPE, ARPHRD_LOOPBACK, make_dissector
from sniffer.records import CaptureError, Record

SOL_PACKET = 263
PACKET_STATISTICS = 6
_TPACKET_STATS = struct.Struct("II")  # struct tpacket_stats {unsigned tp_packets, tp_drops}
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
PACKET_OUTGOING = 4

RCVBUF_BYTES = 16 << 20
"""Room for ~100k header-sized frames: seconds of a busy server while the terminal redraws."""
POLL_S = 0.1
"""Longest a blocked read waits before looking at the stop flag again."""
MAX_FRAME = 65535
"""Bigger than any frame on a 64k-MTU loopback; GRO'd packets are cut here (headers are what counts)."""
_DRAIN_BATCH = 512
"""Frames read from one socket before the others get a turn."""
_RING_BLOCKS_PER_READ = 8
"""Ring blocks (~4000 frames each) turned into records before the caller gets them."""

_TIMESPEC = struct.Struct("qq")  # struct timespec of SO_TIMESTAMPNS on 64-bit Linux
_ANCILLARY_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
PACKET_AUXDATA = 8


def bpf_filter(ports: Sequence[int], hosts: Sequence[str] = ()) -> str:
    """The kernel-side filter: TCP on the server ports, optionally to or from the given hosts.

    >>> bpf_filter([5432, 5433], ["172.18.0.2"])
    '(tcp port 5432 or tcp port 5433) and (host 172.18.0.2)'
    """
    unique_ports = list(dict.fromkeys(int(p) for p in ports))
    if not unique_ports:
        raise ValueError("at least one port is needed")
    for port in unique_ports:
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
    expression = " or ".join(f"tcp port {p}" for p in unique_ports)
    unique_hosts = list(dict.fromkeys(hosts))
    if unique_hosts:
        for host in unique_hosts:
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            except OSError:
                raise ValueError(f"not an IP address: {host!r}") from None
        return f"({expression}) and ({' or '.join(f'host {h}' for h in unique_hosts)})"
    return f"({expression})" if len(unique_ports) > 1 else expression


@dataclass(slots=True)
class LiveStats:
    """Counts so far: what the sockets delivered and what the kernel could not."""

    packets: int = 0
    """Frames read from the sockets, copies on a second interface included."""
    segments: int = 0
    """TCP segments delivered to the iterator."""
    duplicates: int = 0
    """Copies of one packet seen on a second interface (loopback's outgoing copies are not even counted)."""
    kernel_packets: int = 0
    """Frames the kernel passed the filter (PACKET_STATISTICS tp_packets, drops included)."""
    drops: int = 0
    """Frames the kernel dropped because our receive buffer was full."""


class _Tap:
    """One interface's packet socket and what is needed to read it."""

    __slots__ = ("interface", "socket", "fd", "linktype", "loopback", "index", "ring")

    def __init__(self, interface: str, sock, linktype: int, loopback: bool, index: int, ring=None) -> None:
        self.interface = interface
        self.socket = sock
        self.ring = ring  # a sniffer.ring.PacketRing instead of the socket, when one could be set up
        self.fd = ring.fd if ring is not None else sock.ins.fileno()
        self.linktype = linktype
        self.loopback = loopback
        self.index = index



@dataclass(frozen=True, slots=True)
class Rotation:
    """How `--write` spreads a long capture over files, as tcpdump's -C, -G and -W (`RotatingPcapWriter`)."""

    file_size: int | None = None
    """-C: bytes a file may hold (tcpdump counts millions of bytes)."""
    seconds: float | None = None
    """-G: a new file every this many seconds (the name through strftime)."""
    file_count: int | None = None
    """-W: at most this many files are kept."""

    @property
    def rotates(self) -> bool:
        return bool(self.file_size or self.seconds)

class LiveCapture:
    """Records of the server ports' TCP segments on live interfaces; a context manager and an iterator.

    ``with LiveCapture(["docker0"], [5432]) as capture: for record in capture: ...````

    Iteration ends after `stop()` (thread-safe, also from a signal handler) or
    once `duration` seconds have passed since the capture opened. `read()`
    gives what arrived within a timeout, for callers that must also act when
    nothing arrives (alarms, a live view). `hosts` narrows the filter to those
    addresses, `expression` (tcpdump's syntax) further. `write` keeps a pcap of the
    delivered frames, headers only unless `full_packets`, with permissions `write_mode`. Raises CaptureError with one line for the user when
    an interface cannot be opened.
    """

    def __init__(
        self,
        interfaces: Sequence[str],
        ports: Sequence[int],
        *,
        write: str | None = None,
        full_packets: bool = False,
        hosts: Sequence[str] = (),
        duration: float | None = None,
        rcvbuf: int = RCVBUF_BYTES,
        expression: str | None = None,
        write_mode: int = 0o600,
        rotation: Rotation | None = None,
    ) -> None:
        if not interfaces:
            raise CaptureError("no interface to capture on")
        self.interfaces = list(dict.fromkeys(interfaces))
        self.ports = list(ports)
        self.hosts = list(hosts)
        self.filter = bpf_filter(self.ports, self.hosts)
        if expression:  # the user's tcpdump expression narrows the kernel filter further
            self.filter = f"({self.filter}) and ({expression})"
        self.write_mode = write_mode
        self.write_path = write
        self.rotation = rotation
        self.full_packets = full_packets
        self.duration = duration
        self.rcvbuf = rcvbuf
        self.linktype: int | None = None
        self.started: float | None = None
        self._taps: list[_Tap] = []
        self._writer = None
        self._writer_seen = None  # the writer, still known after close (for written_files)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._stats = LiveStats()
        self._stats_lock = threading.Lock()
        self._frame = 0
        if ANY in self.interfaces:  # all of them: naming others too adds nothing
            self.interfaces = [ANY]
        self._copies = CopyFilter() if len(self.interfaces) > 1 or self.interfaces == [ANY] else None
        self._dissectors: dict[int, object] = {}
        self._last_flush = 0.0
        self.path_notes: list[str] = []
        """Why an interface is read through the plain socket rather than a ring (see `path`)."""
        self._buffer = bytearray(MAX_FRAME)
        self._view = memoryview(self._buffer)

    @property
    def written_files(self) -> list[str]:
        """The pcap files --write left (several with a rotation), oldest first."""
        writer = self._writer_seen
        if writer is None:
            return [self.write_path] if self.write_path else []
        return list(getattr(writer, "files", [self.write_path]))

    # -- opening and closing ---------------------------------------------------

    def open(self) -> "LiveCapture":
        if self._taps:
            return self
        try:
            for index, interface in enumerate(self.interfaces):
                self._taps.append(self._open_tap(interface, index))
            linktypes = {tap.linktype for tap in self._taps}
            if len(linktypes) > 1 and self.write_path:
                raise CaptureError(
                    "cannot write one pcap from interfaces with different link types: "
                    + ", ".join(f"{t.interface} ({t.linktype})" for t in self._taps))
            self.linktype = self._taps[0].linktype
            if self.write_path:
                try:
                    from sniffer.pcapwrite import PcapWriter, RotatingPcapWriter
                except ImportError as error:  # pragma: no cover - shipped with kaobs
                    raise CaptureError(f"cannot write pcap files: {error}") from None
                try:
                    if self.rotation is not None and self.rotation.rotates:
                        self._writer = RotatingPcapWriter(
                            self.write_path, self.linktype, MAX_FRAME, flush_every=64, mode=self.write_mode,
                            file_size=self.rotation.file_size, rotate_seconds=self.rotation.seconds,
                            file_count=self.rotation.file_count)
                    else:
                        self._writer = PcapWriter(self.write_path, self.linktype, MAX_FRAME, flush_every=64,
                                                  mode=self.write_mode)
                except OSError as error:
                    raise CaptureError(f"cannot write {self.write_path}: {error.strerror or error}") from None
            self._writer_seen = self._writer
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        except BaseException:
            self.close()
            raise
        self.started = time.time()
        return self

    def _open_tap(self, interface: str, index: int) -> _Tap:
        try:
            from scapy.arch.linux import L2ListenSocket
        except ImportError as error:  # pragma: no cover - scapy is a dependency
            raise CaptureError(f"live capture needs scapy: {error}") from None
        if not interface_exists(interface):
            raise CaptureError(f"no such network interface: {interface}")
        ring_tap = self._open_ring(interface, index)
        if ring_tap is not None:
            return ring_tap
        if interface == ANY:
            raise CaptureError(f"cannot capture on any: it needs a TPACKET_V3 packet ring ({'; '.join(self.path_notes)})")
        scapy_log = logging.getLogger("scapy.runtime")
        level = scapy_log.level
        scapy_log.setLevel(logging.ERROR)  # "Unable to guess type" on lo is noise: we parse frames ourselves
        try:
            sock = L2ListenSocket(iface=interface, filter=self.filter, promisc=True)
        except PermissionError:
            raise CaptureError(
                f"capturing on {interface} needs root or CAP_NET_RAW (run kaobs as root)") from None
        except OSError as error:
            if error.errno in (errno.EPERM, errno.EACCES):
                raise CaptureError(
                    f"capturing on {interface} needs root or CAP_NET_RAW (run kaobs as root)") from None
            raise CaptureError(f"cannot capture on {interface}: {error.strerror or error}") from None
        except Exception as error:  # scapy raises its own exception types for filter errors
            raise CaptureError(f"cannot capture on {interface} with filter {self.filter!r}: {error}") from None
        finally:
            scapy_log.setLevel(level)
        try:
            try:
                sock.ins.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except OSError:
                sock.ins.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.ins.setblocking(False)
            # scapy asks for PACKET_AUXDATA to re-insert VLAN tags the NIC stripped; the
            # parser does not need them (the frame parses the same without), and one
            # ancillary item per packet fewer is measurably faster.
            sock.ins.setsockopt(SOL_PACKET, PACKET_AUXDATA, 0)
            hatype = sock.ins.getsockname()[3]
            linktype = ARPHRD_LINKTYPE.get(hatype)
            if linktype is None:
                raise CaptureError(f"cannot capture on {interface}: unsupported hardware type {hatype}")
            _read_kernel_stats(sock.ins)  # reading resets the counters: start from zero
        except BaseException:
            sock.close()
            raise
        # copies across interfaces are told apart by interface index, as the ring reports it
        return _Tap(interface, sock, linktype, hatype == ARPHRD_LOOPBACK, socket.if_nametoindex(interface))

    def _open_ring(self, interface: str, index: int) -> _Tap | None:
        """A tap reading a TPACKET_V3 ring (`sniffer.ring`): one wake-up per block, not a syscall per packet.

        None when no ring can be had (or KAOBS_CAPTURE=socket): the plain
        socket is used then, and `path_notes` says why. Without
        `full_packets` the kernel copies only the first bytes of each packet.
        """
        from sniffer.ring import (
            BLOCK_COUNT,
            SNAPLEN,
            PacketRing,
            RingUnavailable,
            ring_disabled,
        )

        if ring_disabled():
            self.path_notes.append("KAOBS_CAPTURE=socket")
            return None
        try:
            # 128 MB for one interface; several share that much (at least 32 MB each) rather than multiply it.
            blocks = max(BLOCK_COUNT // 4, BLOCK_COUNT // len(self.interfaces))
            ring = PacketRing(interface, self.filter, snaplen=0 if self.full_packets else SNAPLEN, block_count=blocks)
        except RingUnavailable as error:
            self.path_notes.append(str(error))
            return None
        return _Tap(interface, None, ring.linktype, ring.loopback, index, ring)

    @property
    def path(self) -> str:
        """How packets are read: "ring" (TPACKET_V3 mmap ring), "socket" (recvmsg per packet), or "ring+socket"."""
        return "+".join(sorted({"socket" if tap.ring is None else "ring" for tap in self._taps})) or "closed"

    def close(self) -> None:
        """Close the sockets and the pcap (flushed: the file is valid afterwards). Idempotent."""
        self._stop.set()
        self._collect_kernel_stats()
        for tap in self._taps:
            try:
                (tap.socket if tap.ring is None else tap.ring).close()
            except OSError:
                pass
        self._taps = []
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "LiveCapture":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the capture to end; safe from any thread and from a signal handler."""
        self._stop.set()
        fd = self._wake_w
        if fd >= 0:
            try:
                os.write(fd, b"x")
            except OSError:
                pass

    @property
    def stopped(self) -> bool:
        return self._stop.is_set() or self._expired()

    def _expired(self) -> bool:
        return self.duration is not None and self.started is not None and time.time() - self.started >= self.duration

    def stats(self) -> LiveStats:
        """Counts so far; kernel drops are read from the sockets now."""
        self._collect_kernel_stats()
        with self._stats_lock:
            s = self._stats
            return LiveStats(s.packets, s.segments, s.duplicates, s.kernel_packets, s.drops)

    def _collect_kernel_stats(self) -> None:
        with self._stats_lock:
            for tap in self._taps:
                packets, drops = tap.ring.kernel_stats() if tap.ring is not None else _read_kernel_stats(tap.socket.ins)
                self._stats.kernel_packets += packets
                self._stats.drops += drops

    # -- reading -----------------------------------------------------------------

    def __iter__(self) -> Iterator[Record]:
        if not self._taps:
            self.open()
        while not self.stopped:
            yield from self.read(POLL_S)

    def read(self, timeout: float = POLL_S) -> list[Record]:
        """Records (`sniffer.records`) that arrived within `timeout` seconds, in time order; [] when none or stopped.

        Returns as soon as something was read, or when stopped.
        """
        if not self._taps:
            self.open()
        if self._stop.is_set():
            return []
        if self.duration is not None and self.started is not None:
            timeout = max(0.0, min(timeout, self.started + self.duration - time.time()))
        try:
            ready, _, _ = select.select([tap.fd for tap in self._taps] + [self._wake_r], [], [], timeout)
        except (OSError, ValueError):  # closed under us by close() from another thread
            return []
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 64)
            except OSError:
                pass
        records: list[Record] = []
        for tap in self._taps:
            if tap.fd in ready:
                if tap.ring is not None:
                    self._drain_ring(tap, records)
                else:
                    self._drain_socket(tap, records)
        if len(self._taps) > 1 and len(records) > 1:
            records.sort(key=_record_time)
        if self._writer is not None and time.monotonic() - self._last_flush > 0.5:
            self._writer.flush()
            self._last_flush = time.monotonic()
        return records

    def _drain_ring(self, tap: _Tap, records: list[Record]) -> None:
        """Records of the blocks the kernel handed over; copies across interfaces and the pcap handled per frame."""
        each = None
        if self._copies is not None or self._writer is not None:
            copies, writer, full, stats = self._copies, self._writer, self.full_packets, self._stats
            linktype = tap.linktype

            def each(data, frame: int, t: float, wirelen: int, ifindex: int) -> bool:  # noqa: ARG001 - frame: the number it gets
                if copies is not None and copies.is_copy(linktype, data, 0, len(data), t, ifindex):
                    stats.duplicates += 1
                    return False
                if writer is not None:
                    writer.write(data, t, wirelen=wirelen, full=full)
                return True

        before = len(records)
        self._frame, packets = tap.ring.drain(self._frame, records, max_blocks=_RING_BLOCKS_PER_READ, each=each)
        self._stats.packets += packets
        self._stats.segments += len(records) - before

    def _drain_socket(self, tap: _Tap, records: list[Record]) -> None:
        """Read what is queued on one socket, up to a batch, dissecting frames in place as they come.

        Frames are received into one preallocated buffer (`recvmsg_into`):
        scapy's `recv_raw` allocates a 64 KiB bytes object per packet and
        parses ancillary data in Python, which halved the packet rate here.
        The only ancillary item is the kernel timestamp (SO_TIMESTAMPNS).
        """
        ins = tap.socket.ins
        recv_into = ins.recvmsg_into
        buffers = [self._buffer]
        view = self._view
        dissect = self._dissector(tap.linktype)
        copies = self._copies
        writer = self._writer
        full = self.full_packets
        stats = self._stats
        loopback = tap.loopback
        timestamp = _TIMESPEC.unpack
        for _ in range(_DRAIN_BATCH):
            try:
                n, ancillary, flags, address = recv_into(buffers, _ANCILLARY_SPACE)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EINTR, errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    return  # nothing more, or the interface went away (a container stopped)
                raise
            if not n:
                return
            if loopback and address[2] == PACKET_OUTGOING:
                continue  # loopback shows each packet leaving and arriving: keep one, as libpcap does
            stats.packets += 1
            if ancillary:
                sec, nsec = timestamp(ancillary[0][2][:16])
                t = sec + nsec * 1e-9
            else:
                t = time.time()
            if copies is not None and copies.is_copy(tap.linktype, view, 0, n, t, tap.index):
                stats.duplicates += 1
                continue
            self._frame += 1
            if writer is not None:
                writer.write(view[:n], t, wirelen=n, full=full)  # it copies what it keeps
            record = dissect(view, 0, n, self._frame, t, n)
            if record is not None:
                stats.segments += 1
                records.append(record)

    def _dissector(self, linktype: int):
        dissect = self._dissectors.get(linktype)
        if dissect is None:
            dissect = self._dissectors[linktype] = make_dissector(linktype)
        return dissect


def _record_time(record: tuple) -> float:
    return record[1]


def _read_kernel_stats(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the last read: the kernel resets the counters on every read."""
    try:
        raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
    except OSError:
        return 0, 0
    return _TPACKET_STATS.unpack(raw)
