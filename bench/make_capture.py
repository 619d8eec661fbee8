#!/usr/bin/env python3
"""Generate a large pcap of Postgres-like traffic with keepalive flows mixed in.

The benchmark needs a capture of a million packets or more whose keepalive
probes are known exactly, so that `kaobs analyze` and tshark can be timed on
the same file and their findings checked against a truth file. Recording that
under pgbench takes minutes and gives no ground truth; this script builds it
with `struct` in a few seconds, deterministically from a seed.

What is in it (clients 10.20.x.y, servers 172.17.0.2 and 172.17.0.3, port 5432):

* pgbench-like pooled connections (some already open when the capture
  starts): TPC-B transactions of seven simple-protocol statements, think time
  between transactions, now and then a large SELECT sent in MSS-sized
  segments acknowledged every second segment, and rare retransmissions;
* short connections: handshake, SCRAM authentication, a few queries, then
  Terminate and FIN (or a client RST);
* idle connections whose server kernel probes with known settings
  (idle/interval/count, sometimes tcp_user_timeout), following the kernel
  rules of docs/kernel-keepalive.md: answered probes, a client that vanishes (unanswered
  probes, then RST one interval after the last), both sides probing (a probe
  received does not reset the receiver's timer), a server that vanishes under
  a probing client;
* clients that stop reading a large result: their window closes and the
  server sends zero-window (persist) probes with exponential backoff from
  ~200 ms. They have the keepalive shape (seq = next - 1, no data) and tshark
  labels them Keep-Alive; they are not keepalives.

Every segment carries the TCP timestamp option (66-byte headers, as Linux
sends them); data is cut at the snaplen (default 128) like `tcpdump -s 128`.
The truth file (JSON) lists the frame number of every keepalive probe, with
its side and whether it was answered, and of every zero-window probe.

With --mix short the capture is instead an app opening a connection per
request (see `short_mix`): ~100k connections per million packets.

Usage: python3 bench/make_capture.py [--packets 1000000] [--seed 1] [--mix pgbench|short] [--out FILE]
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from struct import Struct
from typing import Iterator

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MOD = 1 << 32
MSS = 1448  # 1500 - 20 (IP) - 32 (TCP with timestamps)
DELAYED_ACK = 0.040
EPOCH = 1_795_600_000.0

_PCAP_HEADER = Struct("<IHHiIII")
_RECORD = Struct("<IIII")
# Ethernet, IPv4 (no options, DF), TCP with NOP NOP TIMESTAMP: 66 bytes.
_HEADERS = Struct("!6s6sH BBHHHBBH4s4s HHIIBBHHH BBBBII")
# SYN and SYN-ACK: MSS, SACK_PERM, TIMESTAMP, NOP, WSCALE: 74 bytes.
_SYN_HEADERS = Struct("!6s6sH BBHHHBBH4s4s HHIIBBHHH BBH BB BBII B BBB")

CLIENT, SERVER = 0, 1
GENERATOR_VERSION = 2  # bump when the traffic changes, so benchmarks stop reusing old captures
TAG_KEEPALIVE, TAG_WINDOW = "keepalive", "window"


@dataclass(slots=True)
class Host:
    ip: bytes
    mac: bytes
    clock: float  # boot time, for TCP timestamp values
    ip_id: int = 0

    @property
    def name(self) -> str:
        return ".".join(str(b) for b in self.ip)


@dataclass(slots=True)
class Packet:
    """One frame ready to write, with what the truth file needs about it."""

    t: float
    data: bytes
    wirelen: int
    tag: str | None = None
    side: int = CLIENT
    answered: bool | None = None


class Flow:
    """Both ends of one TCP connection: sequence numbers, windows, timestamps.

    `send` builds a frame from one end with the correct seq/ack arithmetic;
    by default the segment acknowledges everything the peer has sent.
    """

    def __init__(self, rng: random.Random, client: Host, cport: int, server: Host, sport: int,
                 snaplen: int):
        self.rng = rng
        self.hosts = (client, server)
        self.ports = (cport, sport)
        self.nxt = [rng.getrandbits(32), rng.getrandbits(32)]
        self.window = [502, 509]  # raw, window scale 7
        self.tsecr = [0, 0]
        self.snaplen = snaplen
        self.t = 0.0  # when the last piece of the conversation ended
        self.t_response = 0.0  # the server's last data segment
        self.aborted = False

    def tsval(self, side: int, t: float) -> int:
        return int((t - self.hosts[side].clock) * 1000) & 0xFFFFFFFF

    def send(self, t: float, side: int, flags: int, length: int = 0, *, seq: int | None = None,
             ack: int | None = None, window: int | None = None, tag: str | None = None,
             advance: bool = True, kind: bytes = b"") -> Packet:
        me, peer = self.hosts[side], self.hosts[1 - side]
        if seq is None:
            seq = self.nxt[side]
        if ack is None:
            ack = self.nxt[1 - side] if flags & ACK else 0
        if window is None:
            window = self.window[side]
        if advance:
            end = (seq + length + (1 if flags & (SYN | FIN) else 0)) % MOD
            if 0 < (end - self.nxt[side]) % MOD < MOD // 2:
                self.nxt[side] = end
        me.ip_id = (me.ip_id + 1) & 0xFFFF
        tsval = self.tsval(side, t)
        self.tsecr[1 - side] = tsval
        if flags & SYN:
            total = 20 + 40 + length
            head = _SYN_HEADERS.pack(
                peer.mac, me.mac, 0x0800,
                0x45, 0, total, me.ip_id, 0x4000, 64, 6, 0, me.ip, peer.ip,
                self.ports[side], self.ports[1 - side], seq, ack, 0xA0, flags, 64240 if side == CLIENT else 65160, 0, 0,
                2, 4, 1460, 4, 2, 8, 10, tsval, self.tsecr[side], 1, 3, 3, 7)
        else:
            total = 20 + 32 + length
            head = _HEADERS.pack(
                peer.mac, me.mac, 0x0800,
                0x45, 0, total, me.ip_id, 0x4000, 64, 6, 0, me.ip, peer.ip,
                self.ports[side], self.ports[1 - side], seq, ack, 0x80, flags, window, 0, 0,
                1, 1, 8, 10, tsval, self.tsecr[side])
        data = head
        if length:
            room = self.snaplen - len(head)
            if room > 0:
                data = head + _payload(kind, length, room)
        return Packet(round(t, 6), data, 14 + total, tag, side)


def _payload(kind: bytes, length: int, room: int) -> bytes:
    """The first `room` bytes of a Postgres message of that type and length.

    Type byte, length, then text cut or padded to fit, NUL-terminated, so that
    a dissector sees well-formed messages cut only by the snaplen.
    """
    if kind == b"":  # StartupMessage: no type byte
        head = length.to_bytes(4, "big") + b"\0\x03\0\0"
    else:
        head = kind + (length - 1).to_bytes(4, "big")
    text = _TEXT.get(kind, b"")
    fill = length - len(head)
    if fill > 0:
        head += text[:fill - 1].ljust(fill - 1, b" ") + b"\0"
    return head[:min(room, length)]


_TEXT = {
    b"Q": b"UPDATE pgbench_accounts SET abalance = abalance + -2417 WHERE aid = 8215;\0",
    b"C": b"UPDATE 1\0Z\0\0\0\x05T",
    b"T": b"\0\x01abalance\0\0\0@\x06\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0D",
    b"D": b"\0\x03\0\0\0\x048215\0\0\0\x015\0\0\0T" + b" " * 40,
    b"R": b"\0\0\0\x0aSCRAM-SHA-256\0\0",
    b"p": b"SCRAM-SHA-256\0\0\0\0 n,,n=,r=Mg4bUwmx4Xv9QbNkq7s2lB6y",
    b"X": b"",
    b"": b"user\0postgres\0database\0pgbench\0application_name\0pgbench\0",
}


# -- pieces of a conversation -------------------------------------------------


def rtt(rng: random.Random) -> float:
    """One-way time between the capture point and the far end (docker bridge: tens of µs)."""
    return rng.uniform(0.000015, 0.000080)


def late(rng: random.Random, timeout: float) -> float:
    """How late a kernel timer of that length fires: a few ms, well inside the wheel bound."""
    return rng.uniform(0.002, 0.012 if timeout <= 2 else 0.030)


def handshake(f: Flow, t: float) -> Iterator[Packet]:
    rng = f.rng
    yield f.send(t, CLIENT, SYN)
    t += rtt(rng)
    yield f.send(t, SERVER, SYN | ACK)
    t += rtt(rng)
    yield f.send(t, CLIENT, ACK)
    f.t = t


def exchange(f: Flow, t: float, request: int, response: int, next_gap: float,
             req_kind: bytes = b"Q", resp_kind: bytes = b"T", work: float | None = None) -> Iterator[Packet]:
    """Client request, server response (in MSS segments, ACKed every second one).

    `next_gap` is when the client sends next: with more than the delayed-ACK
    time to wait it sends a pure ACK for the response.
    """
    rng = f.rng
    yield f.send(t, CLIENT, ACK | PSH, request, kind=req_kind)
    work = work if work is not None else rng.uniform(0.00005, 0.0006)
    if work > DELAYED_ACK + 0.003:
        # A slow query: the server's delayed ACK goes out before the answer.
        yield f.send(t + DELAYED_ACK + rng.uniform(0.0, 0.002), SERVER, ACK)
    t += work
    left = response
    unacked = 0
    while left > 0:
        size = min(left, MSS)
        left -= size
        flags = ACK | PSH if left == 0 else ACK
        yield f.send(t, SERVER, flags, size, kind=resp_kind)
        if size == MSS and left > 0 and rng.random() < 0.0005:
            # A segment lost behind the capture point: resent after the RTO.
            t += rng.uniform(0.201, 0.215)
            yield f.send(t, SERVER, ACK, size, seq=(f.nxt[SERVER] - size) % MOD, kind=resp_kind)
        unacked += 1
        f.t_response = t
        t += rng.uniform(0.000008, 0.00003)
        if unacked == 2 and left > 0:
            t += rtt(rng)
            yield f.send(t, CLIENT, ACK)
            unacked = 0
    if next_gap > DELAYED_ACK:
        t += DELAYED_ACK + rng.uniform(0.0, 0.002)
        yield f.send(t, CLIENT, ACK)
    f.t = t


def startup(f: Flow, t: float) -> Iterator[Packet]:
    """StartupMessage and a SCRAM exchange, ending with ReadyForQuery."""
    rng = f.rng
    yield from exchange(f, t, rng.randint(80, 110), 24, 0.0, b"", b"R")
    t = f.t + rng.uniform(0.0002, 0.001)
    yield from exchange(f, t, 55, 93, 0.0, b"p", b"R")
    t = f.t + rng.uniform(0.0002, 0.001)
    yield from exchange(f, t, 109, rng.randint(380, 460), 0.0, b"p", b"R", work=rng.uniform(0.002, 0.004))


def teardown(f: Flow, t: float) -> Iterator[Packet]:
    """Terminate, then FIN from both ends, or now and then a client RST."""
    rng = f.rng
    yield f.send(t, CLIENT, ACK | PSH, 5, kind=b"X")
    if rng.random() < 0.05:
        yield f.send(t + 0.00002, CLIENT, RST | ACK)
        return
    yield f.send(t + 0.00002, CLIENT, FIN | ACK)
    t += rtt(rng) + rng.uniform(0.0001, 0.0005)
    yield f.send(t, SERVER, FIN | ACK)
    yield f.send(t + rtt(rng), CLIENT, ACK)


PGBENCH = (  # (request bytes, response bytes) of one TPC-B transaction
    (12, 17), (89, 22), (66, 79), (86, 22), (87, 22), (121, 22), (10, 15),
)


def transaction(f: Flow, t: float, think: float) -> Iterator[Packet]:
    rng = f.rng
    for i, (request, response) in enumerate(PGBENCH):
        last = i == len(PGBENCH) - 1
        gap = think if last else rng.uniform(0.00002, 0.00008)
        yield from exchange(f, t, request + rng.randint(0, 3), response, gap, b"Q", b"C")
        t = f.t + gap


# -- idle connections and their keepalive timers ------------------------------


@dataclass(slots=True)
class Keepalive:
    idle: float
    interval: float
    count: int
    user_timeout: float = 0.0


SERVER_SETTINGS = (
    Keepalive(2, 1, 3), Keepalive(3, 2, 3), Keepalive(5, 1, 4), Keepalive(4, 2, 2),
    Keepalive(10, 3, 5), Keepalive(6, 2, 9), Keepalive(1, 1, 10, 4.0), Keepalive(2, 1, 10, 3.5),
)
CLIENT_SETTINGS = (Keepalive(2, 1, 3), Keepalive(3, 1, 5), Keepalive(7, 2, 3), Keepalive(4, 4, 4))


@dataclass(slots=True)
class Timer:
    """One end's keepalive timer, as tcp_keepalive_timer runs it."""

    settings: Keepalive
    last_accepted: float
    probes_out: int = 0
    due: float = 0.0

    def rearm(self, rng: random.Random, t: float) -> None:
        self.last_accepted = t
        self.probes_out = 0
        self.due = t + self.settings.idle + late(rng, self.settings.idle)

    def fire(self, rng: random.Random) -> str:
        """At `due`: "probe" or "abort"; a probe moves `due` one interval on."""
        s = self.settings
        elapsed = self.due - self.last_accepted
        if (s.user_timeout and elapsed >= s.user_timeout and self.probes_out) or (
                not s.user_timeout and self.probes_out >= s.count):
            return "abort"
        self.probes_out += 1
        self.due += s.interval + late(rng, s.interval)
        return "probe"


