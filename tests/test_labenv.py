"""The lab's pure parts: scenarios, docker argument lists, expectations, time bounds, staleness.

Nothing here needs Docker or root; the privileged suite (test_lab.py) runs
the same scenarios for real.
"""
from __future__ import annotations

import json

import pytest

from analysis.model import CLIENT, SERVER
from kaobs.lab.client import conninfo_for
from kaobs.lab.docker import (
    LABEL,
    LABEL_PID,
    LABEL_STARTED,
    STALE_AFTER_S,
    client_spec,
    docker_run_client,
    docker_run_server,
    is_stale,
)
from kaobs.lab.plan import (
    abort_after_last_answer,
    client_timers,
    expected_end,
    fault_delay,
    server_timers,
    time_bound,
)
from kaobs.lab.run import WireWatch
from kaobs.lab.scenario import (
    FAULT_CLIENT_VANISHES,
    FAULT_NONE,
    FAULT_SERVER_VANISHES,
    MAX_DURATION_S,
    LabError,
    Scenario,
    Session,
    expect_items,
    parse_session,
    scenario_from_options,
    server_command,
    session_expectations,
    session_server_settings,
)
from sniffer.records import record_of
from tests.builders import Conversation

KERNEL = {"net.ipv4.tcp_keepalive_time": 7200, "net.ipv4.tcp_keepalive_intvl": 75, "net.ipv4.tcp_keepalive_probes": 9}


def options(**overrides):
    values = dict(idle="3", interval="2", count="3", user_timeout=None, settings=(), server_sysctls=(), client_sysctls=(),
                  libpq=(), sessions=(), fault=FAULT_CLIENT_VANISHES, answered=2, fault_after=None, duration=None, port=5432)
    values.update(overrides)
    return values


# -- the seed, as docker arguments ------------------------------------------------


def test_seed_server_command_is_the_seeds():
    assert server_command(Scenario()) == [
        "postgres", "--tcp_keepalives_idle=3", "--tcp_keepalives_interval=2", "--tcp_keepalives_count=3"]


def test_docker_run_server_labels_network_and_no_password_in_argv():
    scenario = Scenario(server_sysctls=(("net.ipv4.tcp_keepalive_time", 5),))
    argv = docker_run_server(scenario, "abcd1234", "kaobs-lab-abcd1234", "kaobs/postgres:15-local")
    assert argv[:3] == ["docker", "run", "-d"]
    assert argv[argv.index("--network") + 1] == "kaobs-lab-abcd1234"
    assert f"{LABEL}=abcd1234" in argv
    assert any(a.startswith(f"{LABEL_PID}=") for a in argv) and any(a.startswith(f"{LABEL_STARTED}=") for a in argv)
    # -e NAME without a value: docker takes it from its own environment, so ps never shows it
    assert argv[argv.index("-e") + 1] == "POSTGRES_PASSWORD"
    assert argv[argv.index("--sysctl") + 1] == "net.ipv4.tcp_keepalive_time=5"
    image_at = argv.index("kaobs/postgres:15-local")
    assert argv[image_at + 1:] == server_command(scenario)


def test_docker_run_client_is_a_bounded_sleep_with_its_own_sysctls():
    scenario = Scenario(client_sysctls=(("net.ipv4.tcp_keepalive_probes", 4),))
    argv = docker_run_client(scenario, "id", "net", "img", 83.7)
    assert argv[argv.index("--entrypoint") + 1] == "sleep"
    assert argv[-2:] == ["img", "83"]
    assert "net.ipv4.tcp_keepalive_probes=4" in argv


def test_port_other_than_5432_reaches_postgres():
    assert "--port=5433" in server_command(Scenario(port=5433))


# -- validation: one line for what Postgres, libpq or the kernel would refuse ----------


