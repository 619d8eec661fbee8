"""The kernel's keepalive timer as pure functions: what it does next, and when.

This is the one place where kaobs says what Linux's ``tcp_keepalive_timer()``
(net/ipv4/tcp_timer.c; quoted in docs/kernel-keepalive.md) does. The verdicts
compare the probes and aborts seen on the wire with it (`analysis.verdict`),
the live outlook predicts with it (`analysis.outlook`), and the lab plans how
long a run lasts with it (`kaobs.lab.plan`). The other timers that run
instead of keepalive while data is in flight (retransmission, persist) belong
here too.

The timer in the kernel, when it fires at ``now``:

* data unacknowledged or waiting to be sent: keepalive does not apply
  (``if (tp->packets_out || !tcp_write_queue_empty(sk)) goto resched``);
* ``elapsed`` = now - the last packet accepted from the peer; below ``idle``
  the timer re-arms for ``last accepted + idle``;
* otherwise it aborts (RST) when ``tcp_user_timeout`` is set, ``elapsed`` has
  reached it and at least one probe is out, or, without a user timeout, when
  the probes out have reached ``count``; else it sends a probe and re-arms for
  ``interval``.

An answer resets the probes out and the last accepted packet, but not the
timer already armed for ``interval``: after an answered probe the next one
comes at ``max(answer + idle, probe + interval)``. Times here are exact; how
late the timer wheel may fire is `analysis.tolerance`'s business.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PROBE = "probe"
ABORT = "abort"
BLOCKED = "blocked"
"""Data in flight or queued: the retransmission or persist timer runs, not keepalive."""
UNKNOWN = "unknown"
"""The settings do not say (a number not judged): nothing can be predicted."""

BY_COUNT = "count"
BY_USER_TIMEOUT = "user_timeout"
BY_RETRIES2 = "retries2"


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """One side's keepalive numbers in seconds (and probes); None where nothing was said.

    `user_timeout` 0 means not set: the count decides the abort; None (not
    judged) is taken as 0 when an abort must be decided, as the kernel's
    default is. `retries2` is the namespace's net.ipv4.tcp_retries2, which
    bounds retransmissions when no user timeout is set.
    """

    enabled: bool | None = None
    idle: float | None = None
    interval: float | None = None
    count: int | None = None
    user_timeout: float | None = None
    retries2: int = 15


@dataclass(frozen=True, slots=True)
class TimerState:
    """What the prober's timer knows at a moment.

    `last_accepted`: the last packet it accepted from its peer (tp->rcv_tstamp),
    None when that was before the capture. `probes_out`: keepalive probes sent
    and unanswered since then (icsk_probes_out). `armed`: when the timer is set
    to fire, if that is known (after a probe: probe + interval); None when it
    runs from the last accepted packet. `data_in_flight`: data unacknowledged
    or queued.
    """

    last_accepted: float | None
    probes_out: int = 0
    armed: float | None = None
    data_in_flight: bool = False

    def after_probe(self, t: float, interval: float) -> "TimerState":
        """The state once an unanswered probe went out at `t`."""
        return TimerState(self.last_accepted, self.probes_out + 1, t + interval, self.data_in_flight)


@dataclass(frozen=True, slots=True)
class TimerEvent:
    """What the timer does next: `kind` (PROBE, ABORT, BLOCKED, UNKNOWN) at `due`; `rule` names an abort's rule."""

    kind: str
    due: float | None
    rule: str | None = None


def keepalive_blocked(data_in_flight: bool, data_queued: bool) -> bool:
    """The keepalive timer's first test: with data unacknowledged or queued it does nothing.

    A segment shaped like a keepalive probe (next sequence number minus one,
    0 or 1 byte) sent then is a zero-window probe of the persist timer; a peer
    advertising a zero window is what makes data wait in the queue.
    """
    return data_in_flight or data_queued


def abort_rule(settings: TimerSettings, probes_out: int, elapsed: float | None, slack: float = 0.0) -> str | None:
    """Which rule, if any, makes the kernel abort at a tick with these numbers (BY_USER_TIMEOUT, BY_COUNT, None).

    `elapsed` is the time since the last accepted packet (None when unknown:
    a user timeout then cannot be decided). `slack` moves the user-timeout
    boundary: the prober accepted the peer's packet a little after the capture
    point saw it, so a verdict gives the observed event the benefit of that doubt.
    """
    user_timeout = settings.user_timeout or 0.0
    if user_timeout > 0:
        if probes_out > 0 and elapsed is not None and elapsed >= user_timeout + slack:
            return BY_USER_TIMEOUT
        return None
    if settings.count is not None and probes_out >= settings.count:
        return BY_COUNT
    return None


def decide(state: TimerState, settings: TimerSettings, now: float, slack: float = 0.0) -> TimerEvent:
    """What the timer does when it fires at `now` with elapsed >= idle: abort, or send a probe."""
    if keepalive_blocked(state.data_in_flight, False):
        return TimerEvent(BLOCKED, None)
    elapsed = None if state.last_accepted is None else now - state.last_accepted
    rule = abort_rule(settings, state.probes_out, elapsed, slack)
    return TimerEvent(ABORT if rule else PROBE, now, rule)


def next_tick(state: TimerState, settings: TimerSettings) -> float | None:
    """When the timer next fires with the idle time reached; None when the settings do not say."""
    if state.probes_out:
        return state.armed
    if state.last_accepted is None or settings.idle is None:
        return None
    due = state.last_accepted + settings.idle
    return due if state.armed is None else max(due, state.armed)