def idle_period(f: Flow, t: float, until: float, timers: dict[int, Timer],
                dead: int | None = None, dead_at: float = 0.0) -> Iterator[Packet]:
    """Nothing but keepalive traffic from `t` to `until`.

    `timers` are the probing ends. The `dead` end answers and probes nothing
    from `dead_at` on; its peer aborts with RST once its timer says so.
    Sets `f.t` to the end and `f.aborted` when an abort ended the connection.
    """
    rng = f.rng
    f.aborted = False
    while True:
        live = {side: tm for side, tm in timers.items() if not (side == dead and tm.due >= dead_at)}
        if not live:
            break
        side, timer = min(live.items(), key=lambda item: item[1].due)
        now = timer.due
        if now >= until:
            break
        action = timer.fire(rng)
        if action == "abort":
            yield f.send(now, side, RST | ACK)
            f.aborted = True
            f.t = now
            return
        probe = f.send(now, side, ACK, seq=(f.nxt[side] - 1) % MOD, tag=TAG_KEEPALIVE, advance=False)
        peer = 1 - side
        answered = dead != peer or now < dead_at
        probe.answered = answered
        yield probe
        if answered:
            # The duplicate ACK is accepted by the prober; the answering end
            # does not restart its own timer for a probe it received.
            answer_t = now + 2 * rtt(rng)
            yield f.send(answer_t, peer, ACK)
            timer.rearm(rng, answer_t)
            for other in timers.values():
                other.due = max(other.due, answer_t + 0.000001)
    f.t = until


