"""The keepalive model: a pure, deterministic state machine fed with TCP segment records.

One `KeepaliveModel` follows every Postgres connection in a stream of
records (`sniffer.records`) and for each endpoint (server, client) keeps what
its kernel's keepalive timer could see: the last packet it *accepted* from
its peer, the probes it sent, which of them were answered on the wire, and
the abort.

The rules (docs/kernel-keepalive.md, measured on Linux 6.x):

* a probe-shaped segment is a pure ACK of 0 (Linux) or 1 byte at the
  sender's next sequence number minus one; the answer is a duplicate ACK
  from the peer;
* it is a keepalive probe only when the keepalive timer can run: with data
  in flight, or the peer advertising window 0 (data queued), the same shape
  is a zero-window probe of the persist timer (`_probe`, the one place
  where a probe is classified; the gate is `kernel_timer.keepalive_blocked`);
* a probe *received* is out of window: it does not reset the receiver's
  timer; any other segment the receiver accepts does;
* after `count` unanswered probes (or once `tcp_user_timeout` has passed)
  the prober sends RST.

Nothing here knows about expectations or tolerances: the model only records
what happened on the wire, compactly (memory grows with probes and
connections, not with packets); `analysis.prober` and `analysis.verdict`
judge it without writing into it.

There are two ways in, with one set of rules: `feed` takes a `TcpSegment`
and is the readable specification; `feed_records` takes the readers' record
tuples and handles the common case (an established connection's data or
pure ACK) inline, handing everything else to `feed`. `tests/test_fast_path.py`
keeps the two in step.
"""
from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

from analysis.kernel_timer import keepalive_blocked
from analysis.settings import CLIENT, SERVER
from sniffer.records import ACK, FIN, RST, SYN, Record, TcpSegment, flow_endpoints, flow_key

SEQ_MOD = 1 << 32
SEQ_HALF = 1 << 31

KEEPALIVE = "keepalive"
WINDOW = "window"
"""Probe kinds: a keepalive probe, or a zero-window probe of the persist timer (the same shape on the wire)."""

END_REASONS = {
    "open": "open",
    "closed": "closed (FIN)",
    "reset": "reset (RST)",
    "keepalive_abort": "aborted by keepalive",
}
"""`Connection.end_reason` values, and how the reports say them."""

_IGNORED = ("ignored",)  # flow-route cache entry of a flow on no server port
_OVER = frozenset(("reset", "keepalive_abort"))
IDLE_WORTH = 1.0
"""Silences (no packet either way) shorter than this are neither a middlebox's business nor worth a line."""
_HEARD_SCAN = 256
"""Connections of a host looked at (newest first) for evidence that it is alive; bounds the cost of a death."""
_FLOW_ROUTE_LIMIT = 1 << 18


def seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed number (handles wraparound)."""
    d = (a - b) & 0xFFFFFFFF
    return d - SEQ_MOD if d >= SEQ_HALF else d


@dataclass(slots=True)
class KeepaliveProbe:
    """A probe-shaped segment one side sent.

    `kind` is "keepalive" or "window" (a zero-window/persist probe, which looks
    the same on the wire). `since_accepted` is the time of the last packet the
    prober had accepted from its peer when it sent this probe (None when that
    happened before the capture began), `series_index` counts the probes sent
    since that packet, starting at 1. `answer_t` is when the peer's duplicate
    ACK crossed the capture point; whether the prober got it is judged later
    (`analysis.prober`), from when it probed next.
    """

    frame: int
    t: float
    seq: int
    kind: str
    since_accepted: float | None
    series_index: int
    answer_t: float | None = None
    answer_frame: int | None = None
    idle_before: float | None = None

    @property
    def answered_on_wire(self) -> bool:
        return self.answer_t is not None


@dataclass(slots=True)
class Reset:
    """A RST in one side's name, with the keepalive state that side was in.

    `ttl` and `ip_id` are the RST's IP fields: a middlebox answering for the
    side gives itself away by them (`analysis.path`). `peer_heard` is the
    latest time the other side's host was heard on another connection (and
    that connection's index), when the RST is a keepalive abort: evidence that
    the peer is alive and the path dropped this connection.
    """

    frame: int
    t: float
    since_accepted: float | None
    unanswered_probes: int
    after_keepalive: bool
    ttl: int = 0
    ip_id: int = 0
    idle_before: float | None = None
    peer_heard: tuple[float, int] | None = None


@dataclass(slots=True)
class Stall:
    """A side's data (or queued data) the peer did not take: the retransmission or persist timer's run.

    `kind` "data": data sent and not acknowledged, retransmitted by the
    retransmission timer; "window": data queued while the peer advertises a
    zero window, probed by the persist timer. `first_sent` is when the oldest
    unacknowledged byte was first sent (data), or the first zero-window probe
    (window); `idle_before` how long the connection had been silent before
    that, in both directions (what a middlebox's idle timer measured).
    `resends` are the retransmissions (or zero-window probes) as seen on the
    wire. `outcome` is what the wire showed at the end: "acked" (the peer took
    it), "reset" (a RST ended the connection), or "open"; whether the sender
    gave up in silence is judged from the timing (`analysis.stalls`).
    `peer_heard` as in `Reset`, as of the end of the capture.
    """

    kind: str
    first_sent: float
    idle_before: float | None
    seq: int
    resends: list[float] = field(default_factory=list)
    end_t: float | None = None
    outcome: str = "open"
    peer_heard: tuple[float, int] | None = None


@dataclass(slots=True)
class AfterEnd:
    """The first segment on a connection's 4-tuple after a RST ended it: the other side learning of it.

    `side` sent it (data, a FIN, a keepalive probe, a pure ACK: `what`) at
    `t`; `told_t` is when the side that ended the connection answered with a
    RST (its kernel no longer knows the connection). Never an answer to a
    probe, never a packet the ended side accepted.
    """

    side: str
    t: float
    frame: int
    what: str
    told_t: float | None = None
    segments: int = 1


@dataclass(slots=True)
class QuietSpan:
    """The longest span in which a side accepted nothing and sent no probe.

    Only spans that start with nothing of the side's own in flight count: a
    side with unacknowledged data runs its retransmission timer, not its
    keepalive. Kept instead of every accepted packet so memory stays constant.
    """

    start: float
    end: float

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class Endpoint:
    """One side of a connection, as its own kernel's keepalive timer sees it."""

    role: str
    address: str
    port: int
    next_seq: int | None = None
    highest_ack: int | None = None
    window: int | None = None
    last_accepted: float | None = None
    series_probes: int = 0
    series_unanswered: int = 0
    probes: list[KeepaliveProbe] = field(default_factory=list)
    window_probes: int = 0
    retransmissions: int = 0
    reset: Reset | None = None
    fin_t: float | None = None
    longest_quiet: QuietSpan | None = None
    longest_quiet_length: float = 0.5
    quiet_clean: bool = True
    pending_first: TcpSegment | None = None
    unacked_since: float | None = None
    unacked_idle: float | None = None
    stall: Stall | None = None
    stalls: list[Stall] = field(default_factory=list)
    ttls: list[int] = field(default_factory=list)
    last_ip_id: int | None = None
    owes_answer: float = 0.0
    unanswered_heard: tuple[float, int] | None = None
    pending_repeats: list[TcpSegment] | None = None
    """The same pure ACK sent again while `pending_first` waits (see `KeepaliveModel._hold_repeat`)."""

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.address, self.port)

    def keepalive_probes(self) -> list[KeepaliveProbe]:
        return [p for p in self.probes if p.kind == KEEPALIVE]

    def data_in_flight(self, peer: "Endpoint") -> bool:
        """Has this side sent data the peer has not acknowledged (as far as the wire shows)?"""
        return peer.highest_ack is not None and seq_diff(self.next_seq, peer.highest_ack) > 0

    def learn_fingerprint(self, ttl: int, ip_id: int) -> None:
        """Keep the TTLs (at most 4) and the latest IP ID of this side's own packets, as the capture point sees them."""
        if ttl and ttl not in self.ttls and len(self.ttls) < 4:
            self.ttls.append(ttl)
        if ttl:
            self.last_ip_id = ip_id

    def persisting(self, peer: "Endpoint") -> bool:
        """Is this side's persist timer running: its last probe a zero-window probe, the peer's window still 0?

        Its data waits in the send queue, so the keepalive timer does not run:
        the silence after the peer's zero-window ACK is not keepalive idle,
        even though nothing is in flight.
        """
        return bool(self.probes) and self.probes[-1].kind == WINDOW and peer.window == 0


@dataclass(slots=True)
class Connection:
    """A TCP connection between a Postgres server port and a client."""

    index: int
    server: Endpoint
    client: Endpoint
    start: float
    end: float
    first_frame: int
    saw_syn: bool = False
    end_reason: str = "open"
    ended_by: str | None = None
    after_end: AfterEnd | None = None
    last_idle: float = 0.0
    last_idle_t: float | None = None
    longest_idle_survived: float = 0.0

    @property
    def over(self) -> bool:
        """Ended by a RST: what comes later on the 4-tuple is the other side learning of it."""
        return self.end_reason in _OVER

    def side(self, role: str) -> Endpoint:
        return self.server if role == SERVER else self.client

    def peer(self, endpoint: Endpoint) -> Endpoint:
        return self.client if endpoint is self.server else self.server


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """Something a live report shows as it happens."""

    kind: str  # "connection", "probe", "answer", "abort", "reset", "fin", "after_end"
    t: float
    connection: Connection
    side: str
    probe: KeepaliveProbe | None = None
    reset: Reset | None = None


class RetiredStore(Protocol):
    """Where a retiring model puts connections that have ended (see `KeepaliveModel`).

    `put` may be called again for a connection `get` gave back (it came back
    to life and ended again): the later one replaces the earlier.
    """

    def put(self, conn: Connection) -> None: ...

    def get(self, index: int) -> Connection: ...

    def holds(self, index: int) -> bool: ...


