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
from analysis.model import AfterEnd, Connection, Endpoint, KeepaliveProbe
from analysis.path import BOTH, DROP, PathCut, path_cut
from analysis.prober import Abort, Observed, ProberProbe, observe, prober_view
from analysis.stalls import GAVE_UP, StallReport, judge_stalls
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
    """One setting of one side, judged.

    `setting`, `expected`, `observed`, `status` and `detail` are what the
    JSON report says. The rest is for people's reports, which write their own
    shorter words: `key` (idle, interval, count, user_timeout, enabled), the
    expected value without its provenance (`value_text`), where it came from
    (`source`), and the checks behind the status (`checks`; `deciding` is the
    one the status rests on: the first contradiction, or the last agreement).
    """

    setting: str
    expected: str
    observed: str
    status: str
    detail: str
    key: str = ""
    value_text: str = ""
    source: str = ""
    checks: list["Check"] = field(default_factory=list)

    @property
    def deciding(self) -> "Check | None":
        bad = [c for c in self.checks if not c.ok]
        return bad[0] if bad else (self.checks[-1] if self.checks else None)


@dataclass(slots=True)
class Check:
    """One comparison of a predicted event with an observed one.

    `t` is the observed event (or the moment something was due and did not
    come). For timed checks, `due` is when the timer should have fired,
    `since` what it counted from (the last accepted packet, the previous
    probe, the start of a quiet span), `what` the event ("probe", "abort",
    "quiet" for an idle span without a probe, "missing" for an event that
    did not come) and `tolerance` the window applied.
    """

    setting: str
    ok: bool
    t: float | None
    detail: str
    due: float | None = None
    since: float | None = None
    what: str = ""
    tolerance: Tolerance | None = None


