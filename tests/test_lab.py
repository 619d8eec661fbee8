"""The privileged validation suite: `kaobs lab` scenarios run for real, checked against the kernel's configuration.

Each scenario starts Postgres in Docker (KAOBS_LAB_IMAGE, default the local
kaobs/postgres:15-local), a psycopg client in a container of its own, a
fault, and live capture, exactly as a user's `kaobs lab --format json`
does; the test then checks the JSON report against what the settings tell
the kernel to do — probe counts, idle and interval within the timer-wheel
tolerance of `analysis.tolerance` (never a number copied from one run), the
abort and its reason, the verdict and the exit code — and that nothing the
lab created is left behind.

The scenarios are independent, so they run a few at a time in the
background (KAOBS_LAB_PARALLEL, default 3) as soon as the module starts;
each test waits for its own. Kernel timers and capture timestamps do not
depend on user-space load, so running side by side does not blur them.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from analysis.tolerance import timer_tolerance

pytestmark = pytest.mark.privileged

IMAGE = os.environ.get("KAOBS_LAB_IMAGE", "kaobs/postgres:15-local")
PARALLEL = max(1, int(os.environ.get("KAOBS_LAB_PARALLEL", "3")))
RUN_TIMEOUT_S = 150

SEED = ["--tcp-keepalives-idle", "3", "--tcp-keepalives-interval", "2", "--tcp-keepalives-count", "3"]
SEED_PCAP = os.path.join(tempfile.gettempdir(), f"kaobs-lab-seed-{os.getpid()}.pcap")
SEED_HTML = os.path.join(tempfile.gettempdir(), f"kaobs-lab-seed-{os.getpid()}.html")
SCENARIOS: dict[str, list[str]] = {
    "seed": [*SEED, "--write", SEED_PCAP, "--html", SEED_HTML],
    "server_vanishes": ["--tcp-keepalives-idle", "0", "--tcp-keepalives-interval", "0", "--tcp-keepalives-count", "0",
                        "--fault", "server-vanishes", "--libpq", "keepalives_idle=2", "--libpq", "keepalives_interval=1",
                        "--libpq", "keepalives_count=3"],
    "user_timeout": ["--tcp-keepalives-idle", "1", "--tcp-keepalives-interval", "1", "--tcp-keepalives-count", "10",
                     "--tcp-user-timeout", "4000", "--answered", "1"],
    "per_session": ["--tcp-keepalives-idle", "0", "--tcp-keepalives-interval", "1", "--tcp-keepalives-count", "2",
                    "--session", "options:tcp_keepalives_idle=2", "--session", "set:tcp_keepalives_idle=4"],
    "kernel_defaults": ["--tcp-keepalives-idle", "0", "--tcp-keepalives-interval", "0", "--tcp-keepalives-count", "0",
                        "--server-sysctl", "net.ipv4.tcp_keepalive_time=2", "--server-sysctl", "net.ipv4.tcp_keepalive_intvl=1",
                        "--server-sysctl", "net.ipv4.tcp_keepalive_probes=3"],
    "healthy": ["--tcp-keepalives-idle", "2", "--tcp-keepalives-interval", "1", "--fault", "none", "--duration", "9"],
    "zero_window": [*SEED, "--fault", "client-stops-reading", "--duration", "12"],
    "wrong_expectation": [*SEED, "--expect", "tcp_keepalives_idle=5", "--expect", "tcp_keepalives_interval=2",
                          "--expect", "tcp_keepalives_count=3"],
}
LIVE_COLUMNS, LIVE_ROWS = 100, 30
LIVE_SCENARIOS: dict[str, tuple[list[str], bool]] = {
    # the per-session scenario as a person watches it: in a pipe (one line per event) and on a terminal
    "per_session_lines": (SCENARIOS["per_session"], False),
    "per_session_terminal": (SCENARIOS["per_session"], True),
}


@dataclass
class LabResult:
    name: str
    returncode: int
    report: dict | None
    stderr: str
    seconds: float
    text: str = ""  # the text output (live part, then the report), for the live scenarios

    def explain(self) -> str:
        return f"kaobs lab ({self.name}) exit {self.returncode} after {self.seconds:.1f} s; stderr:\n{self.stderr[-3000:]}"


def kaobs_lab(args: list[str], name: str) -> LabResult:
    started = time.monotonic()
    env = dict(os.environ, KAOBS_LAB_IMAGE=IMAGE)
    done = subprocess.run([sys.executable, "-m", "kaobs", "lab", *args, "--format", "json"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    report = None
    if done.stdout.strip():
        report = json.loads(done.stdout)
    return LabResult(name, done.returncode, report, done.stderr, time.monotonic() - started)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def kaobs_lab_text(args: list[str], name: str, terminal: bool) -> LabResult:
    """`kaobs lab ARGS` with its text output to a pipe, or to a terminal (a pty of LIVE_COLUMNS x LIVE_ROWS)."""
    started = time.monotonic()
    env = dict(os.environ, KAOBS_LAB_IMAGE=IMAGE)
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    command = [sys.executable, "-m", "kaobs", "lab", *args]
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
        return LabResult(name, done.returncode, None, done.stderr, time.monotonic() - started, done.stdout)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LIVE_ROWS, LIVE_COLUMNS, 0, 0))
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=err, env=env)
        os.close(slave)
        chunks: list[bytes] = []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1.0)
                if not ready:
                    if process.poll() is not None:
                        break
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            returncode = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            os.close(master)
        err.seek(0)
        stderr = err.read()
    raw = b"".join(chunks).decode(errors="replace").replace("\x1b[2K", "\n")  # rich erases a frame line by line
    text = ANSI.sub("", raw).replace("\r", "")
    return LabResult(name, returncode, None, stderr, time.monotonic() - started, text)


def run_scenario(name: str) -> LabResult:
    if name in LIVE_SCENARIOS:
        args, terminal = LIVE_SCENARIOS[name]
        return kaobs_lab_text(args, name, terminal)
    return kaobs_lab(SCENARIOS[name], name)


_pool: ThreadPoolExecutor | None = None
_futures: dict[str, Future] = {}


def uses(name: str):
    """Mark a test with the lab scenario it checks (started early, in the background)."""
    def mark(function):
        function.lab_scenario = name
        return function
    return mark


@pytest.fixture(scope="module", autouse=True)
def lab_runs(request):
    """Start every scenario the collected tests use, a few at a time, in test order."""
    global _pool
    _pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="kaobs-lab-test")
    for item in request.session.items:
        name = getattr(getattr(item, "function", None), "lab_scenario", None)
        if name and name not in _futures:
            _futures[name] = _pool.submit(run_scenario, name)
    yield
    _pool.shutdown(wait=True, cancel_futures=True)
    _futures.clear()


def result_of(name: str) -> LabResult:
    if name not in _futures:
        assert _pool is not None
        _futures[name] = _pool.submit(run_scenario, name)
    result = _futures[name].result(timeout=RUN_TIMEOUT_S * 3)
    print(f"\n{name}: exit {result.returncode} in {result.seconds:.1f} s")
    return result


# -- checks ----------------------------------------------------------------------------


def assert_timer(observed: float | None, setting_s: float, what: str) -> None:
    """Observed within the window the kernel's timer wheel allows around the setting."""
    assert observed is not None, f"{what}: not observed"
    tolerance = timer_tolerance(setting_s)
    assert setting_s - tolerance.early <= observed <= setting_s + tolerance.late, (
        f"{what}: observed {observed:.3f} s, setting {setting_s:g} s, {tolerance.basis}")


