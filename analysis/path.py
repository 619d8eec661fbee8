"""When the path fails, not the peer: a middlebox's RST, a silent drop, and the idle timeout behind them.

Three judgments, pure, from what the model recorded:

* **A RST from the path.** Each side's own packets carry its kernel's TTL
  (hop limit) and IP IDs, as the capture point sees them; a RST in a side's
  name with a TTL that side never used was made by a load balancer, firewall
  or NAT answering for it (`path_cut`).
* **A silent drop.** A side's data or keepalive probes went unanswered while
  the same peer host kept answering on another connection: the peer is alive,
  the path dropped this one (the model gathers that evidence as it goes:
  `Reset.peer_heard`, `Stall.peer_heard`, `Endpoint.unanswered_heard`).
* **The idle cut.** Across the connections of a host pair, the longest
  silence that survived and the shortest one after which the path cut a
  connection bound the middlebox's idle timeout (`PathSummary`), matched
  against the defaults of common middleboxes (`MIDDLEBOXES`, sources in
  docs/middleboxes.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from analysis.model import Connection, Endpoint
from analysis.settings import CLIENT, SERVER

DROP = "drop"
RESET = "reset"
BOTH = "both"
"""A `PathCut.far` for a connection the path forgot: neither side's packets reach the capture point after it."""


@dataclass(frozen=True, slots=True)
class Middlebox:
    """A middlebox's default idle timeout for established TCP flows, and what it does then."""

    name: str
    seconds: float
    behaviour: str


MIDDLEBOXES: tuple[Middlebox, ...] = (
    Middlebox("Azure Load Balancer default", 240, "drops silently (RST to both ends with 'TCP reset on idle')"),
    Middlebox("AWS NLB default", 350, "answers the next packet with a RST"),
    Middlebox("AWS NAT gateway", 350, "answers the next packet from inside with a RST"),
    Middlebox("GCP VPC firewall", 600, "drops"),
    Middlebox("PgBouncer server_idle_timeout default", 600, "closes the server connection (Terminate, FIN)"),
    Middlebox("Docker Swarm / kube-proxy IPVS", 900, "stops forwarding"),
    Middlebox("GCP Cloud NAT", 1200, "forgets the mapping"),
    Middlebox("RFC 5382 minimum for NATs", 7440, "may abandon the session"),
    Middlebox("Linux conntrack default", 432_000, "forgets the flow"),
)
"""Defaults of common middleboxes (docs/middleboxes.md has the sources)."""


@dataclass(slots=True)
class PathCut:
    """The path, not the peer, ended the connection for this capture point.

    `kind` "reset" (a middlebox's RST) or "drop" (packets not carried); `t`
    the RST, or the first packet the path did not carry; `far` the side
    whose packets no longer reach this capture point after `t` (`BOTH` when
    the cut is inferred); `idle_before` how long the connection had been
    silent before that packet.
    """

    kind: str
    t: float
    evidence: str
    far: str
    idle_before: float | None
    inferred: bool = False
    """No packet shows it: the connection stayed silent longer than the path keeps connections (`forgets_after`)."""


def _other(role: str) -> str:
    return CLIENT if role == SERVER else SERVER


def _ttls(side: Endpoint) -> str:
    ttls = "/".join(str(t) for t in sorted(side.ttls))
    return f"TTL {ttls}" + (f" (IP IDs up to {side.last_ip_id:#06x})" if side.last_ip_id else "")


def path_reset(conn: Connection, t0: float) -> PathCut | None:
    """A RST in a side's name whose TTL that side's own packets never had: a middlebox's."""
    for side in (conn.server, conn.client):
        reset = side.reset
        if reset is None or not reset.ttl or not side.ttls or reset.ttl in side.ttls:
            continue
        ident = f", IP ID {reset.ip_id}" if ":" not in side.address else ""
        evidence = (f"RST at +{reset.t - t0:.3f} s in the {side.role}'s name with TTL {reset.ttl}{ident}; the "
                    f"{side.role}'s own packets arrive with {_ttls(side)}: sent by a middlebox on the path, not by "
                    f"the {side.role}'s kernel")
        return PathCut(RESET, reset.t, evidence, side.role, reset.idle_before)
    return None


