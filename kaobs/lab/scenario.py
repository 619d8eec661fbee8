"""A lab experiment as data: the scenario, and the pure functions that turn it into commands and expectations.

A `Scenario` says everything one experiment needs and nothing about how it
is run: the server's settings (the keepalive GUCs or any ``-c name=value``),
the kernel defaults of the server's and the client's network namespaces
(``docker run --sysctl``), the client's libpq keepalive parameters, the
client sessions with their per-session settings, the fault and when it
comes, and how long the run may last. The functions here turn it into
``docker run`` arguments, libpq strings and the expectations the report is
judged against; `scenario_from_options` builds it from `kaobs lab`'s options.
All of it is unit-tested without Docker.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from analysis.expect import Expectations, SideExpectation, build_expectations
from analysis.gucvalue import parse_guc_value
from analysis.settings import (
    CLIENT,
    GUC_NAMES,
    LIBPQ_KEYWORDS,
    NAMESPACE_DEFAULTS,
    RETRIES2_DEFAULT,
    RETRIES2_SYSCTL,
    SERVER,
    SYSCTL_NAMES,
    USER_TIMEOUT,
    ExpectationError,
)

FAULT_CLIENT_VANISHES = "client-vanishes"
FAULT_SERVER_VANISHES = "server-vanishes"
FAULT_NONE = "none"
FAULT_MIDDLEBOX_DROP = "middlebox-drop"
FAULT_MIDDLEBOX_RESET = "middlebox-reset"
FAULT_CLIENT_RETURNS = "client-returns"
ROUTED_FAULTS = (FAULT_MIDDLEBOX_DROP, FAULT_MIDDLEBOX_RESET)
"""Faults of a router between the client's and the server's networks, which forgets connections idle `idle_cut` s."""
FAULTS = (FAULT_CLIENT_VANISHES, FAULT_SERVER_VANISHES, FAULT_NONE, *ROUTED_FAULTS, FAULT_CLIENT_RETURNS)
IDLE_CUT_RANGE = (2.0, 120.0)
"""The router's idle timeout in a lab run: long enough to be told from timer noise, short enough for a bounded run."""
SEED_SERVER_SETTINGS = (("tcp_keepalives_idle", "3"), ("tcp_keepalives_interval", "2"), ("tcp_keepalives_count", "3"))
LINUX_DEFAULT_SYSCTLS = {**{s.sysctl: s.linux_default for s in NAMESPACE_DEFAULTS}, RETRIES2_SYSCTL: RETRIES2_DEFAULT}
"""A new network namespace starts with these, whatever the host says."""


MAX_DURATION_S = 600.0
"""No run lasts longer than this, whatever the settings say (every loop that sends traffic is bounded)."""


class LabError(Exception):
    """Something the lab cannot do: one line for the user (exit 2)."""


@dataclass(frozen=True, slots=True)
class Session:
    """One client connection and its per-session server settings.

    `options` go into libpq's ``options=-c name=value`` (applied at connection
    start); `sets` are ``SET name = value`` statements sent right after
    connecting. `stop_reading`: ask for a large result and never read it, so
    the server probes the zero window instead of idling.
    """

    options: tuple[tuple[str, str], ...] = ()
    sets: tuple[tuple[str, str], ...] = ()
    stop_reading: bool = False
    every: float | None = None
    """Query (SELECT 1) this often: a busy connection, whose silences never reach a middlebox's idle cut."""
    query_after: float | None = None
    """Query once, this long after the client is ready: a connection that idled, then speaks again."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything one lab experiment needs, as data (see the module docstring).

    `fault_after_answered`: the fault comes once every connection has had that
    many keepalive probes of the surviving side answered (the server's when the
    client vanishes, the client's when the server vanishes); `fault_after_s`,
    when set, is a time bound on that wait, in seconds after the client is
    ready (the fault comes then even if fewer probes were answered).
    `duration`: the longest the run may last after the client is ready; None
    lets `time_bound` compute it from the settings. `grace`: how long the
    capture goes on after the last connection ended. `idle_cut`: with a
    routed fault, the router's conntrack forgets a connection idle this long
    (seconds), then drops or rejects (RST) its packets.
    """

    server_settings: tuple[tuple[str, str], ...] = SEED_SERVER_SETTINGS
    server_sysctls: tuple[tuple[str, int], ...] = ()
    client_sysctls: tuple[tuple[str, int], ...] = ()
    client_params: tuple[tuple[str, str], ...] = ()
    sessions: tuple[Session, ...] = (Session(),)
    fault: str = FAULT_CLIENT_VANISHES
    fault_after_answered: int = 2
    fault_after_s: float | None = None
    duration: float | None = None
    grace: float = 1.0
    port: int = 5432
    idle_cut: float | None = None

    def __post_init__(self) -> None:
        validate(self)

    def with_(self, **changes) -> "Scenario":
        return replace(self, **changes)