def keepalives(side: dict) -> list[dict]:
    return [p for p in side["probes"] if p["kind"] == "keepalive"]


def assert_cleaned_up(report: dict) -> None:
    run_id = report["lab"]["run_id"]
    containers = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=kaobs.lab={run_id}"],
                                capture_output=True, text=True, check=True).stdout.split()
    networks = subprocess.run(["docker", "network", "ls", "-q", "--filter", f"label=kaobs.lab={run_id}"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert containers == [] and networks == [], f"left behind by run {run_id}: {containers + networks}"
    assert not os.path.exists(f"/sys/class/net/{report['lab']['bridge']}")


def assert_vanished_after_answers(report: dict, prober: dict, answered: int, count: int, idle: float, interval: float) -> None:
    """The prober's probes were answered `answered` times, then `count` went unanswered and it aborted."""
    probes = keepalives(prober)
    assert prober["answered_probes"] == answered, probes
    assert [p["answered"] for p in probes] == [True] * answered + [False] * count
    fault_t = report["lab"]["fault"]["t"]
    assert probes[answered - 1]["answer_t"] < fault_t < probes[answered]["t"], "the fault came between the last answer and the next probe"
    assert prober["abort"] is not None and prober["abort"]["reason"] == "keepalive_count"
    assert prober["observed"]["count"] == count
    assert_timer(prober["observed"]["idle"], idle, "idle")
    assert_timer(prober["observed"]["interval"], interval, "interval")
    # every unanswered probe and the abort: one interval after the previous
    times = [p["t"] for p in probes[answered:]] + [prober["abort"]["t"]]
    for before, after in zip(times, times[1:]):
        assert_timer(after - before, interval, "gap between unanswered probes")


# -- the scenarios ---------------------------------------------------------------------------


@uses("seed")
def test_seed_client_vanishes_server_3_2_3():
    result = result_of("seed")
    assert result.returncode == 0, result.explain()
    report = result.report
    (conn,) = report["connections"]
    assert conn["verdict"] == "match" and conn["end_reason"] == "keepalive_abort"
    server, client = conn["sides"]["server"], conn["sides"]["client"]
    assert_vanished_after_answers(report, server, answered=2, count=3, idle=3, interval=2)
    assert keepalives(client) == []  # libpq default: the client's kernel would wait 7200 s
    assert {f["setting"]: f["status"] for f in server["findings"]} == {
        "tcp_keepalives_idle": "match", "tcp_keepalives_interval": "match", "tcp_keepalives_count": "match",
        "tcp_user_timeout": "unobservable"}
    assert report["lab"]["sessions"][0]["shown"] == {
        "tcp_keepalives_idle": "3", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3", "tcp_user_timeout": "0"}
    assert report["lab"]["server"]["command"] == ["postgres", "--tcp_keepalives_idle=3", "--tcp_keepalives_interval=2",
                                                  "--tcp_keepalives_count=3"]
    assert_cleaned_up(report)
    # --html: the page of the run, written at its end
    try:
        with open(SEED_HTML, encoding="utf-8") as page:
            html = page.read()
    finally:
        if os.path.exists(SEED_HTML):
            os.unlink(SEED_HTML)
    assert f'data-connection="{conn["id"]}" data-verdict="match" data-probes="{len(keepalives(server))}"' in html
    assert f"kaobs: timelines written to {SEED_HTML} (1 connection(s) drawn" in result.stderr
    # --write: the headers-only pcap, analyzed as a file, tells the same story as the live run
    try:
        done = subprocess.run([sys.executable, "-m", "kaobs", "analyze", SEED_PCAP, "--format", "json",
                               "--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=2",
                               "--expect", "tcp_keepalives_count=3"], capture_output=True, text=True, timeout=60)
    finally:
        if os.path.exists(SEED_PCAP):
            os.unlink(SEED_PCAP)
    assert done.returncode == 0, done.stderr
    (from_file,) = json.loads(done.stdout)["connections"]
    assert from_file["verdict"] == "match"
    # pcap keeps microseconds; the live capture had the kernel's nanoseconds
    assert [p["t"] for p in from_file["sides"]["server"]["probes"]] == pytest.approx([p["t"] for p in server["probes"]], abs=2e-6)
    assert from_file["sides"]["server"]["abort"]["reason"] == server["abort"]["reason"]
    assert from_file["sides"]["server"]["abort"]["t"] == pytest.approx(server["abort"]["t"], abs=2e-6)


@uses("server_vanishes")
def test_server_vanishes_under_client_keepalives():
    result = result_of("server_vanishes")
    assert result.returncode == 0, result.explain()
    report = result.report
    (conn,) = report["connections"]
    assert conn["verdict"] == "match" and conn["end_reason"] == "keepalive_abort"
    server, client = conn["sides"]["server"], conn["sides"]["client"]
    assert_vanished_after_answers(report, client, answered=2, count=3, idle=2, interval=1)
    assert keepalives(server) == []  # GUCs 0: the server's namespace default, 7200 s
    assert {f["setting"]: f["status"] for f in client["findings"]}["keepalives_count"] == "match"
    lost = [e for e in report["lab"]["events"] if e["kind"] == "connection_lost"]
    assert lost and "timed out" in lost[0]["message"], "the client's libpq should report the kernel's ETIMEDOUT"
    assert lost[0]["t"] >= client["abort"]["t"] - 0.05
    assert_cleaned_up(report)


@uses("user_timeout")
def test_tcp_user_timeout_aborts_before_the_count():
    result = result_of("user_timeout")
    assert result.returncode == 0, result.explain()
    (conn,) = result.report["connections"]
    assert conn["verdict"] == "match"
    server = conn["sides"]["server"]
    assert server["abort"]["reason"] == "user_timeout"
    unanswered = [p for p in keepalives(server) if not p["answered"]]
    assert 1 <= len(unanswered) < 10, "tcp_user_timeout=4000 must abort long before tcp_keepalives_count=10"
    # The abort comes at the first probe tick once 4 s passed since the last accepted packet.
    elapsed = server["observed"]["user_timeout"]
    tolerance = timer_tolerance(1)
    assert 4.0 - tolerance.early <= elapsed <= 4.0 + 1 + tolerance.late, elapsed
    findings = {f["setting"]: f["status"] for f in server["findings"]}
    assert findings["tcp_user_timeout"] == "match" and findings["tcp_keepalives_count"] == "unobservable"
    assert_timer(server["observed"]["idle"], 1, "idle")
    assert_cleaned_up(result.report)


@uses("per_session")
def test_per_session_settings_on_two_connections_at_once():
    result = result_of("per_session")
    assert result.returncode == 0, result.explain()
    report = result.report
    sessions = report["lab"]["sessions"]
    idle_by_client = {s["client"]: int(s["shown"]["tcp_keepalives_idle"]) for s in sessions}
    assert sorted(idle_by_client.values()) == [2, 4], "SHOW must report each session's own idle"
    assert len(report["connections"]) == 2
    first_probes = []
    for conn in report["connections"]:
        assert conn["verdict"] == "match", conn["client"]
        server = conn["sides"]["server"]
        idle = idle_by_client[conn["client"]]
        assert_timer(server["observed"]["idle"], idle, f"idle of {conn['client']}")
        assert_timer(server["observed"]["interval"], 1, "interval")
        assert server["abort"]["reason"] == "keepalive_count" and server["observed"]["count"] == 2
        assert server["answered_probes"] >= 2
        first_probes.append(keepalives(server)[0]["t"])
    # both connections were open and probing at the same time
    ends = [c["end"] for c in report["connections"]]
    assert max(first_probes) < min(ends)
    assert_cleaned_up(report)


FINAL_HEADLINE = re.compile(r"^#(\d+) (MATCH|MISMATCH|UNVERIFIED|NO_KEEPALIVE)  \S+ -> \S+$")
TRUE_ALARM = re.compile(r" ALARM #\d+ server: \d+ of 2 probes unanswered, abort expected at ")


def final_verdicts(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(FINAL_HEADLINE.match, text.splitlines()) if m}


def assert_only_true_alarms(text: str) -> None:
    """The vanished client's unanswered probes are the only thing worth an alarm: no probe overdue, no
    contradicted event, no abort missing (each session runs its own idle; both are judged with it)."""
    alarms = [line for line in text.splitlines() if " ALARM " in line]
    assert alarms, "the vanished client's unanswered probes should raise an alarm"
    false = [line for line in alarms if not TRUE_ALARM.search(line)]
    assert false == [], false


@uses("per_session_lines")
def test_live_lines_agree_with_the_final_report_on_per_session_settings():
    """`kaobs lab` to a pipe with sessions of idle 2 s (options=-c) and 4 s (SET): live and final agree."""
    result = result_of("per_session_lines")
    assert result.returncode == 0, result.explain() + result.text
    text = result.text
    assert_only_true_alarms(text)
    live: dict[str, list[str]] = {}
    for found in re.finditer(r" #(\d+) so far: ([A-Z_]+) ", text):
        live.setdefault(found.group(1), []).append(found.group(2))
    final = final_verdicts(text)
    assert final == {"1": "MATCH", "2": "MATCH"}, text
    assert {index: verdicts[-1] for index, verdicts in live.items()} == final, live
    assert all("MISMATCH" not in verdicts for verdicts in live.values()), live


@uses("per_session_terminal")
def test_live_table_agrees_with_the_final_report_on_per_session_settings():
    """The same on a terminal of 100 x 30: every frame of the table, and nothing wider than the terminal."""
    result = result_of("per_session_terminal")
    assert result.returncode == 0, result.explain() + result.text
    text = result.text
    assert_only_true_alarms(text)
    headings = re.findall(r"^#(\d+) ([A-Z_]+) so far  ", text, flags=re.MULTILINE)
    assert {index for index, _ in headings} == {"1", "2"}, text
    assert all(verdict != "MISMATCH" for _, verdict in headings), headings
    last = {index: verdict for index, verdict in headings}
    final = final_verdicts(text)
    assert final == {"1": "MATCH", "2": "MATCH"} == last, (last, final)
    assert "Ctrl-C: stop and print the report" in text  # the footer was on screen
    wide = [line for line in text.splitlines() if len(line) > LIVE_COLUMNS]
    assert wide == [], wide


@uses("kernel_defaults")
def test_settings_zero_use_the_server_namespaces_kernel_defaults():
    result = result_of("kernel_defaults")
    assert result.returncode == 0, result.explain()
    report = result.report
    measured = report["lab"]["server"]["sysctls"]
    assert measured == {"net.ipv4.tcp_keepalive_time": 2, "net.ipv4.tcp_keepalive_intvl": 1, "net.ipv4.tcp_keepalive_probes": 3,
                        "net.ipv4.tcp_retries2": 15}  # read in the namespace too: it bounds a stall
    assert report["lab"]["client"]["sysctls"] != measured, "the client's namespace keeps its own defaults"
    assert report["lab"]["sessions"][0]["shown"]["tcp_keepalives_idle"] == "2", "Postgres reads the namespace default back"
    (conn,) = report["connections"]
    assert conn["verdict"] == "match"
    assert_vanished_after_answers(report, conn["sides"]["server"], answered=2, count=3, idle=2, interval=1)
    assert "net.ipv4.tcp_keepalive_time=2" in report["expectations"]["server"]["idle"]["source"]
    assert_cleaned_up(report)


@uses("healthy")
def test_healthy_client_answers_every_probe():
    result = result_of("healthy")
    assert result.returncode == 0, result.explain()
    (conn,) = result.report["connections"]
    assert conn["verdict"] == "match" and conn["end_reason"] == "open"
    server = conn["sides"]["server"]
    probes = keepalives(server)
    assert len(probes) >= 3 and all(p["answered"] for p in probes)
    assert server["abort"] is None and server["observed"]["count"] is None
    for previous, probe in zip(probes, probes[1:]):
        assert_timer(probe["t"] - previous["answer_t"], 2, "idle after an answered probe")
    assert result.report["lab"]["fault"]["t"] is None
    assert_cleaned_up(result.report)


@uses("zero_window")
def test_client_that_stops_reading_gets_window_probes_not_keepalives():
    result = result_of("zero_window")
    assert result.returncode == 0, result.explain()
    (conn,) = result.report["connections"]
    assert conn["verdict"] != "mismatch"
    server = conn["sides"]["server"]
    window = [p for p in server["probes"] if p["kind"] == "window"]
    assert server["window_probes"] == len(window) >= 4
    assert keepalives(server) == [], "the keepalive timer never fires while data is queued"
    gaps = [b["t"] - a["t"] for a, b in zip(window, window[1:])]
    assert all(later > earlier * 1.4 for earlier, later in zip(gaps, gaps[1:])), f"persist timer backs off: {gaps}"
    assert gaps[0] < 2, "the first zero-window probes come well before the 3 s keepalive idle"
    assert_cleaned_up(result.report)


@uses("wrong_expectation")
def test_a_wrong_expectation_fails_with_exit_1():
    result = result_of("wrong_expectation")
    assert result.returncode == 1, result.explain()
    (conn,) = result.report["connections"]
    assert conn["verdict"] == "mismatch"
    findings = {f["setting"]: f["status"] for f in conn["sides"]["server"]["findings"]}
    assert findings == {"tcp_keepalives_idle": "mismatch", "tcp_keepalives_interval": "match", "tcp_keepalives_count": "match"}
    assert result.report["expectations"]["server"]["idle"]["value"] == 5
    assert_cleaned_up(result.report)


# -- interruption and leftovers -------------------------------------------------------------


def _lab_objects(run_id: str) -> list[str]:
    out = []
    for command in (["docker", "ps", "-aq"], ["docker", "network", "ls", "-q"]):
        out += subprocess.run([*command, "--filter", f"label=kaobs.lab={run_id}"], capture_output=True, text=True,
                              check=True).stdout.split()
    return out


@pytest.mark.parametrize("when", ["setup", "running"])
def test_sigterm_removes_everything_the_lab_created(when):
    env = dict(os.environ, KAOBS_LAB_IMAGE=IMAGE)
    process = subprocess.Popen([sys.executable, "-m", "kaobs", "lab", *SEED], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    run_id = None
    wanted = "docker run" if when == "setup" else "client idle"
    lines = []
    deadline = time.monotonic() + 90
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"kaobs\.lab=([0-9a-f]{8})", line)
        run_id = run_id or (found.group(1) if found else None)
        if wanted in line or time.monotonic() > deadline:
            break
    assert run_id, "".join(lines)
    if when == "running":
        assert _lab_objects(run_id), "the lab's containers should exist while it runs"
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=60)
    output = "".join(lines) + rest
    assert _lab_objects(run_id) == [], output
    if when == "setup":
        assert process.returncode == 2 and "interrupted" in output, output
    else:
        assert process.returncode in (0, 1), output  # the report of what was seen so far, then cleanup


def test_stale_leftovers_are_removed_and_live_ones_kept():
    """A leftover whose lab process is gone is removed; one of a running lab is not."""
    from kaobs.lab.docker import LABEL, LABEL_PID, LABEL_STARTED, remove_labelled

    dead = subprocess.Popen(["true"])
    dead.wait()
    now = str(int(time.time()))
    names = {"dead": f"kaobs-lab-test-dead-{os.getpid()}", "alive": f"kaobs-lab-test-alive-{os.getpid()}"}
    pids = {"dead": dead.pid, "alive": os.getpid()}
    try:
        for key, name in names.items():
            subprocess.run(["docker", "create", "--name", name, "--network", "none", "--label", f"{LABEL}=test-{key}",
                            "--label", f"{LABEL_PID}={pids[key]}", "--label", f"{LABEL_STARTED}={now}", IMAGE, "true"],
                           capture_output=True, check=True, timeout=60)
        removed = remove_labelled(LABEL, only_stale=True)
        assert names["dead"] in removed
        assert names["alive"] not in removed
        assert _lab_objects("test-alive") != [] and _lab_objects("test-dead") == []
    finally:
        subprocess.run(["docker", "rm", "-f", *names.values()], capture_output=True, timeout=60)


def test_a_missing_image_is_one_line_and_never_pulled():
    done = subprocess.run([sys.executable, "-m", "kaobs", "lab", "--image", "kaobs/no-such-image:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "kaobs/no-such-image:0" in line and "never pulls" in line
    assert "--image kaobs/postgres:15-local" in line and "KAOBS_LAB_IMAGE" in line
    repositories = subprocess.run(["docker", "images", "--format", "{{.Repository}}"], capture_output=True, text=True,
                                  check=True).stdout.split()
    assert "kaobs/no-such-image" not in repositories


def test_record_scenario_keeps_a_pcap_that_reads_back(tmp_path):
    """The recorders' entry point: a scenario played without the live view, its capture read back from the file."""
    from analysis.pipeline import analyze_segments
    from kaobs.lab.run import record_scenario
    from kaobs.lab.scenario import Scenario
    from sniffer.pcapfile import CaptureReader

    scenario = Scenario(server_settings=(("tcp_keepalives_idle", "1"), ("tcp_keepalives_interval", "1"),
                                         ("tcp_keepalives_count", "2")), fault_after_answered=1)
    path = str(tmp_path / "recorded.pcap")
    lab = record_scenario(scenario, IMAGE, path)
    assert lab.end_reason == "ended" and lab.fault_t is not None
    ((client, index),) = lab.sessions_by_port.items()
    model, (report,) = analyze_segments(CaptureReader(path), lab.expectations_for(client))
    assert report.connection.client.endpoint == client and index == 0
    assert report.verdict == "match" and report.server.abort is not None
    assert report.server.answered == 1 and report.server.observed.count == 2
    assert _lab_objects(lab.env.run_id) == []