@pytest.mark.parametrize("changes, words", [
    (dict(fault="explode"), "unknown fault"),
    (dict(server_settings=(("tcp_keepalives_idle", "abc"),)), "tcp_keepalives_idle"),
    (dict(server_settings=(("tcp_keepalives_count", "200"),)), "out of range"),
    (dict(server_settings=(("bad name", "1"),)), "not a GUC name"),
    (dict(client_params=(("password", "x"),)), "the lab sets only"),
    (dict(client_params=(("keepalives_idle", "x"),)), "keepalives_idle"),
    (dict(server_sysctls=(("net.ipv4.ip_forward", 1),)), "only net.ipv4.tcp_keepalive"),
    (dict(sessions=()), "at least one session"),
    (dict(duration=MAX_DURATION_S + 1), "duration"),
    (dict(sessions=(Session(sets=(("tcp_user_timeout", "-5"),)),)), "tcp_user_timeout"),
])
def test_invalid_scenarios_are_one_line_errors(changes, words):
    with pytest.raises(LabError) as error:
        Scenario(**changes)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


# -- per-session settings and expectations ------------------------------------------------


def test_session_settings_layer_server_then_options_then_set():
    scenario = Scenario(server_settings=(("tcp_keepalives_idle", "3"), ("work_mem", "4MB")))
    session = Session(options=(("tcp_keepalives_idle", "2"), ("tcp_keepalives_count", "5")),
                      sets=(("TCP_KEEPALIVES_COUNT", "4"),))
    assert session_server_settings(scenario, session) == {"tcp_keepalives_idle": "2", "tcp_keepalives_count": "4"}
    assert expect_items(scenario, session) == [
        "tcp_keepalives_idle=2", "tcp_keepalives_interval=0", "tcp_keepalives_count=4", "tcp_user_timeout=0"]


def test_expectations_resolve_zero_to_the_measured_kernel_defaults():
    scenario = Scenario(server_settings=(), fault=FAULT_NONE)
    measured = {"net.ipv4.tcp_keepalive_time": 4, "net.ipv4.tcp_keepalive_intvl": 2, "net.ipv4.tcp_keepalive_probes": 3}
    exp = session_expectations(scenario, scenario.sessions[0], measured, KERNEL)
    assert (exp.server.idle.value, exp.server.interval.value, exp.server.count.value) == (4, 2, 3)
    assert "net.ipv4.tcp_keepalive_time=4, read in the server container" in exp.server.idle.source
    assert "--sysctl" not in exp.server.interval.source and "--expect" not in exp.server.user_timeout.source
    assert exp.client.idle.value == 7200 and exp.client.enabled is True


def test_the_vanished_side_is_not_judged():
    client_gone = Scenario()
    exp = session_expectations(client_gone, client_gone.sessions[0], KERNEL, KERNEL)
    assert exp.server.judged() and not exp.client.judged()
    server_gone = Scenario(fault=FAULT_SERVER_VANISHES, client_params=(("keepalives_idle", "2"),))
    exp = session_expectations(server_gone, server_gone.sessions[0], KERNEL, KERNEL)
    assert exp.client.judged() and not exp.server.judged()
    exp = session_expectations(server_gone, server_gone.sessions[0], KERNEL, KERNEL, judge_vanished=True)
    assert exp.server.judged()


def test_each_session_gets_its_own_expectation():
    scenario = Scenario(sessions=(Session(options=(("tcp_keepalives_idle", "2"),)), Session(sets=(("tcp_keepalives_idle", "4"),))))
    idles = [session_expectations(scenario, s, KERNEL, KERNEL).server.idle.value for s in scenario.sessions]
    assert idles == [2, 4]


# -- timers and bounds -------------------------------------------------------------------


def test_seed_timeline_bounds():
    scenario = Scenario()
    timers = server_timers(scenario, scenario.sessions[0])
    assert (timers.idle, timers.interval, timers.count, timers.user_timeout) == (3, 2, 3, 0)
    # two answered probes (3 s, 6 s) come before the fallback fault time, the abort after it
    assert 6 < fault_delay(scenario) < 9
    assert expected_end(scenario) == pytest.approx(fault_delay(scenario) + 3 + 3 * 2)
    assert expected_end(scenario) < time_bound(scenario) <= MAX_DURATION_S