def validate(scenario: Scenario) -> None:
    """Refuse what Postgres, libpq or the kernel would refuse, with one line each."""
    if scenario.fault not in FAULTS:
        raise LabError(f"unknown fault {scenario.fault!r} (valid: {', '.join(FAULTS)})")
    if not scenario.sessions:
        raise LabError("a scenario needs at least one session")
    if scenario.fault_after_answered < 0:
        raise LabError("fault_after_answered must be 0 or more")
    if scenario.duration is not None and not 0 < scenario.duration <= MAX_DURATION_S:
        raise LabError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if not 1 <= scenario.port <= 65535:
        raise LabError(f"port out of range: {scenario.port}")
    if scenario.fault in ROUTED_FAULTS:
        low, high = IDLE_CUT_RANGE
        if scenario.idle_cut is None or not low <= scenario.idle_cut <= high:
            raise LabError(f"--fault {scenario.fault} needs --idle-cut SECONDS in {low:g}..{high:g} (the router's "
                           "conntrack timeout for established connections)")
    elif scenario.idle_cut is not None:
        raise LabError("--idle-cut goes with --fault middlebox-drop or middlebox-reset (a router that forgets idle "
                       "connections)")
    for session in scenario.sessions:
        for name, value in (("every", session.every), ("query-after", session.query_after)):
            if value is not None and not 0.2 <= value <= MAX_DURATION_S:
                raise LabError(f"session {name}:{value:g}: must be in 0.2..{MAX_DURATION_S:g} seconds")
    for name, value in scenario.server_settings:
        _check_guc(name, value, "server setting")
    for session in scenario.sessions:
        for name, value in session.options + session.sets:
            _check_guc(name, value, "session setting")
    for name, value in scenario.server_sysctls + scenario.client_sysctls:
        if name not in SYSCTL_NAMES:
            raise LabError(f"sysctl {name}: only {', '.join(SYSCTL_NAMES)} are set on the lab's containers")
        if not isinstance(value, int) or value < (0 if name.endswith(("probes", "retries2")) else 1):
            raise LabError(f"sysctl {name}={value}: not a valid value")
    for keyword, _ in scenario.client_params:
        if keyword not in LIBPQ_KEYWORDS:
            raise LabError(f"libpq parameter {keyword!r}: the lab sets only {', '.join(LIBPQ_KEYWORDS)}")
    try:
        build_expectations((), client_conninfo_params(scenario), ())
    except ExpectationError as error:
        raise LabError(str(error).replace("--client-dsn", "client libpq parameter")) from None


def _check_guc(name: str, value: str, what: str) -> None:
    if not name or any(c in name for c in " =\t'\""):
        raise LabError(f"{what} {name!r}: not a GUC name")
    if any(c in str(value) for c in "\n\0"):
        raise LabError(f"{what} {name}: the value cannot hold a newline")
    if name.lower() in GUC_NAMES:
        try:
            parse_guc_value(name.lower(), str(value))
        except ExpectationError as error:
            raise LabError(str(error).replace("--expect ", f"{what} ")) from None


def parse_assignment(item: str, what: str) -> tuple[str, str]:
    """``name=value`` -> (name, value); one clear line when it is not."""
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise LabError(f"{what} {item!r}: expected NAME=VALUE")
    return name, value.strip()


def server_command(scenario: Scenario) -> list[str]:
    """The command given to the image: ``postgres --tcp_keepalives_idle=3 ...``, as the seed ran it."""
    args = ["postgres"]
    if scenario.port != 5432:
        args.append(f"--port={scenario.port}")
    args += [f"--{name}={value}" for name, value in scenario.server_settings]
    return args


def sysctl_args(sysctls: Iterable[tuple[str, int]]) -> list[str]:
    out: list[str] = []
    for name, value in sysctls:
        out += ["--sysctl", f"{name}={value}"]
    return out


def client_conninfo_params(scenario: Scenario) -> str:
    """The client's keepalive parameters as a libpq string (what its expectation is built from)."""
    return " ".join(f"{k}={v}" for k, v in scenario.client_params)


