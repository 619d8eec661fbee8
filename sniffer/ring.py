"""A TPACKET_V3 memory-mapped receive ring: live packets without a system call per packet.

With a plain packet socket every frame costs a ``recvmsg`` (plus scapy's
ancillary-data handling): ~10 us a packet in Python, more than a busy bridge
leaves time for. Here the kernel writes frames into a ring of blocks shared
with us (``PACKET_RX_RING``); a block is handed over when it is full or after
`BLOCK_TIMEOUT_MS`, so one ``select`` wakes us for thousands of packets, and
walking a block is one ``struct.unpack_from`` per packet on the mapping.

Only headers are needed, so the kernel is asked to copy only the first
`snaplen` bytes: the BPF program's accepting ``ret`` returns that length
instead of libpcap's 262144 (a classic BPF filter's return value *is* the
snap length). The frame's length on the wire still comes with it (``tp_len``),
and the TCP payload length is read from the IP header, so GRO/TSO packets of
64 kB cost no more than a pure ACK.

`PacketRing.drain` turns retired blocks into records (`sniffer.records`),
the form `KeepaliveModel.feed_records` takes, with the dissection routine
every reader shares (`sniffer.dissect`), reading each frame in place in the
mapping.

The interface ``any`` (`ANY`) is one socket for all interfaces, those that
appear later included (a new container's veth), as ``tcpdump -i any``: a
``SOCK_DGRAM`` packet socket bound to no interface, which hands over packets
from their network header on (link type RAW, the filter compiled for it).
Each frame's interface index comes with it (``sll_ifindex``), so that the
caller can drop a packet's copies on a bridge and its veths; loopback's
outgoing copies are skipped as on ``lo`` itself.

Linux only; `RingUnavailable` says why when a ring cannot be set up (old
kernel, no libpcap, a seccomp'd container), and the caller falls back to the
plain socket.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import struct
from typing import Callable

from sniffer.discovery import ANY
from sniffer.dissect import ARPHRD_LINKTYPE, ARPHRD_LOOPBACK, LINKTYPE_RAW, make_dissector

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
PACKET_MR_PROMISC = 1
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
DLT_RAW = 12
"""libpcap's data link type for packets that begin with their IP header (what SOCK_DGRAM reads)."""
PACKET_OUTGOING = 4

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1

BLOCK_SIZE = 256 << 10
"""One block: ~1200 header-cut frames (~210 bytes each with the ring's own header), 20 ms of 60k packets/s.

Small blocks matter: a block is handed over when full *or* after
`BLOCK_TIMEOUT_MS`, so with big blocks on a moderately busy bridge most of
each block stays empty and the ring holds far fewer packets than its size.
"""
BLOCK_COUNT = 512
"""128 MB in all: ~10 s of a 60k packets/s bridge (~224 bytes a frame in the ring) while kaobs gets no CPU.

On a machine whose CPUs are taken by the database and its clients, a
process can get no CPU for seconds at a time (2.5 s measured here at nice
-10, more at nice 0); 64 MB lost packets in such runs where tcpdump's 64 MB
of ~180-byte frames did not.
"""
BLOCK_TIMEOUT_MS = 50
"""A block that is not full is handed over after this long: events are at most this late."""
FRAME_SIZE = 2048
"""Only sizes the kernel's frame bookkeeping; a TPACKET_V3 frame takes what it needs."""
SNAPLEN = 128
"""Bytes copied per packet: Ethernet + VLAN + IPv4 (or IPv6) + TCP with 40 bytes of options fit."""

# struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word
_REQ3 = struct.Struct("7I")
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status, num_pkts, offset_to_first_pkt
_BLOCK = struct.Struct("IIIII")
_BLOCK_STATUS = struct.Struct("I")
_BLOCK_STATUS_OFFSET = 8
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net
_HDR = struct.Struct("IIIIIIHH")
# The part of it the walk needs: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_mac.
_HDR_USED = struct.Struct("IIIII4xH")
_SLL_PKTTYPE_OFFSET = 48 + 10  # TPACKET_ALIGN(sizeof tpacket3_hdr) + offset of sll_pkttype in sockaddr_ll
_SLL_IFINDEX_OFFSET = 48 + 4  # ... and of sll_ifindex
_IFINDEX = struct.Struct("i")
# struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype, halen, addr[8]
_SOCKADDR_LL = struct.Struct("HHiHBB8s")
_BPF_INSN = struct.Struct("HBBI")
_BPF_RET_K = 0x06
_STATS = struct.Struct("II")


