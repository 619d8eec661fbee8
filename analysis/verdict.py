"""Whether what each side's kernel did agrees with the settings: findings and a verdict per connection.

The expected settings drive the kernel's keepalive timer (`analysis.kernel_timer`),
re-anchored on every observed event: at each probe and abort the prober's
timer is asked what it would have done at that moment, and the observed event
is checked against it within the timer-wheel tolerance of
`analysis.tolerance`. Settings are judged by predicted versus observed events,
not by comparing inferred numbers: a 4 s tcp_user_timeout aborting after three
1 s probes matches count=10 with user_timeout=4000 and contradicts count=10
alone. The probes are taken as the prober saw them (`analysis.prober`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from analysis.expect import SideExpectation
from analysis.kernel_timer import (
    ABORT,
    BY_USER_TIMEOUT,
    TimerSettings,
    TimerState,
    abort_rule,
    decide,
    next_tick,
)
from analysis.model import Connection, Endpoint, KeepaliveProbe
from analysis.prober import Abort, Observed, ProberProbe, observe, prober_view
from analysis.settings import (
    BY_KEY,
    CLIENT,
    ENABLED_KEY,
    SERVER,
    SETTINGS,
    setting_name,
)
from analysis.tolerance import DEFAULT_HZ, EARLY_TOLERANCE_S, Tolerance, timer_tolerance

MATCH = "match"
MISMATCH = "mismatch"
UNOBSERVABLE = "unobservable"
VERDICTS = ("match", "mismatch", "unverified", "no_keepalive")


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
    observed: Observed
    abort: Abort | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def keepalive_probe_count(self) -> int:
        return len(self.probes)

    @property
    def answered(self) -> int:
        return sum(1 for p in self.probes if p.answered)

    @property
    def lost_answers(self) -> list[KeepaliveProbe]:
        return [p.probe for p in self.probes if p.answer_lost]


@dataclass(slots=True)
class ConnectionReport:
    connection: Connection
    server: SideReport
    client: SideReport
    verdict: str

    def side(self, role: str) -> SideReport:
        return self.server if role == SERVER else self.client


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

    unit = _rule_words(user_timeout, settings.user_timeout is None, count)
    previous: ProberProbe | None = None
    for p in view:
        state = _state_before(p, previous, interval)
        previous = p
        if p.index == 1:
            due = next_tick(state, settings)
            if due is None:
                continue
            checks.append(_timed("idle", due, p.t, timer_tolerance(idle, hz), "probe", p.anchor, rel))  # type: ignore[arg-type]
        elif interval is not None and p.previous is not None:
            checks.append(_timed("interval", p.previous + interval, p.t, timer_tolerance(interval, hz), "probe", p.previous, rel))
        if p.anchor is not None:
            # The timer fired at p.t: did the settings say abort there instead of probing?
            event = decide(state, settings, p.t, slack=EARLY_TOLERANCE_S)
            if event.kind == ABORT:
                checks.append(
                    Check(
                        _rule_setting(event.rule),
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
            rule = abort_rule(settings, last.index, elapsed, slack=-EARLY_TOLERANCE_S)
            if user_timeout > 0:
                ok = rule == BY_USER_TIMEOUT
                detail = (
                    f"abort {elapsed:.3f} s after the last accepted packet, {last.index} probe(s) out; "
                    f"tcp_user_timeout={user_timeout * 1000:.0f} ms "
                    + ("allows it" if ok else "says not before then")
                )
                checks.append(Check("user_timeout", ok, reset.t, detail))
            elif count is not None:
                ok = rule is not None
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
            event = decide(TimerState(last.anchor, last.index, due), settings, due)
            if event.kind == ABORT:
                checks.append(Check(_rule_setting(event.rule), False, due, f"abort due at {rel(due)} ({unit}) did not come; the capture runs to {rel(end)}"))
            else:
                checks.append(Check("interval", False, due, f"probe due at {rel(due)} did not come; the capture runs to {rel(end)} ({tolerance.basis})"))
        return checks
    if idle is not None:
        quiet = None if endpoint.persisting(peer) else _trailing_quiet(endpoint, end)
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


def _state_before(p: ProberProbe, previous: ProberProbe | None, interval: float | None) -> TimerState:
    """The prober's timer just before probe `p` fired, as the observed events tell it.

    Within a series the timer was armed one interval after the previous
    probe; a series' first probe after an answered probe also waits for that
    armed timer (max(answer + idle, probe + interval)).
    """
    if p.index > 1:
        armed = None if interval is None or p.previous is None else p.previous + interval
        return TimerState(p.anchor, p.index - 1, armed)
    armed = None
    if interval is not None and previous is not None and previous.probe.answer_t == p.anchor:
        armed = previous.t + interval
    return TimerState(p.anchor, 0, armed)


def _trailing_quiet(endpoint: Endpoint, end: float) -> tuple[float, float] | None:
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


def _rule_setting(rule: str | None) -> str:
    return "user_timeout" if rule == BY_USER_TIMEOUT else "count"


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
    settings = expectation.timer_settings() if expectation is not None else TimerSettings()
    view = prober_view(endpoint, settings, hz)
    observed, abort = observe(view, endpoint, settings)
    checks = simulate(view, endpoint, peer, settings, capture_end, hz, conn.start) if expectation is not None else []
    report = SideReport(
        role=role,
        endpoint=endpoint,
        probes=view,
        window_probe_count=endpoint.window_probes,
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
    findings: list[Finding] = []
    for key in (ENABLED_KEY, *(s.key for s in SETTINGS)):
        value = getattr(settings, key)
        if value is None:
            continue
        if key == ENABLED_KEY:
            if role == SERVER:
                continue  # Postgres always turns keepalives on for TCP sessions
            expected_text, observed_text = ("on" if value else "off"), "-"
        else:
            expected_text = _format_expected(key, value, getattr(expectation, key).source)
            seen = getattr(observed, key)
            observed_text = "-" if seen is None else BY_KEY[key].observed_text(seen)
        mine = [c for c in checks if c.setting == key]
        if any(not c.ok for c in mine):
            bad = next(c for c in mine if not c.ok)
            status, detail = MISMATCH, bad.detail
        elif mine:
            status, detail = MATCH, mine[-1].detail
        else:
            status, detail = UNOBSERVABLE, _why_unobservable(key, settings, observed, abort)
        findings.append(Finding(setting_name(key, role), expected_text, observed_text, status, detail))
    return findings


def _format_expected(key: str, value: float | int, source: str) -> str:
    text = BY_KEY[key].text(value)
    return f"{text} [{source}]" if source and source != "--expect" else text


def _why_unobservable(key: str, settings: TimerSettings, observed: Observed, abort: Abort | None) -> str:
    if abort is not None and abort.since_accepted is None and key in ("count", "user_timeout", "idle"):
        return _series_before_capture(abort)
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


def _series_before_capture(abort: Abort) -> str:
    """What a capture that starts during the unanswered probes can and cannot tell (never the opposite)."""
    return (f"the capture began during the probes: {abort.unanswered_probes} unanswered probe(s) seen before the "
            "keepalive abort, earlier ones and the last packet the prober accepted are not in it, so the idle, "
            "the count and the time to the abort cannot be told (the interval can)")


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
