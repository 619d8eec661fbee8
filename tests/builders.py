"""Build TCP conversations segment by segment, with correct seq/ack arithmetic.

Unit tests of the model describe a scenario in the words of docs/kernel-keepalive.md
("the server probes at 3.05, the client answers") and get the TcpSegments a
capture of it would hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sniffer.records import ACK, FIN, PSH, RST, SYN, TcpSegment

MOD = 1 << 32


@dataclass
class Peer:
    address: str
    port: int
    next_seq: int
    window: int = 502
    ttl: int = 64
    ip_id: int = 100


@dataclass
class Conversation:
    client: Peer = field(default_factory=lambda: Peer("10.9.0.2", 41000, 1000))
    server: Peer = field(default_factory=lambda: Peer("10.9.0.1", 5432, 900000))
    t0: float = 1_700_000_000.0
    segments: list[TcpSegment] = field(default_factory=list)

    def _side(self, side: str) -> tuple[Peer, Peer]:
        return (self.server, self.client) if side == "server" else (self.client, self.server)

    def _emit(self, side: str, t: float, flags: int, seq: int, payload_len: int = 0, window: int | None = None,
              ttl: int | None = None, ip_id: int | None = None, ack: int | None = None) -> TcpSegment:
        me, peer = self._side(side)
        me.ip_id += 1
        segment = TcpSegment(
            frame=len(self.segments) + 1,
            t=self.t0 + t,
            src=me.address,
            sport=me.port,
            dst=peer.address,
            dport=peer.port,
            seq=seq % MOD,
            ack=(peer.next_seq if ack is None else ack) % MOD if flags & ACK else 0,
            flags=flags,
            window=me.window if window is None else window,
            payload_len=payload_len,
            ttl=me.ttl if ttl is None else ttl,
            ip_id=me.ip_id if ip_id is None else ip_id,
        )
        self.segments.append(segment)
        return segment

    def handshake(self, t: float = 0.0) -> "Conversation":
        self._emit("client", t, SYN, self.client.next_seq)
        self.client.next_seq += 1
        self._emit("server", t + 0.0001, SYN | ACK, self.server.next_seq)
        self.server.next_seq += 1
        self._emit("client", t + 0.0002, ACK, self.client.next_seq)
        return self

    def data(self, side: str, t: float, length: int = 100) -> "Conversation":
        me, _ = self._side(side)
        self._emit(side, t, ACK | PSH, me.next_seq, length)
        me.next_seq += length
        return self

    def ack(self, side: str, t: float, upto: int | None = None) -> "Conversation":
        """A pure ACK of everything the peer sent, or of its bytes before sequence number `upto`."""
        me, _ = self._side(side)
        self._emit(side, t, ACK, me.next_seq, ack=upto)
        return self

    def exchange(self, t: float) -> "Conversation":
        """A query and its result, acknowledged: the client's last packet is a pure ACK at t+0.002."""
        return self.data("client", t).data("server", t + 0.001, 300).ack("client", t + 0.002)

    def probe(self, side: str, t: float, *, one_byte: bool = False) -> "Conversation":
        me, _ = self._side(side)
        self._emit(side, t, ACK, me.next_seq - 1, 1 if one_byte else 0)
        return self

    def answer(self, side: str, t: float) -> "Conversation":
        """The duplicate ACK a peer sends to a probe it received."""
        return self.ack(side, t)

    def rst(self, side: str, t: float) -> "Conversation":
        me, _ = self._side(side)
        self._emit(side, t, RST | ACK, me.next_seq)
        return self

    def fin(self, side: str, t: float) -> "Conversation":
        me, _ = self._side(side)
        self._emit(side, t, FIN | ACK, me.next_seq)
        me.next_seq += 1
        return self

    def set_window(self, side: str, window: int) -> "Conversation":
        me, _ = self._side(side)
        me.window = window
        return self

    def send_unacked(self, side: str, t: float, length: int) -> "Conversation":
        """Data the peer will not acknowledge (it stays in flight)."""
        return self.data(side, t, length)

    def resend(self, side: str, t: float, length: int) -> "Conversation":
        """The last `length` bytes the side sent, sent again (a retransmission, or a tail-loss probe)."""
        me, _ = self._side(side)
        self._emit(side, t, ACK | PSH, me.next_seq - length, length)
        return self

    def rst_from_path(self, side: str, t: float, ttl: int = 64) -> "Conversation":
        """A RST in `side`'s name made by a middlebox: its own TTL, IP ID 0."""
        me, _ = self._side(side)
        self._emit(side, t, RST | ACK, me.next_seq, ttl=ttl, ip_id=0)
        return self


def judge_all(model, expectations, capture_end=None, hz=250):
    """Every connection the model followed, judged as of `capture_end` (default: its last segment)."""
    from analysis.pipeline import judge_in_order

    end = capture_end if capture_end is not None else (model.last_t or 0.0)
    return list(judge_in_order(model.connections, expectations, end, hz))
