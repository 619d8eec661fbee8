"""From what the model recorded to what each side's kernel did, and whether it agrees.

Two steps, both pure:

1. *Prober view.* The model sees the wire at the capture point; the prober
   may not have received an answer that crossed it. When the next probe comes
   one *interval* after an answered probe instead of one *idle* after the
   answer, the answer was lost between the capture point and the prober.
   Probes are re-grouped into series as the prober's own timer saw them.
2. *Simulation.* The expected settings drive a model of the kernel's
   keepalive timer (tcp_keepalive_timer in net/ipv4/tcp_timer.c), re-anchored
   on every observed event: after each accepted packet, probe and abort it
   predicts the next event and its time, and the observed event is checked
   against it within the timer-wheel tolerance of `analysis.timers`. Settings
   are judged by predicted versus observed events, not by comparing inferred
   numbers: a 4 s tcp_user_timeout aborting after three 1 s probes matches
   count=10 with user_timeout=4000 and contradicts count=10 alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from analysis.expect import SideExpectation
from analysis.model import CLIENT, SERVER, Connection, Endpoint, KeepaliveProbe
from analysis.timers import DEFAULT_HZ, EARLY_TOLERANCE_S, Tolerance, timer_tolerance

MATCH = "match"
MISMATCH = "mismatch"
UNOBSERVABLE = "unobservable"

SETTING_NAMES = {
    SERVER: {
        "enabled": "keepalives",
        "idle": "tcp_keepalives_idle",
        "interval": "tcp_keepalives_interval",
        "count": "tcp_keepalives_count",
        "user_timeout": "tcp_user_timeout",
    },
    CLIENT: {
        "enabled": "keepalives",
        "idle": "keepalives_idle",
        "interval": "keepalives_interval",
        "count": "keepalives_count",
        "user_timeout": "tcp_user_timeout",
    },
}


@dataclass(slots=True)
class ProberProbe:
    """A keepalive probe as the prober's own timer saw it."""

    probe: KeepaliveProbe
    anchor: float | None  # last packet the prober accepted, as far as it knows
    index: int  # 1 for the first probe after that packet
    previous: float | None  # the previous probe of this series

    @property
    def t(self) -> float:
        return self.probe.t


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


@dataclass(slots=True)
class Finding:
    setting: str
    expected: str
    observed: str
    status: str
    detail: str


@dataclass(slots=True)
class Check:
    """One comparison of a predicted event with an observed one."""

    setting: str
    ok: bool
    t: float | None
    detail: str


@dataclass(slots=True)
class SideReport:
    role: str
    endpoint: Endpoint
    probes: list[ProberProbe]
    window_probe_count: int
    answered: int
    lost_answers: list[KeepaliveProbe]
    observed: Observed
    abort: Abort | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def keepalive_probe_count(self) -> int:
        return len(self.probes)


@dataclass(slots=True)
class ConnectionReport:
    connection: Connection
    server: SideReport
    client: SideReport
    verdict: str

    def side(self, role: str) -> SideReport:
        return self.server if role == SERVER else self.client


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """Resolved numbers for the simulation; None where nothing was said."""

    enabled: bool | None
    idle: float | None
    interval: float | None
    count: int | None
    user_timeout: float | None  # seconds; 0 = not set (the count rules)

    @classmethod
    def from_expectation(cls, expectation: SideExpectation | None) -> "TimerSettings":
        if expectation is None:
            return cls(None, None, None, None, None)
        return cls(
            expectation.enabled,
            _num(expectation.idle.value),
            _num(expectation.interval.value),
            None if expectation.count.value is None else int(expectation.count.value),
            _num(expectation.user_timeout.value),
        )


def _num(value: float | int | None) -> float | None:
    return None if value is None else float(value)


# -- step 1: the prober's view -------------------------------------------------


def prober_view(endpoint: Endpoint, settings: TimerSettings, hz: int = DEFAULT_HZ) -> tuple[list[ProberProbe], list[KeepaliveProbe]]:
    """Regroup an endpoint's keepalive probes as its timer saw them; find lost answers."""
    probes = endpoint.keepalive_probes()
    idle = settings.idle if settings.idle else estimate_idle(probes)
    interval = settings.interval if settings.interval else estimate_interval(probes)
    view: list[ProberProbe] = []
    lost: list[KeepaliveProbe] = []
    for i, probe in enumerate(probes):
        probe.answer_lost = False
        previous = view[-1] if view else None
        continues_series = (
            previous is not None
            and probe.since_accepted is not None
            and (
                probe.since_accepted == previous.probe.since_accepted
                or (previous.probe.answer_lost and probe.since_accepted == previous.probe.answer_t)
            )
        )
        if continues_series:
            view.append(ProberProbe(probe, previous.anchor, previous.index + 1, previous.t))
        else:
            view.append(ProberProbe(probe, probe.since_accepted, 1, None))
        if probe.answer_t is None:
            continue
        following = probes[i + 1] if i + 1 < len(probes) else None
        if following is not None and following.since_accepted == probe.answer_t:
            if _answer_lost(probe, following.t, idle, interval, hz):
                probe.answer_lost = True
        elif following is None and endpoint.reset is not None and endpoint.reset.after_keepalive:
            if endpoint.reset.since_accepted == probe.answer_t:
                # The prober aborted right after an answered probe: it never got the answer.
                probe.answer_lost = True
        if probe.answer_lost:
            lost.append(probe)
    return view, lost


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
    """The smallest delay from an accepted packet to a first probe (timers fire late)."""
    delays = [p.t - p.since_accepted for p in probes if p.series_index == 1 and p.since_accepted is not None]
    return min(delays) if delays else None


