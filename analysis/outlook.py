"""What live capture adds over a file: predictions, alarms and the verdict so far, while they still matter.

`LiveMonitor` looks at the model's state at a given moment ("now", from the
capture clock) and asks the kernel timer (`analysis.kernel_timer`) when the
next probe and the abort are due, per connection and side, under the expected
settings (or, where nothing was expected, under what the side has shown so
far), and raises an alarm once:

* a probe overdue beyond the timer tolerance ("no probe 5 s after it was due:
  keepalives are not running on this side");
* a peer that stopped answering ("2 of 3 probes unanswered, abort expected at
  12:01:07");
* an abort that did not come when the settings say it must;
* an event the settings contradict as it arrives: a probe early (or late,
  when no overdue alarm said so already), an abort after the wrong number of
  probes. These are the findings of `analysis.verdict` on the connection so
  far, so that the live alarms and the final report say the same thing.

Each connection is judged with its own expectations (`expectations_for`):
sessions can differ (a `SET tcp_keepalives_idle` in one of them), and the
live view must use what the final report will use, or it disagrees with it.
A connection `hidden` (kaobs's own --dsn session) raises nothing.

Pure: the caller supplies the time; nothing here reads a clock or prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from analysis.expect import Expectations
from analysis.kernel_timer import (
    PROBE,
    TimerSettings,
    TimerState,
    abort_due,
    next_event,
)
from analysis.stalls import judge_stall
from analysis.model import WINDOW, Connection, Endpoint, KeepaliveModel
from analysis.prober import estimate_idle, estimate_interval
from analysis.settings import CLIENT, SERVER
from analysis.tolerance import DEFAULT_HZ, timer_tolerance
from analysis.verdict import Check, ConnectionReport, Finding, judge_connection
from analysis.words import local_clock

# An alarm waits this much beyond the timer tolerance: a capture clock and a
# busy machine should not page anyone for a probe 300 ms late.
ALARM_GRACE_S = 1.0
STALL_ALARM_S = 2.0
"""Data unacknowledged this long (and resent twice) is a stall worth an alarm."""
CAPTURE_LAG_S = 0.5
"""How far behind the clock the packets read so far may be (the ring hands blocks over every 50 ms, the
loop polls every 100 ms, a loaded machine adds more): a verdict so far says an event "did not come" only
once this has passed too, or a probe still in a ring block reads as missing for a moment."""
VERDICT_REFRESH_S = 1.0
"""A verdict is judged again at most this often when nothing but the time changed."""

ExpectationsFor = Callable[[Connection], "Expectations | None"]


@dataclass(frozen=True, slots=True)
class SideOutlook:
    """One side's keepalive timer as of `now`."""

    role: str
    probes: int
    unanswered: int
    next_probe: float | None
    abort_due: float | None
    settings_from: str  # "expected" | "observed" | "unknown"


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: str  # "probe_overdue" | "peer_silent" | "abort_missing" | "stall" | "mismatch"
    t: float
    connection: Connection
    side: str
    message: str
    report: ConnectionReport | None = None  # "mismatch": the connection judged so far,
    finding: Finding | None = None  # the finding the event contradicts,
    check: Check | None = None  # and the check that says so

    @property
    def key(self) -> tuple[int, str, str, float]:
        return (self.connection.index, self.side, self.kind, round(self.t, 3))