class Tombstones:
    """Hash of a retired connection's 4-tuple -> its index, 16 bytes a slot.

    A dict of ints costs ~110 bytes an entry, which grew a capture with a
    million short connections by 110 MB; two arrays with linear probing,
    kept between half and three quarters full, hold the same in 21-32
    bytes. Hashes may collide: `candidates` gives every index stored under a
    hash, and the caller checks the 4-tuple.
    """

    _EMPTY, _DELETED = 0, -1  # values; indexes start at 1

    def __init__(self) -> None:
        self._keys = array("q", bytes(8 * 1024))
        self._values = array("q", bytes(8 * 1024))
        self._size = 1024
        self._used = 0  # live and deleted slots
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def add(self, key_hash: int, index: int) -> None:
        if (self._used + 1) * 4 > self._size * 3:
            self._rebuild()
        keys, values, size = self._keys, self._values, self._size
        slot = key_hash % size
        while values[slot] > 0:
            slot = (slot + 1) % size
        if values[slot] == self._EMPTY:
            self._used += 1
        keys[slot] = key_hash
        values[slot] = index
        self.live += 1

    def candidates(self, key_hash: int) -> Iterator[tuple[int, int]]:
        """(slot, index) of every entry stored under this hash."""
        keys, values, size = self._keys, self._values, self._size
        slot = key_hash % size
        while values[slot] != self._EMPTY:
            if values[slot] > 0 and keys[slot] == key_hash:
                yield slot, values[slot]
            slot = (slot + 1) % size

    def remove(self, slot: int) -> None:
        self._values[slot] = self._DELETED
        self.live -= 1

    def _rebuild(self) -> None:
        old_keys, old_values = self._keys, self._values
        size = max(1024, 2 * (self.live + 1))  # half full after a rebuild
        self._keys = array("q", bytes(8 * size))
        self._values = array("q", bytes(8 * size))
        self._size = size
        self._used = self.live = 0
        for slot, index in enumerate(old_values):  # no list of entries: it would cost more than the table
            if index > 0:
                self.add(old_keys[slot], index)