@dataclass(slots=True)
class SideReport:
    role: str
    endpoint: Endpoint
    probes: list[ProberProbe]
    window_probe_count: int
    observed: Observed
    abort: Abort | None
    findings: list[Finding] = field(default_factory=list)
    stalls: list[StallReport] = field(default_factory=list)
    settings: TimerSettings | None = None
    """The settings the side was judged with (None: not judged)."""

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
    path_cut: PathCut | None = None

    @property
    def after_end(self) -> AfterEnd | None:
        return self.connection.after_end

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
    ended_at: float | None = None,
) -> list[Check]:
    """Replay the kernel's keepalive timer with `settings` on the observed events.

    Times in the details are relative to `t0`, the connection's first packet.
    `ended_at` is when the connection ended (its last packet), if it did: an
    idle side of an ended connection was idle until then, not until the end
    of the capture (so the judgement does not depend on when it is made).
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
            quiet = _longest_quiet(endpoint, capture_end if ended_at is None else min(capture_end, ended_at))
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
                        since=p.anchor,
                        what="extra_probe",
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
                checks.append(Check(_rule_setting(event.rule), False, due, f"abort due at {rel(due)} ({unit}) did not come; the capture runs to {rel(end)}",
                                    due, last.t, "missing", tolerance))
            else:
                checks.append(Check("interval", False, due, f"probe due at {rel(due)} did not come; the capture runs to {rel(end)} ({tolerance.basis})",
                                    due, last.t, "missing", tolerance))
        return checks
    if idle is not None:
        quiet = None if endpoint.persisting(peer) else _trailing_quiet(endpoint, end)
        tolerance = timer_tolerance(idle, hz)
        if quiet is not None and quiet[1] - quiet[0] > idle + tolerance.late:
            checks.append(
                Check("idle", False, quiet[0] + idle, f"no keepalive probe in {quiet[1] - quiet[0]:.3f} s of idle from {rel(quiet[0])}; idle {idle:g} s says one was due at {rel(quiet[0] + idle)} ({tolerance.basis})",
                      quiet[0] + idle, quiet[0], "quiet", tolerance)
            )
        span = endpoint.longest_quiet
        if span is not None and span.length > idle + tolerance.late:
            checks.append(
                Check("idle", False, span.start + idle, f"no keepalive probe in an idle span of {span.length:.3f} s from {rel(span.start)}; idle {idle:g} s says one was due at {rel(span.start + idle)}",
                      span.start + idle, span.start, "quiet", tolerance)
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
    return Check(setting, ok, observed, detail, due, since, what, tolerance)


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
    *,
    stalls: list[StallReport] | None = None,
    cut: PathCut | None = None,
    idle_cut: float | None = None,
) -> SideReport:
    """One side judged as of `capture_end`.

    When the path cut the connection and this is the far side (its packets
    no longer reach the capture point), what it did after the cut is not
    seen here: it is judged only up to the cut.
    """
    endpoint = conn.side(role)
    peer = conn.peer(endpoint)
    settings = expectation.timer_settings() if expectation is not None else TimerSettings()
    view = prober_view(endpoint, settings, hz)
    observed, abort = observe(view, endpoint, settings)
    hidden = cut is not None and cut.far in (role, BOTH) and cut.t < capture_end
    end = cut.t if hidden else capture_end
    ended_at = conn.end if conn.end_reason != "open" else None
    checks = simulate(view, endpoint, peer, settings, end, hz, conn.start, ended_at) if expectation is not None else []
    stalls = stalls if stalls is not None else judge_stalls(endpoint, settings if expectation is not None else None,
                                                            capture_end, hz, conn.start)
    if expectation is not None:
        checks += _stall_checks(stalls, conn.start)
        if idle_cut is not None and settings.idle is not None and settings.enabled is not False \
                and settings.idle >= idle_cut:
            checks.append(_idle_cut_check(settings.idle, idle_cut))
    report = SideReport(
        role=role,
        endpoint=endpoint,
        probes=view,
        window_probe_count=endpoint.window_probes,
        observed=observed,
        abort=abort,
        stalls=stalls,
        settings=settings if expectation is not None else None,
    )
    if expectation is not None:
        unseen = (f"not seen here after +{cut.t - conn.start:.3f} s: the path cut the connection ({cut.kind})"
                  if not cut.inferred else f"not seen here after +{cut.t - conn.start:.3f} s: the path forgets "
                  f"connections idle that long") if hidden and cut is not None else None
        report.findings = _findings(role, expectation, settings, observed, abort, checks, unseen,
                                    _give_up_seen(stalls))
    return report


def _stall_checks(stalls: list[StallReport], t0: float) -> list[Check]:
    """A give-up seen on the wire judges tcp_user_timeout (or, when it is not set, tcp_retries2 behind it)."""
    checks = []
    for stall in stalls:
        if stall.outcome != GAVE_UP or stall.give_up is None or stall.gave_up_between is None:
            continue
        low, high = stall.gave_up_between
        if stall.mismatch is not None:
            checks.append(Check("user_timeout", False, low, stall.mismatch))
        else:
            checks.append(Check("user_timeout", True, low,
                                f"gave up between +{low - t0:.3f} s and +{high - t0:.3f} s with data in flight; "
                                f"{stall.give_up.rule} says at +{stall.give_up.t - t0:.3f} s"))
    return checks


def _give_up_seen(stalls: list[StallReport]) -> str | None:
    """A silent give-up with data in flight, as the time it took from the first retransmission (the kernel's clock)."""
    for stall in stalls:
        if stall.outcome == GAVE_UP and stall.gave_up_between is not None and stall.retrans_stamp is not None:
            low, high = (t - stall.retrans_stamp for t in stall.gave_up_between)
            return f"gave up {low:.1f}-{high:.1f} s"
    return None


def _idle_cut_check(idle: float, idle_cut: float) -> Check:
    """--idle-cut: a first probe that comes after the path has forgotten the connection comes too late."""
    return Check("idle", False, None, f"the first probe comes {idle:g} s after the last packet, but the path forgets "
                 f"connections idle {idle_cut:g} s (--idle-cut): an idle connection is cut before keepalive runs")


def _findings(
    role: str,
    expectation: SideExpectation,
    settings: TimerSettings,
    observed: Observed,
    abort: Abort | None,
    checks: list[Check],
    unseen: str | None = None,
    give_up_seen: str | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    for key in (ENABLED_KEY, *(s.key for s in SETTINGS)):
        value = getattr(settings, key)
        if value is None:
            continue
        if key == ENABLED_KEY:
            if role == SERVER:
                continue  # Postgres always turns keepalives on for TCP sessions
            value_text = expected_text = "on" if value else "off"
            source, observed_text = expectation.enabled_source, "-"
        else:
            source = getattr(expectation, key).source
            value_text = BY_KEY[key].text(value)
            expected_text = _format_expected(key, value, source)
            seen = getattr(observed, key)
            observed_text = "-" if seen is None else BY_KEY[key].observed_text(seen)
            if seen is None and key == "user_timeout" and give_up_seen is not None:
                observed_text = give_up_seen
        mine = [c for c in checks if c.setting == key]
        if any(not c.ok for c in mine):
            bad = next(c for c in mine if not c.ok)
            status, detail = MISMATCH, bad.detail
        elif mine:
            status, detail = MATCH, mine[-1].detail
        else:
            status, detail = UNOBSERVABLE, unseen or _why_unobservable(key, settings, observed, abort)
        findings.append(Finding(setting_name(key, role), expected_text, observed_text, status, detail,
                                key, value_text, source, mine))
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
    idle_cut: float | None = None,
    forgets_after: tuple[float, int] | None = None,
) -> ConnectionReport:
    """Both sides judged, the stalls first: whether the path cut the connection decides what each side is judged on.

    `forgets_after` is what other connections of the same hosts showed: the
    path cut one after that much idle (and which). A connection silent that
    long is not seen by this capture point afterwards, in either direction:
    a probe missing then says nothing of the settings.
    """
    expectations = {role: side if side is not None and side.judged() else None
                    for role, side in ((SERVER, server), (CLIENT, client))}
    stalls = {role: judge_stalls(conn.side(role), expectation.timer_settings() if expectation is not None else None,
                                 capture_end, hz, conn.start)
              for role, expectation in expectations.items()}
    outcomes = {id(report.stall): report.outcome for reports in stalls.values() for report in reports}
    cut = path_cut(conn, conn.start, outcomes)
    if cut is None and forgets_after is not None:
        idle, index = forgets_after
        if conn.end_reason == "open" and capture_end - conn.end > idle:
            # Silent to the end for longer than the path keeps a connection: forgotten, in both directions.
            cut = PathCut(DROP, conn.end + idle, f"silent from +{conn.end - conn.start:.3f} s to the end of the "
                          f"capture, longer than the {idle:.1f} s after which the path cut connection #{index}: the "
                          "path has forgotten it", BOTH, idle, inferred=True)
    server_report, client_report = (
        judge_side(conn, role, expectations[role], capture_end, hz, stalls=stalls[role], cut=cut, idle_cut=idle_cut)
        for role in (SERVER, CLIENT))
    statuses = [f.status for side in (server_report, client_report) for f in side.findings]
    if MISMATCH in statuses:
        verdict = "mismatch"
    elif MATCH in statuses:
        verdict = "match"
    elif not server_report.probes and not client_report.probes:
        verdict = "no_keepalive"
    else:
        verdict = "unverified"
    return ConnectionReport(conn, server_report, client_report, verdict, cut)