def test_user_timeout_abort_comes_at_the_first_probe_tick_past_it():
    scenario = Scenario(server_settings=(("tcp_keepalives_idle", "1"), ("tcp_keepalives_interval", "1"),
                                         ("tcp_keepalives_count", "10"), ("tcp_user_timeout", "4000")))
    timers = server_timers(scenario, scenario.sessions[0])
    # docs/kernel-keepalive.md: last ACK 2.06, probes 3.08 4.11 5.13, RST 6.15: ~4 s after the last accepted packet
    assert abort_after_last_answer(timers) == pytest.approx(4.0)
    assert abort_after_last_answer(timers) < timers.idle + timers.count * timers.interval


def test_server_vanishing_is_timed_by_the_clients_keepalives():
    scenario = Scenario(server_settings=(), fault=FAULT_SERVER_VANISHES,
                        client_params=(("keepalives_idle", "2"), ("keepalives_interval", "1"), ("keepalives_count", "3")))
    assert client_timers(scenario).idle == 2
    assert expected_end(scenario) == pytest.approx(fault_delay(scenario) + 2 + 3)
    off = scenario.with_(client_params=(("keepalives", "0"),))
    assert client_timers(off) is None and expected_end(off) is None  # nothing would end it: the bound does
    assert time_bound(off) <= MAX_DURATION_S


def test_kernel_default_idle_is_capped_by_the_maximum_duration():
    scenario = Scenario(server_settings=())
    assert server_timers(scenario, scenario.sessions[0]).idle == 7200
    assert time_bound(scenario) == MAX_DURATION_S


def test_explicit_duration_wins():
    assert time_bound(Scenario(duration=12.5)) == 12.5


# -- leftovers ------------------------------------------------------------------------


def test_stale_means_owner_gone_or_too_old():
    now = 1_000_000.0
    alive = {100}.__contains__
    assert is_stale({LABEL_PID: "200", LABEL_STARTED: str(int(now) - 5)}, now, alive)
    assert not is_stale({LABEL_PID: "100", LABEL_STARTED: str(int(now) - 5)}, now, alive)
    assert is_stale({LABEL_PID: "100", LABEL_STARTED: str(int(now - STALE_AFTER_S - 1))}, now, alive)
    # labelled by someone else's tool (no pid, no start): never touched
    assert not is_stale({LABEL: "capt-1"}, now, alive)


# -- the client's side ---------------------------------------------------------------------


def test_client_spec_and_conninfo_carry_settings_but_no_password():
    scenario = Scenario(client_params=(("keepalives_idle", "2"),),
                        sessions=(Session(options=(("tcp_keepalives_idle", "2"),)), Session(sets=(("tcp_keepalives_idle", "4"),))))
    spec = client_spec(scenario, "172.18.0.2", 30)
    assert "password" not in json.dumps(spec).lower()
    first = conninfo_for(spec, spec["sessions"][0])
    assert "keepalives_idle=2" in first and "sslmode=disable" in first and "host=172.18.0.2" in first
    assert "-c tcp_keepalives_idle=2" in first
    assert "options" not in conninfo_for(spec, spec["sessions"][1])
    assert json.loads(json.dumps(spec))["sessions"][1]["sets"] == [["tcp_keepalives_idle", "4"]]


# -- options to scenario (kaobs lab) ------------------------------------------------------------


def test_default_options_are_the_seed():
    assert scenario_from_options(**options()) == Scenario()


def test_options_build_the_scenario():
    scenario = scenario_from_options(**options(
        idle="0", user_timeout="4s", settings=("log_connections=on", "TCP_KEEPALIVES_COUNT=5"),
        server_sysctls=("tcp_keepalive_time=4",), client_sysctls=("net.ipv4.tcp_keepalive_probes=2",),
        libpq=("keepalives_idle=2",), sessions=("options:tcp_keepalives_idle=2", "set:tcp_keepalives_idle=4,tcp_keepalives_count=2"),
        fault=FAULT_SERVER_VANISHES, answered=1, port=5433))
    assert dict(scenario.server_settings) == {"tcp_keepalives_idle": "0", "tcp_keepalives_interval": "2",
                                             "tcp_keepalives_count": "5", "tcp_user_timeout": "4s", "log_connections": "on"}
    assert scenario.server_sysctls == (("net.ipv4.tcp_keepalive_time", 4),)
    assert scenario.client_sysctls == (("net.ipv4.tcp_keepalive_probes", 2),)
    assert scenario.client_params == (("keepalives_idle", "2"),)
    assert scenario.sessions == (Session(options=(("tcp_keepalives_idle", "2"),)),
                                 Session(sets=(("tcp_keepalives_idle", "4"), ("tcp_keepalives_count", "2"))))
    assert (scenario.fault, scenario.fault_after_answered, scenario.port) == (FAULT_SERVER_VANISHES, 1, 5433)