class RingUnavailable(Exception):
    """The ring could not be set up; the message says why (the caller falls back)."""


def patched_filter(program: bytes, snaplen: int) -> bytes:
    """A classic BPF program whose accepting returns give at most `snaplen` bytes.

    ``ret #k`` with k > 0 accepts k bytes of the packet; libpcap compiles
    262144 there. Rejections (``ret #0``) stay as they are.

    >>> insn = _BPF_INSN.pack(_BPF_RET_K, 0, 0, 262144) + _BPF_INSN.pack(_BPF_RET_K, 0, 0, 0)
    >>> [_BPF_INSN.unpack_from(patched_filter(insn, 96), i)[3] for i in (0, 8)]
    [96, 0]
    """
    out = bytearray(program)
    for offset in range(0, len(out), _BPF_INSN.size):
        code, jt, jf, k = _BPF_INSN.unpack_from(out, offset)
        if code == _BPF_RET_K and k > snaplen:
            _BPF_INSN.pack_into(out, offset, code, jt, jf, snaplen)
    return bytes(out)


def compile_bpf(expression: str, interface: str | None, linktype: int | None = None) -> bytes:
    """The filter compiled by libpcap (through scapy) as raw ``struct sock_filter`` instructions.

    For `interface`'s link type, or for `linktype` (a DLT) when given.
    """
    try:
        from scapy.arch.common import compile_filter
    except ImportError as error:  # pragma: no cover - scapy is a dependency
        raise RingUnavailable(f"no BPF compiler: {error}") from None
    try:
        program = compile_filter(expression, iface=interface, linktype=linktype)
    except Exception as error:  # noqa: BLE001 - scapy raises its own types
        raise RingUnavailable(f"cannot compile {expression!r}: {error}") from None
    raw = ctypes.string_at(program.bf_insns, program.bf_len * _BPF_INSN.size)
    try:
        from scapy.arch.common import free_filter  # scapy >= 2.6

        free_filter(program)
    except Exception:  # noqa: BLE001 - a leak of a few bytes is fine
        pass
    return raw


