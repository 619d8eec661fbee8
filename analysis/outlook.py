"""What live capture adds over a file: predictions and alarms while they still matter.

`LiveMonitor` looks at the model's state at a given moment ("now", from the
capture clock) and asks the kernel timer (`analysis.kernel_timer`) when the
next probe and the abort are due, per connection and side, under the expected
settings (or, where nothing was expected, under what the side has shown so
far), and raises an alarm once:

* a probe overdue beyond the timer tolerance ("no probe 5 s after it was due:
  keepalives are not running on this side");
* a peer that stopped answering ("2 of 3 probes unanswered, abort expected at
  12:01:07");
* an abort that did not come when the settings say it must.

Pure: the caller supplies the time; nothing here reads a clock or prints.
"""
from __future__ import annotations

from dataclasses import dataclass

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
from analysis.words import local_clock

# An alarm waits this much beyond the timer tolerance: a capture clock and a
# busy machine should not page anyone for a probe 300 ms late.
ALARM_GRACE_S = 1.0
STALL_ALARM_S = 2.0
"""Data unacknowledged this long (and resent twice) is a stall worth an alarm."""


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
    kind: str  # "probe_overdue" | "peer_silent" | "abort_missing" | "stall"
    t: float
    connection: Connection
    side: str
    message: str

    @property
    def key(self) -> tuple[int, str, str, float]:
        return (self.connection.index, self.side, self.kind, round(self.t, 3))


class LiveMonitor:
    """Turns the model's state into outlooks and one-time alarms."""

    def __init__(self, model: KeepaliveModel, expectations: Expectations | None, hz: int = DEFAULT_HZ) -> None:
        self.model = model
        self.hz = hz
        self.settings = {
            role: side.timer_settings() if side is not None and side.judged() else TimerSettings()
            for role, side in ((SERVER, expectations.server if expectations else None),
                               (CLIENT, expectations.client if expectations else None))
        }
        self._raised: set[tuple[int, str, str, float]] = set()

    def outlook(self, conn: Connection, role: str) -> SideOutlook:
        endpoint = conn.side(role)
        keepalives = endpoint.keepalive_probes()
        unanswered = endpoint.series_unanswered
        if conn.end_reason != "open" or endpoint.fin_t is not None or conn.peer(endpoint).fin_t is not None:
            return SideOutlook(role, len(keepalives), unanswered, None, None, "unknown")
        settings, source = self._numbers(role, endpoint)
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

    def _numbers(self, role: str, endpoint: Endpoint) -> tuple[TimerSettings, str]:
        """The side's timer settings: the expected ones, with what the side has shown so far where none were given."""
        expected = self.settings[role]
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

    def alarms(self, now: float) -> list[Alarm]:
        """Alarms that became true by `now`, each raised once."""
        fresh: list[Alarm] = []
        for conn in self.model.connections:
            for role in (SERVER, CLIENT):
                for alarm in self._check(conn, role, now):
                    if alarm.key not in self._raised:
                        self._raised.add(alarm.key)
                        fresh.append(alarm)
        return fresh

    def _check(self, conn: Connection, role: str, now: float) -> list[Alarm]:
        out = self.outlook(conn, role)
        found: list[Alarm] = []
        stall = self._stall_alarm(conn, role, now)
        if stall is not None:
            found.append(stall)
        if out.abort_due is not None:
            late = timer_tolerance(self._interval_of(role, conn) or 1.0, self.hz).late + ALARM_GRACE_S
            if now > out.abort_due + late:
                found.append(
                    Alarm("abort_missing", out.abort_due, conn, role,
                          f"{role} should have aborted at {local_clock(out.abort_due, millis=False)} after {out.unanswered} unanswered probe(s); "
                          f"no RST {now - out.abort_due:.1f} s later")
                )
            elif out.unanswered >= 2 or (out.unanswered >= 1 and self.settings[role].count == 1):
                total = self.settings[role].count
                of = f" of {total}" if total and not self.settings[role].user_timeout else ""
                found.append(
                    Alarm("peer_silent", conn.side(role).probes[-1].t, conn, role,
                          f"{role}: {out.unanswered}{of} probes unanswered, abort expected at {local_clock(out.abort_due, millis=False)}")
                )
        if out.next_probe is not None and out.settings_from != "unknown":
            length = self._idle_of(role, conn) if not out.unanswered else self._interval_of(role, conn)
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
        settings = self.settings[role]
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

    def _idle_of(self, role: str, conn: Connection) -> float | None:
        return self.settings[role].idle or estimate_idle(conn.side(role).keepalive_probes())

    def _interval_of(self, role: str, conn: Connection) -> float | None:
        return self.settings[role].interval or estimate_interval(conn.side(role).keepalive_probes())
