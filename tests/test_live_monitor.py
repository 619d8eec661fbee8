"""Live predictions and alarms, on conversations built in code (no capture needed)."""
from __future__ import annotations

import pytest

from analysis.expect import build_expectations
from analysis.model import KeepaliveModel
from analysis.outlook import LiveMonitor
from tests.builders import Conversation
from tests.test_model import SEED_EXPECT, seed_conversation


def monitor_for(conv: Conversation, expect=SEED_EXPECT, upto: float | None = None) -> tuple[LiveMonitor, float]:
    model = KeepaliveModel()
    for segment in conv.segments:
        if upto is None or segment.t <= conv.t0 + upto:
            model.feed(segment)
    return LiveMonitor(model, build_expectations(expect)), conv.t0


def test_peer_silent_alarm_names_the_abort_time():
    monitor, t0 = monitor_for(seed_conversation(), upto=11.2)
    out = monitor.outlook(monitor.model.connections[0], "server")
    assert out.unanswered == 2
    assert out.abort_due == pytest.approx(t0 + 11.098 + 2 * 2)
    assert out.next_probe == pytest.approx(t0 + 13.098)
    [alarm] = monitor.alarms(t0 + 11.2)
    assert alarm.kind == "peer_silent" and "2 of 3 probes unanswered" in alarm.message
    assert monitor.alarms(t0 + 11.3) == []  # raised once


def test_abort_that_does_not_come_raises_an_alarm():
    monitor, t0 = monitor_for(seed_conversation(t_rst=None))
    assert [a.kind for a in monitor.alarms(t0 + 14.0)] == ["peer_silent"]
    assert monitor.alarms(t0 + 15.5) == []  # due at 15.114: within tolerance and grace
    [alarm] = monitor.alarms(t0 + 16.5)
    assert alarm.kind == "abort_missing"


def test_overdue_probe_raises_an_alarm():
    conv = Conversation().handshake().exchange(0.01)  # last accepted 0.012
    monitor, t0 = monitor_for(conv, ("tcp_keepalives_idle=3",))
    out = monitor.outlook(monitor.model.connections[0], "server")
    assert out.next_probe == pytest.approx(t0 + 3.012)
    assert monitor.alarms(t0 + 4.0) == []
    [alarm] = monitor.alarms(t0 + 5.0)
    assert alarm.kind == "probe_overdue" and "not running" in alarm.message


def test_no_expectation_and_no_history_means_no_alarm():
    conv = Conversation().handshake().exchange(0.01)
    monitor, t0 = monitor_for(conv, ())
    assert monitor.alarms(t0 + 100.0) == []


def test_user_timeout_abort_prediction():
    conv = Conversation().handshake().data("client", 2.0).data("server", 2.05, 20).ack("client", 2.06)
    conv.probe("server", 3.08).probe("server", 4.11)
    monitor, t0 = monitor_for(conv, ("tcp_keepalives_idle=1", "tcp_keepalives_interval=1", "tcp_user_timeout=4000"))
    out = monitor.outlook(monitor.model.connections[0], "server")
    assert out.abort_due == pytest.approx(t0 + 6.11)  # first tick at or past 2.06 + 4
