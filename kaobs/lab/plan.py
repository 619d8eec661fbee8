"""How long a lab run takes: when the fault comes and when the connections must have ended, from the kernel timer.

Each side's settings are resolved as its kernel will run them (the GUCs of
the session, libpq's keywords, 0 = the namespace default) into the kernel
timer's `TimerSettings`, and `analysis.kernel_timer` says when the abort
comes once nothing answers: the lab plans its fault and its time bound with
the same timer the verdicts judge by.
"""
from __future__ import annotations

from typing import Iterable

from analysis.conninfo import parse_conninfo
from analysis.gucvalue import parse_guc_value
from analysis.kernel_timer import TimerSettings, TimerState, abort_due
from analysis.settings import CLIENT, COUNT, ENABLED_LIBPQ, IDLE, INTERVAL, USER_TIMEOUT
from kaobs.lab.scenario import (
    FAULT_NONE,
    LINUX_DEFAULT_SYSCTLS,
    MAX_DURATION_S,
    Scenario,
    Session,
    client_conninfo_params,
    session_server_settings,
    surviving_side,
)


def abort_after_last_answer(timers: TimerSettings) -> float:
    """From the last accepted packet to the abort when nothing answers any more."""
    due = abort_due(TimerState(0.0), timers)
    assert due is not None, "resolved settings always end in an abort"
    return due


def _kernel(sysctls: Iterable[tuple[str, int]]) -> dict[str, int]:
    values = dict(LINUX_DEFAULT_SYSCTLS)
    values.update(dict(sysctls))
    return values


def server_timers(scenario: Scenario, session: Session, kernel: dict[str, int] | None = None) -> TimerSettings:
    """The numbers one session's server side runs: its GUCs, 0 = the server namespace's default."""
    k = kernel or _kernel(scenario.server_sysctls)
    settings = session_server_settings(scenario, session)

    def guc(setting) -> int:
        value = parse_guc_value(setting.guc, settings.get(setting.guc, "0"))
        return value or (k[setting.sysctl] if setting.sysctl else 0)

    return TimerSettings(True, guc(IDLE), guc(INTERVAL), guc(COUNT), USER_TIMEOUT.seconds(guc(USER_TIMEOUT)))


def client_timers(scenario: Scenario, kernel: dict[str, int] | None = None) -> TimerSettings | None:
    """The client's numbers (libpq's keywords, unset or 0 = the client namespace's default); None when keepalives are off."""
    k = kernel or _kernel(scenario.client_sysctls)
    params = parse_conninfo(client_conninfo_params(scenario))
    if params.get(ENABLED_LIBPQ, "1").strip() == "0":
        return None

    def param(setting) -> int:
        value = max(0, int(params.get(setting.libpq, "0").strip()))
        return value or (k[setting.sysctl] if setting.sysctl else 0)

    return TimerSettings(True, param(IDLE), param(INTERVAL), param(COUNT), USER_TIMEOUT.seconds(param(USER_TIMEOUT)))


def survivor_timers(scenario: Scenario, session: Session) -> TimerSettings | None:
    """The timers of the side that must notice the fault (the server when there is no fault)."""
    if surviving_side(scenario.fault) == CLIENT:
        return client_timers(scenario)
    return server_timers(scenario, session)


def fault_delay(scenario: Scenario) -> float | None:
    """Seconds after the client is ready by which the fault comes even without the answered probes.

    Enough for `fault_after_answered` answered probes of the slowest session
    plus half an idle; None when there is no fault.
    """
    if scenario.fault == FAULT_NONE:
        return None
    if scenario.fault_after_s is not None:
        return scenario.fault_after_s
    idles = [t.idle for t in (survivor_timers(scenario, s) for s in scenario.sessions) if t is not None]
    idle = max(idles) if idles else 0.0
    return scenario.fault_after_answered * idle + idle / 2 + 0.5 if scenario.fault_after_answered else 0.0


def expected_end(scenario: Scenario) -> float | None:
    """Seconds after the client is ready by which the settings say every connection has ended.

    None when nothing ends it (no fault): the duration decides.
    """
    if scenario.fault == FAULT_NONE:
        return None
    delay = fault_delay(scenario) or 0.0
    ends = []
    for session in scenario.sessions:
        timers = survivor_timers(scenario, session)
        if timers is None:
            return None  # the survivor does not probe: nothing will end the connection
        # The fault lands at most one idle after the last answered probe; from
        # then the abort comes after one idle and the probes.
        ends.append(delay + abort_after_last_answer(timers))
    return max(ends)


def time_bound(scenario: Scenario) -> float:
    """How long the run may last after the client is ready: the scenario's duration, or enough for the settings.

    Timers fire late by up to ~1/8 of their length; the bound allows a quarter
    more and a few seconds, so that a correct kernel always ends before it.
    """
    if scenario.duration is not None:
        return scenario.duration
    end = expected_end(scenario)
    if end is None:
        idles = [t.idle for t in (server_timers(scenario, s) for s in scenario.sessions)]
        end = (scenario.fault_after_answered + 1) * min(idles) + 1.0
    return min(MAX_DURATION_S, end * 1.25 + 3.0 + scenario.grace)
