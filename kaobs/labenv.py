"""The lab's world: a scenario (pure data) and the Docker machinery that plays it.

A `Scenario` says everything one experiment needs and nothing about how it
is run: the server's settings (the keepalive GUCs or any ``-c name=value``),
the kernel defaults of the server's and the client's network namespaces
(``docker run --sysctl``), the client's libpq keepalive parameters, the
client sessions with their per-session settings, the fault and when it
comes, and how long the run may last. The pure functions below turn it into
``docker run`` argument lists, libpq strings, the expectations the report is
judged against, and time bounds; they are unit-tested without Docker.

`LabEnvironment` is the I/O edge. It runs everything on a Docker network of
its own (``--internal``: no route out), labels everything it creates with
``kaobs.lab=<run id>`` (plus the owning pid and start time, so that leftovers
of a killed run are recognised and removed by the next one), never touches
anything else, and removes what it created when it leaves, also on errors
and signals. The client is a container of its own (``sleep``) whose network
namespace the psycopg client (`kaobs.labclient`) runs in, from the host, via
``nsenter``: that makes it an endpoint a fault can cut off. Faults are
applied from the host side in the victim's namespace: every packet dropped
by iptables in both directions, so the victim neither answers nor probes,
like a machine that lost power or a NAT that forgot the flow.

`LabRun` conducts one run: environment, capture on the lab bridge, client,
fault at the right moment (after the surviving side's Nth answered probe,
seen on the wire by a keepalive model of its own), and the end (the abort,
plus a grace period, or the time bound). The capture is consumed by the
caller — the live view of `kaobs lab`, or a plain loop that records a pcap.
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from analysis.expect import (
    ExpectationError,
    Expectations,
    GUC_NAMES,
    SideExpectation,
    build_expectations,
    parse_conninfo,
    parse_guc_value,
)
from analysis.model import CLIENT, SERVER, KeepaliveModel, ModelEvent
from sniffer.live import LiveCapture
from sniffer.records import TcpSegment

LABEL = "kaobs.lab"
LABEL_PID = "kaobs.lab.pid"
LABEL_STARTED = "kaobs.lab.started"
DEFAULT_IMAGE = "postgres"
LOCAL_IMAGE = "kaobs/postgres:15-local"
IMAGE_ENV = "KAOBS_LAB_IMAGE"

FAULT_CLIENT_VANISHES = "client-vanishes"
FAULT_SERVER_VANISHES = "server-vanishes"
FAULT_NONE = "none"
FAULTS = (FAULT_CLIENT_VANISHES, FAULT_SERVER_VANISHES, FAULT_NONE)

KEEPALIVE_GUCS = GUC_NAMES  # tcp_keepalives_idle, _interval, _count, tcp_user_timeout
SEED_SERVER_SETTINGS = (("tcp_keepalives_idle", "3"), ("tcp_keepalives_interval", "2"), ("tcp_keepalives_count", "3"))
CLIENT_LIBPQ_KEYWORDS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")
KEEPALIVE_SYSCTLS = ("net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes")
LINUX_DEFAULT_SYSCTLS = {"net.ipv4.tcp_keepalive_time": 7200, "net.ipv4.tcp_keepalive_intvl": 75,
                         "net.ipv4.tcp_keepalive_probes": 9}

MAX_DURATION_S = 600.0
"""No run lasts longer than this, whatever the settings say (every loop that sends traffic is bounded)."""
STALE_AFTER_S = MAX_DURATION_S + 300
"""A labelled leftover older than this belongs to no running lab, even if its pid was reused."""
READY_TIMEOUT_S = 60.0
CLIENT_READY_TIMEOUT_S = 30.0
CLEANUP_PASSES = 6
LOST_REPORT_WAIT_S = 5.0
"""When the client must notice the abort, how long its libpq may take to say so."""


class LabError(Exception):
    """Something the lab cannot do: one line for the user (exit 2)."""


# --------------------------------------------------------------------------
# Scenario: pure data
# --------------------------------------------------------------------------


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
    capture goes on after the last connection ended.
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
    for name, value in scenario.server_settings:
        _check_guc(name, value, "server setting")
    for session in scenario.sessions:
        for name, value in session.options + session.sets:
            _check_guc(name, value, "session setting")
    for name, value in scenario.server_sysctls + scenario.client_sysctls:
        if name not in KEEPALIVE_SYSCTLS:
            raise LabError(f"sysctl {name}: only {', '.join(KEEPALIVE_SYSCTLS)} are set on the lab's containers")
        if not isinstance(value, int) or value < (0 if name.endswith("probes") else 1):
            raise LabError(f"sysctl {name}={value}: not a valid value")
    for keyword, _ in scenario.client_params:
        if keyword not in CLIENT_LIBPQ_KEYWORDS:
            raise LabError(f"libpq parameter {keyword!r}: the lab sets only {', '.join(CLIENT_LIBPQ_KEYWORDS)}")
    try:
        build_expectations((), client_conninfo_params(scenario), ())
    except ExpectationError as error:
        raise LabError(str(error).replace("--client-dsn", "client libpq parameter")) from None


def _check_guc(name: str, value: str, what: str) -> None:
    if not name or any(c in name for c in " =\t'\""):
        raise LabError(f"{what} {name!r}: not a GUC name")
    if any(c in str(value) for c in "\n\0"):
        raise LabError(f"{what} {name}: the value cannot hold a newline")
    if name.lower() in KEEPALIVE_GUCS:
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
        if name.lower() in KEEPALIVE_GUCS:
            settings[name.lower()] = str(value)
    return settings


def expect_items(scenario: Scenario, session: Session) -> list[str]:
    """`--expect` items for one session: every keepalive GUC, 0 (kernel default / not set) when not given."""
    settings = session_server_settings(scenario, session)
    return [f"{name}={settings.get(name, '0')}" for name in KEEPALIVE_GUCS]


def sysctl_items(server: dict[str, int], client: dict[str, int]) -> list[str]:
    """`--sysctl server:...`/`client:...` items for the kernel defaults measured in each namespace."""
    items = [f"server:{name}={value}" for name, value in sorted(server.items())]
    items += [f"client:{name}={value}" for name, value in sorted(client.items())]
    return items


def vanishing_side(fault: str) -> str | None:
    return {FAULT_CLIENT_VANISHES: CLIENT, FAULT_SERVER_VANISHES: SERVER}.get(fault)


def surviving_side(fault: str) -> str | None:
    return {FAULT_CLIENT_VANISHES: SERVER, FAULT_SERVER_VANISHES: CLIENT}.get(fault)


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


@dataclass(frozen=True, slots=True)
class Timers:
    """One side's resolved keepalive numbers (seconds; user_timeout 0 = not set)."""

    idle: float
    interval: float
    count: int
    user_timeout: float

    def abort_after_last_answer(self) -> float:
        """From the last accepted packet to the abort when nothing answers any more."""
        if self.user_timeout > 0:
            # The abort comes at the first tick (probe time) at or after user_timeout.
            ticks = max(1, math.ceil((self.user_timeout - self.idle) / self.interval))
            return max(self.idle + ticks * self.interval, self.idle + self.interval)
        return self.idle + self.count * self.interval