def estimate_interval(probes: list[KeepaliveProbe]) -> float | None:
    gaps = [
        b.t - a.t
        for a, b in zip(probes, probes[1:])
        if a.answer_t is None and b.since_accepted == a.since_accepted and b.since_accepted is not None
    ]
    return min(gaps) if gaps else None


# -- step 2: observed numbers ----------------------------------------------------


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
        observed.count = last.index
        if last.anchor is not None:
            observed.user_timeout = round(reset.t - last.anchor, 3)
    if gaps:
        observed.interval = round(min(gaps), 3)
    return observed, abort


# -- step 3: simulation against the expected settings -----------------------------


def simulate(
    view: list[ProberProbe],
    endpoint: Endpoint,
    peer: Endpoint,
    settings: TimerSettings,
    capture_end: float,
    hz: int = DEFAULT_HZ,
    t0: float = 0.0,
) -> list[Check]:
    """Replay the kernel's keepalive timer with `settings` on the observed events.

    Times in the details are relative to `t0`, the connection's first packet.
    """
    checks: list[Check] = []

    def rel(t: float) -> str:
        return f"+{t - t0:.3f} s"

    idle, interval, count = settings.idle, settings.interval, settings.count
    user_timeout = settings.user_timeout or 0.0
    user_timeout_assumed = settings.user_timeout is None

    if settings.enabled is False:
        for p in view:
            checks.append(Check("enabled", False, p.t, f"keepalive probe at {rel(p.t)} although keepalives are off"))
        if not view:
            quiet = _longest_quiet(endpoint, capture_end)
            if quiet is not None:
                checks.append(Check("enabled", True, None, f"no keepalive probe in {quiet:.1f} s of idle"))
        return checks
    if settings.enabled and view:
        checks.append(Check("enabled", True, view[0].t, "keepalive probes seen"))

    def aborts_at(p_index_out: int, elapsed: float, *, benefit_of_doubt: float) -> str | None:
        """Which rule, if any, makes the kernel abort at a tick with these numbers.

        The prober accepted the peer's last packet a little after the capture
        point saw it, so `elapsed` is uncertain by a tick: `benefit_of_doubt`
        shifts the user_timeout boundary in favour of what was observed.
        """
        if user_timeout > 0:
            if p_index_out > 0 and elapsed >= user_timeout + benefit_of_doubt:
                return "user_timeout"
            return None
        if count is not None and p_index_out >= count:
            return "count"
        return None

    unit = _rule_words(user_timeout, user_timeout_assumed, count)
    for p in view:
        if p.index == 1:
            if p.anchor is None or idle is None:
                continue
            due = p.anchor + idle
            tolerance = timer_tolerance(idle, hz)
            previous_series_probe = _previous_probe(view, p)
            if interval is not None and previous_series_probe is not None and previous_series_probe.probe.answer_t == p.anchor:
                due = max(due, previous_series_probe.t + interval)
            checks.append(_timed("idle", due, p.t, tolerance, "probe", p.anchor, rel))
            continue
        if interval is not None and p.previous is not None:
            checks.append(_timed("interval", p.previous + interval, p.t, timer_tolerance(interval, hz), "probe", p.previous, rel))
        if p.anchor is not None:
            rule = aborts_at(p.index - 1, p.t - p.anchor, benefit_of_doubt=EARLY_TOLERANCE_S)
            if rule is not None:
                checks.append(
                    Check(
                        _rule_setting(rule),
                        False,
                        p.t,
                        f"probe #{p.index} sent {p.t - p.anchor:.3f} s after the last accepted packet; "
                        f"{unit} says the connection is aborted instead",
                    )
                )

    reset = endpoint.reset
    last = view[-1] if view else None
    if reset is not None and reset.after_keepalive and last is not None:
        if interval is not None:
            checks.append(_timed("interval", last.t + interval, reset.t, timer_tolerance(interval, hz), "abort", last.t, rel))
        if last.anchor is not None:
            elapsed = reset.t - last.anchor
            rule = aborts_at(last.index, elapsed, benefit_of_doubt=-EARLY_TOLERANCE_S)
            if user_timeout > 0:
                ok = rule == "user_timeout"
                detail = (
                    f"abort {elapsed:.3f} s after the last accepted packet, {last.index} probe(s) out; "
                    f"tcp_user_timeout={user_timeout * 1000:.0f} ms "
                    + ("allows it" if ok else "says not before then")
                )
                checks.append(Check("user_timeout", ok, reset.t, detail))
            elif count is not None:
                ok = rule == "count"
                detail = f"abort after {last.index} unanswered probe(s); {unit} " + ("agrees" if ok else f"says after {count}")
                checks.append(Check("count", ok, reset.t, detail))
        return checks

    if reset is not None or endpoint.fin_t is not None or peer.fin_t is not None or peer.reset is not None:
        return checks  # the connection ended otherwise: the timer stopped
    end = capture_end
    if last is not None and last.probe.answer_t is None and endpoint.last_accepted == last.probe.since_accepted:
        # Probes out at the end: the next tick is a probe or the abort.
        if interval is None:
            return checks
        due = last.t + interval
        tolerance = timer_tolerance(interval, hz)
        if end > due + tolerance.late:
            rule = aborts_at(last.index, due - last.anchor, benefit_of_doubt=0.0) if last.anchor is not None else None
            if rule is not None:
                checks.append(Check(_rule_setting(rule), False, due, f"abort due at {rel(due)} ({unit}) did not come; the capture runs to {rel(end)}"))
            else:
                checks.append(Check("interval", False, due, f"probe due at {rel(due)} did not come; the capture runs to {rel(end)} ({tolerance.basis})"))
        return checks
    if idle is not None:
        quiet = None if blocked_by_zero_window(endpoint, peer) else _trailing_quiet(endpoint, view, end)
        tolerance = timer_tolerance(idle, hz)
        if quiet is not None and quiet[1] - quiet[0] > idle + tolerance.late:
            checks.append(
                Check("idle", False, quiet[0] + idle, f"no keepalive probe in {quiet[1] - quiet[0]:.3f} s of idle from {rel(quiet[0])}; idle {idle:g} s says one was due at {rel(quiet[0] + idle)} ({tolerance.basis})")
            )
        span = endpoint.longest_quiet
        if span is not None and span.length > idle + tolerance.late:
            checks.append(
                Check("idle", False, span.start + idle, f"no keepalive probe in an idle span of {span.length:.3f} s from {rel(span.start)}; idle {idle:g} s says one was due at {rel(span.start + idle)}")
            )
    return checks


