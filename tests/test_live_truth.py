"""Live that tells the truth: the same expectations and verdicts as the final report, on conversations built in code.

The lab runs the same checks for real (tests/test_lab.py, `per_session_*`);
here each piece is checked without a network: per-connection expectations,
alarms for early probes, the verdict-so-far lines, kaobs's own --dsn session
left out, and a terminal view sized to its height with the troubled
connections first.
"""
from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from analysis.expect import build_expectations
from analysis.model import KeepaliveModel
from analysis.outlook import LiveMonitor
from analysis.pgsessions import PostgresView
from kaobs.liveview import LiveHeader, alarm_line, live_table, live_view
from kaobs.watch import run_live
from tests.builders import Conversation, Peer
from tests.test_model import SEED_EXPECT, seed_conversation
from tests.test_pgmeta import backend
from tests.test_watch import FakeClock, ReplayCapture

IDLE2 = build_expectations(["tcp_keepalives_idle=2", "tcp_keepalives_interval=1", "tcp_keepalives_count=2"])
IDLE4 = build_expectations(["tcp_keepalives_idle=4", "tcp_keepalives_interval=1", "tcp_keepalives_count=2"])


def two_sessions() -> list[Conversation]:
    """Two sessions at once, as the lab's per-session scenario: idle 2 (port 41000) and idle 4 (port 41001)."""
    first = Conversation(client=Peer("10.9.0.2", 41000, 1000)).handshake(0).exchange(0.01)
    first.probe("server", 2.02).answer("client", 2.021).probe("server", 4.03).answer("client", 4.031)
    first.probe("server", 6.04).probe("server", 7.05).rst("server", 8.06)
    second = Conversation(client=Peer("10.9.0.2", 41001, 5000)).handshake(0.005).exchange(0.015)
    second.probe("server", 4.03).answer("client", 4.031).probe("server", 8.04).probe("server", 9.05).rst("server", 10.06)
    return [first, second]


def per_session(conn):
    return IDLE4 if conn.client.port == 41001 else IDLE2


def replay_all(conversations, expectations, *, expectations_for=None, hide=None, terminal=False, duration=12.0,
               width=160, height=45, backend_of=None):
    segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    clock = FakeClock(segments[0].t - 0.5)
    capture = ReplayCapture(segments, clock)
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=width, height=height, highlight=False,
                      color_system=None)
    run, reports = run_live(capture, expectations=expectations, ports=(5432,), hz=250, output_format="text",
                            duration=duration, stop=threading.Event(), console=console, title="replay", clock=clock,
                            expectations_for=expectations_for, hide=hide, backend_of=backend_of)
    return run, reports, out.getvalue()


def test_per_session_expectations_raise_no_false_alarm_and_agree_with_the_final_verdict():
    _, reports, text = replay_all(two_sessions(), IDLE2, expectations_for=per_session)
    alarms = [line for line in text.splitlines() if " ALARM " in line]
    assert alarms and all("probes unanswered" in line for line in alarms), alarms  # only the vanished client
    live = {}
    for line in text.splitlines():
        if " so far: " in line:
            index, verdict = line.split(" #", 1)[1].split(" so far: ")
            live[int(index)] = verdict.split()[0]
    final = {r.connection.index: r.verdict.upper() for r in reports}
    assert final == {1: "MATCH", 2: "MATCH"} and live == final


def test_one_expectation_for_both_sessions_is_what_raised_the_false_alarms():
    """The issue's case, kept as a contrast: judged with the first session's idle, the 4 s session alarms."""
    _, reports, text = replay_all(two_sessions(), IDLE2)
    assert any("#2 server: no probe" in line for line in text.splitlines() if " ALARM " in line)
    assert [r.verdict for r in reports] == ["match", "mismatch"]


def test_an_early_probe_raises_an_alarm_as_it_arrives():
    conv = Conversation().handshake(0).exchange(0.01).probe("server", 3.02).answer("client", 3.021)
    expect_idle5 = build_expectations(["tcp_keepalives_idle=5"])
    model = KeepaliveModel()
    model.feed_all(conv.segments)
    monitor = LiveMonitor(model, expect_idle5)
    [alarm] = monitor.alarms(conv.t0 + 3.1)
    assert alarm.kind == "mismatch" and alarm.side == "server"
    line = alarm_line(alarm, conv.t0 + 3.1)
    assert ("ALARM #1 server tcp_keepalives_idle: probe 1 came 3.008 s after the last packet the server accepted, "
            "at +0.012 s, due after 5.000 s: 1.992 s early") in line
    assert monitor.alarms(conv.t0 + 3.3) == []  # once
    assert monitor.verdict(model.connections[0], conv.t0 + 3.1).verdict == "mismatch"


def test_a_late_probe_an_overdue_alarm_announced_is_not_announced_twice():
    conv = Conversation().handshake(0).exchange(0.01).probe("server", 5.02).answer("client", 5.021)
    model = KeepaliveModel()
    monitor = LiveMonitor(model, build_expectations(["tcp_keepalives_idle=3"]))
    segments = list(conv.segments)
    model.feed_all(segments[:-2])
    [overdue] = monitor.alarms(conv.t0 + 4.5)
    assert overdue.kind == "probe_overdue"
    model.feed_all(segments[-2:])
    assert monitor.alarms(conv.t0 + 5.1) == []
    assert monitor.verdict(model.connections[0], conv.t0 + 5.1).verdict == "mismatch"