def test_stop_reading_is_a_session_property_without_fault():
    scenario = scenario_from_options(**options(fault="client-stops-reading"))
    assert scenario.fault == FAULT_NONE and all(s.stop_reading for s in scenario.sessions)


@pytest.mark.parametrize("overrides, words", [
    (dict(libpq=("host=evil",)), "--libpq host=evil"),
    (dict(libpq=("keepalives_idle",)), "expected NAME=VALUE"),
    (dict(server_sysctls=("net.core.somaxconn=5",)), "only net.ipv4.tcp_keepalive"),
    (dict(server_sysctls=("tcp_keepalive_time=x",)), "whole number"),
    (dict(sessions=("bogus:tcp_keepalives_idle=2",)), "unknown prefix"),
    (dict(settings=("=3",)), "expected NAME=VALUE"),
])
def test_bad_options_are_one_line_errors(overrides, words):
    with pytest.raises(LabError) as error:
        scenario_from_options(**options(**overrides))
    assert words in str(error.value)


def test_parse_session_forms():
    assert parse_session("default") == Session()
    assert parse_session("stop-reading") == Session(stop_reading=True)
    assert parse_session("tcp_keepalives_idle=2") == Session(sets=(("tcp_keepalives_idle", "2"),))


# -- the wire watch that times the fault ----------------------------------------------------------


def test_wire_watch_counts_answered_probes_per_side_and_ends():
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("server", 3.0).answer("client", 3.0001)
    conv.probe("server", 6.0).answer("client", 6.0001)
    conv.probe("client", 6.5)  # unanswered client probe: counted for nobody
    conv.probe("server", 9.0).probe("server", 11.0).rst("server", 13.0)
    watch = WireWatch([5432])
    watch.feed([record_of(segment) for segment in conv.segments])
    connections, answered, ended, last_end = watch.snapshot()
    assert list(connections) == [1]
    assert answered == {(1, SERVER): 2}
    assert answered.get((1, CLIENT), 0) == 0
    assert ended == {1} and last_end == pytest.approx(conv.t0 + 13.0)


# -- a verdict the zero-window scenario relies on -------------------------------------------------


def test_silence_after_zero_window_probes_is_not_keepalive_idle():
    """The persist timer backs off to gaps longer than the idle; the keepalive timer is off meanwhile."""
    from analysis.expect import build_expectations
    from analysis.model import KeepaliveModel
    from analysis.outlook import LiveMonitor
    from tests.builders import judge_all

    conv = Conversation().handshake().exchange(0.01)
    conv.data("server", 0.05, 1448)
    conv.set_window("client", 0).ack("client", 0.06)
    for t in (0.3, 0.7, 1.5, 3.1, 6.3, 12.7):
        conv.probe("server", t).answer("client", t + 0.0001)
    expectations = build_expectations(["tcp_keepalives_idle=3", "tcp_keepalives_interval=2", "tcp_keepalives_count=3"])
    model = KeepaliveModel([5432]).feed_all(conv.segments)
    end = conv.t0 + 20.0  # the capture runs on, 7.3 s after the last zero-window ACK
    model.finish(end)
    (report,) = judge_all(model, expectations, end)
    assert report.server.window_probe_count == 6 and report.server.probes == []
    assert report.verdict != "mismatch", [f.detail for f in report.server.findings]
    outlook = LiveMonitor(model, expectations).outlook(model.connections[0], SERVER)
    assert outlook.next_probe is None, "no keepalive is due while the window is closed"


# -- the command without Docker ------------------------------------------------------------------


def test_without_docker_the_lab_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kaobs", "lab"], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kaobs: error: Docker is not available"), done.stderr