# -- connection scenarios -----------------------------------------------------


def pooled(f: Flow, t: float, end: float, preexisting: bool) -> Iterator[Packet]:
    """A pgbench client: transactions back to back with some think time, until `end`."""
    rng = f.rng
    if not preexisting:
        yield from handshake(f, t)
        yield from startup(f, f.t + 0.0003)
        t = f.t + rng.uniform(0.001, 0.01)
    mean_think = rng.choice((0.0005, 0.002, 0.01, 0.06))
    while t < end:
        think = rng.expovariate(1 / mean_think)
        if rng.random() < 0.02:
            size = rng.randint(5_000, 120_000)
            yield from exchange(f, t, rng.randint(40, 90), size, think, b"Q", b"D",
                                work=rng.uniform(0.0005, 0.08))
            t = f.t + think
        else:
            yield from transaction(f, t, think)
            t = f.t + think
    yield from teardown(f, t)


def short(f: Flow, t: float) -> Iterator[Packet]:
    rng = f.rng
    yield from handshake(f, t)
    yield from startup(f, f.t + 0.0003)
    t = f.t
    for _ in range(rng.randint(1, 12)):
        gap = rng.uniform(0.0001, 0.2)
        yield from exchange(f, t + 0.0001, rng.randint(30, 300), rng.randint(20, 3000), gap)
        t = f.t + gap
    yield from teardown(f, t)