def path_drop(conn: Connection, t0: float, stall_outcomes: dict[int, str] | None = None) -> PathCut | None:
    """A side's data or probes unanswered while the peer host answered on another connection after them.

    `stall_outcomes` maps id(stall) to its judged outcome ("gave_up", "open",
    ...): a stall that was acknowledged in the end was no drop.
    """
    found: list[tuple[float, str, str, float | None]] = []
    for side in (conn.server, conn.client):
        peer = conn.peer(side)
        for stall in side.stalls:
            outcome = (stall_outcomes or {}).get(id(stall), stall.outcome)
            if stall.peer_heard is None or outcome == "acked":
                continue
            what = (f"the {side.role}'s data at +{stall.first_sent - t0:.3f} s was never acknowledged "
                    f"({len(stall.resends)} retransmission(s))" if stall.kind == "data" else
                    f"the {side.role}'s zero-window probes from +{stall.first_sent - t0:.3f} s went unanswered")
            found.append((stall.first_sent, side.role, _alive(what, peer, stall.peer_heard, t0), stall.idle_before))
        reset = side.reset
        if reset is not None and reset.after_keepalive and reset.peer_heard is not None and reset.unanswered_probes:
            first = side.probes[-reset.unanswered_probes]
            what = f"the {side.role}'s keepalive probes from +{first.t - t0:.3f} s went unanswered until its abort"
            found.append((first.t, side.role, _alive(what, peer, reset.peer_heard, t0), first.idle_before))
        if side.unanswered_heard is not None and side.series_unanswered:
            first = side.probes[-side.series_unanswered]
            what = f"the {side.role}'s keepalive probes from +{first.t - t0:.3f} s went unanswered"
            found.append((first.t, side.role, _alive(what, peer, side.unanswered_heard, t0), first.idle_before))
    if not found:
        return None
    t, role, evidence, idle = min(found, key=lambda item: item[0])
    return PathCut(DROP, t, evidence, _other(role), idle)


def _alive(what: str, peer: Endpoint, heard: tuple[float, int], t0: float) -> str:
    heard_t, index = heard
    return (f"{what} while {peer.address} answered connection #{index} at +{heard_t - t0:.3f} s: the path dropped "
            f"this connection; the {peer.role} is alive (unless several hosts share that address, behind a NAT or a "
            "proxy)")


def path_cut(conn: Connection, t0: float, stall_outcomes: dict[int, str] | None = None) -> PathCut | None:
    """The path's cut of this connection, if the capture shows one: a middlebox's RST first, else a drop."""
    return path_reset(conn, t0) or path_drop(conn, t0, stall_outcomes)


# -- the idle timeout behind the cuts -----------------------------------------------------------------


@dataclass(slots=True)
class IdleCut:
    """The middlebox's idle timeout as the capture bounds it: more than `lower`, at most `upper` seconds."""

    lower: float
    upper: float
    evidence: list[str]
    matches: list[str]
    hosts: tuple[str, str]  # (client host, server host)


@dataclass(slots=True)
class _Pair:
    survived: float = 0.0
    survived_by: int | None = None
    died: float | None = None
    died_by: int | None = None
    cuts: int = 0
    connections: int = 0


