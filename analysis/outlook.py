"""What live capture adds over a file: predictions and alarms while they still matter.

`LiveMonitor` looks at the model's state at a given moment ("now", from the
capture clock) and says, per connection and side, when the next probe and the
abort are due under the expected settings (or, where nothing was expected,
under what the side has shown so far), and raises an alarm once:

* a probe overdue beyond the timer tolerance ("no probe 5 s after it was due:
  keepalives are not running on this side");
* a peer that stopped answering ("2 of 3 probes unanswered, abort expected at
  12:01:07");
* an abort that did not come when the settings say it must.

Pure: the caller supplies the time; nothing here reads a clock or prints.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from analysis.expect import Expectations
from analysis.model import CLIENT, SERVER, Connection, Endpoint, KeepaliveModel
from analysis.timers import DEFAULT_HZ, timer_tolerance
from analysis.verdict import TimerSettings, estimate_idle, estimate_interval

# An alarm waits this much beyond the timer tolerance: a capture clock and a
# busy machine should not page anyone for a probe 300 ms late.
ALARM_GRACE_S = 1.0


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
    kind: str  # "probe_overdue" | "peer_silent" | "abort_missing"
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
            SERVER: TimerSettings.from_expectation(expectations.server if expectations and expectations.server.judged() else None),
            CLIENT: TimerSettings.from_expectation(expectations.client if expectations and expectations.client.judged() else None),
        }
        self._raised: set[tuple[int, str, str, float]] = set()

    def outlook(self, conn: Connection, role: str) -> SideOutlook:
        endpoint = conn.side(role)
        keepalives = [p for p in endpoint.probes if p.kind == "keepalive"]
        unanswered = endpoint.series_unanswered
        if conn.end_reason != "open" or endpoint.fin_t is not None or conn.peer(endpoint).fin_t is not None:
            return SideOutlook(role, len(keepalives), unanswered, None, None, "unknown")
        idle, interval, count, user_timeout, source = self._numbers(role, endpoint)
        next_probe = abort_due = None
        if unanswered and interval:
            last = endpoint.probes[-1]
            anchor = last.since_accepted
            if user_timeout:
                if anchor is not None:
                    ticks = 1
                    while last.t + ticks * interval - anchor < user_timeout and ticks < 10_000:
                        ticks += 1
                    abort_due = last.t + ticks * interval
            elif count is not None:
                abort_due = last.t + max(1, count - unanswered + 1) * interval
            next_probe = last.t + interval
            if abort_due is not None and abort_due <= next_probe:
                next_probe = None
        elif not unanswered and idle and endpoint.last_accepted is not None and endpoint.quiet_clean:
            next_probe = endpoint.last_accepted + idle
            if endpoint.probes and endpoint.probes[-1].kind == "window" and (
                    endpoint.series_probes or conn.peer(endpoint).window == 0):
                next_probe = None  # persist timer running: keepalive is off while data waits
        return SideOutlook(role, len(keepalives), unanswered, next_probe, abort_due, source)

    def _numbers(self, role: str, endpoint: Endpoint):
        expected = self.settings[role]
        if expected.enabled is False:
            return None, None, None, None, "expected"
        keepalives = endpoint.keepalive_probes()
        idle = expected.idle
        interval = expected.interval
        source = "expected" if idle or interval else "unknown"
        if idle is None:
            idle = estimate_idle(keepalives)
            source = "observed" if idle else source
        if interval is None:
            interval = estimate_interval(keepalives)
        count = expected.count
        user_timeout = expected.user_timeout
        return idle, interval, count, user_timeout, source

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
        if out.abort_due is not None:
            late = timer_tolerance(self._interval_of(role, conn) or 1.0, self.hz).late + ALARM_GRACE_S
            if now > out.abort_due + late:
                found.append(
                    Alarm("abort_missing", out.abort_due, conn, role,
                          f"{role} should have aborted at {clock(out.abort_due)} after {out.unanswered} unanswered probe(s); "
                          f"no RST {now - out.abort_due:.1f} s later")
                )
            elif out.unanswered >= 2 or (out.unanswered >= 1 and self.settings[role].count == 1):
                total = self.settings[role].count
                of = f" of {total}" if total and not self.settings[role].user_timeout else ""
                found.append(
                    Alarm("peer_silent", conn.side(role).probes[-1].t, conn, role,
                          f"{role}: {out.unanswered}{of} probes unanswered, abort expected at {clock(out.abort_due)}")
                )
        if out.next_probe is not None and out.settings_from != "unknown":
            length = self._idle_of(role, conn) if not out.unanswered else self._interval_of(role, conn)
            late = timer_tolerance(length or 1.0, self.hz).late + ALARM_GRACE_S
            if now > out.next_probe + late:
                found.append(
                    Alarm("probe_overdue", out.next_probe, conn, role,
                          f"{role}: no probe {now - out.next_probe:.1f} s after it was due at {clock(out.next_probe)}: "
                          "keepalives are not running on this side, or not with these settings")
                )
        return found

    def _idle_of(self, role: str, conn: Connection) -> float | None:
        return self.settings[role].idle or estimate_idle(conn.side(role).keepalive_probes())

    def _interval_of(self, role: str, conn: Connection) -> float | None:
        return self.settings[role].interval or estimate_interval(conn.side(role).keepalive_probes())


def clock(t: float | None) -> str:
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")