def brief(f: Flow, t: float) -> Iterator[Packet]:
    """A connection per request (--mix short): handshake, one or two queries, FIN (no SCRAM): ~10 packets."""
    rng = f.rng
    yield from handshake(f, t)
    t = f.t
    for _ in range(rng.randint(1, 2)):
        gap = rng.uniform(0.0001, 0.01)
        yield from exchange(f, t + 0.0001, rng.randint(30, 300), rng.randint(20, MSS), gap)
        t = f.t + gap
    yield from teardown(f, t)


def keepalive_conn(f: Flow, t: float, style: str) -> Iterator[Packet]:
    """Connect, query a little, then sit idle while keepalive timers run.

    style: "answered" (server probes, client answers; then FIN or more work),
    "dead_client" (answered for a while, then the client vanishes: server aborts),
    "both" (both ends probe and answer), "dead_server" (the client probes a
    vanished server and aborts).
    """
    rng = f.rng
    yield from handshake(f, t)
    yield from startup(f, f.t + 0.0003)
    server = Timer(rng.choice(SERVER_SETTINGS), 0.0)
    client = Timer(rng.choice(CLIENT_SETTINGS), 0.0)
    for _ in range(rng.randint(1, 3)):
        t = f.t + rng.uniform(0.0005, 0.05)
        queries = rng.randint(1, 4)
        for i in range(queries):
            gap = rng.uniform(0.0002, 0.03) if i < queries - 1 else float("inf")
            yield from exchange(f, t, rng.randint(30, 200), rng.randint(20, 2000), gap)
            t = f.t + gap
        # The last packet each end accepted: the client's delayed ACK (server),
        # the server's last response segment (client).
        t_quiet = f.t
        server.rearm(rng, t_quiet)
        client.rearm(rng, f.t_response)
        length = rng.uniform(8, 40)
        if style == "answered":
            yield from idle_period(f, t_quiet, t_quiet + length, {SERVER: server})
        elif style == "both":
            yield from idle_period(f, t_quiet, t_quiet + length, {SERVER: server, CLIENT: client})
        elif style == "dead_client":
            yield from idle_period(f, t_quiet, t_quiet + length + 120, {SERVER: server},
                                   dead=CLIENT, dead_at=t_quiet + rng.uniform(0, length))
            return
        else:
            yield from idle_period(f, t_quiet, t_quiet + length + 120, {CLIENT: client},
                                   dead=SERVER, dead_at=t_quiet + rng.uniform(0, length))
            return
    yield from teardown(f, f.t + rng.uniform(0.0, 0.5))


