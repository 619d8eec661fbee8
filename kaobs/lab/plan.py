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
from analysis.kernel_timer import TimerSettings, TimerState, abort_due, retransmission_timeout
from analysis.settings import CLIENT, COUNT, ENABLED_LIBPQ, IDLE, INTERVAL, USER_TIMEOUT
from kaobs.lab.scenario import (
    FAULT_CLIENT_RETURNS,
    FAULT_NONE,
    RETRIES2_DEFAULT,
    RETRIES2_SYSCTL,
    ROUTED_FAULTS,
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
    plus half an idle; None when there is no fault to inject (none, or a
    middlebox's, which is there from the start).
    """
    if scenario.fault == FAULT_NONE or scenario.fault in ROUTED_FAULTS:
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
    if scenario.fault in ROUTED_FAULTS:
        return routed_end(scenario)
    delay = fault_delay(scenario) or 0.0
    ends = []
    for session in scenario.sessions:
        timers = survivor_timers(scenario, session)
        if timers is None:
            return None  # the survivor does not probe: nothing will end the connection
        # The fault lands at most one idle after the last answered probe; from
        # then the abort comes after one idle and the probes.
        ends.append(delay + abort_after_last_answer(timers))
    if scenario.fault == FAULT_CLIENT_RETURNS:
        return max(ends) + RETURN_AFTER_S + 2.0  # the client comes back, speaks, and is told by a RST
    return max(ends)


RETURN_AFTER_S = 1.0
"""--fault client-returns: the cut heals this long after the server's abort, then the client closes its sessions."""


def routed_end(scenario: Scenario) -> float | None:
    """A middlebox run: when every session that does not keep busy has met the forgotten flow, and ended.

    A session that idles for ever meets it with the server's first probe and
    is aborted after the count (or reset at once); one that queries after a
    while meets it with its query, which the client gives up on after its
    tcp_user_timeout (or tcp_retries2). A session that keeps busy never ends:
    None when every session does.
    """
    client = client_timers(scenario)
    client_give_up = (client.user_timeout if client is not None and client.user_timeout
                      else retransmission_timeout(int(dict(scenario.client_sysctls).get(RETRIES2_SYSCTL, RETRIES2_DEFAULT))))
    ends = []
    for session in scenario.sessions:
        if session.every is not None:
            continue
        server = server_timers(scenario, session)
        probed = abort_after_last_answer(server)
        # The client's give-up is silent: only the retransmission that then never comes (at most the give-up
        # time again later) shows it.
        ends.append(max(probed, session.query_after + 2 * client_give_up + 1.0) if session.query_after is not None
                    else probed)
    return max(ends) if ends else None


def time_bound(scenario: Scenario) -> float:
    """How long the run may last after the client is ready: the scenario's duration, or enough for the settings.

    Timers fire late by up to ~1/8 of their length; the bound allows a quarter
    more and a few seconds, so that a correct kernel always ends before it.
    """
    if scenario.duration is not None:
        return scenario.duration
    end = expected_end(scenario)
    if end is None and scenario.fault in ROUTED_FAULTS:
        end = 3.0 * (scenario.idle_cut or 1.0)
    if end is None:
        idles = [t.idle for t in (server_timers(scenario, s) for s in scenario.sessions)]
        end = (scenario.fault_after_answered + 1) * min(idles) + 1.0
    return min(MAX_DURATION_S, end * 1.25 + 3.0 + scenario.grace)