def _previous_probe(view: list[ProberProbe], p: ProberProbe) -> ProberProbe | None:
    i = view.index(p)
    return view[i - 1] if i > 0 else None


def blocked_by_zero_window(endpoint: Endpoint, peer: Endpoint) -> bool:
    """The side's last probe was a zero-window probe and the peer's window is still closed.

    Its data waits in the send queue, so the persist timer runs and the
    keepalive timer does not (KEEPALIVE.md): the silence after the peer's
    zero-window ACK is not keepalive idle, even though nothing is in flight.
    """
    return bool(endpoint.probes) and endpoint.probes[-1].kind == "window" and peer.window == 0


def _trailing_quiet(endpoint: Endpoint, view: list[ProberProbe], end: float) -> tuple[float, float] | None:
    """The idle span from the last accepted packet to the end, if the side stayed silent and clean."""
    if endpoint.last_accepted is None or endpoint.series_probes or not endpoint.quiet_clean:
        return None
    return endpoint.last_accepted, end


def _longest_quiet(endpoint: Endpoint, end: float) -> float | None:
    spans = []
    if endpoint.longest_quiet is not None:
        spans.append(endpoint.longest_quiet.length)
    if endpoint.last_accepted is not None and not endpoint.series_probes:
        spans.append(end - endpoint.last_accepted)
    return max(spans) if spans else None


def _timed(setting: str, due: float, observed: float, tolerance: Tolerance, what: str, since: float, rel) -> Check:
    ok = tolerance.admits(due, observed)
    delta = observed - due
    if ok:
        detail = f"{what} at {rel(observed)}, {observed - since:.3f} s after {rel(since)}: {delta * 1000:+.0f} ms from due; {tolerance.basis}"
    else:
        direction = "early" if delta < 0 else "late"
        detail = f"{what} at {rel(observed)}, {observed - since:.3f} s after {rel(since)}: {abs(delta):.3f} s {direction}; {tolerance.basis}"
    return Check(setting, ok, observed, detail)


