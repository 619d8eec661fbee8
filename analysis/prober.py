"""The probes as the prober's own timer saw them, and what its kernel did in the settings' terms.

The model sees the wire at the capture point; the prober may not have
received an answer that crossed it. When the next probe comes one *interval*
after an answered probe instead of one *idle* after the answer, the answer
was lost between the capture point and the prober (`prober_view` says so,
per probe, without writing into the model). Probes are grouped into series
as the prober's timer saw them: a series starts at the last packet it
accepted, and each probe has its place in it.

`observe` then states what the side's kernel did in the settings' own
terms: the idle before the first probe, the interval between unanswered
probes, how many went unanswered before the abort, and the time from the
last accepted packet to the abort.
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.kernel_timer import TimerSettings
from analysis.model import Endpoint, KeepaliveProbe
from analysis.tolerance import DEFAULT_HZ, timer_tolerance


@dataclass(slots=True)
class ProberProbe:
    """A keepalive probe as the prober's own timer saw it.

    `anchor` is the last packet the prober accepted, as far as it knows;
    `index` the probe's place in the series since then (1 for the first);
    `previous` the time of the series' previous probe. `answer_lost`: an
    answer crossed the capture point, but the prober's next move shows it
    never arrived.
    """

    probe: KeepaliveProbe
    anchor: float | None
    index: int
    previous: float | None
    answer_lost: bool = False

    @property
    def t(self) -> float:
        return self.probe.t

    @property
    def answered(self) -> bool:
        """Answered as the prober saw it: an answer on the wire that was not lost."""
        return self.probe.answer_t is not None and not self.answer_lost


@dataclass(slots=True)
class Abort:
    t: float
    reason: str  # "keepalive_count" | "user_timeout"
    unanswered_probes: int
    since_accepted: float | None


@dataclass(slots=True)
class Observed:
    idle: float | None = None
    interval: float | None = None
    count: int | None = None
    user_timeout: float | None = None


def prober_view(endpoint: Endpoint, settings: TimerSettings, hz: int = DEFAULT_HZ) -> list[ProberProbe]:
    """Regroup an endpoint's keepalive probes as its timer saw them, each marked when its answer was lost."""
    probes = endpoint.keepalive_probes()
    idle = settings.idle if settings.idle else estimate_idle(probes)
    interval = settings.interval if settings.interval else estimate_interval(probes)
    view: list[ProberProbe] = []
    for i, probe in enumerate(probes):
        previous = view[-1] if view else None
        continues_series = previous is not None and (
            (
                probe.since_accepted is not None
                and (
                    probe.since_accepted == previous.probe.since_accepted
                    or (previous.answer_lost and probe.since_accepted == previous.probe.answer_t)
                )
            )
            or began_before_capture(probe, previous.probe)
        )
        if continues_series:
            assert previous is not None
            seen = ProberProbe(probe, previous.anchor, previous.index + 1, previous.t)
        else:
            seen = ProberProbe(probe, probe.since_accepted, 1, None)
        view.append(seen)
        if probe.answer_t is None:
            continue
        following = probes[i + 1] if i + 1 < len(probes) else None
        if following is not None and following.since_accepted == probe.answer_t:
            seen.answer_lost = _answer_lost(probe, following.t, idle, interval, hz)
        elif following is None and endpoint.reset is not None and endpoint.reset.after_keepalive:
            # The prober aborted right after an answered probe: it never got the answer.
            seen.answer_lost = endpoint.reset.since_accepted == probe.answer_t
    return view


def began_before_capture(probe: KeepaliveProbe, previous: KeepaliveProbe) -> bool:
    """Two probes of one series whose start is not in the capture (tcpdump started during the probes).

    Neither prober had accepted a packet in the capture, and the first went
    unanswered: nothing restarted the timer between them. Their places in the
    series are then counted from the first probe seen, not from the real first.
    """
    return probe.since_accepted is None and previous.since_accepted is None and previous.answer_t is None


def _answer_lost(probe: KeepaliveProbe, next_t: float, idle: float | None, interval: float | None, hz: int) -> bool:
    """Did the prober's next probe follow its timer as if the answer never came?"""
    if idle is None or interval is None or probe.answer_t is None:
        return False
    if_reached = max(probe.answer_t + idle, probe.t + interval)
    if_lost = probe.t + interval
    if if_reached - if_lost <= timer_tolerance(interval, hz).late:
        return False  # indistinguishable: give the network the benefit of the doubt
    return timer_tolerance(interval, hz).admits(if_lost, next_t)


def estimate_idle(probes: list[KeepaliveProbe]) -> float | None:
    """The smallest delay from an accepted packet to a first probe (timers fire late, never early)."""
    delays = [p.t - p.since_accepted for p in probes if p.series_index == 1 and p.since_accepted is not None]
    return min(delays) if delays else None


def estimate_interval(probes: list[KeepaliveProbe]) -> float | None:
    """The smallest gap between an unanswered probe and the next of its series."""
    gaps = [
        b.t - a.t
        for a, b in zip(probes, probes[1:])
        if a.answer_t is None and b.since_accepted == a.since_accepted and b.since_accepted is not None
    ]
    return min(gaps) if gaps else None


def observe(view: list[ProberProbe], endpoint: Endpoint, settings: TimerSettings) -> tuple[Observed, Abort | None]:
    """What the side's kernel did, in the settings' own terms."""
    observed = Observed()
    idles = [p.t - p.anchor for p in view if p.index == 1 and p.anchor is not None]
    if idles:
        observed.idle = round(min(idles), 3)
    gaps = [p.t - p.previous for p in view if p.previous is not None]
    abort: Abort | None = None
    reset = endpoint.reset
    if reset is not None and reset.after_keepalive and view:
        last = view[-1]
        gaps.append(reset.t - last.t)
        reason = "user_timeout" if settings.user_timeout else "keepalive_count"
        abort = Abort(reset.t, reason, last.index, last.anchor)
        if last.anchor is not None:  # else the series began before the capture: at least last.index probes
            observed.count = last.index
            observed.user_timeout = round(reset.t - last.anchor, 3)
    if gaps:
        observed.interval = round(min(gaps), 3)
    return observed, abort
