"""Postgres awareness without a server: settings resolution, naming connections, per-session notes, dead backends."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rich.console import Console

from analysis.expect import build_expectations
from analysis.kernel_defaults import parse_sysctls
from analysis.model import KeepaliveModel
from analysis.pgsessions import (
    Backend,
    BackendTracker,
    PostgresView,
    ServerInfo,
    abort_checks,
    match_connections,
    normalize_address,
    session_notes,
    staleness_warning,
)
from analysis.pgsettings import (
    GucReading,
    KernelReading,
    apply_session_options,
    server_expectation,
    session_options,
    unix_socket_reason,
)
from analysis.pipeline import AnalysisRun
from analysis.settings import ExpectationError
from analysis.verdict import judge_connection
from kaobs.postgres import explain_connect_error
from kaobs.report import postgres_connection_lines as connection_lines
from kaobs.report import render_text, to_json
from tests.builders import Conversation, Peer

T0 = 1_700_000_000.0
SERVER_IP = "10.9.0.1"


def readings(idle=7, interval=0, count=0, user_timeout=5000, idle_source="command line", session=(7, 75, 9, 5000)):
    return [
        GucReading("tcp_keepalives_idle", idle, session[0], idle_source),
        GucReading("tcp_keepalives_interval", interval, session[1], "default"),
        GucReading("tcp_keepalives_count", count, session[2], "default"),
        GucReading("tcp_user_timeout", user_timeout, session[3], "command line", "/etc/postgresql.conf", 12),
    ]


def server_info(**kw) -> ServerInfo:
    base = dict(address=SERVER_IP, port=5432, version="15.18", own_pid=99, read_at=T0 + 60)
    base.update(kw)
    return ServerInfo(**base)


def backend(pid, port, address="10.9.0.2", start=T0 + 0.01, **kw) -> Backend:
    base = dict(usename="app", datname="shop", application_name="api", client_addr=address, client_hostname=None,
                client_port=port, backend_start=start, state="idle", state_change=start + 0.1)
    base.update(kw)
    return Backend(pid, **base)


def conversation(port: int, t0: float = T0, address: str = "10.9.0.2") -> Conversation:
    return Conversation(client=Peer(address, port, 1000), server=Peer(SERVER_IP, 5432, 900000), t0=t0)


def reports_for(conversations, expectations, end=None):
    model = KeepaliveModel([5432])
    segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    model.feed_all(segments)
    model.finish()
    capture_end = end if end is not None else model.last_t
    return [judge_connection(c, expectations.server, expectations.client, capture_end) for c in model.connections]


# -- the DSN must be TCP ---------------------------------------------------------------


@pytest.mark.parametrize("params, env, unix", [
    ({"host": "/var/run/postgresql"}, None, True),
    ({"host": "@abstract"}, None, True),
    ({}, None, True),
    ({"host": ""}, None, True),
    ({}, "/tmp", True),
    ({}, "db.example", False),
    ({"host": "127.0.0.1"}, None, False),
    ({"host": "/tmp", "hostaddr": "127.0.0.1"}, None, False),
    ({"host": "db1,/tmp"}, None, True),
])
def test_unix_socket_is_detected(params, env, unix):
    reason = unix_socket_reason(params, env)
    assert (reason is not None) == unix
    if unix:
        assert "Unix socket" in reason and "reports 0 for every keepalive setting" in reason


# -- server-side expectation -----------------------------------------------------------------


def test_server_settings_resolve_with_origins():
    explicit = build_expectations().server
    side, lines, warnings = server_expectation(readings(), explicit)
    assert side.enabled is True
    assert (side.idle.value, side.interval.value, side.count.value, side.user_timeout.value) == (7, 75, 9, 5.0)
    assert side.idle.source == "server: command line"
    assert side.interval.source == "server: 0 = kernel default"
    assert "tcp_keepalives_idle = 7 s (pg_settings.source: command line)" in lines[0]
    assert "getsockopt TCP_KEEPINTVL" in lines[1] and "kernel default 75 s" in lines[1]
    assert "/etc/postgresql.conf:12" in lines[3]
    assert warnings == []


def test_kernel_default_from_container_wins_over_socket_and_disagreement_is_warned():
    container = KernelReading({"keepalive_time": 7200, "keepalive_intvl": 30, "keepalive_probes": 9}, "container pg's network namespace")
    side, lines, warnings = server_expectation(readings(), build_expectations().server, container=container)
    assert side.interval.value == 30
    assert "container pg's network namespace" in lines[1]
    assert any("30 from" in w and "75 from" in w for w in warnings)


def test_sysctl_given_by_user_wins_and_local_proc_is_last():
    user_kernel, _ = parse_sysctls(["server:net.ipv4.tcp_keepalive_probes=4"])
    local = KernelReading({"keepalive_time": 7200, "keepalive_intvl": 75, "keepalive_probes": 9}, "this host's /proc/sys")
    side, lines, _ = server_expectation(readings(session=(7, -1, 9, 5000)), build_expectations().server,
                                        user_kernel=user_kernel, local=local)
    assert side.count.value == 4 and "--sysctl server:net.ipv4.tcp_keepalive_probes=4" in lines[2]
    # the server could not read its socket (-1): this host's /proc/sys is the fallback
    assert side.interval.value == 75 and "this host's /proc/sys" in lines[1]


def test_expect_wins_over_server_with_a_warning():
    explicit = build_expectations(["tcp_keepalives_idle=60"]).server
    side, lines, warnings = server_expectation(readings(), explicit)
    assert side.idle.value == 60 and side.idle.source == "--expect"
    assert "--expect tcp_keepalives_idle=60 is used instead" in lines[0]
    assert any("differs from the server's tcp_keepalives_idle" in w for w in warnings)


def test_client_dsn_options_win_over_the_server_wide_value():
    dsn = "host=db options='-c tcp_keepalives_idle=2'"
    explicit, _ = apply_session_options(build_expectations(client_dsn=dsn), dsn)
    side, lines, warnings = server_expectation(readings(), explicit.server)
    assert side.idle.value == 2 and side.interval.value == 75
    assert "tcp_keepalives_idle=2 (client DSN options) [client DSN options=-c (per session)] is used instead" in lines[0]
    assert "--expect" not in lines[0] and any("differs from the server's tcp_keepalives_idle" in w for w in warnings)


def test_cli_unix_socket_dsn_is_refused_before_connecting():
    from pathlib import Path

    seed = Path(__file__).resolve().parents[1] / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap"
    done = subprocess.run([sys.executable, "-m", "kaobs", "analyze", str(seed), "--dsn", "user=monitor password=pw9x"],
                          capture_output=True, text=True, timeout=60, env={k: v for k, v in __import__("os").environ.items()
                                                                            if not k.startswith("PG")})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("kaobs: error: --dsn user=monitor password=***: no host given") and "Unix socket" in line
    assert "pw9x" not in done.stdout + done.stderr and "#1 " in done.stdout


def test_role_level_setting_is_flagged():
    _, _, warnings = server_expectation(readings(idle_source="user"), build_expectations().server)
    assert any("ALTER ROLE" in w for w in warnings)


# -- the application's real DSN -------------------------------------------------------------


@pytest.mark.parametrize("dsn, expected", [
    ("host=db options='-c tcp_keepalives_idle=2'", {"tcp_keepalives_idle": 2}),
    ("host=db options='-ctcp_keepalives_idle=2 -c tcp_user_timeout=4s'", {"tcp_keepalives_idle": 2, "tcp_user_timeout": 4000}),
    ("host=db options='--tcp-keepalives-interval=3 -c work_mem=64MB'", {"tcp_keepalives_interval": 3}),
    ("postgresql://app:s3cret@db/shop?options=-c%20tcp_keepalives_count%3D4&keepalives_idle=30", {"tcp_keepalives_count": 4}),
    ("host=db password=s3cret", {}),
])
def test_session_options_from_the_application_dsn(dsn, expected):
    assert session_options(dsn) == expected


def test_session_options_errors_never_show_the_password():
    with pytest.raises(ExpectationError) as error:
        session_options("host=db password=s3cret options='-c tcp_keepalives_idle=2x'")
    assert "s3cret" not in str(error.value) and "tcp_keepalives_idle" in str(error.value)


def test_application_dsn_options_set_the_server_side():
    dsn = "postgresql://app:s3cret@db/shop?options=-c%20tcp_keepalives_idle%3D2"
    expectations, lines = apply_session_options(build_expectations(client_dsn=dsn), dsn)
    assert expectations.server.idle.value == 2 and "per session" in expectations.server.idle.source
    assert expectations.server.interval.value is None  # not said: not judged
    assert expectations.client.judged() and "s3cret" not in repr(expectations) + " ".join(lines)
    kept, _ = apply_session_options(build_expectations(["tcp_keepalives_idle=5"], dsn), dsn)
    assert kept.server.idle.value == 5


# -- naming connections ----------------------------------------------------------------------


def test_normalize_address():
    assert normalize_address("::ffff:10.0.0.1") == "10.0.0.1"
    assert normalize_address("[fd00:0::2]") == "fd00::2"
    assert normalize_address("10.0.0.1/32") == "10.0.0.1"


def test_connections_are_named_or_told_why_not():
    open_conn = conversation(41000).handshake(0).exchange(0.1)
    ended = conversation(41001).handshake(0).exchange(0.1).fin("client", 0.5).fin("server", 0.51)
    reused = conversation(41002).handshake(0).exchange(0.1).fin("client", 0.5).fin("server", 0.51)
    own = conversation(41003, address="10.9.0.3").handshake(0).exchange(0.1)
    other_port = conversation(41004).handshake(0).exchange(0.1)
    nat = conversation(41006, address="10.9.0.4").handshake(0).exchange(0.1)
    reports = reports_for([open_conn, ended, reused, own, other_port, nat], build_expectations())
    backends = [
        backend(10, 41000),
        backend(12, 41002, start=T0 + 30),  # started long after that connection ended
        backend(13, 50000, address="192.0.2.7"),  # what a NAT/pooler looks like
        backend(99, 41003, address="10.9.0.3"),  # the monitoring session itself: said, never a match
        Backend(14, None, None, None, None, None, None, None, None, None, hidden=True),
    ]
    named = match_connections([r.connection for r in reports], backends, server_info())
    by_port = {r.connection.client.port: named[r.connection.index] for r in reports}
    assert by_port[41000].backend.pid == 10
    assert "ended in the capture (closed (FIN))" in by_port[41001].reason
    assert "client port was reused" in by_port[41002].reason and by_port[41002].backend is None
    assert by_port[41003].reason.startswith("kaobs's own monitoring session (--dsn, backend pid 99)")
    nat_reason = by_port[41006].reason
    assert "192.0.2.7" in nat_reason and "pooler or NAT" in nat_reason and "pg_read_all_stats" in nat_reason
    assert "backends from 10.9.0.2 exist but on other ports" in by_port[41004].reason


def test_backend_older_than_the_syn_is_another_connection():
    conn = conversation(41000, t0=T0 + 100).handshake(0).exchange(0.1)
    reports = reports_for([conn], build_expectations())
    named = match_connections([reports[0].connection], [backend(10, 41000, start=T0)], server_info())
    assert "before this connection's SYN" in named[reports[0].connection.index].reason


def test_other_server_endpoint_is_said():
    conn = conversation(41000).handshake(0).exchange(0.1)
    reports = reports_for([conn], build_expectations())
    named = match_connections([reports[0].connection], [], server_info(address="172.20.0.2"))
    assert "not the address the server has on the --dsn session (172.20.0.2:5432)" in named[1].reason


# -- per-session differences ---------------------------------------------------------------------


def _server_expectations(idle=7):
    side, _, _ = server_expectation(readings(idle=idle, user_timeout=0, session=(idle, 75, 9, 0)), build_expectations().server)
    base = build_expectations()
    from analysis.expect import Expectations
    return Expectations(side, base.client)


def test_session_with_its_own_idle_is_noted_while_others_match():
    expectations = _server_expectations(idle=7)
    server_wide = conversation(41000).handshake(0).exchange(0.1)
    server_wide.probe("server", 7.11).answer("client", 7.111)
    own = conversation(41001).handshake(0).exchange(0.1)
    own.probe("server", 1.11).answer("client", 1.111).probe("server", 2.12).answer("client", 2.121)
    reports = reports_for([server_wide, own], expectations, end=T0 + 8)
    verdicts = {r.connection.client.port: r.verdict for r in reports}
    assert verdicts == {41000: "match", 41001: "mismatch"}
    notes = session_notes(reports, expectations.server, {})
    own_index = next(r.connection.index for r in reports if r.connection.client.port == 41001)
    assert list(notes) == [own_index]
    [text] = notes[own_index]
    assert "tcp_keepalives_idle server-wide 7 s, packets 1.008 s" in text
    assert "#1 agrees" in text and "SET / options=-c" in text and "server-wide value assumed" in text
    assert "SHOW tcp_keepalives_idle" in text


def test_no_connection_agreeing_suggests_a_changed_setting():
    expectations = _server_expectations(idle=7)
    own = conversation(41001).handshake(0).exchange(0.1)
    own.probe("server", 1.11).answer("client", 1.111)
    reports = reports_for([own], expectations, end=T0 + 3)
    [text] = session_notes(reports, expectations.server, {})[1]
    assert "no connection agrees" in text and "changed since the capture" in text


def test_expect_settings_give_no_session_notes():
    expectations = build_expectations(["tcp_keepalives_idle=7"])
    own = conversation(41001).handshake(0).exchange(0.1)
    own.probe("server", 1.11).answer("client", 1.111)
    reports = reports_for([own], expectations, end=T0 + 3)
    assert reports[0].verdict == "mismatch"
    assert session_notes(reports, expectations.server, {}) == {}


# -- dead backends -----------------------------------------------------------------------------------


def _aborted(port=41000):
    conn = conversation(port).handshake(0).exchange(0.1)
    conn.probe("server", 1.11).probe("server", 2.12).rst("server", 3.13)
    return conn


def test_abort_checks():
    expectations = build_expectations(["tcp_keepalives_idle=1", "tcp_keepalives_interval=1", "tcp_keepalives_count=2"])
    reports = reports_for([_aborted(41000), _aborted(41001), _aborted(41002)], expectations)
    assert all(r.server.abort is not None for r in reports)
    index = {r.connection.client.port: r.connection.index for r in reports}
    now = T0 + 4
    backends = [backend(21, 41001, state="active")]  # still there: outlived its abort
    checks = abort_checks(reports, backends, now, known_pids={index[41000]: 20})
    gone = checks[index[41000]]
    assert gone.status == "gone" and gone.pid == 20 and "backend pid 20 is gone" in gone.detail
    alive = checks[index[41001]]
    assert alive.outlived and alive.pid == 21 and "outlived" in alive.detail and "state active" in alive.detail
    unknown_pid = checks[index[41002]]
    assert unknown_pid.status == "gone" and unknown_pid.pid is None and "was not known" in unknown_pid.detail
    assert abort_checks(reports, None, None)[index[41000]].status == "unknown"


def test_backend_tracker_keeps_the_pid_after_the_connection_is_gone():
    conn = conversation(41000).handshake(0).exchange(0.1)
    model = KeepaliveModel([5432])
    model.feed_all(conn.segments)
    tracker = BackendTracker()
    tracker.update(model.connections, [backend(31, 41000)], server_info())
    assert tracker.pid(model.connections[0].index) == 31
    tracker.update(model.connections, [], server_info())  # the row vanished: the pid stays known
    assert tracker.pids == {model.connections[0].index: 31}


# -- reports -----------------------------------------------------------------------------------------


def test_json_and_text_carry_the_postgres_view():
    expectations = build_expectations(["tcp_keepalives_idle=1", "tcp_keepalives_interval=1", "tcp_keepalives_count=2"])
    reports = reports_for([_aborted(41000), conversation(41005).handshake(0).exchange(0.1)], expectations)
    view = PostgresView(dsn="host=db password=***", server=server_info(), settings=readings(),
                        setting_lines=["tcp_keepalives_idle = 7 s (pg_settings.source: command line)"])
    backends = [backend(41, 41005), backend(40, 41000, state="active")]
    view.connections = match_connections([r.connection for r in reports], backends, view.server)
    for i, check in abort_checks(reports, backends, T0 + 5).items():
        view.connections[i].after_abort = check
    run = AnalysisRun(sources=["x.pcap"])
    doc = json.loads(json.dumps(to_json(run, reports, expectations, view)))
    assert doc["postgres"]["server"]["address"] == SERVER_IP
    assert doc["postgres"]["settings"]["tcp_user_timeout"] == {
        "server_wide": 5000, "unit": "ms", "source": "command line", "sourcefile": "/etc/postgresql.conf",
        "sourceline": 12, "monitoring_session": 5000}
    assert doc["postgres"]["backends_outlived_abort"] == 1
    first, second = doc["connections"]
    assert first["postgres"]["after_abort"]["status"] == "alive" and first["postgres"]["after_abort"]["pid"] == 40
    assert second["postgres"]["matched"] and second["postgres"]["backend"]["pid"] == 41
    assert set(second["postgres"]["backend"]) == {"pid", "usename", "datname", "application_name", "client_hostname",
                                                   "backend_start", "state", "state_change"}
    assert to_json(run, reports, expectations)["connections"][0]["postgres"] is None
    console = Console(record=True, width=300)
    render_text(console, run, reports, expectations, view)
    text = console.export_text()
    assert "postgres: 10.9.0.1:5432 (PostgreSQL 15.18) via --dsn host=db password=***" in text
    assert "postgres: backend pid 41, user app, database shop, application_name 'api'" in text
    assert "postgres: FINDING backend pid 40 is still in pg_stat_activity" in text
    assert [line for line, alarm in connection_lines(view, reports[0].connection.index) if alarm]


def test_staleness_warning():
    assert staleness_warning(T0, T0 + 60) is None
    assert "2.0 h before the server was read" in staleness_warning(T0, T0 + 7200)


# -- connection errors: one line, never a password -----------------------------------------------------


@pytest.mark.parametrize("message, needle", [
    ('connection failed: connection to server at "172.20.0.2", port 5432 failed: FATAL:  password authentication '
     'failed for user "monitor"', "authentication failed at 172.20.0.2:5432"),
    ('connection failed: connection to server at "172.20.0.2", port 5999 failed: Connection refused\n\tIs the server '
     'running on that host and accepting TCP/IP connections?', "connection refused at 172.20.0.2:5999"),
    ('connection failed: connection to server at "10.1.1.1", port 5432 failed: timeout expired', "no answer at 10.1.1.1:5432 within 3 s"),
    ('connection failed: connection to server at "172.20.0.2", port 5432 failed: fe_sendauth: no password supplied', "asks for a password"),
])
def test_connect_errors_are_one_line(message, needle):
    line = explain_connect_error(message, "host=db password=***", 3)
    assert "\n" not in line and needle in line and line.startswith("--dsn host=db password=***: ")


def test_cli_client_dsn_with_password_and_options_never_echoes_it():
    from pathlib import Path

    seed = Path(__file__).resolve().parents[1] / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap"
    dsn = "postgresql://app:s3cr3tpw@db/shop?options=-c%20tcp_keepalives_idle%3D3&keepalives_idle=30"
    done = subprocess.run([sys.executable, "-m", "kaobs", "analyze", str(seed), "--client-dsn", dsn, "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert "s3cr3tpw" not in done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["expectations"]["server"]["idle"]["value"] == 3
    assert doc["connections"][0]["sides"]["server"]["findings"][0]["status"] == "match"