class LiveMonitor:
    """Turns the model's state into outlooks, one-time alarms and verdicts so far."""

    def __init__(self, model: KeepaliveModel, expectations: Expectations | None, hz: int = DEFAULT_HZ, *,
                 expectations_for: ExpectationsFor | None = None,
                 hidden: Callable[[Connection], bool] | None = None) -> None:
        self.model = model
        self.hz = hz
        self.expectations = expectations
        self.expectations_for = expectations_for
        self.hidden = hidden
        self._timers: dict[int, tuple[Expectations | None, dict[str, TimerSettings]]] = {}
        self._raised: dict[int, set[tuple]] = {}  # connection index -> keys of the alarms raised for it
        self._verdicts: dict[int, tuple[tuple, ConnectionReport, float]] = {}
        self._events_seen: dict[tuple[int, str], int] = {}
        self._overdue: dict[tuple[int, str], float] = {}
        self.alarmed: set[int] = set()
        """Connections an alarm was raised for."""

    # -- expectations, per connection ----------------------------------------------

    def expectations_of(self, conn: Connection) -> Expectations | None:
        if self.expectations_for is not None:
            found = self.expectations_for(conn)
            if found is not None:
                return found
        return self.expectations

    def timer(self, conn: Connection, role: str) -> TimerSettings:
        """The settings this side of `conn` is expected to run (empty where nothing is expected)."""
        expectations = self.expectations_of(conn)
        cached = self._timers.get(id(expectations))
        if cached is None or cached[0] is not expectations:
            if len(self._timers) > 4096:
                self._timers.clear()
            sides = {SERVER: expectations.server if expectations else None,
                     CLIENT: expectations.client if expectations else None}
            cached = (expectations, {r: side.timer_settings() if side is not None and side.judged() else TimerSettings()
                                     for r, side in sides.items()})
            self._timers[id(expectations)] = cached
        return cached[1][role]

    def is_hidden(self, conn: Connection) -> bool:
        return self.hidden is not None and self.hidden(conn)

    def forget(self, conn: Connection) -> None:
        """Drop what is kept about a connection that left the model for good (retired), so a run of weeks stays small."""
        index = conn.index
        self._raised.pop(index, None)
        self._verdicts.pop(index, None)
        self.alarmed.discard(index)
        for role in (SERVER, CLIENT):
            self._events_seen.pop((index, role), None)
            self._overdue.pop((index, role), None)

    # -- the verdict so far -----------------------------------------------------------

    def verdict(self, conn: Connection, now: float) -> ConnectionReport:
        """`conn` judged as of `now`, as the final report would judge it.

        Judging every connection at every refresh costs too much with
        thousands of them, so the result is kept until something it depends
        on changes: a probe, an answer, an abort, a FIN, the expectations, or
        the time passing the moment a probe or an abort was due (then a "did
        not come" finding may appear).
        """
        expectations = self.expectations_of(conn)
        key = (id(expectations), conn.end_reason, _events(conn.server), _events(conn.client),
               _answers(conn.server), _answers(conn.client))
        cached = self._verdicts.get(conn.index)
        if cached is not None and cached[0] == key and cached[1].connection is conn and now < cached[2]:
            return cached[1]
        server = expectations.server if expectations is not None else None
        client = expectations.client if expectations is not None else None
        as_of = max(now - CAPTURE_LAG_S, conn.end)  # what has surely been read by now
        report = judge_connection(conn, server, client, as_of, self.hz)
        self._verdicts[conn.index] = (key, report, max(self._recheck_at(conn, as_of) + CAPTURE_LAG_S,
                                                       now + VERDICT_REFRESH_S))
        return report

    def _recheck_at(self, conn: Connection, now: float) -> float:
        """When the verdict of `conn` may next change without a new event: a due probe or abort that does not
        come. A moment already past was judged just now (with at least the tolerance the verdict uses)."""
        if conn.end_reason != "open":
            return float("inf")
        moments = []
        for role in (SERVER, CLIENT):
            outlook = self.outlook(conn, role)
            timer = self.timer(conn, role)
            length = max(timer.idle or 0.0, timer.interval or 0.0) or 1.0
            for due in (outlook.next_probe, outlook.abort_due):
                if due is not None and due + timer_tolerance(length, self.hz).late > now:
                    moments.append(due + timer_tolerance(length, self.hz).late)
        return min(moments, default=float("inf"))

    # -- outlook --------------------------------------------------------------------------

    def outlook(self, conn: Connection, role: str) -> SideOutlook:
        endpoint = conn.side(role)
        keepalives = endpoint.keepalive_probes()
        unanswered = endpoint.series_unanswered
        if conn.end_reason != "open" or endpoint.fin_t is not None or conn.peer(endpoint).fin_t is not None:
            return SideOutlook(role, len(keepalives), unanswered, None, None, "unknown")
        settings, source = self._numbers(conn, role, endpoint)
        next_probe = abort_at = None
        if unanswered and settings.interval:
            last = endpoint.probes[-1]
            state = TimerState(last.since_accepted, unanswered, last.t + settings.interval)
        elif not unanswered and settings.idle and endpoint.last_accepted is not None and endpoint.quiet_clean:
            last = endpoint.probes[-1] if endpoint.probes else None
            if last is not None and last.kind == WINDOW and (endpoint.series_probes or endpoint.persisting(conn.peer(endpoint))):
                return SideOutlook(role, len(keepalives), unanswered, None, None, source)  # persist timer, not keepalive
            # After an answered probe the timer armed for `interval` still runs: max(answer + idle, probe + interval).
            answered_last = last is not None and last.answer_t == endpoint.last_accepted and settings.interval
            state = TimerState(endpoint.last_accepted, 0, last.t + settings.interval if answered_last else None)
        else:
            return SideOutlook(role, len(keepalives), unanswered, None, None, source)
        event = next_event(state, settings)
        if event.kind == PROBE:
            next_probe = event.due
        if unanswered:
            abort_at = abort_due(state, settings)
        return SideOutlook(role, len(keepalives), unanswered, next_probe, abort_at, source)

    def _numbers(self, conn: Connection, role: str, endpoint: Endpoint) -> tuple[TimerSettings, str]:
        """The side's timer settings: the expected ones, with what the side has shown so far where none were given."""
        expected = self.timer(conn, role)
        if expected.enabled is False:
            return TimerSettings(False), "expected"
        keepalives = endpoint.keepalive_probes()
        idle, interval = expected.idle, expected.interval
        source = "expected" if idle or interval else "unknown"
        if idle is None:
            idle = estimate_idle(keepalives)
            source = "observed" if idle else source
        if interval is None:
            interval = estimate_interval(keepalives)
        return TimerSettings(expected.enabled, idle, interval, expected.count, expected.user_timeout), source

    # -- alarms ------------------------------------------------------------------------------

    def alarms(self, now: float) -> list[Alarm]:
        """Alarms that became true by `now`, each raised once."""
        fresh: list[Alarm] = []
        for conn in self.model.connections:
            if self.is_hidden(conn):
                continue
            found: list[Alarm] = []
            for role in (SERVER, CLIENT):
                found += self._check(conn, role, now)
            found += self._contradictions(conn, now)
            for alarm in found:
                raised = self._raised.setdefault(conn.index, set())
                if alarm.key not in raised:
                    raised.add(alarm.key)
                    self.alarmed.add(conn.index)
                    if alarm.kind == "probe_overdue":
                        self._overdue[(conn.index, alarm.side)] = alarm.t
                    fresh.append(alarm)
        return fresh

    def _check(self, conn: Connection, role: str, now: float) -> list[Alarm]:
        out = self.outlook(conn, role)
        timer = self.timer(conn, role)
        found: list[Alarm] = []
        stall = self._stall_alarm(conn, role, now)
        if stall is not None:
            found.append(stall)
        if out.abort_due is not None:
            late = timer_tolerance(self._interval_of(conn, role) or 1.0, self.hz).late + ALARM_GRACE_S
            if now > out.abort_due + late:
                found.append(
                    Alarm("abort_missing", out.abort_due, conn, role,
                          f"{role} should have aborted at {local_clock(out.abort_due, millis=False)} after {out.unanswered} unanswered probe(s); "
                          f"no RST {now - out.abort_due:.1f} s later")
                )
            elif out.unanswered >= 2 or (out.unanswered >= 1 and timer.count == 1):
                total = timer.count
                of = f" of {total}" if total and not timer.user_timeout else ""
                found.append(
                    Alarm("peer_silent", conn.side(role).probes[-1].t, conn, role,
                          f"{role}: {out.unanswered}{of} probes unanswered, abort expected at {local_clock(out.abort_due, millis=False)}")
                )
        if out.next_probe is not None and out.settings_from != "unknown":
            length = self._idle_of(conn, role) if not out.unanswered else self._interval_of(conn, role)
            late = timer_tolerance(length or 1.0, self.hz).late + ALARM_GRACE_S
            if now > out.next_probe + late:
                found.append(
                    Alarm("probe_overdue", out.next_probe, conn, role,
                          f"{role}: no probe {now - out.next_probe:.1f} s after it was due at {local_clock(out.next_probe, millis=False)}: "
                          "keepalives are not running on this side, or not with these settings")
                )
        return found

    def _stall_alarm(self, conn: Connection, role: str, now: float) -> Alarm | None:
        """Data unacknowledged for a while, retransmitted: keepalive does not apply; say what ends it, and when.

        Raised once per stall, after STALL_ALARM_S and at least two resends
        (one lost segment resent once is just TCP).
        """
        endpoint = conn.side(role)
        stall = endpoint.stall
        if (stall is None or conn.end_reason != "open" or len(stall.resends) < 2
                or now - stall.first_sent < STALL_ALARM_S):
            return None
        settings = self.timer(conn, role)
        expected = settings if settings.user_timeout is not None else TimerSettings(user_timeout=0.0)
        report = judge_stall(stall, endpoint, expected, now, self.hz)
        what = "zero-window probes (data queued, window closed)" if stall.kind == WINDOW else "data unacknowledged"
        message = (f"{role}: {what} for {now - stall.first_sent:.1f} s, {len(stall.resends)} "
                   f"{'probes' if stall.kind == WINDOW else 'retransmissions'}; keepalives do not apply while data "
                   "is in flight")
        give_up = report.give_up
        if give_up is not None:
            if give_up.t - now < 120:
                message += f"; the kernel gives up at {local_clock(give_up.t, millis=False)} by {give_up.rule}"
            else:
                message += f"; the kernel gives up in about {(give_up.t - now) / 60:.0f} min by {give_up.rule}"
            if settings.user_timeout is None:
                message += " (assuming no tcp_user_timeout)"
        elif stall.kind == WINDOW:
            message += "; only tcp_user_timeout bounds it while the peer answers"
        return Alarm("stall", stall.first_sent, conn, role, message)

    def _contradictions(self, conn: Connection, now: float) -> list[Alarm]:
        """A probe or an abort that just arrived and that the settings contradict (judged as the final report will)."""
        changed = [role for role in (SERVER, CLIENT)
                   if self._events_seen.get((conn.index, role), 0) != _events(conn.side(role))]
        if not changed:
            return []
        arrivals: dict[str, set[float]] = {}
        for role in changed:
            endpoint = conn.side(role)
            seen = self._events_seen.get((conn.index, role), 0)
            self._events_seen[(conn.index, role)] = _events(endpoint)
            arrived = {p.t for p in endpoint.probes[seen:]}
            if endpoint.reset is not None:
                arrived.add(endpoint.reset.t)
            if arrived:
                arrivals[role] = arrived
        if not arrivals:  # only a FIN: nothing it could contradict (and no report kept for each closing connection)
            return []
        report = self.verdict(conn, now)
        found: list[Alarm] = []
        for role, arrived in arrivals.items():
            for finding in report.side(role).findings:
                if finding.status != "mismatch":
                    continue
                for check in finding.checks:
                    if check.ok or check.t is None or check.t not in arrived:
                        continue
                    overdue = self._overdue.get((conn.index, role))
                    if (check.due is not None and check.t > check.due and overdue is not None
                            and abs(overdue - check.due) < 0.1):
                        continue  # the late probe an overdue alarm announced already
                    found.append(Alarm("mismatch", check.t, conn, role, f"{role} {finding.setting}: {check.detail}",
                                       report, finding, check))
        return found

    def _idle_of(self, conn: Connection, role: str) -> float | None:
        return self.timer(conn, role).idle or estimate_idle(conn.side(role).keepalive_probes())

    def _interval_of(self, conn: Connection, role: str) -> float | None:
        return self.timer(conn, role).interval or estimate_interval(conn.side(role).keepalive_probes())


def _answers(endpoint: Endpoint) -> int:
    return sum(1 for p in endpoint.probes if p.answer_t is not None)


def _events(endpoint: Endpoint) -> int:
    """How many probes (and a keepalive abort) a side has shown: what changes its findings."""
    return len(endpoint.probes) + (1 if endpoint.reset is not None else 0) + (1 if endpoint.fin_t is not None else 0)
