"""The lab's Docker machinery: a network, a server and a client container of its own, faults, and cleanup.

`LabEnvironment` is the I/O edge of the lab. It runs everything on a Docker
network of its own (``--internal``: no route out), labels everything it
creates with ``kaobs.lab=<run id>`` (plus the owning pid and start time, so
that leftovers of a killed run are recognised and removed by the next one),
never touches anything else, and removes what it created when it leaves, also
on errors and signals. The client is a container of its own (``sleep``) whose
network namespace the psycopg client (`kaobs.lab.client`) runs in, from the
host, via ``nsenter``: that makes it an endpoint a fault can cut off. Faults
are applied from the host side in the victim's namespace: every packet
dropped by iptables in both directions, so the victim neither answers nor
probes, like a machine that lost power or a NAT that forgot the flow.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from analysis.settings import CLIENT, SYSCTL_NAMES
from kaobs.lab.plan import time_bound
from kaobs.lab.scenario import (
    FAULT_MIDDLEBOX_DROP,
    MAX_DURATION_S,
    ROUTED_FAULTS,
    LabError,
    Scenario,
    server_command,
    sysctl_args,
)

LABEL = "kaobs.lab"


LABEL_PID = "kaobs.lab.pid"


LABEL_STARTED = "kaobs.lab.started"


DEFAULT_IMAGE = "postgres"


LOCAL_IMAGE = "kaobs/postgres:15-local"


IMAGE_ENV = "KAOBS_LAB_IMAGE"


STALE_AFTER_S = MAX_DURATION_S + 300
"""A labelled leftover older than this belongs to no running lab, even if its pid was reused."""


READY_TIMEOUT_S = 60.0


CLEANUP_PASSES = 6


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
    """What `kaobs.lab.client` gets on its command line (no password: PGPASSWORD is in its environment)."""
    return {
        "host": host,
        "port": scenario.port,
        "libpq": dict(scenario.client_params),
        "sessions": [
            {"index": i, "options": list(s.options), "sets": list(s.sets), "stop_reading": s.stop_reading,
             "every": s.every, "query_after": s.query_after}
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


def image_present(image: str) -> bool:
    try:
        done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def default_image() -> str:
    """The image `kaobs lab` runs without --image: $KAOBS_LAB_IMAGE; else `postgres`, unless only the local build is here.

    scripts/setup.sh builds kaobs/postgres:15-local (no registry needed) and the lab never pulls, so on such a
    machine `kaobs lab` as the README writes it would otherwise stop at "image 'postgres' is not present".
    """
    chosen = os.environ.get(IMAGE_ENV)
    if chosen:
        return chosen
    if not image_present(DEFAULT_IMAGE) and image_present(LOCAL_IMAGE):
        return LOCAL_IMAGE
    return DEFAULT_IMAGE


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
class LabContainer:
    """A running lab container: its name, address and the pid whose network namespace it has."""

    name: str
    ip: str
    pid: int

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"


def nsenter(endpoint: LabContainer, *command: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={endpoint.netns}", *command], capture_output=True, text=True, timeout=timeout)


def read_sysctls(endpoint: LabContainer) -> dict[str, int]:
    """The keepalive sysctls of the endpoint's namespace, read there (a new namespace starts at 7200/75/9)."""
    paths = ["/proc/sys/" + name.replace(".", "/") for name in SYSCTL_NAMES]
    done = nsenter(endpoint, "cat", *paths)
    values = done.stdout.split()
    if done.returncode != 0 or len(values) != len(paths):
        raise LabError(f"cannot read the keepalive sysctls of {endpoint.name}: {' '.join(done.stderr.split())}")
    return {name: int(value) for name, value in zip(SYSCTL_NAMES, values)}


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
        self.routed = scenario.fault in ROUTED_FAULTS
        self.network = f"kaobs-lab-{self.run_id}" + ("-server" if self.routed else "")
        self.network_id = ""
        self.client_network = f"kaobs-lab-{self.run_id}-client" if self.routed else self.network
        self.client_network_id = ""
        self.server: LabContainer | None = None
        self.client: LabContainer | None = None
        self.router: LabContainer | None = None
        self.server_sysctls: dict[str, int] = {}
        self.client_sysctls: dict[str, int] = {}
        self.fault_method = ""
        self._cleaned = False

    @property
    def bridge(self) -> str:
        """The server's network's bridge: what a DBA captures at the database host."""
        return f"br-{self.network_id[:12]}"

    @property
    def client_bridge(self) -> str:
        """The client's network's bridge (the server's, when there is no router between them)."""
        return f"br-{(self.client_network_id or self.network_id)[:12]}"

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
        # Docker's --internal networks drop what is routed between two networks: a router needs plain bridges.
        internal = () if self.routed else ("--internal",)
        self.network_id = docker(
            "network", "create", *internal, *labels(self.run_id), self.network, timeout=60).strip()
        if self.routed:
            self.client_network_id = docker(
                "network", "create", *labels(self.run_id), self.client_network, timeout=60).strip()
        env = dict(os.environ, POSTGRES_PASSWORD=self.password)
        server_cmd = docker_run_server(self.scenario, self.run_id, self.network, self.image)
        self.log(_shown(server_cmd))
        docker(*server_cmd[1:], env=env, timeout=120)
        client_cmd = docker_run_client(self.scenario, self.run_id, self.client_network, self.image, self.lifetime)
        docker(*client_cmd[1:], timeout=120)
        self.server = self._endpoint(f"kaobs-lab-{self.run_id}-server", self.network)
        self.client = self._endpoint(f"kaobs-lab-{self.run_id}-client", self.client_network)
        if self.routed:
            self._start_router()
        self._wait_ready()
        self.server_sysctls = read_sysctls(self.server)
        self.client_sysctls = read_sysctls(self.client)
        for bridge in {self.bridge, self.client_bridge}:
            if not os.path.exists(f"/sys/class/net/{bridge}"):
                raise LabError(f"the lab network's bridge {bridge} is not there")

    def _start_router(self) -> None:
        """A router between the client's and the server's networks that forgets idle connections.

        Its own network namespace runs Linux conntrack in strict mode
        (nf_conntrack_tcp_loose=0: a mid-stream packet of a forgotten flow
        starts nothing) with the established timeout set to the idle cut;
        FORWARD accepts packets of known flows and new SYNs, and drops the
        rest (middlebox-drop) or answers them with a RST (middlebox-reset),
        as a load balancer, NAT or firewall does once it forgot a flow. The
        client's and the server's namespaces route the other network through
        it.
        """
        assert self.server is not None and self.client is not None and self.scenario.idle_cut is not None
        name = f"kaobs-lab-{self.run_id}-router"
        docker("run", "-d", "--name", name, "--network", self.network, *labels(self.run_id),
               "--sysctl", "net.ipv4.ip_forward=1", "--entrypoint", "sleep", self.image, str(int(self.lifetime)),
               timeout=120)
        docker("network", "connect", self.client_network, name, timeout=60)
        info = json.loads(docker("inspect", name, timeout=30))[0]
        networks = info["NetworkSettings"]["Networks"]
        router_server_ip = networks[self.network]["IPAddress"]
        router_client_ip = networks[self.client_network]["IPAddress"]
        self.router = LabContainer(name, router_server_ip, int(info["State"]["Pid"]))
        subnets = {net: json.loads(docker("network", "inspect", net, timeout=30))[0]["IPAM"]["Config"][0]["Subnet"]
                   for net in (self.network, self.client_network)}
        timeout = max(1, int(round(self.scenario.idle_cut)))
        reject = (["-j", "DROP"] if self.scenario.fault == FAULT_MIDDLEBOX_DROP
                  else ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
        steps = [
            (self.client, ["ip", "route", "replace", subnets[self.network], "via", router_client_ip]),
            (self.server, ["ip", "route", "replace", subnets[self.client_network], "via", router_server_ip]),
            (self.router, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0",
                           f"net.netfilter.nf_conntrack_tcp_timeout_established={timeout}"]),
            (self.router, ["iptables", "-w", "5", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
                           "ESTABLISHED,RELATED", "-j", "ACCEPT"]),
            (self.router, ["iptables", "-w", "5", "-A", "FORWARD", "-p", "tcp", "--syn", "-m", "conntrack",
                           "--ctstate", "NEW", "-j", "ACCEPT"]),
            (self.router, ["iptables", "-w", "5", "-A", "FORWARD", *reject]),
        ]
        for container, command in steps:
            done = nsenter(container, *command)
            if done.returncode != 0:
                raise LabError(f"cannot set up the router ({' '.join(command[:3])} in {container.name}): "
                               f"{' '.join(done.stderr.split()) or 'exit ' + str(done.returncode)}")
        self.fault_method = (f"router {name}: conntrack forgets connections idle {timeout} s "
                             f"(nf_conntrack_tcp_timeout_established={timeout}, nf_conntrack_tcp_loose=0), then "
                             + ("drops their packets" if self.scenario.fault == FAULT_MIDDLEBOX_DROP
                                else "answers their packets with a RST"))
        self.log(self.fault_method)

    def _endpoint(self, name: str, network_name: str) -> LabContainer:
        info = json.loads(docker("inspect", name, timeout=30))[0]
        state = info["State"]
        if not state.get("Running"):
            raise LabError(f"{name} is not running: {self._last_log(name)}")
        network = info["NetworkSettings"]["Networks"].get(network_name) or {}
        return LabContainer(name, network.get("IPAddress", ""), int(state["Pid"]))

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
            ["nsenter", f"--net={self.client.netns}", sys.executable, "-m", "kaobs.lab.client", "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile(), env=env, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the checkout
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

    def heal(self, side: str) -> None:
        """Undo `vanish`: the side's packets flow again (--fault client-returns)."""
        victim = self.client if side == CLIENT else self.server
        assert victim is not None
        for chain in ("INPUT", "OUTPUT"):
            done = nsenter(victim, "iptables", "-w", "5", "-D", chain, "-j", "DROP")
            if done.returncode != 0:
                raise LabError(f"cannot bring {victim.name} back: {' '.join(done.stderr.split())}")

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