def session_server_settings(scenario: Scenario, session: Session) -> dict[str, str]:
    """The keepalive GUCs one session runs: server settings, then its options, then its SETs (last wins)."""
    settings: dict[str, str] = {}
    for name, value in scenario.server_settings + session.options + session.sets:
        if name.lower() in GUC_NAMES:
            settings[name.lower()] = str(value)
    return settings


def expect_items(scenario: Scenario, session: Session) -> list[str]:
    """`--expect` items for one session: every keepalive GUC, 0 (kernel default / not set) when not given."""
    settings = session_server_settings(scenario, session)
    return [f"{name}={settings.get(name, '0')}" for name in GUC_NAMES]


def sysctl_items(server: dict[str, int], client: dict[str, int]) -> list[str]:
    """`--sysctl server:...`/`client:...` items for the kernel defaults measured in each namespace."""
    items = [f"server:{name}={value}" for name, value in sorted(server.items())]
    items += [f"client:{name}={value}" for name, value in sorted(client.items())]
    return items


def vanishing_side(fault: str) -> str | None:
    return {FAULT_CLIENT_VANISHES: CLIENT, FAULT_SERVER_VANISHES: SERVER, FAULT_CLIENT_RETURNS: CLIENT}.get(fault)


def surviving_side(fault: str) -> str | None:
    return {FAULT_CLIENT_VANISHES: SERVER, FAULT_SERVER_VANISHES: CLIENT, FAULT_CLIENT_RETURNS: SERVER}.get(fault)


def routed_defaults(idle_cut: float) -> tuple[tuple[tuple[str, str], ...], tuple[Session, ...], tuple[tuple[str, str], ...]]:
    """What a middlebox run does unless told otherwise: (server GUCs, sessions, client libpq parameters).

    The server probes only after 1.5 idle cuts (as with the kernel's 7200 s
    behind a 350 s load balancer): too late. Three sessions: one queries
    every 0.6 idle cut (its silences never reach the cut: it survives), one
    idles past the cut and then queries (its data meets the forgotten flow),
    one idles for ever (the server's probes meet it). The client gives up on
    unacknowledged data after 5 s (libpq tcp_user_timeout), not after the
    kernel's 15 minutes.
    """
    gucs = (("tcp_keepalives_idle", str(int(round(idle_cut * 1.5)))), ("tcp_keepalives_interval", "1"),
            ("tcp_keepalives_count", "3"))
    sessions = (Session(every=round(idle_cut * 0.6, 3)), Session(query_after=round(idle_cut + 2.0, 3)), Session())
    return gucs, sessions, (("tcp_user_timeout", "5000"),)


def session_expectations(
    scenario: Scenario,
    session: Session,
    server_kernel: dict[str, int],
    client_kernel: dict[str, int],
    *,
    judge_vanished: bool = False,
) -> Expectations:
    """What one session's connection must show, from the lab's own settings.

    The server side is judged with the session's effective GUCs, the client
    side with its libpq keepalive parameters; 0 or unset resolve to the
    kernel defaults measured in that side's namespace. The side that vanishes
    is not judged unless asked: its packets never reach the wire after the
    fault, so what its timer does cannot be seen.
    """
    expectations = build_expectations(
        expect_items(scenario, session), client_conninfo_params(scenario), sysctl_items(server_kernel, client_kernel)
    )
    expectations = Expectations(_lab_sources(expectations.server), _lab_sources(expectations.client))
    gone = vanishing_side(scenario.fault)
    if judge_vanished or gone is None:
        return expectations
    empty = build_expectations((), None, ())
    if gone == SERVER:
        return Expectations(empty.server, expectations.client)
    return Expectations(expectations.server, empty.client)


_SYSCTL_SOURCE_RE = re.compile(r"--sysctl (server|client):(net\.ipv4\.[a-z_]+=\d+)")


def _lab_source(source: str) -> str:
    """Say where the lab's own expectations come from: its settings and the containers' namespaces."""
    source = _SYSCTL_SOURCE_RE.sub(r"\2, read in the \1 container", source)
    source = source.replace("--expect (", "lab setting (")
    return source.replace("client DSN", "lab --libpq")


def _lab_sources(side: SideExpectation) -> SideExpectation:
    if not side.judged():
        return side
    settings = {name: replace(value, source=_lab_source(value.source)) for name, value in side.settings().items()}
    return replace(side, **settings, enabled_source=_lab_source(side.enabled_source))


FAULT_STOPS_READING = "client-stops-reading"


LAB_FAULTS = (*FAULTS[:2], FAULT_STOPS_READING, FAULT_NONE, *ROUTED_FAULTS, FAULT_CLIENT_RETURNS)