def _kernel(sysctls: Iterable[tuple[str, int]]) -> dict[str, int]:
    values = dict(LINUX_DEFAULT_SYSCTLS)
    values.update(dict(sysctls))
    return values


def server_timers(scenario: Scenario, session: Session, kernel: dict[str, int] | None = None) -> Timers:
    k = kernel or _kernel(scenario.server_sysctls)
    settings = session_server_settings(scenario, session)

    def guc(name: str) -> int:
        return parse_guc_value(name, settings.get(name, "0"))

    return Timers(
        idle=guc("tcp_keepalives_idle") or k["net.ipv4.tcp_keepalive_time"],
        interval=guc("tcp_keepalives_interval") or k["net.ipv4.tcp_keepalive_intvl"],
        count=guc("tcp_keepalives_count") or k["net.ipv4.tcp_keepalive_probes"],
        user_timeout=guc("tcp_user_timeout") / 1000,
    )


def client_timers(scenario: Scenario, kernel: dict[str, int] | None = None) -> Timers | None:
    """The client's numbers, or None when libpq keepalives are off."""
    k = kernel or _kernel(scenario.client_sysctls)
    params = parse_conninfo(client_conninfo_params(scenario))
    if params.get("keepalives", "1").strip() == "0":
        return None

    def param(name: str) -> int:
        return max(0, int(params.get(name, "0").strip()))

    return Timers(
        idle=param("keepalives_idle") or k["net.ipv4.tcp_keepalive_time"],
        interval=param("keepalives_interval") or k["net.ipv4.tcp_keepalive_intvl"],
        count=param("keepalives_count") or k["net.ipv4.tcp_keepalive_probes"],
        user_timeout=param("tcp_user_timeout") / 1000,
    )