@dataclass(slots=True)
class PathSummary:
    """Across connections, per (client host, server host): the longest idle that survived, the shortest that died.

    Fed one connection at a time (`add`), so it works on reports streamed in
    bounded memory; `idle_cut` then gives the window, `warnings` what else
    it saw.
    """

    pairs: dict[tuple[str, str], _Pair] = field(default_factory=dict)

    def add(self, conn: Connection, cut: PathCut | None) -> None:
        pair = self.pairs.setdefault((conn.client.address, conn.server.address), _Pair())
        pair.connections += 1
        if conn.longest_idle_survived > pair.survived:
            pair.survived, pair.survived_by = conn.longest_idle_survived, conn.index
        if cut is not None and not cut.inferred:  # an inferred cut is drawn from this summary: no evidence of its own
            pair.cuts += 1
            if cut.idle_before is not None and (pair.died is None or cut.idle_before < pair.died):
                pair.died, pair.died_by = cut.idle_before, conn.index

    def idle_cut(self) -> IdleCut | None:
        """The tightest consistent window, from the host pair with the most cuts."""
        candidates = [(pair.cuts, hosts, pair) for hosts, pair in self.pairs.items()
                      if pair.died is not None and pair.survived < pair.died]
        if not candidates:
            return None
        _, hosts, pair = max(candidates, key=lambda item: (item[0], -(item[2].died - item[2].survived)))
        lower, upper = pair.survived, pair.died
        assert upper is not None
        evidence = [f"connection #{pair.died_by} ({hosts[0]} -> {hosts[1]}) was cut by the path after {upper:.1f} s "
                    f"idle"]
        if pair.survived_by is not None:
            evidence.append(f"connection #{pair.survived_by} survived {lower:.1f} s idle")
        matches = [f"{box.name} {_seconds(box.seconds)}" for box in MIDDLEBOXES
                   if lower < box.seconds <= upper * 1.02 + 1.0]
        return IdleCut(round(lower, 3), round(upper, 3), evidence, matches, hosts)

    def forgets_after(self, client: str, server: str) -> tuple[float, int] | None:
        """For a host pair whose cuts fit one idle timeout: the longest idle the path is known to cut, and where."""
        pair = self.pairs.get((client, server))
        if pair is None or pair.died is None or pair.died_by is None or pair.survived >= pair.died:
            return None
        return pair.died, pair.died_by

    def warnings(self) -> list[str]:
        """What does not fit one idle timeout (several middleboxes, or a cut that is not about idleness)."""
        out = []
        for (client, server), pair in self.pairs.items():
            if pair.died is not None and pair.survived >= pair.died:
                out.append(f"{client} -> {server}: connection #{pair.survived_by} survived {pair.survived:.1f} s idle "
                           f"but #{pair.died_by} was cut after {pair.died:.1f} s: not one idle timeout (several "
                           "paths, or the cut was not about idleness)")
        return out


def recommended_idle(lower: float) -> int:
    """A keepalive idle safely below an idle cut known to be more than `lower` seconds: 10 % off, rounded down."""
    room = lower * 0.9
    step = 60 if room >= 120 else 10 if room >= 20 else 1
    return max(1, int(room // step) * step)


def idle_advice(cut: IdleCut, server_idle: float | None, client_idle: float | None) -> str:
    """The idle cut and what to set, in the user's own terms."""
    window = f"between {_seconds(cut.lower)} and {_seconds(cut.upper)}"
    matched = f" ({', '.join(cut.matches)})" if cut.matches else ""
    words = f"the path forgets connections idle {window}{matched}"
    late = [f"{name} probes start at {_seconds(idle)}" for name, idle in (("server", server_idle), ("client", client_idle))
            if idle is not None and idle >= cut.lower]
    safe = recommended_idle(cut.lower)
    if late:
        words += f"; {' and '.join(late)}"
    return (f"{words}: set tcp_keepalives_idle <= {safe} on the server and keepalives_idle <= {safe} in the "
            "client's DSN")


def _seconds(value: float) -> str:
    if value >= 3600 and value % 60 == 0:
        hours, minutes = divmod(int(value) // 60, 60)
        return f"{hours} h" + (f" {minutes} min" if minutes else "") if value < 86400 else f"{value / 86400:g} days"
    return f"{round(value):d} s" if value >= 100 else f"{value:.1f} s"
