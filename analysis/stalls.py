"""Stalls: data in flight that the peer does not take, and what the kernel does about it.

While a side has data unacknowledged, or queued behind a zero window,
keepalive does not run (`kernel_timer.keepalive_blocked`): the retransmission
timer does, or the persist timer. They give up in silence (no RST), after
tcp_user_timeout when it is set, else after tcp_retries2 (about 924.6 s for
the default 15). From the wire (`model.Stall`: the first send and every
retransmission or zero-window probe) this module says when each gave up, or
when it must, and by which rule; and, when nothing was expected, what the
timing shows: "gave up between +31.7 s and +38.4 s: a tcp_user_timeout of
6.7-13.4 s, not tcp_retries2".

Reading the retransmissions: Linux may first send a tail-loss probe (about
200 ms after the data when only one segment is in flight), then the
retransmission timer's first retransmission one RTO later, which sets
``retrans_stamp``, the start of the give-up clock; each following
retransmission comes twice as late (at most 120 s). A first resend followed
by a second one *not* twice as late is taken as that tail-loss probe.
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.kernel_timer import (
    BY_RETRIES2,
    BY_USER_TIMEOUT,
    RTO_MAX,
    TimerSettings,
    persist_give_up,
    retransmission_give_up,
    retransmission_timeout,
)
from analysis.model import WINDOW, Endpoint, Stall
from analysis.tolerance import DEFAULT_HZ, timer_tolerance

GAVE_UP = "gave_up"
RULE_NAMES = {BY_USER_TIMEOUT: "tcp_user_timeout", BY_RETRIES2: "tcp_retries2"}


@dataclass(slots=True)
class GiveUp:
    """When the kernel gives up (predicted from the settings), by which rule, and whether the capture shows it."""

    t: float
    rule: str  # "tcp_user_timeout" | "tcp_retries2"
    observed: bool
    resends: int | None = None  # the retransmissions the rule allows (data stalls)


@dataclass(slots=True)
class StallReport:
    """One stall as judged: its outcome on the wire, when the sender gave up (or must), and in words."""

    stall: Stall
    retransmissions: int
    outcome: str  # "acked" | "gave_up" | "reset" | "open"
    retrans_stamp: float | None
    rto: float | None
    next_due: float | None  # when the next retransmission (or probe) was due after the last one seen
    gave_up_between: tuple[float, float] | None  # when it gave up in silence: after the last resend, by next_due
    give_up: GiveUp | None
    inferred: str | None  # with nothing expected: the timing in the settings' terms
    mismatch: str | None  # the settings contradicted by the timing, in words

    @property
    def kind(self) -> str:
        return self.stall.kind


def _timing(stall: Stall) -> tuple[float | None, float | None, list[float]]:
    """(retrans_stamp, rto, the timer's resends): the tail-loss probe, if any, set apart."""
    resends = stall.resends
    if not resends:
        return None, None, []
    if stall.kind == WINDOW:
        gap = resends[1] - resends[0] if len(resends) > 1 else None
        return resends[0], gap, resends
    first_gap = resends[0] - stall.first_sent
    if len(resends) > 1:
        second_gap = resends[1] - resends[0]
        if first_gap > 0 and second_gap < 1.5 * first_gap:
            return resends[1], second_gap, resends[1:]  # resends[0] was a tail-loss probe
    return resends[0], first_gap if first_gap > 0 else None, resends


def _next_due(timer_resends: list[float], rto: float | None) -> float | None:
    """When the timer fires next after the last resend seen: twice the last timeout, at most RTO_MAX."""
    if not timer_resends or rto is None:
        return None
    last_gap = timer_resends[-1] - timer_resends[-2] if len(timer_resends) > 1 else rto
    return timer_resends[-1] + min(2 * last_gap, RTO_MAX)


def judge_stall(stall: Stall, owner: Endpoint, settings: TimerSettings | None, capture_end: float,
                hz: int = DEFAULT_HZ, t0: float = 0.0) -> StallReport:
    """The stall's outcome (a silent give-up told from the timing), its predicted give-up, and what it says of the settings.

    `settings` are the stalled side's expected numbers (None: nothing
    expected, the timing is put in the settings' terms instead).
    """
    stamp, rto, timer_resends = _timing(stall)
    due = _next_due(timer_resends, rto)
    outcome = stall.outcome
    between = None
    if outcome == "open" and due is not None:
        # Told from the wire alone, whatever the settings: the next resend was due (twice the last timeout)
        # and did not come. A tcp_user_timeout may have ended it sooner: that is for the judging to say.
        if capture_end > due + timer_tolerance(max(due - timer_resends[-1], 0.001), hz).late:
            outcome = GAVE_UP
            between = (timer_resends[-1], due)
    give_up = _predicted(stall, owner, settings, stamp, rto, outcome)
    report = StallReport(stall, len(stall.resends), outcome, stamp, rto, due, between, give_up, None, None)
    if between is not None:
        if settings is None or settings.user_timeout is None:
            report.inferred = _infer(report, t0)
        elif give_up is not None:
            report.mismatch = _contradiction(report, settings, hz, t0)
    return report


def _predicted(stall: Stall, owner: Endpoint, settings: TimerSettings | None, stamp: float | None,
               rto: float | None, outcome: str) -> GiveUp | None:
    if settings is None or settings.user_timeout is None or stamp is None:
        return None
    observed = outcome == GAVE_UP
    if stall.kind == WINDOW:
        answered = owner.last_accepted is not None and owner.last_accepted >= stall.resends[0]
        t, rule = persist_give_up(stall.resends[0], settings, answered)
        return None if t is None or rule is None else GiveUp(t, RULE_NAMES[rule], observed)
    if rto is None:
        return None
    t, resends = retransmission_give_up(stamp, rto, settings)
    rule = BY_USER_TIMEOUT if settings.user_timeout else BY_RETRIES2
    return GiveUp(t, RULE_NAMES[rule], observed, resends)


def _contradiction(report: StallReport, settings: TimerSettings, hz: int, t0: float) -> str | None:
    """The give-up seen against the one predicted: None when they agree within the timer's tolerance."""
    assert report.gave_up_between is not None and report.give_up is not None
    low, high = report.gave_up_between
    predicted = report.give_up.t
    tolerance = timer_tolerance(max(high - low, 0.001), hz)
    if low - tolerance.early <= predicted <= high + tolerance.late:
        return None
    rule = report.give_up.rule
    said = (f"tcp_user_timeout={settings.user_timeout * 1000:.0f} ms" if rule == "tcp_user_timeout"
            else f"tcp_retries2={settings.retries2} (no tcp_user_timeout)")
    return (f"gave up between +{low - t0:.3f} s and +{high - t0:.3f} s; {said} says at +{predicted - t0:.3f} s"
            + ("" if predicted < low else f" ({_words(predicted - high)} later)"))


def _infer(report: StallReport, t0: float) -> str:
    """With nothing expected: which tcp_user_timeout, or which tcp_retries2, the give-up fits."""
    assert report.gave_up_between is not None
    low, high = report.gave_up_between
    stamp, rto = report.retrans_stamp, report.rto
    where = f"gave up between +{low - t0:.3f} s and +{high - t0:.3f} s"
    if stamp is None:
        return where
    if report.kind == WINDOW:
        return f"{where}: a tcp_user_timeout of {low - stamp:.1f}-{high - stamp:.1f} s"
    fits = []
    if rto is not None:
        for retries2 in range(0, 31):
            t, _ = retransmission_give_up(stamp, rto, TimerSettings(retries2=retries2))
            if low < t <= high + 0.05:
                fits.append(retries2)
    user = f"a tcp_user_timeout of {low - stamp:.1f}-{high - stamp:.1f} s"
    default = retransmission_timeout(15)
    if 15 in fits:
        return f"{where}: tcp_retries2=15 (the default, {_words(default)} of retransmissions), or {user}"
    if fits:
        return (f"{where}: {user}, or a lowered tcp_retries2={fits[0]}; not the default tcp_retries2=15, which "
                f"would go on until +{stamp + default - t0:.0f} s")
    return f"{where}: {user}, not tcp_retries2 (the default 15 would go on until +{stamp + default - t0:.0f} s)"


def _words(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def judge_stalls(owner: Endpoint, settings: TimerSettings | None, capture_end: float, hz: int = DEFAULT_HZ,
                 t0: float = 0.0) -> list[StallReport]:
    """Every stall of one side, judged."""
    return [judge_stall(stall, owner, settings, capture_end, hz, t0) for stall in owner.stalls]