def zero_window(f: Flow, t: float) -> Iterator[Packet]:
    """A client stops reading a large result: window 0, the server's persist probes.

    The server runs keepalive settings too, but its keepalive timer never
    fires while data is queued: only zero-window probes appear, spaced by
    exponential backoff from the 200 ms minimum RTO.
    """
    rng = f.rng
    yield from handshake(f, t)
    yield from startup(f, f.t + 0.0003)
    t = f.t + rng.uniform(0.001, 0.05)
    yield f.send(t, CLIENT, ACK | PSH, rng.randint(40, 80), kind=b"Q")
    t += rng.uniform(0.001, 0.01)
    buffer_free = rng.randint(40, 90) * MSS
    unacked = 0
    while buffer_free > 0:
        yield f.send(t, SERVER, ACK, MSS, kind=b"D")
        buffer_free -= MSS
        unacked += 1
        t += rng.uniform(0.000008, 0.00003)
        if unacked == 2 or buffer_free <= 0:
            f.window[CLIENT] = max(0, buffer_free) >> 7
            t += rtt(rng)
            yield f.send(t, CLIENT, ACK)
            unacked = 0
    # Window closed, everything sent is acknowledged, more is queued.
    backoff = rng.uniform(0.201, 0.215)
    probe_t = t
    for _ in range(rng.randint(2, 7)):
        probe_t += backoff
        probe = f.send(probe_t, SERVER, ACK, seq=(f.nxt[SERVER] - 1) % MOD, tag=TAG_WINDOW, advance=False)
        yield probe
        yield f.send(probe_t + 2 * rtt(rng), CLIENT, ACK)
        backoff = min(backoff * 2, 120.0)
    # The client reads again: a window update, the rest of the result.
    t = probe_t + rng.uniform(0.05, backoff)
    f.window[CLIENT] = 502
    yield f.send(t, CLIENT, ACK)
    yield from exchange_tail(f, t + rtt(rng), rng.randint(3, 30) * MSS)
    server = Timer(rng.choice(SERVER_SETTINGS[:6]), 0.0)
    server.rearm(rng, f.t)
    yield from idle_period(f, f.t, f.t + rng.uniform(5, 20), {SERVER: server})
    yield from teardown(f, f.t + rng.uniform(0.0, 0.5))