def test_kaobs_own_session_is_neither_shown_nor_reported():
    own = Conversation(client=Peer("10.9.0.7", 50000, 1000)).handshake(0).exchange(0.01).exchange(1.0)
    conversations = [seed_conversation(), own]
    run, reports, text = replay_all(conversations, build_expectations(SEED_EXPECT),
                                    hide=lambda conn: conn.client.port == 50000, duration=17.0)
    assert [r.connection.client.port for r in reports] == [41000]
    assert "10.9.0.7" not in text and "1 connection(s)" in text.splitlines()[-1]


def test_postgres_recognises_its_own_session_and_says_so_in_the_json():
    from kaobs.postgres import Postgres
    from kaobs.report import to_json
    from tests.test_pgmeta import server_info

    view = PostgresView(dsn="host=db", server=server_info())
    postgres = Postgres("host=db", build_expectations(), view)
    postgres.own_clients.add(("10.9.0.7", 50000))
    model = KeepaliveModel()
    model.feed_all(Conversation(client=Peer("10.9.0.7", 50000, 1000), server=Peer("10.9.0.1", 5432, 9000))
                   .handshake(0).segments)
    model.feed_all(Conversation(client=Peer("10.9.0.7", 50001, 1000), server=Peer("10.9.0.1", 5432, 9000))
                   .handshake(1).segments)
    mine, other = model.connections
    assert postgres.is_own(mine) and not postgres.is_own(other)
    from analysis.pipeline import AnalysisRun

    document = to_json(AnalysisRun(sources=["x"]), [], build_expectations(), view)
    assert document["postgres"]["own_session"] == {"connection": 1, "client": "10.9.0.7:50000", "pid": 99}


# -- the terminal view -----------------------------------------------------------------------


def crowd(count: int) -> list[Conversation]:
    """`count` idle connections, the oldest of which has a probe the settings contradict (4 s, idle 2)."""
    out = []
    for i in range(count):
        conv = Conversation(client=Peer("10.9.0.2", 42000 + i, 1000 + i)).handshake(0.01 * i).exchange(0.01 * i + 0.3)
        out.append(conv)
    out[0].probe("server", 4.31).answer("client", 4.311)
    return out


def test_25_connections_in_45_lines_keep_the_events_and_the_footer_on_screen():
    model = KeepaliveModel()
    conversations = crowd(25)
    model.feed_all(sorted((s for c in conversations for s in c.segments), key=lambda s: s.t))
    monitor = LiveMonitor(model, IDLE2)
    now = conversations[0].t0 + 4.4
    header = LiveHeader(title="t", interfaces=["br"], filter="tcp port 5432", started=now - 5,
                        recent=[f"12:00:0{i} event {i}" for i in range(8)])
    console = Console(record=True, width=100, height=45, color_system=None)
    console.print(live_view(header, model, monitor, now, console.height))
    lines = console.export_text().splitlines()
    assert len(lines) <= 44, len(lines)
    assert lines[-1] == "Ctrl-C: stop and print the report"
    assert "12:00:07 event 7" in lines[-2]
    assert lines[1].startswith("#1 MISMATCH so far  10.9.0.2:42000")  # troubled first, though the oldest
    assert any("more connection(s)" in line for line in lines)
    assert all(len(line) <= 100 for line in lines)


def test_a_short_terminal_keeps_the_footer_and_a_few_events():
    model = KeepaliveModel()
    conversations = crowd(10)
    model.feed_all(sorted((s for c in conversations for s in c.segments), key=lambda s: s.t))
    header = LiveHeader(title="t", interfaces=["br"], filter="f", started=0, recent=[f"event {i}" for i in range(20)])
    console = Console(record=True, width=80, height=12, color_system=None)
    console.print(live_view(header, model, LiveMonitor(model, IDLE2), conversations[0].t0 + 4.4, console.height))
    lines = console.export_text().splitlines()
    assert len(lines) <= 11 and lines[-1] == "Ctrl-C: stop and print the report"
    assert "event 19" in lines[-2] and "event 17" in lines[-4]
    assert lines[1].startswith("#1 MISMATCH so far")


def test_the_backend_is_named_and_empty_sides_have_no_row():
    conv = Conversation().handshake(0).exchange(0.01)
    model = KeepaliveModel()
    model.feed_all(conv.segments)
    console = Console(record=True, width=140, color_system=None)
    console.print(live_table(model, LiveMonitor(model, None), conv.t0 + 1, backend_of=lambda index: backend(777, 41000)))
    lines = console.export_text().splitlines()
    assert lines == [lines[0]] and "pid 777 'api'" in lines[0]  # no expectation, no probe: no side rows


@pytest.mark.parametrize("terminal", [False, True])
def test_verdict_so_far_is_said_when_it_changes(terminal):
    _, [report], text = replay_all([seed_conversation()], build_expectations(SEED_EXPECT), terminal=terminal,
                                   duration=17.0)
    if terminal:
        assert "#1 MATCH so far" in text
    else:
        [line] = [line for line in text.splitlines() if " so far: " in line]
        assert "#1 so far: MATCH (server 1 probe(s), 1 answered; the settings agree)" in line
    assert report.verdict == "match"