def bind_all_interfaces(sock: socket.socket) -> None:
    """Bind a packet socket to every interface (``sll_ifindex`` 0), which Python's `bind` cannot express."""
    libc = ctypes.CDLL(None, use_errno=True)
    address = _SOCKADDR_LL.pack(socket.AF_PACKET, socket.htons(ETH_P_ALL), 0, 0, 0, 0, b"")
    if libc.bind(sock.fileno(), ctypes.c_char_p(address), len(address)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def attach_bpf(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER with a ``struct sock_fprog`` {unsigned short len; struct sock_filter *filter}."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // _BPF_INSN.size, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class PacketRing:
    """One interface's AF_PACKET socket with a TPACKET_V3 RX ring; see the module docstring.

    `fd` is what to `select` on: it is readable when a block was handed over.
    `linktype` is the pcap link type of the frames. `close()` unmaps and
    closes (idempotent).
    """

    def __init__(self, interface: str, bpf: str, *, snaplen: int = SNAPLEN, block_size: int = BLOCK_SIZE,
                 block_count: int = BLOCK_COUNT, timeout_ms: int = BLOCK_TIMEOUT_MS, promisc: bool = True) -> None:
        self.interface = interface
        self.snaplen = snaplen
        self.block_size = block_size
        self.block_count = block_count
        self._sock: socket.socket | None = None
        self._map: mmap.mmap | None = None
        self._next_block = 0
        self.all_interfaces = interface == ANY
        try:
            ifindex = 0 if self.all_interfaces else socket.if_nametoindex(interface)
        except OSError:
            raise RingUnavailable(f"no such network interface: {interface}") from None
        self.loopback_index = _loopback_index()
        program = compile_bpf(bpf, None, DLT_RAW) if self.all_interfaces else compile_bpf(bpf, interface)
        if snaplen:
            program = patched_filter(program, snaplen)
        try:
            # Protocol 0: nothing arrives before the filter is on and the socket is bound.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM if self.all_interfaces else socket.SOCK_RAW, 0)
        except OSError as error:
            raise RingUnavailable(f"no packet socket: {error.strerror or error}") from None
        self._sock = sock
        try:
            attach_bpf(sock, program)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frames = block_size // FRAME_SIZE * block_count
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING,
                            _REQ3.pack(block_size, block_count, FRAME_SIZE, frames, timeout_ms, 0, 0))
            self._map = mmap.mmap(sock.fileno(), block_size * block_count, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            if self.all_interfaces:  # no promiscuous mode: it is per interface (tcpdump -i any has none either)
                bind_all_interfaces(sock)
                self.hatype = None
            else:
                if promisc:
                    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                                    struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))
                sock.bind((interface, ETH_P_ALL))
                self.hatype = sock.getsockname()[3]
        except OSError as error:
            self.close()
            raise RingUnavailable(f"no TPACKET_V3 ring on {interface}: {error.strerror or error}") from None
        self.ifindex = ifindex
        self.loopback = self.hatype == ARPHRD_LOOPBACK
        self.linktype = LINKTYPE_RAW if self.all_interfaces else ARPHRD_LINKTYPE.get(self.hatype)
        if self.linktype is None:
            self.close()
            raise RingUnavailable(f"unsupported hardware type {self.hatype} on {interface}")
        self._dissect = make_dissector(self.linktype)
        self.fd = sock.fileno()
        self.kernel_stats()  # reading resets the counters: start from zero

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except (BufferError, ValueError):
                pass
            self._map = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def kernel_stats(self) -> tuple[int, int]:
        """(packets, drops) since the last call (PACKET_STATISTICS resets on read)."""
        if self._sock is None:
            return 0, 0
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
        except OSError:
            return 0, 0
        return _STATS.unpack(raw)

    def drain(self, frame: int, out: list, *, max_blocks: int = 0,
              each: Callable[[memoryview | bytes, int, float, int, int], bool] | None = None) -> tuple[int, int]:
        """Append the records of every block handed over so far to `out`; return (last frame number, packets read).

        Frames are numbered from `frame` + 1. With `each`, every frame is first
        shown to ``each(data, number_it_would_get, t, wirelen, ifindex)``, and
        skipped (not numbered) when it returns False: the caller's dedupe and
        pcap writer. Loopback's outgoing copies are skipped as libpcap does.
        """
        mm = self._map
        if mm is None:
            return frame, 0
        block_size = self.block_size
        count = self.block_count
        block_unpack = _BLOCK.unpack_from
        status_pack = _BLOCK_STATUS.pack_into
        status_unpack = _BLOCK_STATUS.unpack_from
        hdr_unpack = _HDR_USED.unpack_from
        dissect = self._dissect
        append = out.append
        loopback = self.loopback
        all_interfaces = self.all_interfaces
        lo_index = self.loopback_index
        ifindex = self.ifindex
        ifindex_unpack = _IFINDEX.unpack_from
        packets = 0
        blocks = 0
        while True:
            base = self._next_block * block_size
            # The status first, then the rest: the kernel sets it last (after a write barrier).
            if not status_unpack(mm, base + _BLOCK_STATUS_OFFSET)[0] & TP_STATUS_USER:
                break
            _, _, _, num, first = block_unpack(mm, base)
            packets += num
            off = base + first
            for _ in range(num):
                next_off, sec, nsec, snap, wirelen, mac = hdr_unpack(mm, off)
                start = off + mac
                off += next_off
                if all_interfaces:
                    ifindex = ifindex_unpack(mm, start - mac + _SLL_IFINDEX_OFFSET)[0]
                    if ifindex == lo_index and mm[start - mac + _SLL_PKTTYPE_OFFSET] == PACKET_OUTGOING:
                        packets -= 1
                        continue
                elif loopback and mm[start - mac + _SLL_PKTTYPE_OFFSET] == PACKET_OUTGOING:
                    packets -= 1
                    continue
                t = sec + nsec * 1e-9
                if each is not None and not each(mm[start:start + snap], frame + 1, t, wirelen, ifindex):
                    continue
                frame += 1  # a non-TCP frame that got through the filter still has its number
                record = dissect(mm, start, start + snap, frame, t, wirelen)
                if record is not None:
                    append(record)
            status_pack(mm, base + _BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)  # hand the block back
            self._next_block = (self._next_block + 1) % count
            blocks += 1
            if max_blocks and blocks >= max_blocks:
                break
        return frame, packets


def _loopback_index() -> int:
    try:
        return socket.if_nametoindex("lo")
    except OSError:
        return -1


def ring_disabled() -> bool:
    """KAOBS_CAPTURE=socket forces the plain socket path (benchmarks, a kernel that misbehaves)."""
    return os.environ.get("KAOBS_CAPTURE", "").strip().lower() == "socket"