def next_event(state: TimerState, settings: TimerSettings) -> TimerEvent:
    """What the kernel's keepalive timer does next under `settings`, and when (nothing answering meanwhile)."""
    if state.data_in_flight:
        return TimerEvent(BLOCKED, None)
    if settings.enabled is False:
        return TimerEvent(UNKNOWN, None)
    due = next_tick(state, settings)
    if due is None:
        return TimerEvent(UNKNOWN, None)
    return decide(state, settings, due)


def abort_due(state: TimerState, settings: TimerSettings) -> float | None:
    """When the kernel aborts if nothing answers any more; None when the settings cannot tell.

    Count: one interval after the count-th probe. User timeout: the first
    tick (probe time) at or after it with a probe out.
    """
    interval = settings.interval
    event = next_event(state, settings)
    if event.kind == ABORT or event.kind != PROBE or interval is None or event.due is None:
        return event.due if event.kind == ABORT else None
    user_timeout = settings.user_timeout or 0.0
    if user_timeout > 0:
        if state.last_accepted is None:
            return None
        # Ticks come every interval after this probe; the abort is the first one at or past the user timeout.
        last, due = state.last_accepted, event.due
        k = max(1, math.ceil((last + user_timeout - due) / interval))
        while k > 1 and due + (k - 1) * interval - last >= user_timeout:  # float rounding of ceil, both ways
            k -= 1
        while due + k * interval - last < user_timeout:
            k += 1
        return due + k * interval
    if settings.count is None:
        return None
    # This probe makes probes_out + 1; the abort tick comes once probes_out reaches count.
    more = max(0, settings.count - (state.probes_out + 1))
    return event.due + (more + 1) * interval


# -- while data is in flight: the retransmission and persist timers ---------------------------------
#
# tcp_write_timeout() / retransmits_timed_out() and tcp_probe_timer() in net/ipv4/tcp_timer.c (quoted in
# docs/kernel-keepalive.md). Neither sends a RST when it gives up: the socket is closed in silence
# (tcp_write_err), and the peer learns of it only by a RST to its next segment.

RTO_MIN = 0.200
"""TCP_RTO_MIN: the base of the retransmission timeout the give-up is modelled on."""
RTO_MAX = 120.0
"""TCP_RTO_MAX: the longest a retransmission timeout backs off to."""
RETRIES2_DEFAULT = 15
"""net.ipv4.tcp_retries2: 15 gives up after ~924.6 s of retransmissions."""


def retransmission_timeout(retries2: int, rto_base: float = RTO_MIN, rto_max: float = RTO_MAX) -> float:
    """tcp_model_timeout(): seconds of retransmissions before `retries2` is reached (924.6 s for 15).

    Doubling from `rto_base` up to `rto_max`, then `rto_max` each:
    ``(2^(R+1) - 1) * 0.2 s`` for R <= 9, ``204.6 s + (R - 9) * 120 s`` above.
    """
    threshold = int(math.log2(rto_max / rto_base))  # ilog2(TCP_RTO_MAX / TCP_RTO_MIN) = 9
    if retries2 <= threshold:
        return ((2 << retries2) - 1) * rto_base
    return ((2 << threshold) - 1) * rto_base + (retries2 - threshold) * rto_max


def retransmission_limit(settings: TimerSettings) -> tuple[float, str]:
    """How long the retransmission timer may run, counted from the first retransmission, and by which rule.

    ``tcp_user_timeout`` when set replaces the tcp_retries2 model entirely
    (the `timeout` argument of retransmits_timed_out()).
    """
    user_timeout = settings.user_timeout or 0.0
    if user_timeout > 0:
        return user_timeout, BY_USER_TIMEOUT
    return retransmission_timeout(settings.retries2), BY_RETRIES2


def retransmission_give_up(retrans_stamp: float, rto: float, settings: TimerSettings) -> tuple[float, int]:
    """When the retransmission timer gives up, and how many retransmissions it sends, nothing acknowledged.

    `retrans_stamp` is the first retransmission by the timer (tp->retrans_stamp),
    `rto` the timeout it came after; each later one doubles it, up to
    RTO_MAX. At every expiry the kernel first checks whether the time since
    `retrans_stamp` has reached the limit (then gives up, in silence), else
    retransmits. With tcp_user_timeout the timer is clamped to fire exactly
    at the limit (tcp_clamp_rto_to_user_timeout).
    """
    limit, rule = retransmission_limit(settings)
    expiry, gap, sent = retrans_stamp, min(2 * rto, RTO_MAX), 1
    for _ in range(10_000):
        if rule == BY_USER_TIMEOUT and expiry + gap >= retrans_stamp + limit:
            return retrans_stamp + limit, sent
        expiry += gap
        if expiry - retrans_stamp >= limit:
            return expiry, sent
        sent += 1
        gap = min(2 * gap, RTO_MAX)
    return expiry, sent


def persist_give_up(first_probe: float, settings: TimerSettings, peer_answers: bool) -> tuple[float | None, str | None]:
    """When the persist (zero-window probe) timer gives up: (time, rule), or (None, None) when it never does.

    With tcp_user_timeout: that long after the first probe, answered or not
    (icsk_probes_tstamp is not reset by ACKs). Without: after tcp_retries2
    unanswered probes; a peer that answers every probe with a zero window
    keeps the connection open for ever (RFC 1122 4.2.2.17).
    """
    user_timeout = settings.user_timeout or 0.0
    if user_timeout > 0:
        return first_probe + user_timeout, BY_USER_TIMEOUT
    if peer_answers:
        return None, None
    return first_probe + retransmission_timeout(settings.retries2), BY_RETRIES2