def _sysctl_pair(item: str, what: str) -> tuple[str, int]:
    name, value = parse_assignment(item, what)
    full = name if name.startswith("net.") else f"net.ipv4.{name}"
    if full not in SYSCTL_NAMES:
        raise LabError(f"{what} {item}: only {', '.join(SYSCTL_NAMES)} can be set on the lab's containers")
    if not value.isdigit():
        raise LabError(f"{what} {item}: the value must be a whole number")
    return full, int(value)


def parse_session(text: str) -> Session:
    """``--session`` syntax: ``default``, or comma-separated ``[set:|options:]NAME=VALUE`` items.

    ``set:`` (the default) sends ``SET NAME = VALUE`` after connecting;
    ``options:`` puts ``-c NAME=VALUE`` into libpq's ``options`` (applied at
    connection start). ``stop-reading`` makes the session ask for a large
    result and never read it; ``every:S`` makes it query every S seconds,
    ``query-after:S`` once, S seconds after the client is ready.
    """
    text = text.strip()
    if text in ("", "default"):
        return Session()
    options: list[tuple[str, str]] = []
    sets: list[tuple[str, str]] = []
    stop_reading = False
    every = query_after = None
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item == "stop-reading":
            stop_reading = True
            continue
        kind, colon, rest = item.partition(":")
        if colon and kind in ("every", "query-after"):
            try:
                seconds = float(rest)
            except ValueError:
                raise LabError(f"--session {text!r}: {kind}: takes seconds, e.g. {kind}:5") from None
            if kind == "every":
                every = seconds
            else:
                query_after = seconds
            continue
        if colon and kind in ("set", "options"):
            target = sets if kind == "set" else options
            item = rest
        elif colon and "=" not in kind:
            raise LabError(f"--session {text!r}: unknown prefix {kind!r} (use set:, options:, every: or query-after:)")
        else:
            target = sets
        target.append(parse_assignment(item, "--session"))
    return Session(options=tuple(options), sets=tuple(sets), stop_reading=stop_reading, every=every,
                   query_after=query_after)


def scenario_from_options(
    *,
    idle: str | None,
    interval: str | None,
    count: str | None,
    user_timeout: str | None,
    settings: Sequence[str],
    server_sysctls: Sequence[str],
    client_sysctls: Sequence[str],
    libpq: Sequence[str],
    sessions: Sequence[str],
    fault: str,
    answered: int,
    fault_after: float | None,
    duration: float | None,
    port: int,
    idle_cut: float | None = None,
) -> Scenario:
    """The scenario the options describe (pure; LabError with one line for bad input).

    The server's keepalive GUCs not given are the seed's (3/2/3), or, with a
    middlebox fault, `routed_defaults`; so are the sessions and the client's
    tcp_user_timeout there.
    """
    routed = fault in ROUTED_FAULTS and idle_cut is not None
    gucs, routed_sessions, routed_libpq = routed_defaults(idle_cut) if routed else (SEED_SERVER_SETTINGS, (), ())
    server: dict[str, str] = {}
    for (name, default), value in zip(gucs + ((USER_TIMEOUT.guc, None),), (idle, interval, count, user_timeout)):
        if value is not None or default is not None:
            server[name] = value if value is not None else default
    for item in settings:
        name, value = parse_assignment(item, "-c")
        server[name.lower() if name.lower().startswith("tcp_") else name] = value
    params: dict[str, str] = {}
    for item in libpq:
        keyword, value = parse_assignment(item, "--libpq")
        if keyword not in LIBPQ_KEYWORDS:
            raise LabError(f"--libpq {item}: the lab sets only the client's {', '.join(LIBPQ_KEYWORDS)}")
        params[keyword] = value
    for keyword, value in routed_libpq:
        params.setdefault(keyword, value)
    session_list = [parse_session(text) for text in sessions] or list(routed_sessions) or [Session()]
    real_fault = fault
    if fault == FAULT_STOPS_READING:
        real_fault = FAULT_NONE
        session_list = [Session(s.options, s.sets, True) for s in session_list]
    return Scenario(
        server_settings=tuple(server.items()),
        server_sysctls=tuple(_sysctl_pair(item, "--server-sysctl") for item in server_sysctls),
        client_sysctls=tuple(_sysctl_pair(item, "--client-sysctl") for item in client_sysctls),
        client_params=tuple(params.items()),
        sessions=tuple(session_list),
        fault=real_fault,
        fault_after_answered=answered,
        fault_after_s=fault_after,
        duration=duration,
        port=port,
        idle_cut=idle_cut,
    )