def format_endpoint(address: str, port: int) -> str:
    """ip:port, with IPv6 in brackets as in URLs ([::1]:5433)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class KeepaliveModel:
    """Follows Postgres connections segment by segment; see the module docstring.

    `server_ports` says which side is the server. Segments of connections that
    touch none of those ports are ignored. `on_event`, when given, is called
    with a `ModelEvent` as probes, answers and aborts are seen (live reports);
    the model itself never does I/O.

    With `retired` (a `RetiredStore`), memory stays bounded by the connections
    alive at a time instead of all of them: a connection that has ended (FIN
    or RST, or whose 4-tuple a new SYN took) and saw no segment for `linger`
    seconds of capture time is handed to the store and dropped from
    `connections`, leaving a tombstone (a hash of its 4-tuple and its index,
    16-64 bytes, see `Tombstones`). A later segment on that
    4-tuple takes it back from the store first, so the result is exactly what
    a model that kept everything would have recorded. `connections` then holds
    the live connections only, in index order; `opened` counts them all;
    `on_retire` sees each connection as it leaves (what must be known of all
    of them before judging: `analysis.path.PathSummary`).

    With `revive` False (`kaobs watch`, which judges a connection as it
    retires and may run for weeks) retiring is for good: no tombstone is
    kept, and a later segment on the 4-tuple starts a new connection. A
    connection aborted by keepalive then lingers `linger_after_abort` seconds
    instead, so that its peer coming back later (`Connection.after_end`) is
    still seen on it.
    """

    def __init__(
        self,
        server_ports: Iterable[int] = (5432,),
        on_event: Callable[[ModelEvent], None] | None = None,
        retired: RetiredStore | None = None,
        linger: float = 5.0,
        on_retire: Callable[[Connection], None] | None = None,
        revive: bool = True,
        linger_after_abort: float | None = None,
    ) -> None:
        self.server_ports = frozenset(server_ports)
        self.on_retire = on_retire
        self.on_event = on_event
        self.connections: list[Connection] = []
        self.opened = 0
        self.retired = retired
        self.linger = linger
        self.revive = revive
        self.linger_after_abort = linger if linger_after_abort is None else max(linger, linger_after_abort)
        self._tombstones = Tombstones()  # hash of the (server, client) 4-tuple -> connection index
        self._next_sweep = 0.0
        self._retired_last_t: float | None = None
        self._routes: dict[tuple[str, int, str, int], tuple[Connection, Endpoint, Endpoint]] = {}
        # The same routes by record flow key (see feed_records), filled on first use.
        self._flow_routes: dict[bytes, tuple] = {}
        self.first_t: float | None = None
        self.segments_ignored = 0
        self.capture_end: float | None = None
        # Connections by host address (both ends), for evidence that a peer host is alive elsewhere;
        # and, per host, the latest time it was heard on a retired connection.
        self._by_host: dict[str, dict[int, Connection]] = {}
        self._retired_heard: dict[str, tuple[float, int]] = {}

    @property
    def last_t(self) -> float | None:
        """Time of the last segment of a followed connection (kept per connection, not per segment)."""
        retired_end = self._retired_last_t
        if retired_end is not None:
            return max(max((c.end for c in self.connections), default=retired_end), retired_end)
        return max((c.end for c in self.connections), default=self.first_t)

    # -- feeding -------------------------------------------------------------

    def feed_all(self, segments: Iterable[TcpSegment]) -> "KeepaliveModel":
        feed = self.feed
        for segment in segments:
            feed(segment)
        return self

    def feed_records(self, records: Iterable[Record]) -> "KeepaliveModel":
        """Account for capture records, in order: the same as `feed` on their TcpSegments, faster.

        A record is ``(frame, t, flow, seq, ack, flags, window, payload_len)``
        (`sniffer.records`): no TcpSegment is built per packet, and the route
        is found by the flow bytes. Only the common case, an established
        connection's data or pure ACK that is not probe-shaped, is handled
        here, inline: it is `_segment` written out for speed (keep the two in
        step). Everything else (a flow's first packet, handshake, FIN, RST, a
        side first seen mid-connection, a probe) goes through `feed`.
        """
        feed = self.feed
        flow_routes = self._flow_routes
        route_of = flow_routes.get
        routes_get = self._routes.get
        ignored = _IGNORED
        for frame, t, flow, seq, ack, flags, window, payload_len, ttl_id in records:
            route = route_of(flow)
            if route is None:
                src, sport, dst, dport = flow_endpoints(flow)
                feed(TcpSegment(frame, t, src, sport, dst, dport, seq, ack, flags, window, payload_len,
                                ttl_id >> 16, ttl_id & 0xFFFF))
                if len(flow_routes) >= _FLOW_ROUTE_LIMIT:
                    flow_routes.clear()
                route = routes_get((src, sport, dst, dport), ignored)
                if route is ignored or route[0].end_reason not in _OVER:  # an ended one stays on the spec path
                    flow_routes[flow] = route
                continue
            if route is ignored:
                self.segments_ignored += 1
                continue
            conn, sender, receiver = route
            next_seq = sender.next_seq
            if (flags & 0x07 or next_seq is None or sender.pending_first is not None
                    or receiver.pending_first is not None
                    or payload_len <= 1 and (next_seq - seq) & 0xFFFFFFFF == 1
                    or payload_len and not 0 < (seq + payload_len - next_seq) & 0xFFFFFFFF < SEQ_HALF):
                feed(TcpSegment(frame, t, sender.address, sender.port, receiver.address, receiver.port,
                                seq, ack, flags, window, payload_len, ttl_id >> 16, ttl_id & 0xFFFF))
                continue
            idle = t - conn.end
            conn.end = t
            if idle > IDLE_WORTH:
                self._silence_ended(conn, receiver, idle, t)
            if sender.owes_answer:
                self._silence_survived(conn, sender)
            if payload_len:
                if sender.unacked_since is None:
                    sender.unacked_since = t
                    sender.unacked_idle = idle if idle > IDLE_WORTH else 0.0
                sender.next_seq = (seq + payload_len) & 0xFFFFFFFF
                sender.quiet_clean = False
            sender.window = window
            if flags & ACK:
                receiver_next = receiver.next_seq
                if receiver.series_unanswered and ack == receiver_next:
                    self._answer(conn, receiver, TcpSegment(
                        frame, t, sender.address, sender.port, receiver.address, receiver.port,
                        seq, ack, flags, window, payload_len, ttl_id >> 16, ttl_id & 0xFFFF))
                highest = sender.highest_ack
                if highest is None or 0 < (ack - highest) & 0xFFFFFFFF < SEQ_HALF:
                    sender.highest_ack = ack
                    if receiver_next is None or 0 < (ack - receiver_next) & 0xFFFFFFFF < SEQ_HALF:
                        receiver.next_seq = receiver_next = ack
                clean = ack == receiver_next
                if clean:
                    receiver.unacked_since = None
                if receiver.stall is not None:
                    self._stall_progress(receiver, ack, window, t)
            else:
                clean = False
            previous = receiver.last_accepted
            if previous is not None and t - previous > receiver.longest_quiet_length:
                self._quiet_span(receiver, previous, t)
            receiver.last_accepted = t
            if receiver.series_probes:
                receiver.series_probes = 0
                receiver.series_unanswered = 0
            receiver.quiet_clean = clean
        return self

    def feed(self, seg: TcpSegment) -> None:
        """Account for one segment; segments must come in capture order.

        The readable path through the rules: find (or open) the connection;
        after a RST ended it, only note the other side learning of it
        (`_after_end`); else the handshake, FIN, RST and sides first seen
        mid-connection (`_uncommon`), or an established connection's segment
        (`_segment`).
        """
        route = self._routes.get((seg.src, seg.sport, seg.dst, seg.dport))
        if route is None:
            route = self._new_route(seg)
            if route is None:
                self.segments_ignored += 1
                return
        conn, sender, receiver = route
        if conn.end_reason in _OVER and seg.flags & (SYN | ACK) != SYN:
            self._after_end(conn, sender, seg)
            return
        if (seg.flags & (SYN | FIN | RST) or sender.next_seq is None or sender.pending_first is not None
                or receiver.pending_first is not None):
            self._uncommon(conn, sender, receiver, seg)
            return
        self._flow(conn, sender, receiver, seg.t)
        self._segment(conn, sender, receiver, seg)

    def _flow(self, conn: Connection, sender: Endpoint, receiver: Endpoint, t: float, answers: bool = True) -> None:
        """A packet crossed: the connection's silence (in both directions: what a middlebox's idle timer sees) ends.

        A silence survived once the side that received the packet ending it
        speaks again (`owes_answer`); `longest_idle_survived` keeps the longest.
        A RST never `answers`: a middlebox's RST comes in the peer's name.
        """
        idle = t - conn.end
        conn.end = t
        if idle > IDLE_WORTH:
            self._silence_ended(conn, receiver, idle, t)
        if answers and sender.owes_answer:
            self._silence_survived(conn, sender)

    @staticmethod
    def _silence_ended(conn: Connection, receiver: Endpoint, idle: float, t: float) -> None:
        """A silence of more than IDLE_WORTH ended at `t`; it survived once `receiver` speaks again."""
        conn.last_idle, conn.last_idle_t = idle, t
        if idle > conn.longest_idle_survived:
            receiver.owes_answer = idle

    @staticmethod
    def _silence_survived(conn: Connection, sender: Endpoint) -> None:
        if sender.owes_answer > conn.longest_idle_survived:
            conn.longest_idle_survived = sender.owes_answer
        sender.owes_answer = 0.0

    def _idle_before(self, conn: Connection, t: float) -> float:
        """The silence the packet at `t` ended (0 when it was shorter than IDLE_WORTH)."""
        return conn.last_idle if conn.last_idle_t == t else 0.0

    def _new_route(self, seg: TcpSegment) -> tuple[Connection, Endpoint, Endpoint] | None:
        """The route of a 4-tuple not followed now: a retired connection taken back, or a new one (None: not Postgres)."""
        t = seg.t
        if self.first_t is None:
            self.first_t = t
        route = None
        if self.retired is not None:
            route = self._revive(seg) if self._tombstones else None
            if route is None and t >= self._next_sweep:
                self._sweep(t)
        return route if route is not None else self._open(seg)

    def _uncommon(self, conn: Connection, sender: Endpoint, receiver: Endpoint, seg: TcpSegment) -> None:
        """Handshake, FIN, RST, and sides first seen mid-connection.

        These are also where a side's IP fingerprint is learnt (its first
        packets, its handshake and FIN, never a RST): samples enough to tell
        its packets from a middlebox's, at no cost on the fast path.
        """
        if seg.flags & (SYN | ACK) == SYN and (conn.end_reason != "open" or sender.next_seq is not None):
            # A new SYN on a used 4-tuple: the port was reused for a new connection.
            self._retire(conn)
            conn, sender, receiver = self._open(seg)
        if not seg.flags & RST:
            sender.learn_fingerprint(seg.ttl, seg.ip_id)
        idle_before = self._idle_before(conn, conn.end)  # the silence the previous packet ended: what a RST answers
        self._flow(conn, sender, receiver, seg.t, not seg.flags & RST)  # after the reuse check: the old one ended before
        if receiver.pending_first is not None and seg.flags & ACK:
            self._resolve_pending(conn, receiver, sender, seg.ack)
        if sender.pending_first is not None and self._hold_repeat(sender, seg):
            return
        if sender.pending_first is not None:
            self._resolve_pending(conn, sender, receiver, seg.seq)
        if seg.flags & (SYN | FIN | RST):
            self._control(conn, sender, receiver, seg, idle_before)
            return
        if sender.next_seq is None:
            if seg.payload_len == 0:
                # A pure ACK first seen mid-connection may be a probe at
                # next-1 or an ordinary ACK at next: decided by what follows.
                sender.pending_first = seg
                return
            sender.next_seq = seg.seq
        self._segment(conn, sender, receiver, seg)

    def _after_end(self, conn: Connection, sender: Endpoint, seg: TcpSegment) -> None:
        """A segment after a RST ended the connection: the other side learning of it, or the ender telling it."""
        after = conn.after_end
        if sender.role != conn.ended_by:
            if after is None:
                what = ("data" if seg.payload_len > 1 else "RST" if seg.flags & RST else "FIN" if seg.flags & FIN
                        else "a probe-shaped ACK" if seg.payload_len <= 1 and sender.next_seq is not None
                        and seq_diff(sender.next_seq, seg.seq) == 1 else "an ACK")
                conn.after_end = AfterEnd(sender.role, seg.t, seg.frame, what)
                self._emit("after_end", seg.t, conn, sender.role)
            else:
                after.segments += 1
        elif after is not None:
            after.segments += 1
            if seg.flags & RST and after.told_t is None:
                after.told_t = seg.t

    def _forget_flows(self, conn: Connection) -> None:
        """Take an ended connection's flows out of the fast path's cache: what follows goes to `_after_end`."""
        s, c = conn.server, conn.client
        for key in (flow_key(s.address, s.port, c.address, c.port), flow_key(c.address, c.port, s.address, s.port)):
            self._flow_routes.pop(key, None)

    def _index_hosts(self, conn: Connection) -> None:
        for address in {conn.server.address, conn.client.address}:
            self._by_host.setdefault(address, {})[conn.index] = conn

    def _unindex_hosts(self, conn: Connection) -> None:
        for end in (conn.server, conn.client):
            hearer = conn.peer(end)
            heard = hearer.last_accepted
            if heard is not None:
                known = self._retired_heard.get(end.address)
                if known is None or heard > known[0]:
                    self._retired_heard[end.address] = (heard, conn.index)
            found = self._by_host.get(end.address)
            if found is not None:
                found.pop(conn.index, None)
                if not found:
                    del self._by_host[end.address]

    def _heard_elsewhere(self, conn: Connection, host: str, since: float) -> tuple[float, int] | None:
        """The latest time `host` was heard on another connection after `since`, and that connection's index.

        Evidence that a peer that went silent on this connection is alive:
        the path, not the peer, dropped this one. Looks at the newest
        connections of the host first, at most `_HEARD_SCAN` of them.
        """
        best = None
        others = self._by_host.get(host, {})
        for count, index in enumerate(reversed(others)):
            if count >= _HEARD_SCAN:
                break
            other = others[index]
            if other is conn:
                continue
            hearer = other.client if other.server.address == host else other.server
            heard = hearer.last_accepted
            if heard is not None and heard > since and (best is None or heard > best[0]):
                best = (heard, other.index)
        retired = self._retired_heard.get(host)
        if retired is not None and retired[0] > since and retired[1] != conn.index and (best is None or retired[0] > best[0]):
            best = retired
        return best

    # -- connection bookkeeping ---------------------------------------------

    def _open(self, seg: TcpSegment) -> tuple[Connection, Endpoint, Endpoint] | None:
        if seg.dport in self.server_ports:
            server = Endpoint(SERVER, seg.dst, seg.dport)
            client = Endpoint(CLIENT, seg.src, seg.sport)
            sender, receiver = client, server
        elif seg.sport in self.server_ports:
            server = Endpoint(SERVER, seg.src, seg.sport)
            client = Endpoint(CLIENT, seg.dst, seg.dport)
            sender, receiver = server, client
        else:
            return None
        old = self._routes.get((seg.dst, seg.dport, seg.src, seg.sport))
        if old is not None:  # pragma: no cover - both directions share routes
            return old
        self.opened += 1
        conn = Connection(
            index=self.opened,
            server=server,
            client=client,
            start=seg.t,
            end=seg.t,
            first_frame=seg.frame,
        )
        self.connections.append(conn)
        self._index_hosts(conn)
        forward = (conn, sender, receiver)
        backward = (conn, receiver, sender)
        self._routes[(seg.src, seg.sport, seg.dst, seg.dport)] = forward
        self._routes[(seg.dst, seg.dport, seg.src, seg.sport)] = backward
        self._emit("connection", seg.t, conn, sender.role)
        return forward

    def _retire(self, conn: Connection) -> None:
        """Forget a finished connection's routes so a reused port starts afresh."""
        self._flow_routes.clear()  # rare: refilled from _routes on first use
        s, c = conn.server, conn.client
        for key in ((s.address, s.port, c.address, c.port), (c.address, c.port, s.address, s.port)):
            route = self._routes.get(key)
            if route is not None and route[0] is conn:
                del self._routes[key]

    # -- retiring ended connections (see the class docstring) ---------------

    def _server_key(self, src: str, sport: int, dst: str, dport: int) -> tuple | None:
        if dport in self.server_ports:
            return (dst, dport, src, sport)
        if sport in self.server_ports:
            return (src, sport, dst, dport)
        return None

    def _sweep(self, t: float) -> None:
        """Hand over every connection that ended more than `linger` ago; runs when a new flow appears.

        Only new flows add connections, so sweeping then bounds memory without
        costing the per-packet path anything.
        """
        self._next_sweep = t + self.linger / 2
        keep: list[Connection] = []
        routes = self._routes
        retired_any = False
        for conn in self.connections:
            s, c = conn.server, conn.client
            route = routes.get((s.address, s.port, c.address, c.port))
            owns = route is not None and route[0] is conn
            linger = self.linger_after_abort if conn.end_reason == "keepalive_abort" else self.linger
            if t - conn.end <= linger or (owns and conn.end_reason == "open"):
                keep.append(conn)
                continue
            if (s.pending_first is not None or c.pending_first is not None
                    or s.stall is not None or c.stall is not None  # the peer answering elsewhere later
                    or ((s.series_unanswered or c.series_unanswered) and not conn.over)):  # is path evidence
                if self.revive or t - conn.end <= self.linger_after_abort:
                    keep.append(conn)
                    continue
                self._settle(conn)  # for good: what the end of the run would have concluded, concluded now
            retired_any = True
            self._unindex_hosts(conn)
            if owns:
                del routes[(s.address, s.port, c.address, c.port)]
                del routes[(c.address, c.port, s.address, s.port)]
                if self.revive:
                    self._tombstones.add(hash((s.address, s.port, c.address, c.port)), conn.index)
            if self._retired_last_t is None or conn.end > self._retired_last_t:
                self._retired_last_t = conn.end
            if self.on_retire is not None:
                self.on_retire(conn)
            self.retired.put(conn)
        if retired_any:
            self.connections = keep
            self._flow_routes.clear()  # refilled from _routes on first use

    def _revive(self, seg: TcpSegment) -> tuple[Connection, Endpoint, Endpoint] | None:
        """A segment on a retired connection's 4-tuple: take the connection back, as if never retired."""
        key = self._server_key(seg.src, seg.sport, seg.dst, seg.dport)
        if key is None:
            return None
        for slot, index in self._tombstones.candidates(hash(key)):
            conn = self.retired.get(index)
            s, c = conn.server, conn.client
            if (s.address, s.port, c.address, c.port) == key:  # else a hash collision: not this one
                self._tombstones.remove(slot)
                break
        else:
            return None
        self._routes[(s.address, s.port, c.address, c.port)] = (conn, s, c)
        self._routes[(c.address, c.port, s.address, s.port)] = (conn, c, s)
        bisect.insort(self.connections, conn, key=lambda live: live.index)
        self._index_hosts(conn)
        return self._routes[(seg.src, seg.sport, seg.dst, seg.dport)]

    def _emit(self, kind: str, t: float, conn: Connection, side: str, **extra) -> None:
        if self.on_event is not None:
            self.on_event(ModelEvent(kind, t, conn, side, **extra))

    # -- per-segment rules ---------------------------------------------------

    def _resolve_pending(self, conn: Connection, owner: Endpoint, peer: Endpoint, hint: int) -> None:
        """Replay a side's first pure ACK once the next segment tells where it sat.

        `hint` is the peer's ACK number or the owner's next sequence number: one
        past the pending segment's seq means the pending one was a probe at
        next-1; anything else means it was an ordinary ACK at next.
        """
        pending = owner.pending_first
        owner.pending_first = None
        if pending is None:
            return
        if owner.next_seq is None:
            owner.next_seq = hint if seq_diff(hint, pending.seq) == 1 else pending.seq
        self._segment(conn, owner, peer, pending)
        repeats, owner.pending_repeats = owner.pending_repeats, None
        for repeat in repeats or ():
            self._segment(conn, owner, peer, repeat)

    @staticmethod
    def _hold_repeat(sender: Endpoint, seg: TcpSegment) -> bool:
        """The side sends its pending first pure ACK again, unprompted: hold it with the first one.

        A capture that starts in the middle of a probe series (tcpdump started
        during an incident) begins with the same pure ACK, again and again, and
        nothing from the peer. Only a probe is sent like that, but whether at
        next-1 (keepalive) is for the next hint to say: the peer's ACK, the
        side's own data, or its RST at next after the last probe. Taking the
        repeat itself as the hint made every probe an ordinary ACK.
        """
        pending = sender.pending_first
        if (pending is None or seg.flags & (SYN | FIN | RST) or seg.seq != pending.seq or seg.ack != pending.ack
                or seg.payload_len != pending.payload_len or seg.window != pending.window):
            return False  # anything else, a window update included, is not a repeat
        if sender.pending_repeats is None:
            sender.pending_repeats = []
        sender.pending_repeats.append(seg)
        return True

    def _control(self, conn: Connection, sender: Endpoint, receiver: Endpoint, seg: TcpSegment,
                 idle_before: float | None = None) -> None:
        flags = seg.flags
        t = seg.t
        if flags & RST:
            unanswered = sender.series_unanswered
            last_probe = sender.probes[-1] if sender.probes else None
            # An answer seen on the wire may never have reached the prober; a
            # RST right after it says so (judged in analysis.verdict). A side
            # that sent anything after its probe was not idle: its RST is not
            # the keepalive timer's (a client's Terminate then RST, say).
            after_keepalive = (
                last_probe is not None
                and last_probe.kind == KEEPALIVE
                and (sender.series_probes > 0 or sender.last_accepted == last_probe.answer_t)
                and (sender.next_seq is None or seq_diff(sender.next_seq, last_probe.seq) <= 1)
            )
            heard = None
            if after_keepalive and unanswered:
                first_unanswered = sender.probes[-unanswered].t
                heard = self._heard_elsewhere(conn, receiver.address, first_unanswered)
            sender.reset = Reset(
                frame=seg.frame,
                t=t,
                since_accepted=sender.last_accepted,
                unanswered_probes=unanswered,
                after_keepalive=after_keepalive,
                ttl=seg.ttl,
                ip_id=seg.ip_id,
                idle_before=idle_before,
                peer_heard=heard,
            )
            conn.end_reason = "keepalive_abort" if after_keepalive else "reset"
            conn.end = t
            conn.ended_by = sender.role
            for side in (sender, receiver):
                if side.stall is not None:
                    side.stall.outcome, side.stall.end_t, side.stall = "reset", t, None
            self._forget_flows(conn)
            self._emit("abort" if after_keepalive else "reset", t, conn, sender.role, reset=sender.reset)
            return
        if flags & SYN:
            conn.saw_syn = True
            sender.next_seq = (seg.seq + 1 + seg.payload_len) & 0xFFFFFFFF
            if flags & ACK:
                self._note_ack(sender, receiver, seg.ack)
                self._accept(receiver, t, self._acked(receiver, sender))
            sender.window = seg.window
            return
        # FIN: it occupies one sequence number and is accepted like data.
        if sender.next_seq is None:
            sender.next_seq = seg.seq
        end = (seg.seq + seg.payload_len + 1) & 0xFFFFFFFF
        if seq_diff(end, sender.next_seq) > 0:
            sender.next_seq = end
        if flags & ACK:
            self._note_ack(sender, receiver, seg.ack)
        sender.window = seg.window
        if sender.fin_t is None:
            sender.fin_t = t
            self._emit("fin", t, conn, sender.role)
        if conn.end_reason == "open":
            conn.end_reason = "closed"
        self._accept(receiver, t, self._acked(receiver, sender))

    def _segment(self, conn: Connection, sender: Endpoint, receiver: Endpoint, seg: TcpSegment) -> None:
        """A data segment or pure ACK of an established connection: a probe, or a packet the receiver accepts."""
        if seg.payload_len <= 1 and seq_diff(sender.next_seq, seg.seq) == 1:
            self._probe(conn, sender, receiver, seg)
            return
        if seg.payload_len:
            end = (seg.seq + seg.payload_len) & 0xFFFFFFFF
            if seq_diff(end, sender.next_seq) > 0:
                if sender.unacked_since is None:
                    sender.unacked_since, sender.unacked_idle = seg.t, self._idle_before(conn, seg.t)
                sender.next_seq = end
                sender.quiet_clean = False
            else:
                self._retransmission(sender, seg)
        sender.window = seg.window
        clean = False
        if seg.flags & ACK:
            if receiver.series_unanswered and seg.ack == receiver.next_seq:
                self._answer(conn, receiver, seg)
            self._note_ack(sender, receiver, seg.ack)
            clean = seg.ack == receiver.next_seq  # nothing of the receiver's own left unacknowledged
            if clean:
                receiver.unacked_since = None
            if receiver.stall is not None:
                self._stall_progress(receiver, seg.ack, seg.window, seg.t)
        self._accept(receiver, seg.t, clean)

    @staticmethod
    def _retransmission(sender: Endpoint, seg: TcpSegment) -> None:
        """Data sent again: the retransmission timer's (or a tail-loss probe's) run, kept as a `Stall`."""
        sender.retransmissions += 1
        stall = sender.stall
        if stall is None or stall.kind != "data":
            known = sender.unacked_since is not None
            stall = Stall("data", sender.unacked_since if known else seg.t,
                          sender.unacked_idle if known else None, seg.seq, [seg.t])
            sender.stall = stall
            sender.stalls.append(stall)
        else:
            stall.resends.append(seg.t)

    @staticmethod
    def _stall_progress(owner: Endpoint, ack: int, window: int, t: float) -> None:
        """The peer's ACK: a data stall ends when it covers the stalled byte, a persist stall when the window opens."""
        stall = owner.stall
        if stall is None:
            return
        if (seq_diff(ack, stall.seq) > 0) if stall.kind == "data" else window > 0:
            stall.outcome, stall.end_t, owner.stall = "acked", t, None

    def _answer(self, conn: Connection, prober: Endpoint, seg: TcpSegment) -> None:
        """The peer acknowledged the prober's next byte again: the probe is answered on the wire."""
        last_probe = prober.probes[-1]
        if last_probe.answer_t is None and last_probe.kind == KEEPALIVE:
            last_probe.answer_t = seg.t
            last_probe.answer_frame = seg.frame
            self._emit("answer", seg.t, conn, prober.role, probe=last_probe)

    def _probe(self, conn: Connection, sender: Endpoint, receiver: Endpoint, seg: TcpSegment) -> None:
        """A probe-shaped segment: classified here, and only here, as a keepalive or a zero-window probe."""
        blocked = keepalive_blocked(data_in_flight=sender.data_in_flight(receiver), data_queued=receiver.window == 0)
        kind = WINDOW if blocked else KEEPALIVE
        sender.series_probes += 1
        probe = KeepaliveProbe(
            frame=seg.frame,
            t=seg.t,
            seq=seg.seq,
            kind=kind,
            since_accepted=sender.last_accepted,
            series_index=sender.series_probes,
            idle_before=self._idle_before(conn, seg.t),
        )
        sender.probes.append(probe)
        if kind == KEEPALIVE:
            sender.series_unanswered += 1
        else:
            sender.window_probes += 1
            stall = sender.stall
            if stall is None or stall.kind != WINDOW:
                stall = sender.stall = Stall(WINDOW, seg.t, self._idle_before(conn, seg.t), seg.seq)
                sender.stalls.append(stall)
            stall.resends.append(seg.t)
        if seg.flags & ACK:
            self._note_ack(sender, receiver, seg.ack)
        sender.window = seg.window
        self._emit("probe", seg.t, conn, sender.role, probe=probe)

    def _note_ack(self, sender: Endpoint, receiver: Endpoint, ack: int) -> None:
        highest = sender.highest_ack
        if highest is None or seq_diff(ack, highest) > 0:
            sender.highest_ack = ack
            if receiver.next_seq is None or seq_diff(ack, receiver.next_seq) > 0:
                receiver.next_seq = ack

    def _accept(self, endpoint: Endpoint, t: float, clean: bool) -> None:
        """The endpoint's kernel accepted a packet: its keepalive timer restarts.

        `clean`: nothing of the endpoint's own is unacknowledged, so the quiet
        span that starts now is keepalive idle (see `_quiet_span`).
        """
        previous = endpoint.last_accepted
        if previous is not None and t - previous > endpoint.longest_quiet_length:
            self._quiet_span(endpoint, previous, t)
        endpoint.last_accepted = t
        endpoint.series_probes = 0
        endpoint.series_unanswered = 0
        endpoint.quiet_clean = clean

    @staticmethod
    def _acked(endpoint: Endpoint, peer: Endpoint) -> bool:
        """Has the peer acknowledged everything the endpoint sent?"""
        return endpoint.next_seq is not None and peer.highest_ack == endpoint.next_seq

    @staticmethod
    def _quiet_span(endpoint: Endpoint, start: float, end: float) -> None:
        """Keep the longest probe-less span with nothing of the endpoint's own in flight.

        With data of its own unacknowledged the endpoint runs its
        retransmission timer, not its keepalive: such a span proves nothing.
        """
        if endpoint.series_probes == 0 and endpoint.quiet_clean:
            endpoint.longest_quiet = QuietSpan(start, end)
            endpoint.longest_quiet_length = end - start

    # -- the end -------------------------------------------------------------

    def finish(self, end_t: float | None = None) -> list[Connection]:
        """Close the books: replay first segments still waiting for a hint."""
        end = end_t if end_t is not None else self.last_t
        for conn in self.connections:
            self._resolve_all_pending(conn)
        for conn in self.connections:
            self._note_heard(conn)
        self.capture_end = end
        return self.connections

    def _settle(self, conn: Connection) -> None:
        """`finish` for one connection, retired for good before the end (see `revive`)."""
        self._resolve_all_pending(conn)
        self._note_heard(conn)

    def _resolve_all_pending(self, conn: Connection) -> None:
        for endpoint in (conn.server, conn.client):
            if endpoint.pending_first is not None:
                # No hint came. One pure ACK is taken as ordinary; the same one repeated, unprompted, was probing.
                seq = endpoint.pending_first.seq
                hint = seq + 1 if endpoint.pending_repeats else seq
                self._resolve_pending(conn, endpoint, conn.peer(endpoint), hint & 0xFFFFFFFF)

    def _note_heard(self, conn: Connection) -> None:
        for endpoint in (conn.server, conn.client):
            peer_address = conn.peer(endpoint).address
            if endpoint.stall is not None:
                endpoint.stall.peer_heard = self._heard_elsewhere(conn, peer_address, endpoint.stall.first_sent)
            if endpoint.series_unanswered and not conn.over:
                first = endpoint.probes[-endpoint.series_unanswered].t
                endpoint.unanswered_heard = self._heard_elsewhere(conn, peer_address, first)
