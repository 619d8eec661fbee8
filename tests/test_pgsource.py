"""Postgres awareness against a real server in the lab (privileged: Docker, packet capture, netns).

One lab (kaobs.lab) for the module: PostgreSQL 15 started as
``postgres --tcp_keepalives_idle=7 --tcp_user_timeout=5000`` on an internal
Docker network of its own, reached from the host at its bridge address; a
monitoring role with only pg_read_all_settings and pg_read_all_stats; a
psycopg client in the client container's network namespace with three
sessions: S0 on the server-wide settings, S1 with ``SET tcp_keepalives_idle =
2``, S2 with short timers of its own (idle 1, interval 1, count 2,
user_timeout 0) for the vanishing-client test, which comes last because it
cuts the client off.  tcpdump records the lab bridge from before the client
connects.  Everything is removed in a finally (labels kaobs.lab=pgmeta...).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psycopg
import pytest
from rich.console import Console

from analysis.expect import build_expectations
from analysis.gucvalue import parse_guc_value
from analysis.model import KeepaliveModel
from analysis.pipeline import AnalysisRun
from kaobs.postgres import (
    MonitoringSession,
    Postgres,
    read_container_kernel,
)
from kaobs.report import render_text, to_json
from sniffer.pcapfile import CaptureReader
from tests.builders import judge_all

pytestmark = pytest.mark.privileged

IMAGE = os.environ.get("KAOBS_LAB_IMAGE", "kaobs/postgres:15-local")
MONITOR_PASSWORD = "m0n-" + secrets.token_hex(6)
S0, S1, S2 = 0, 1, 2


class Lab:
    env = None
    pcap = ""
    ports: dict[int, int] = {}
    ready_at = 0.0
    superuser_dsn = ""
    monitor_dsn = ""
    plain_dsn = ""


def _kaobs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaobs", *args], capture_output=True, text=True, timeout=timeout)


def _snapshot(lab: Lab) -> str:
    """A copy of the capture so far (tcpdump -U writes whole packets as they come)."""
    copy = tempfile.NamedTemporaryFile(prefix="kaobs-pgmeta-", suffix=".pcap", delete=False)
    copy.close()
    shutil.copyfile(lab.pcap, copy.name)
    return copy.name


def _model(path: str) -> KeepaliveModel:
    model = KeepaliveModel([5432])
    for segment in CaptureReader(path, warn=lambda message: None):
        model.feed(segment)
    return model


@pytest.fixture(scope="module")
def lab():
    from kaobs.lab.docker import LabEnvironment
    from kaobs.lab.scenario import FAULT_NONE, Scenario, Session

    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump is needed for the privileged Postgres tests")
    scenario = Scenario(
        server_settings=(("tcp_keepalives_idle", "7"), ("tcp_user_timeout", "5000")),
        sessions=(
            Session(),
            Session(sets=(("tcp_keepalives_idle", "2"),)),
            Session(sets=(("tcp_keepalives_idle", "1"), ("tcp_keepalives_interval", "1"),
                          ("tcp_keepalives_count", "2"), ("tcp_user_timeout", "0"))),
        ),
        fault=FAULT_NONE,
        duration=120,
    )
    env = LabEnvironment(scenario, IMAGE, run_id=f"pgmeta{secrets.token_hex(3)}", lifetime=180)
    workdir = tempfile.mkdtemp(prefix="kaobs-pgmeta-")
    tcpdump = client = None
    try:
        env.start()
        ip = env.server.ip
        lab = Lab()
        lab.env = env
        lab.scenario = scenario
        lab.superuser_dsn = f"host={ip} user=postgres dbname=postgres sslmode=disable connect_timeout=5"
        with psycopg.connect(lab.superuser_dsn, password=env.password, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}'")
            conn.execute("GRANT pg_read_all_settings, pg_read_all_stats TO monitor")
            conn.execute(f"CREATE ROLE plain LOGIN PASSWORD '{MONITOR_PASSWORD}'")
        lab.monitor_dsn = f"postgresql://monitor:{MONITOR_PASSWORD}@{ip}:5432/postgres?sslmode=disable"
        lab.plain_dsn = f"host={ip} user=plain password={MONITOR_PASSWORD} dbname=postgres sslmode=disable"
        lab.pcap = os.path.join(workdir, "lab.pcap")
        tcpdump = subprocess.Popen(
            ["timeout", "170", "tcpdump", "-i", env.bridge, "-U", "-s", "128", "-w", lab.pcap, "tcp", "port", "5432"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = tcpdump.stderr.readline()  # "listening on br-...": the capture is running
        assert "listening on" in line, line
        client = env.start_client(max_seconds=150)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = client.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event["event"] == "connected":
                lab.ports[event["session"]] = int(event["local"].rsplit(":", 1)[1])
            elif event["event"] == "error":
                pytest.fail(f"lab client: {event['message']}")
            elif event["event"] == "ready":
                lab.ready_at = time.time()
                break
        assert lab.ready_at and len(lab.ports) == 3, lab.ports
        lab.client = client
        yield lab
    finally:
        if client is not None and client.poll() is None:
            client.terminate()
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
        if tcpdump is not None and tcpdump.poll() is None:
            tcpdump.send_signal(signal.SIGINT)
            try:
                tcpdump.wait(10)
            except subprocess.TimeoutExpired:
                tcpdump.kill()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _backend_pid(lab: Lab, port: int) -> int | None:
    with psycopg.connect(lab.superuser_dsn, password=lab.env.password, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE client_port = %s", (port,)).fetchone()
    return row[0] if row else None


def test_settings_read_from_the_server_match_the_lab_command_line(lab):
    with MonitoringSession(lab.monitor_dsn) as source:
        info = source.server_info()
        readings = {r.name: r for r in source.read_settings()}
    assert info.address == lab.env.server.ip and info.port == 5432 and info.missing_roles == ()
    given = {}
    from kaobs.lab.scenario import server_command

    for arg in server_command(lab.scenario)[1:]:
        name, _, value = arg.removeprefix("--").partition("=")
        given[name] = parse_guc_value(name, value)
    assert given == {"tcp_keepalives_idle": 7, "tcp_user_timeout": 5000}
    for name, value in given.items():
        assert readings[name].server_wide == value and readings[name].source == "command line"
    # not on the command line: 0 = the kernel default, which the server reads back from its TCP socket
    kernel = lab.env.server_sysctls
    assert readings["tcp_keepalives_interval"].server_wide == 0 and readings["tcp_keepalives_interval"].source == "default"
    assert readings["tcp_keepalives_interval"].session == kernel["net.ipv4.tcp_keepalive_intvl"]
    assert readings["tcp_keepalives_count"].session == kernel["net.ipv4.tcp_keepalive_probes"]

    snapshot = Postgres.read(lab.monitor_dsn, build_expectations(), container=lab.env.server.name)
    server = snapshot.expectations.server
    assert (server.idle.value, server.interval.value, server.count.value, server.user_timeout.value) == (
        7, kernel["net.ipv4.tcp_keepalive_intvl"], kernel["net.ipv4.tcp_keepalive_probes"], 5.0)
    assert any(f"container {lab.env.server.name}'s network namespace" in line for line in snapshot.view.setting_lines)
    assert snapshot.view.warnings == []  # the container's sysctls and the socket's read-back agree
    values = read_container_kernel(lab.env.server.name).values
    assert values["keepalive_time"] == kernel["net.ipv4.tcp_keepalive_time"]


def test_without_pg_read_all_stats_other_sessions_are_hidden(lab):
    with MonitoringSession(lab.plain_dsn) as source:
        info = source.server_info()
        backends = [b for b in source.poll_backends() if b.pid != info.own_pid]
    assert set(info.missing_roles) == {"pg_read_all_settings", "pg_read_all_stats"}
    assert len(backends) >= 3 and all(b.hidden and b.client_addr is None for b in backends)


def test_sessions_are_named_and_a_per_session_set_is_reported(lab):
    # S0's first server probe is due 7 s after its last packet; give it 7 s plus the timer tolerance.
    wait = lab.ready_at + 8.0 - time.time()
    if wait > 0:
        time.sleep(wait)
    pcap = _snapshot(lab)
    try:
        done = _kaobs("analyze", pcap, "--dsn", lab.monitor_dsn, "--format", "json")
        text = _kaobs("analyze", pcap, "--dsn", lab.monitor_dsn)
    finally:
        os.unlink(pcap)
    assert MONITOR_PASSWORD not in done.stdout + done.stderr + text.stdout + text.stderr
    assert done.returncode == 1, done.stderr  # S1 and S2 contradict the server-wide idle
    doc = json.loads(done.stdout)
    assert doc["postgres"]["error"] is None and doc["postgres"]["settings"]["tcp_keepalives_idle"]["server_wide"] == 7
    by_port = {int(c["client"].rsplit(":", 1)[1]): c for c in doc["connections"]}
    assert set(lab.ports.values()) <= set(by_port)
    for session, port in lab.ports.items():
        pg = by_port[port]["postgres"]
        assert pg["matched"], pg["reason"]
        backend = pg["backend"]
        assert backend["pid"] == _backend_pid(lab, port)
        assert backend["usename"] == "postgres" and backend["datname"] == "postgres"
        assert backend["application_name"] == f"kaobs-lab-{session}" and backend["state"] == "idle"
        assert abs(backend["backend_start"] - by_port[port]["start"]) < 2.0
    s0, s1 = by_port[lab.ports[S0]], by_port[lab.ports[S1]]
    assert s0["verdict"] == "match" and s0["postgres"]["session_notes"] == []
    assert s1["verdict"] == "mismatch"
    [note] = s1["postgres"]["session_notes"]
    assert "tcp_keepalives_idle server-wide 7 s, packets 2.0" in note
    assert f"#{s0['id']}" in note and "may have its own setting (SET / options=-c)" in note
    assert "server-wide value assumed" in note and "SHOW tcp_keepalives_idle" in note
    assert text.returncode == 1
    assert f"postgres: backend pid {s1['postgres']['backend']['pid']}, user postgres, database postgres" in text.stdout
    assert "per-session setting? tcp_keepalives_idle server-wide 7 s" in text.stdout
    assert "tcp_keepalives_idle = 7 s (pg_settings.source: command line)" in text.stdout


def test_unix_socket_dsn_is_refused_with_the_reason(lab):
    pcap = _snapshot(lab)
    try:
        done = _kaobs("analyze", pcap, "--dsn", f"host=/var/run/postgresql user=monitor password={MONITOR_PASSWORD}")
    finally:
        os.unlink(pcap)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("kaobs: error: --dsn host=/var/run/postgresql user=monitor password=***: ")
    assert "Unix socket" in line and "reports 0 for every keepalive setting" in line
    assert "#1 " in done.stdout  # the packet analysis still ran
    assert MONITOR_PASSWORD not in done.stdout + done.stderr


def test_wrong_password_is_one_line_exit_2_and_the_packets_are_still_analyzed(lab):
    pcap = _snapshot(lab)
    wrong = "Wr0ng-" + secrets.token_hex(4)
    try:
        done = _kaobs("analyze", pcap, "--dsn", f"host={lab.env.server.ip} user=monitor password={wrong}")
        refused = _kaobs("analyze", pcap, "--dsn", f"host={lab.env.server.ip} port=5999 user=monitor", "--format", "json")
    finally:
        os.unlink(pcap)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("kaobs: error: --dsn ") and "authentication failed" in line and 'user "monitor"' in line
    assert wrong not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert "connection(s):" in done.stdout
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert f"connection refused at {lab.env.server.ip}:5999" in line
    doc = json.loads(refused.stdout)
    assert "connection refused" in doc["postgres"]["error"] and doc["connections"]
    watched = _kaobs("watch", "--network", lab.env.network, "--duration", "1", "--format", "json",
                     "--dsn", f"host={lab.env.server.ip} user=monitor password={wrong}")
    assert watched.returncode == 2
    [line] = watched.stderr.strip().splitlines()
    assert line.startswith("kaobs: error: --dsn ") and "authentication failed" in line and wrong not in line
    assert json.loads(watched.stdout)["postgres"]["error"] == line.removeprefix("kaobs: error: ")


BUSY_CLIENT = """
import os, socket, sys, time
import psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
print(sock.getsockname()[1], flush=True)
sock.close()
conn.pgconn.send_query(b"SELECT pg_sleep(20)")
while conn.pgconn.flush():
    time.sleep(0.01)