def survivor_timers(scenario: Scenario, session: Session) -> Timers | None:
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
        ends.append(delay + timers.abort_after_last_answer())
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


def docker_run_server(scenario: Scenario, run_id: str, network: str, image: str) -> list[str]:
    """``docker run`` for the server. The password comes from the docker client's environment, not argv."""
    return [
        "docker", "run", "-d", "--name", f"kaobs-lab-{run_id}-server", "--network", network,
        *labels(run_id), "-e", "POSTGRES_PASSWORD", *sysctl_args(scenario.server_sysctls),
        image, *server_command(scenario),
    ]


def docker_run_client(scenario: Scenario, run_id: str, network: str, image: str, lifetime: float) -> list[str]:
    """``docker run`` for the client's network endpoint: `sleep`, bounded, in the same image."""
    return [
        "docker", "run", "-d", "--name", f"kaobs-lab-{run_id}-client", "--network", network,
        *labels(run_id), *sysctl_args(scenario.client_sysctls), "--entrypoint", "sleep",
        image, str(int(lifetime)),
    ]


def labels(run_id: str, pid: int | None = None, started: float | None = None) -> list[str]:
    pid = os.getpid() if pid is None else pid
    started = time.time() if started is None else started
    return ["--label", f"{LABEL}={run_id}", "--label", f"{LABEL_PID}={pid}", "--label", f"{LABEL_STARTED}={int(started)}"]


def client_spec(scenario: Scenario, host: str, max_seconds: float) -> dict:
    """What `kaobs.labclient` gets on its command line (no password: PGPASSWORD is in its environment)."""
    return {
        "host": host,
        "port": scenario.port,
        "libpq": dict(scenario.client_params),
        "sessions": [
            {"index": i, "options": list(s.options), "sets": list(s.sets), "stop_reading": s.stop_reading}
            for i, s in enumerate(scenario.sessions)
        ],
        "max_seconds": max_seconds,
    }


def is_stale(labels_: dict[str, str], now: float, alive: Callable[[int], bool]) -> bool:
    """Is a labelled container/network a leftover of a lab that is no longer running?

    Its owner's pid is gone, or it is older than any run can last (pids are
    reused). Without the pid/start labels (an older kaobs) only age counts,
    and without those either it is left alone.
    """
    started = labels_.get(LABEL_STARTED, "")
    pid = labels_.get(LABEL_PID, "")
    if started.isdigit() and now - int(started) > STALE_AFTER_S:
        return True
    if pid.isdigit():
        return not alive(int(pid))
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------
# Docker: the I/O edge
# --------------------------------------------------------------------------