def exchange_tail(f: Flow, t: float, size: int) -> Iterator[Packet]:
    rng = f.rng
    unacked = 0
    while size > 0:
        chunk = min(size, MSS)
        size -= chunk
        yield f.send(t, SERVER, ACK | PSH if size == 0 else ACK, chunk, kind=b"D")
        unacked += 1
        t += rng.uniform(0.000008, 0.00003)
        if unacked == 2 or size == 0:
            t += rtt(rng)
            yield f.send(t, CLIENT, ACK)
            unacked = 0
    f.t = t + 0.0001


# -- the whole capture --------------------------------------------------------


@dataclass
class Network:
    rng: random.Random
    snaplen: int
    servers: list[Host] = field(default_factory=list)
    clients: list[Host] = field(default_factory=list)
    next_port: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = self.rng
        for i in (2, 3):
            self.servers.append(Host(bytes((172, 17, 0, i)), bytes((2, 0x42, 0xAC, 0x11, 0, i)),
                                     EPOCH - rng.uniform(1e5, 1e6)))
        for i in range(64):
            ip = bytes((10, 20, i // 250, 2 + i % 250))
            self.clients.append(Host(ip, bytes((2, 0x42, 10, 20, i // 250, 2 + i % 250)),
                                     EPOCH - rng.uniform(1e5, 1e6)))
            self.next_port[ip] = rng.randint(32768, 40000)

    def flow(self, rng: random.Random) -> Flow:
        client = rng.choice(self.clients)
        server = rng.choice(self.servers)
        port = self.next_port[client.ip]
        self.next_port[client.ip] = 32768 + (port + 1 - 32768) % 28000
        return Flow(rng, client, port, server, 5432, self.snaplen)


def connections(net: Network, duration_hint: float, mix: str = "pgbench") -> Iterator[tuple[float, Iterator[Packet]]]:
    """(start time, packet generator) of every connection, in start order, forever.

    Rates per second of capture: ~8 pooled pgbench clients always busy (3 of
    them open before the capture), 4 short connections, 10 idle
    keepalive connections, 0.5 zero-window stalls.
    """
    if mix == "short":
        yield from short_mix(net, duration_hint)
        return
    rng = net.rng
    t = EPOCH
    for i in range(8):
        f = net.flow(random.Random(rng.getrandbits(64)))
        preexisting = i < 3
        life = rng.uniform(duration_hint * 0.3, duration_hint * 1.5)
        yield t + i * 0.0007, pooled(f, t + i * 0.0007, t + life, preexisting)
    t += 8 * 0.0007  # starts must come in time order
    yield from _arrivals(net, t, {
        "short": (4.0, lambda f, t: short(f, t)),
        "keepalive": (10.0, lambda f, t: keepalive_conn(f, t, rng.choice(KEEPALIVE_STYLES))),
        "zero_window": (0.5, lambda f, t: zero_window(f, t)),
        "pooled": (0.12, lambda f, t: pooled(f, t, t + rng.uniform(duration_hint * 0.2, duration_hint * 0.8), False)),
    })


KEEPALIVE_STYLES = ("answered", "answered", "both", "dead_client", "dead_client", "dead_server")


def _arrivals(net: Network, t: float, kinds: dict) -> Iterator[tuple[float, Iterator[Packet]]]:
    """Connections arriving as a Poisson process: `kinds` maps a kind to (rate per second, make(flow, t))."""
    rng = net.rng
    names = tuple(kinds)
    weights = tuple(rate for rate, _ in kinds.values())
    rate = sum(weights)
    while True:
        t += rng.expovariate(rate)
        kind = rng.choices(names, weights)[0]
        f = net.flow(random.Random(rng.getrandbits(64)))
        yield t, kinds[kind][1](f, t)


def short_mix(net: Network, duration_hint: float) -> Iterator[tuple[float, Iterator[Packet]]]:
    """--mix short: an app that opens a connection per request, with keepalive flows mixed in.

    Rates per second: ~1,000 brief connections (about 10 packets each, client
    ports soon reused), 1 short connection with SCRAM, 2 idle keepalive
    connections, 0.05 zero-window stalls, and one pooled client. Memory of
    `kaobs analyze` on such a capture grows with connections, not packets.
    """
    rng = net.rng
    t = EPOCH
    f = net.flow(random.Random(rng.getrandbits(64)))
    yield t, pooled(f, t, t + duration_hint * 1.5, True)
    yield from _arrivals(net, t, {
        "brief": (1000.0, lambda f, t: brief(f, t)),
        "short": (1.0, lambda f, t: short(f, t)),
        "keepalive": (2.0, lambda f, t: keepalive_conn(f, t, rng.choice(KEEPALIVE_STYLES))),
        "zero_window": (0.05, lambda f, t: zero_window(f, t)),
    })


MIXES = {"pgbench": 22_000, "short": 12_000}  # mix -> about how many packets per second of capture it makes


def generate(path: str, packets: int, seed: int, snaplen: int, mix: str = "pgbench") -> dict:
    """Write `packets` frames to `path`; return the truth document.

    `mix` "pgbench" (the default) is pooled pgbench-like traffic; "short" is
    a connection per request (hundreds of thousands of connections).
    """
    rng = random.Random(seed)
    net = Network(rng, snaplen)
    duration_hint = packets / MIXES[mix]  # "pgbench": about what 8 pgbench clients produce per second
    starts = connections(net, duration_hint, mix)
    next_start, next_gen = next(starts)
    heap: list[tuple[float, int, Packet, Iterator[Packet]]] = []
    order = 0
    keepalives: list[dict] = []
    window_probes: list[int] = []
    record = _RECORD.pack
    out = open(path, "wb")
    out.write(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
    chunk: list[bytes] = []
    frame = 0
    last_t = EPOCH
    while frame < packets:
        while not heap or next_start <= heap[0][0]:
            packet = next(next_gen, None)
            if packet is not None:
                order += 1
                heapq.heappush(heap, (packet.t, order, packet, next_gen))
            next_start, next_gen = next(starts)
        t, _, packet, gen = heap[0]
        following = next(gen, None)
        if following is None:
            heapq.heappop(heap)
        else:
            order += 1
            heapq.heapreplace(heap, (following.t, order, following, gen))
        frame += 1
        if t < last_t:  # pragma: no cover - a scenario bug
            raise AssertionError(f"frame {frame} goes back in time")
        last_t = t
        sec = int(t)
        usec = int(round((t - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        data = packet.data
        if len(data) > packet.wirelen or len(data) > snaplen:  # pragma: no cover - a builder bug
            raise AssertionError(f"frame {frame}: {len(data)} bytes captured of {packet.wirelen}")
        chunk.append(record(sec, usec, len(data), packet.wirelen))
        chunk.append(data)
        if packet.tag == TAG_KEEPALIVE:
            keepalives.append({"frame": frame, "side": "server" if packet.side == SERVER else "client",
                               "answered": packet.answered})
        elif packet.tag == TAG_WINDOW:
            window_probes.append(frame)
        if len(chunk) >= 8192:
            out.write(b"".join(chunk))
            chunk.clear()
    out.write(b"".join(chunk))
    out.close()
    return {
        "generator": GENERATOR_VERSION,
        "packets": frame,
        "seed": seed,
        "snaplen": snaplen,
        "start": EPOCH,
        "end": last_t,
        "keepalive_probes": keepalives,
        "zero_window_probes": window_probes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000, help="frames to write (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--snaplen", type=int, default=128, help="bytes kept per frame (>= 74)")
    parser.add_argument("--out", default=None, help="pcap to write (default /tmp/kaobs-bench-<N>.pcap)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="pgbench",
                        help="pgbench: pooled clients (default); short: a connection per request, ~100k per 1M packets")
    parser.add_argument("--truth", default=None, help="truth JSON (default: the pcap path + .truth.json)")
    args = parser.parse_args(argv)
    if args.packets < 1 or args.snaplen < 74:
        print("make_capture: --packets must be >= 1 and --snaplen >= 74", file=sys.stderr)
        return 2
    out = args.out or f"/tmp/kaobs-bench-{args.packets}.pcap"
    truth_path = args.truth or out + ".truth.json"
    started = time.perf_counter()
    truth = generate(out, args.packets, args.seed, args.snaplen, args.mix)
    with open(truth_path, "w") as f:
        json.dump(truth, f)
    print(f"{out}: {truth['packets']} packets, {os.path.getsize(out) / 1e6:.1f} MB, "
          f"{truth['end'] - truth['start']:.1f} s of traffic, {len(truth['keepalive_probes'])} keepalive probes, "
          f"{len(truth['zero_window_probes'])} zero-window probes "
          f"(generated in {time.perf_counter() - started:.1f} s); truth in {truth_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