def _rule_setting(rule: str) -> str:
    return "user_timeout" if rule == "user_timeout" else "count"


def _rule_words(user_timeout: float, assumed: bool, count: int | None) -> str:
    if user_timeout > 0:
        return f"tcp_user_timeout={user_timeout * 1000:.0f} ms"
    words = f"count={count}" if count is not None else "the count"
    return words + (" (assuming tcp_user_timeout=0)" if assumed else "")


# -- putting it together ---------------------------------------------------------


def judge_side(
    conn: Connection,
    role: str,
    expectation: SideExpectation | None,
    capture_end: float,
    hz: int = DEFAULT_HZ,
) -> SideReport:
    endpoint = conn.side(role)
    peer = conn.peer(endpoint)
    settings = TimerSettings.from_expectation(expectation)
    view, lost = prober_view(endpoint, settings, hz)
    observed, abort = observe(view, endpoint, settings)
    checks = simulate(view, endpoint, peer, settings, capture_end, hz, conn.start) if expectation is not None else []
    answered = sum(1 for p in view if p.probe.answer_t is not None and not p.probe.answer_lost)
    report = SideReport(
        role=role,
        endpoint=endpoint,
        probes=view,
        window_probe_count=endpoint.window_probes,
        answered=answered,
        lost_answers=lost,
        observed=observed,
        abort=abort,
    )
    if expectation is not None:
        report.findings = _findings(role, expectation, settings, observed, abort, checks)
    return report


def _findings(
    role: str,
    expectation: SideExpectation,
    settings: TimerSettings,
    observed: Observed,
    abort: Abort | None,
    checks: list[Check],
) -> list[Finding]:
    names = SETTING_NAMES[role]
    findings: list[Finding] = []
    for key in ("enabled", "idle", "interval", "count", "user_timeout"):
        value = getattr(settings, key)
        if value is None:
            continue
        if key == "enabled":
            expected_text = "on" if value else "off"
        else:
            expected_text = _format_expected(key, value, getattr(expectation, key).source)
        if key == "enabled" and role == SERVER:
            continue  # Postgres always turns keepalives on for TCP sessions
        mine = [c for c in checks if c.setting == key]
        observed_text = _format_observed(key, observed, abort)
        if any(not c.ok for c in mine):
            bad = next(c for c in mine if not c.ok)
            status, detail = MISMATCH, bad.detail
        elif mine:
            status, detail = MATCH, mine[-1].detail
        else:
            status, detail = UNOBSERVABLE, _why_unobservable(key, settings, observed, abort)
        findings.append(Finding(names[key], expected_text, observed_text, status, detail))
    return findings


def _format_expected(key: str, value: object, source: str) -> str:
    if key == "count":
        text = f"{value}"
    elif key == "user_timeout":
        text = "0 (off)" if not value else f"{float(value) * 1000:.0f} ms"
    else:
        text = f"{float(value):g} s"
    return f"{text} [{source}]" if source and source != "--expect" else text


def _format_observed(key: str, observed: Observed, abort: Abort | None) -> str:
    if key == "enabled":
        return "-"
    value = getattr(observed, key)
    if value is None:
        return "-"
    if key == "count":
        return f"{value}"
    if key == "user_timeout":
        return f"{value * 1000:.0f} ms to abort"
    return f"{value:.3f} s"


def _why_unobservable(key: str, settings: TimerSettings, observed: Observed, abort: Abort | None) -> str:
    if key == "count" and settings.user_timeout:
        return "tcp_user_timeout is set: it replaces the count, which the kernel then ignores"
    if key == "user_timeout" and not settings.user_timeout:
        return "not set: the count decides the abort"
    if key in ("count", "user_timeout") and abort is None:
        return "no keepalive abort in the capture"
    if key == "interval":
        return "no unanswered probe followed by another probe or an abort"
    if key == "idle":
        return "no probe after a known last accepted packet, and no idle span long enough"
    return "nothing in the capture shows it"


def judge_connection(
    conn: Connection,
    server: SideExpectation | None,
    client: SideExpectation | None,
    capture_end: float,
    hz: int = DEFAULT_HZ,
) -> ConnectionReport:
    server_report = judge_side(conn, SERVER, server if server is not None and server.judged() else None, capture_end, hz)
    client_report = judge_side(conn, CLIENT, client if client is not None and client.judged() else None, capture_end, hz)
    statuses = [f.status for side in (server_report, client_report) for f in side.findings]
    if MISMATCH in statuses:
        verdict = "mismatch"
    elif MATCH in statuses:
        verdict = "match"
    elif not server_report.probes and not client_report.probes:
        verdict = "no_keepalive"
    else:
        verdict = "unverified"
    return ConnectionReport(conn, server_report, client_report, verdict)