print("sent", flush=True)
time.sleep(40)
"""


def _start_busy_client(lab: Lab) -> tuple[subprocess.Popen, int]:
    """A session in the client's namespace, with short server timers of its own, busy in a 20 s query."""
    env = lab.env
    dsn = (f"host={env.server.ip} user=postgres dbname=postgres sslmode=disable connect_timeout=5 "
           "application_name=kaobs-pgmeta-busy options='-c tcp_keepalives_idle=1 -c tcp_keepalives_interval=1 "
           "-c tcp_keepalives_count=2 -c tcp_user_timeout=0'")
    busy = subprocess.Popen(["timeout", "60", "nsenter", f"--net={env.client.netns}", sys.executable, "-c", BUSY_CLIENT, dsn],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PGPASSWORD=env.password))
    port = busy.stdout.readline().strip()
    sent = busy.stdout.readline().strip()
    assert port.isdigit() and sent == "sent", (port, sent)
    return busy, int(port)


def _model_now(lab: Lab) -> KeepaliveModel:
    path = _snapshot(lab)
    try:
        return _model(path)
    finally:
        os.unlink(path)


def test_backend_gone_after_a_vanished_clients_abort_and_a_busy_one_outlives_it(lab):
    """Runs last: it cuts the client off.

    S2 (idle 1, interval 1, count 2, idle backend) is aborted ~3 s later and
    its backend exits at once; the busy session (same timers, in pg_sleep(20))
    is aborted too, but its backend does not notice until the query ends: it
    outlives the abort, a finding of its own.
    """
    s2_port = lab.ports[S2]
    pid = _backend_pid(lab, s2_port)
    assert pid is not None
    busy, busy_port = _start_busy_client(lab)
    busy_pid = _backend_pid(lab, busy_port)
    # `kaobs watch --dsn` beside it, as a user runs it: it must reach the same conclusions on its own
    watch = subprocess.Popen([sys.executable, "-m", "kaobs", "watch", "--network", lab.env.network, "--dsn",
                              lab.monitor_dsn, "--duration", "18", "--format", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch_started = time.monotonic()
    live = Postgres.read(lab.monitor_dsn, build_expectations(), live=True, poll_every=0.2, confirm_timeout=4.0)
    expectations = live.expectations
    try:
        wait_until = time.monotonic() + 10  # tcpdump writes what it read; under load it may lag a little
        while True:
            model = _model_now(lab)
            index = {c.client.port: c.index for c in model.connections}
            if {s2_port, busy_port} <= set(index) or time.monotonic() > wait_until:
                break
            time.sleep(0.2)
        live.tick(model.connections, now=time.time())
        s2_index, busy_index = index[s2_port], index[busy_port]
        assert live.tracker.pid(s2_index) == pid and live.tracker.pid(busy_index) == busy_pid  # named while alive
        time.sleep(max(0.0, watch_started + 6.0 - time.monotonic()))  # the watch has seen both sessions probe
        cut_at = time.time()
        lab.env.vanish("client")
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and not {s2_index, busy_index} <= set(live.checks):
            model = _model_now(lab)
            live.tick(model.connections, now=time.time())
            time.sleep(0.3)
        conns = {c.index: c for c in model.connections}
        for i in (s2_index, busy_index):
            assert conns[i].end_reason == "keepalive_abort", conns[i].end_reason
            assert 1.5 < conns[i].server.reset.t - cut_at < 6.0  # idle <= 1 s, then 2 unanswered probes 1 s apart
        check = live.checks[s2_index]
        assert check.status == "gone" and check.pid == pid, check
        assert _backend_pid(lab, s2_port) is None  # ground truth, as the superuser sees it
        outlived = live.checks[busy_index]
        assert outlived.status == "alive" and outlived.pid == busy_pid, outlived
        assert _backend_pid(lab, busy_port) == busy_pid  # still there, in its pg_sleep
        model.finish()
        reports = judge_all(model, expectations, model.last_t)
        view = live.finish(reports)
        watch_out, watch_err = watch.communicate(timeout=40)
    finally:
        live.close()
        busy.kill()
        busy.wait(10)
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    info = view.connections[s2_index]
    assert info.backend is not None and info.backend.pid == pid  # named as last seen alive
    assert info.after_abort.status == "gone"
    assert [i for i, _ in view.outlived()] == [busy_index]
    doc = to_json(AnalysisRun(sources=["lab"]), reports, expectations, view)
    by_id = {c["id"]: c for c in doc["connections"]}
    assert by_id[s2_index]["end_reason"] == "keepalive_abort"
    assert by_id[s2_index]["postgres"]["after_abort"]["status"] == "gone"
    assert by_id[s2_index]["postgres"]["after_abort"]["pid"] == pid
    assert by_id[busy_index]["postgres"]["after_abort"]["status"] == "alive"
    assert by_id[busy_index]["postgres"]["backend"]["application_name"] == "kaobs-pgmeta-busy"
    assert doc["postgres"]["backends_outlived_abort"] == 1
    console = Console(record=True, width=250)
    render_text(console, AnalysisRun(sources=["lab"]), reports, expectations, view)
    text = console.export_text()
    assert f"after the server's keepalive abort: backend pid {pid} is gone from pg_stat_activity" in text
    assert f"postgres: FINDING backend pid {busy_pid} is still in pg_stat_activity" in text and "outlived" in text

    assert watch.returncode == 1, watch_err  # the busy backend outlived its abort (and S1's idle mismatches)
    assert MONITOR_PASSWORD not in watch_out + watch_err
    watched = json.loads(watch_out)
    assert watched["postgres"]["error"] is None and watched["postgres"]["backends_outlived_abort"] == 1
    by_port = {int(c["client"].rsplit(":", 1)[1]): c for c in watched["connections"]}
    assert by_port[s2_port]["end_reason"] == "keepalive_abort"
    assert by_port[s2_port]["postgres"]["backend"]["pid"] == pid
    assert by_port[s2_port]["postgres"]["after_abort"]["status"] == "gone"
    assert by_port[s2_port]["postgres"]["after_abort"]["pid"] == pid
    assert by_port[busy_port]["postgres"]["after_abort"]["status"] == "alive"
    assert f"postgres: FINDING backend pid {busy_pid}" in watch_err  # said live, as it happened
    # its own monitoring session polls on the wire: recognised and left out of the report, which says so
    own = watched["postgres"]["own_session"]
    assert own is not None and own["client"] not in {c["client"] for c in watched["connections"]}
    reasons = [c["postgres"]["reason"] or "" for c in watched["connections"]]
    assert not any(r.startswith("kaobs's own monitoring session (--dsn") for r in reasons)
    assert watched["summary"]["connections"] == len(watched["connections"])


def test_timeout_is_one_line(lab):
    """After the client was cut off (iptables DROP in its namespace) its address answers nothing: a timeout."""
    if not lab.env.fault_method:
        lab.env.vanish("client")
    pcap = _snapshot(lab)
    try:
        started = time.monotonic()
        done = _kaobs("analyze", pcap, "--dsn", f"host={lab.env.client.ip} user=monitor connect_timeout=2")
        took = time.monotonic() - started
    finally:
        os.unlink(pcap)
    assert done.returncode == 2 and took < 30
    [line] = done.stderr.strip().splitlines()
    assert f"no answer at {lab.env.client.ip}:5432 within 2 s" in line, line