def docker(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run the docker CLI; LabError with docker's own one-line message when it fails.

    An interrupt (Ctrl-C, SIGTERM turned into KeyboardInterrupt) does not
    kill the CLI mid-request: the engine would go on creating the container
    after the cleanup looked for it. The CLI runs in a session of its own
    (the terminal's Ctrl-C does not reach it), is waited for within
    `timeout`, and the interrupt is raised afterwards.
    """
    try:
        process = subprocess.Popen(["docker", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env, start_new_session=True)
    except FileNotFoundError:
        raise LabError("Docker is not installed (bash scripts/setup.sh installs it)") from None
    deadline = time.monotonic() + timeout
    interrupted: BaseException | None = None
    while True:
        try:
            stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            break
        except KeyboardInterrupt as error:
            interrupted = error
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise LabError(f"docker {args[0]} did not answer within {timeout:g} s") from None
    if interrupted is not None:
        raise interrupted
    if check and process.returncode != 0:
        message = " ".join(stderr.split()) or f"exit {process.returncode}"
        raise LabError(f"docker {args[0]} failed: {message}")
    return stdout


def check_docker() -> None:
    """One line when there is no usable Docker engine."""
    if shutil.which("docker") is None:
        raise LabError("Docker is not available: no docker command (bash scripts/setup.sh installs and starts it)")
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise LabError("Docker is not available: the engine does not answer (bash scripts/start-docker.sh)") from None
    if done.returncode != 0 or not done.stdout.strip():
        said = " ".join((done.stderr.strip().splitlines() or [""])[-1].split())
        if "permission denied" in said.lower():
            raise LabError(f"Docker is not available to this user ({said}): run kaobs lab as root")
        raise LabError("Docker is not available: the engine is not running (bash scripts/start-docker.sh starts it)"
                       + (f"; docker says: {said}" if said else ""))


def check_image(image: str) -> None:
    """The lab never pulls: an image that is not here is one line with what to do."""
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LabError(
            f"image {image!r} is not present locally and kaobs lab never pulls: use --image {LOCAL_IMAGE} "
            f"(bash scripts/setup.sh builds it) or set {IMAGE_ENV}")


def check_tools() -> None:
    if os.geteuid() != 0:
        raise LabError("kaobs lab needs root (packet capture, nsenter into the containers, iptables): run it with sudo")
    missing = [tool for tool in ("nsenter",) if shutil.which(tool) is None]
    if shutil.which("iptables") is None and shutil.which("ip") is None:
        missing.append("iptables (or ip)")
    if missing:
        raise LabError(f"kaobs lab needs {' and '.join(missing)} (bash scripts/setup.sh installs them)")


def remove_labelled(selector: str, *, only_stale: bool = False, now: float | None = None) -> list[str]:
    """Remove containers, then networks, carrying the label selector (``kaobs.lab`` or ``kaobs.lab=ID``).

    With `only_stale`, only those `is_stale` says belong to no running lab.
    Returns the names removed. Never raises: cleanup must go on.
    """
    removed: list[str] = []
    now = time.time() if now is None else now
    for kind in ("container", "network"):
        try:
            if kind == "container":
                ids = docker("ps", "-aq", "--filter", f"label={selector}", timeout=30).split()
            else:
                ids = docker("network", "ls", "-q", "--filter", f"label={selector}", timeout=30).split()
        except LabError:
            continue
        for object_id in ids:
            try:
                info = json.loads(docker(kind, "inspect", object_id, timeout=30))[0]
            except (LabError, ValueError, IndexError):
                continue
            labels_ = (info.get("Config") or {}).get("Labels") if kind == "container" else info.get("Labels")
            labels_ = labels_ or {}
            if LABEL not in labels_:
                continue  # the filter matched; belt and braces: never touch what is not ours
            if only_stale and not is_stale(labels_, now, pid_alive):
                continue
            name = (info.get("Name") or object_id).lstrip("/")
            try:
                if kind == "container":
                    docker("rm", "-f", "-v", object_id, timeout=60)
                else:
                    docker("network", "rm", object_id, timeout=60)
                removed.append(name)
            except LabError:
                pass
    return removed


def labelled_objects(selector: str) -> list[str]:
    """Ids of containers and networks carrying the label selector (empty when Docker does not answer)."""
    found: list[str] = []
    for command in (("ps", "-aq"), ("network", "ls", "-q")):
        try:
            found += docker(*command, "--filter", f"label={selector}", timeout=30).split()
        except LabError:
            pass
    return found


@dataclass(slots=True)
class Endpoint:
    """A running lab container: its name, address and the pid whose network namespace it has."""

    name: str
    ip: str
    pid: int

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"


def nsenter(endpoint: Endpoint, *command: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={endpoint.netns}", *command], capture_output=True, text=True, timeout=timeout)


def read_sysctls(endpoint: Endpoint) -> dict[str, int]:
    """The keepalive sysctls of the endpoint's namespace, read there (a new namespace starts at 7200/75/9)."""
    paths = ["/proc/sys/" + name.replace(".", "/") for name in KEEPALIVE_SYSCTLS]
    done = nsenter(endpoint, "cat", *paths)
    values = done.stdout.split()
    if done.returncode != 0 or len(values) != len(paths):
        raise LabError(f"cannot read the keepalive sysctls of {endpoint.name}: {' '.join(done.stderr.split())}")
    return {name: int(value) for name, value in zip(KEEPALIVE_SYSCTLS, values)}


class LabEnvironment:
    """The lab's network, server and client containers; a context manager that always cleans up."""

    def __init__(self, scenario: Scenario, image: str, *, run_id: str | None = None,
                 log: Callable[[str], None] = lambda message: None, lifetime: float | None = None) -> None:
        self.scenario = scenario
        self.image = image
        self.run_id = run_id or secrets.token_hex(4)
        self.log = log
        self.lifetime = lifetime or (time_bound(scenario) + 120)
        self.password = secrets.token_urlsafe(18)
        self.network = f"kaobs-lab-{self.run_id}"
        self.network_id = ""
        self.server: Endpoint | None = None
        self.client: Endpoint | None = None
        self.server_sysctls: dict[str, int] = {}
        self.client_sysctls: dict[str, int] = {}
        self.fault_method = ""
        self._cleaned = False

    @property
    def bridge(self) -> str:
        return f"br-{self.network_id[:12]}"

    def __enter__(self) -> "LabEnvironment":
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def start(self) -> None:
        check_docker()
        check_image(self.image)
        stale = remove_labelled(LABEL, only_stale=True)
        if stale:
            self.log(f"removed leftovers of earlier lab runs: {', '.join(stale)}")
        self.network_id = docker(
            "network", "create", "--internal", *labels(self.run_id), self.network, timeout=60).strip()
        env = dict(os.environ, POSTGRES_PASSWORD=self.password)
        server_cmd = docker_run_server(self.scenario, self.run_id, self.network, self.image)
        self.log(_shown(server_cmd))
        docker(*server_cmd[1:], env=env, timeout=120)
        client_cmd = docker_run_client(self.scenario, self.run_id, self.network, self.image, self.lifetime)
        docker(*client_cmd[1:], timeout=120)
        self.server = self._endpoint(f"kaobs-lab-{self.run_id}-server")
        self.client = self._endpoint(f"kaobs-lab-{self.run_id}-client")
        self._wait_ready()
        self.server_sysctls = read_sysctls(self.server)
        self.client_sysctls = read_sysctls(self.client)
        if not os.path.exists(f"/sys/class/net/{self.bridge}"):
            raise LabError(f"the lab network's bridge {self.bridge} is not there")

    def _endpoint(self, name: str) -> Endpoint:
        info = json.loads(docker("inspect", name, timeout=30))[0]
        state = info["State"]
        if not state.get("Running"):
            raise LabError(f"{name} is not running: {self._last_log(name)}")
        network = info["NetworkSettings"]["Networks"].get(self.network) or {}
        return Endpoint(name, network.get("IPAddress", ""), int(state["Pid"]))

    def _last_log(self, name: str) -> str:
        done = subprocess.run(["docker", "logs", "--tail", "3", name], capture_output=True, text=True, timeout=30)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return " ".join(lines[-1].split()) if lines else "no output"

    def _wait_ready(self) -> None:
        """Bounded wait until the server accepts TCP connections (the image's first start runs initdb)."""
        assert self.server is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["docker", "exec", self.server.name, "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.scenario.port)],
                capture_output=True, timeout=30)
            if done.returncode == 0:
                return
            state = json.loads(docker("inspect", self.server.name, timeout=30))[0]["State"]
            if not state.get("Running"):
                raise LabError(f"the server did not start: {self._last_log(self.server.name)}")
            time.sleep(0.25)
        raise LabError(f"the server did not accept connections within {READY_TIMEOUT_S:g} s")

    def start_client(self, max_seconds: float) -> subprocess.Popen:
        """The psycopg client, in the client container's network namespace; JSON lines on its stdout."""
        assert self.client is not None and self.server is not None
        spec = client_spec(self.scenario, self.server.ip, max_seconds)
        env = dict(os.environ, PGPASSWORD=self.password, PYTHONUNBUFFERED="1")
        env.pop("PGSERVICEFILE", None)
        return subprocess.Popen(
            ["nsenter", f"--net={self.client.netns}", sys.executable, "-m", "kaobs.labclient", "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile(), env=env, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

    def vanish(self, side: str) -> str:
        """Make one side vanish: drop every packet in and out of its namespace. Returns what was done."""
        victim = self.client if side == CLIENT else self.server
        assert victim is not None
        commands = [["iptables", "-w", "5", "-I", "INPUT", "-j", "DROP"], ["iptables", "-w", "5", "-I", "OUTPUT", "-j", "DROP"]]
        errors = []
        for command in commands:
            done = nsenter(victim, *command)
            if done.returncode != 0:
                errors.append(" ".join(done.stderr.split()))
        if not errors:
            self.fault_method = f"iptables DROP of INPUT and OUTPUT in {victim.name}'s network namespace"
            return self.fault_method
        # No netfilter here: take the interface down instead (the peer sees the same silence).
        done = nsenter(victim, "ip", "link", "set", "eth0", "down")
        if done.returncode != 0:
            raise LabError(f"cannot cut {victim.name} off: iptables: {errors[0]}; ip link: {' '.join(done.stderr.split())}")
        self.fault_method = f"eth0 down in {victim.name}'s network namespace (iptables failed: {errors[0]})"
        return self.fault_method

    def cleanup(self) -> None:
        """Remove everything labelled with this run's id. Idempotent; never raises.

        A few passes, bounded: a network cannot go while a container being
        removed is still attached to it.
        """
        if self._cleaned:
            return
        self._cleaned = True
        selector = f"{LABEL}={self.run_id}"
        for _ in range(CLEANUP_PASSES):
            remove_labelled(selector)
            if not labelled_objects(selector):
                return
            time.sleep(0.5)


def _shown(command: Sequence[str]) -> str:
    """A command as the user could type it (the password is an environment variable, never in argv)."""
    out = []
    for arg in command:
        out.append(arg if arg and all(c.isalnum() or c in "-_=./:,+@" for c in arg) else json.dumps(arg))
    return " ".join(out)


# --------------------------------------------------------------------------
# One run: capture, client, fault, end
# --------------------------------------------------------------------------


@dataclass(slots=True)
class LabEvent:
    """Something the lab did or the client reported, for the live view and the report."""

    t: float
    kind: str  # client events ("connected", "settings", "set", "stopped_reading", "ready", "connection_lost", ...), "fault", "end", "error"
    message: str
    data: dict = field(default_factory=dict)


class TappedCapture(LiveCapture):
    """A live capture that also shows each segment to the lab's own keepalive model.

    The lab decides when to inject the fault and when it is over from what is
    on the wire, without reaching into the consumer's model: whoever reads the
    capture (the live view, a recorder) drives this one too.
    """

    def __init__(self, *args, tap: Callable[[TcpSegment], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tap = tap

    def read(self, timeout: float = 0.1) -> list[TcpSegment]:
        batch = super().read(timeout)
        tap = self._tap
        for segment in batch:
            tap(segment)
        return batch


class WireWatch:
    """Answered probes and ends per connection, from a keepalive model of the lab's own (thread-safe counts)."""

    def __init__(self, ports: Sequence[int]) -> None:
        self._lock = threading.Lock()
        self.answered: dict[tuple[int, str], int] = {}
        self.connections: dict[int, str] = {}  # index -> client endpoint
        self.ended: set[int] = set()
        self.last_end_t: float | None = None
        self.model = KeepaliveModel(ports, on_event=self._on_event)

    def feed(self, segment: TcpSegment) -> None:
        self.model.feed(segment)

    def _on_event(self, event: ModelEvent) -> None:
        index = event.connection.index
        with self._lock:
            if event.kind == "connection":
                self.connections[index] = event.connection.client.endpoint
            elif event.kind == "answer":
                key = (index, event.side)
                self.answered[key] = self.answered.get(key, 0) + 1
            elif event.kind in ("abort", "reset", "fin"):
                if index not in self.ended:
                    self.ended.add(index)
                    self.last_end_t = event.t

    def snapshot(self) -> tuple[dict[int, str], dict[tuple[int, str], int], set[int], float | None]:
        with self._lock:
            return dict(self.connections), dict(self.answered), set(self.ended), self.last_end_t


class LabRun:
    """Conducts one scenario: a context manager around `LabEnvironment` plus the conductor thread.

    Usage::

        with LabRun(scenario, image, write="x.pcap") as lab:
            with lab.capture() as capture:
                lab.start()          # client, then fault and end in a thread
                for segment in capture: ...   # or run_live(capture, stop=lab.stop_event, ...)
        lab.events, lab.sessions_by_port, lab.expectations_for(port)

    The capture ends when the conductor says the run is over (stop_event)
    or at the time bound.
    """

    def __init__(self, scenario: Scenario, image: str, *, write: str | None = None, full_packets: bool = False,
                 on_event: Callable[[LabEvent], None] | None = None, log: Callable[[str], None] | None = None) -> None:
        self.scenario = scenario
        self.image = image
        self.write = write
        self.full_packets = full_packets
        self.on_event = on_event
        self.bound = time_bound(scenario)
        self.env = LabEnvironment(scenario, image, log=log or (lambda m: self._note("setup", m)),
                                  lifetime=self.bound + 120)
        self.watch = WireWatch([scenario.port])
        self.stop_event = threading.Event()
        self.events: list[LabEvent] = []
        self.sessions_by_port: dict[str, int] = {}  # client "ip:port" -> session index
        self.session_settings: dict[int, dict] = {}
        self.lost_sessions: set[int] = set()
        self.ready_t: float | None = None
        self.fault_t: float | None = None
        self.end_reason = ""
        self.error: str | None = None
        self._client: subprocess.Popen | None = None
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._capture: TappedCapture | None = None

    # -- context ------------------------------------------------------------------

    def __enter__(self) -> "LabRun":
        self.env.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the client (ours, by its pid), then remove the containers and network. Idempotent."""
        self.stop_event.set()
        client, self._client = self._client, None
        if client is not None:
            try:
                if client.stdin:
                    client.stdin.close()
            except OSError:
                pass
            try:
                client.terminate()
                client.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    client.kill()
                    client.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        for thread in self._threads:
            thread.join(timeout=5)
        self.env.cleanup()

    # -- pieces ------------------------------------------------------------------

    def capture(self) -> TappedCapture:
        """The live capture on the lab bridge; open it before `start()` so the handshake is seen."""
        self._capture = TappedCapture(
            [self.env.bridge], [self.scenario.port], write=self.write, full_packets=self.full_packets,
            tap=self.watch.feed, duration=self.bound + READY_TIMEOUT_S)
        return self._capture

    def start(self) -> None:
        """Start the client and the conductor thread (fault, end)."""
        self._client = self.env.start_client(max_seconds=self.bound + 60)
        reader = threading.Thread(target=self._read_client, name="kaobs-lab-client", daemon=True)
        conductor = threading.Thread(target=self._conduct, name="kaobs-lab-conductor", daemon=True)
        self._threads = [reader, conductor]
        reader.start()
        conductor.start()

    def expectations_for(self, client_endpoint: str, *, judge_vanished: bool = False) -> Expectations:
        """The expectation of the session that owns this client endpoint (the first session's when unknown)."""
        index = self.sessions_by_port.get(client_endpoint, 0)
        return session_expectations(self.scenario, self.scenario.sessions[index], self.env.server_sysctls,
                                    self.env.client_sysctls, judge_vanished=judge_vanished)

    def default_expectations(self) -> Expectations:
        return session_expectations(self.scenario, self.scenario.sessions[0], self.env.server_sysctls, self.env.client_sysctls)

    # -- threads -------------------------------------------------------------------

    def _note(self, kind: str, message: str, **data) -> None:
        event = LabEvent(time.time(), kind, message, data)
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a display problem must not stop the experiment
                pass

    def _read_client(self) -> None:
        client = self._client
        assert client is not None and client.stdout is not None
        for line in client.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _client_event(self, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        kind = record.get("event", "?")
        session = record.get("session")
        if kind == "connected":
            self.sessions_by_port[record["local"]] = session
            options = " ".join(f"-c {n}={v}" for n, v in record.get("options", []))
            self._note(kind, f"session {session} connected from {record['local']}" + (f" (options '{options}')" if options else ""), **record)
        elif kind == "set":
            self._note(kind, f"session {session}: SET {record['name']} = {record['value']}", **record)
        elif kind == "settings":
            self.session_settings[session] = record.get("settings", {})
            shown = ", ".join(f"{k}={v}" for k, v in record.get("settings", {}).items())
            self._note(kind, f"session {session} runs {shown}", **record)
        elif kind == "stopped_reading":
            self._note(kind, f"session {session} asked for a large result and stopped reading ", **record)
        elif kind == "ready":
            self.ready_t = record.get("t", time.time())
            self._note(kind, f"client idle with {record.get('sessions')} session(s)", **record)
        elif kind == "connection_lost":
            self.lost_sessions.add(session)
            self._note(kind, f"session {session}: the client's libpq reports: {record.get('error')}", **record)
        elif kind == "error":
            self.error = f"the lab client failed: {record.get('message')}"
            self._note("error", self.error, **record)
        else:
            self._note(kind, f"client: {kind}", **record)

    def _drain_client(self, timeout: float) -> bool:
        """Handle the client's lines for up to `timeout` s; False once its output ended."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if line is None:
                return False
            self._client_event(line)
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return True

    def _conduct(self) -> None:
        try:
            self._conduct_inner()
        except Exception as error:  # noqa: BLE001 - reported, and the run ends cleanly
            self.error = self.error or f"the lab stopped: {error}"
            self._note("error", self.error)
        finally:
            self.stop_event.set()
            if self._capture is not None:
                self._capture.stop()

    def _conduct_inner(self) -> None:
        scenario = self.scenario
        started = time.monotonic()
        client_alive = True
        while self.ready_t is None:
            if not client_alive or self.error or time.monotonic() - started > CLIENT_READY_TIMEOUT_S:
                self.error = self.error or "the lab client did not get ready"
                self._note("error", self.error)
                return
            client_alive = self._drain_client(0.1)
            if self.stop_event.is_set():
                return
        ready = time.monotonic()
        sessions = len(scenario.sessions)
        survivor = surviving_side(scenario.fault)
        delay = fault_delay(scenario)
        need = scenario.fault_after_answered
        while not self.stop_event.is_set():
            if client_alive:
                client_alive = self._drain_client(0.1)
            else:
                time.sleep(0.1)
            now = time.monotonic()
            if now - ready > self.bound:
                self.end_reason = "time bound"
                self._note("end", f"time bound of {self.bound:.0f} s reached")
                return
            connections, answered, ended, last_end_t = self.watch.snapshot()
            if self.fault_t is None and survivor is not None:
                counts = [answered.get((index, survivor), 0) for index in connections]
                enough = len(connections) >= sessions and all(c >= need for c in counts)
                if enough or (delay is not None and now - ready >= delay):
                    why = (f"after {need} answered {survivor} probe(s)" if enough and need
                           else f"{now - ready:.1f} s after the client went idle" if not enough else "at once")
                    method = self.env.vanish(vanishing_side(scenario.fault) or CLIENT)
                    self.fault_t = time.time()
                    self._note("fault", f"FAULT: the {vanishing_side(scenario.fault)} vanishes {why}: {method}")
            if connections and len(ended) >= len(connections) and (self.fault_t is not None or survivor is None):
                # Every connection ended: let stragglers (retransmitted RSTs) in, then stop. When the
                # client was the one to abort, give its libpq the time to say so too.
                waited = time.time() - last_end_t if last_end_t is not None else 0.0
                told = survivor != CLIENT or len(self.lost_sessions) >= sessions or waited >= LOST_REPORT_WAIT_S
                if waited >= scenario.grace and told:
                    self.end_reason = "ended"
                    self._note("end", "every connection ended")
                    return


def run_plain(lab: LabRun, consume: Callable[[TcpSegment], None] | None = None) -> None:
    """Run `lab` without a live view: read the capture until the conductor stops it (for recorders and tests)."""
    with lab.capture() as capture:
        lab.start()
        for segment in capture:
            if consume is not None:
                consume(segment)
            if lab.stop_event.is_set():
                break


def record_scenario(scenario: Scenario, image: str, path: str, *, full_packets: bool = False,
                    on_event: Callable[[LabEvent], None] | None = None) -> LabRun:
    """Play `scenario` and keep its capture in `path` (headers only unless `full_packets`); return the finished run.

    For recorders (captures/record.py): the returned `LabRun` says what was
    done — `events`, `sessions_by_port`, `session_settings` (SHOW per
    session), `env.server_sysctls`/`env.client_sysctls`, `fault_t`,
    `end_reason`, `expectations_for(client endpoint)` — after everything it
    created was removed. Raises LabError when the run could not happen.
    """
    lab = LabRun(scenario, image, write=path, full_packets=full_packets, on_event=on_event)
    with lab:
        run_plain(lab)
    if lab.error:
        raise LabError(lab.error)
    return lab
