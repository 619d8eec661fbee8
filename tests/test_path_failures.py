"""When the path fails, not the peer (issue 8): stalls, a middlebox's RST, silent drops, the idle cut, the peer back."""
from __future__ import annotations

import pytest

from analysis.expect import build_expectations
from analysis.model import KeepaliveModel
from analysis.outlook import LiveMonitor
from analysis.path import MIDDLEBOXES, PathSummary, idle_advice, recommended_idle
from analysis.pipeline import analyze_segments
from tests.builders import Conversation, Peer

SEED = ("tcp_keepalives_idle=3", "tcp_keepalives_interval=2", "tcp_keepalives_count=3")


def judged(conv: Conversation, expect=(), client_dsn=None, sysctls=(), segments=None):
    expectations = build_expectations(expect, client_dsn, sysctls)
    model, reports = analyze_segments(segments if segments is not None else conv.segments, expectations)
    return model, reports


# -- who sent a RST ------------------------------------------------------------------------------


def test_a_rst_with_a_ttl_the_side_never_used_is_the_paths():
    conv = Conversation()
    conv.server.ttl = 63  # a hop away from the capture point
    conv.handshake().exchange(0.01)
    conv.data("client", 12.0, 20).rst_from_path("server", 12.0001, ttl=64)
    _, [report] = judged(conv)
    cut = report.path_cut
    assert cut is not None and cut.kind == "reset" and cut.far == "server"
    assert "TTL 64, IP ID 0" in cut.evidence and "TTL 63" in cut.evidence and "middlebox" in cut.evidence
    assert cut.idle_before == pytest.approx(12.0 - 0.012, abs=0.01)


def test_a_rst_with_the_sides_own_ttl_is_its_kernels():
    conv = Conversation()
    conv.server.ttl = 63
    conv.handshake().exchange(0.01)
    conv.data("client", 12.0, 20).rst("server", 12.0001)
    _, [report] = judged(conv)
    assert report.path_cut is None and report.connection.end_reason == "reset"


# -- the peer that comes back ---------------------------------------------------------------------


def seed_abort() -> Conversation:
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("server", 3.05).answer("client", 3.0501)
    conv.probe("server", 6.08).answer("client", 6.0801)
    conv.probe("server", 9.08).probe("server", 11.10).probe("server", 13.11).rst("server", 15.13)
    return conv


def test_the_peer_back_after_the_abort_is_learning_of_it_not_answering():
    conv = seed_abort()
    conv.data("client", 19.4, 5)  # its Terminate, 4.3 s after the abort
    conv._emit("server", 19.4001, 0x04, conv.server.next_seq)  # the server's kernel: a bare RST
    _, [report] = judged(conv, SEED)
    assert report.connection.end_reason == "keepalive_abort"
    assert report.server.abort is not None and report.server.abort.t == pytest.approx(conv.t0 + 15.13)
    assert report.connection.end == pytest.approx(conv.t0 + 15.13)
    assert report.verdict == "match"  # not "interval 4.4 s late"
    after = report.after_end
    assert after is not None and after.side == "client" and after.what == "data"
    assert after.t - report.connection.end == pytest.approx(4.27, abs=0.01)
    assert after.told_t == pytest.approx(conv.t0 + 19.4001)


# -- stalls ---------------------------------------------------------------------------------------


def stalled(end: float = 20.0) -> Conversation:
    """The client's query after 10 s idle is never acknowledged: a tail-loss probe, then doubling retransmissions."""
    conv = Conversation().handshake().exchange(0.01)
    before = conv.client.next_seq
    conv.data("client", 10.0, 14)
    for t in (10.20, 10.41, 10.83, 11.66, 13.32):
        conv.resend("client", t, 14)
    conv.ack("server", end, upto=before)  # the capture goes on: an ACK of nothing new (the query never arrived)
    return conv


def test_a_silent_give_up_is_told_by_the_retransmission_that_never_comes():
    conv = stalled()
    segments = conv.segments[:-1]
    model = KeepaliveModel().feed_all(segments)
    model.finish(conv.t0 + 20.0)
    [stall] = model.connections[0].client.stalls
    assert stall.kind == "data" and len(stall.resends) == 5 and stall.first_sent == pytest.approx(conv.t0 + 10.0)
    assert stall.idle_before == pytest.approx(10.0 - 0.012, abs=0.01)
    from analysis.pipeline import judge_in_order

    [report] = judge_in_order(model.connections, build_expectations((), "tcp_user_timeout=5000"), conv.t0 + 20.0)
    [seen] = report.client.stalls
    assert seen.outcome == "gave_up" and seen.retrans_stamp == pytest.approx(conv.t0 + 10.41)  # the TLP set apart
    low, high = seen.gave_up_between
    assert low == pytest.approx(conv.t0 + 13.32) and high == pytest.approx(conv.t0 + 13.32 + 2 * 1.66, abs=0.01)
    assert seen.give_up is not None and seen.give_up.rule == "tcp_user_timeout"
    assert seen.give_up.t == pytest.approx(conv.t0 + 15.41) and seen.mismatch is None
    finding = next(f for f in report.client.findings if f.setting == "tcp_user_timeout")
    assert finding.status == "match"


def test_a_give_up_outside_the_window_contradicts_the_user_timeout():
    conv = stalled()
    _, [report] = judged(conv, client_dsn="tcp_user_timeout=1000")
    [seen] = report.client.stalls
    assert seen.outcome == "gave_up" and seen.mismatch is not None and "tcp_user_timeout=1000 ms" in seen.mismatch
    assert report.verdict == "mismatch"


def test_without_expectations_the_give_up_is_put_in_the_settings_terms():
    conv = stalled()
    _, [report] = judged(conv)
    [seen] = report.client.stalls
    assert seen.give_up is None and seen.inferred is not None
    assert "a tcp_user_timeout of 2.9-6.2 s" in seen.inferred and "not the default tcp_retries2=15" in seen.inferred


def test_a_stall_acknowledged_in_the_end_is_acked():
    conv = Conversation().handshake().exchange(0.01)
    conv.data("client", 10.0, 14).resend("client", 10.2, 14).resend("client", 10.41, 14).ack("server", 10.5)
    _, [report] = judged(conv, client_dsn="")
    [seen] = report.client.stalls
    assert seen.outcome == "acked" and seen.stall.end_t == pytest.approx(conv.t0 + 10.5)


def test_a_stall_at_the_end_of_the_capture_is_open_and_says_what_bounds_it():
    conv = Conversation().handshake().exchange(0.01)
    conv.data("client", 10.0, 14).resend("client", 10.2, 14).resend("client", 10.41, 14).resend("client", 10.83, 14)
    _, [report] = judged(conv, client_dsn="")
    [seen] = report.client.stalls
    assert seen.outcome == "open"
    assert seen.give_up is not None and seen.give_up.rule == "tcp_retries2"
    assert seen.give_up.t - conv.t0 == pytest.approx(10.41 + 924.6, abs=25)  # ~15 min of retransmissions


def test_retries2_from_the_sysctl_bounds_the_stall():
    conv = stalled(end=40.0)
    _, [report] = judged(conv, client_dsn="tcp_user_timeout=0", sysctls=("client:net.ipv4.tcp_retries2=5",))
    [seen] = report.client.stalls
    assert seen.give_up is not None and seen.give_up.rule == "tcp_retries2"
    assert seen.give_up.t - conv.t0 == pytest.approx(10.41 + 12.7, abs=0.5)  # (2^6 - 1) x 0.2 s, on the RTO's ticks


# -- silent drops ---------------------------------------------------------------------------------


def test_unanswered_data_while_the_same_server_answers_elsewhere_is_the_path():
    stuck = stalled(end=20.0)
    busy = Conversation(client=Peer("10.9.0.2", 41001, 5000))
    busy.handshake(0.5)
    for t in range(12, 20, 2):
        busy.exchange(float(t))
    segments = sorted(stuck.segments[:-1] + busy.segments, key=lambda s: s.t)
    _, reports = judged(stuck, segments=segments)
    first = next(r for r in reports if r.connection.client.port == 41000)
    cut = first.path_cut
    assert cut is not None and cut.kind == "drop" and cut.far == "server" and not cut.inferred
    assert "answered connection #2" in cut.evidence and "the server is alive" in cut.evidence


def test_silence_alone_is_no_drop():
    _, [report] = judged(stalled())
    assert report.path_cut is None  # the server may have died: nothing shows it alive


# -- the idle cut ---------------------------------------------------------------------------------


def test_the_idle_cut_lies_between_the_longest_silence_survived_and_the_shortest_cut():
    survivor = Conversation(client=Peer("10.9.0.2", 41001, 5000)).handshake(0.5)
    for t in (0.6, 5.7, 11.0, 16.0):  # the server answers here after the stuck query: it is alive
        survivor.exchange(t)
    stuck = stalled()
    segments = sorted(stuck.segments[:-1] + survivor.segments, key=lambda s: s.t)
    model, reports = judged(stuck, segments=segments)
    summary = PathSummary()
    for report in reports:
        summary.add(report.connection, report.path_cut)
    cut = summary.idle_cut()
    assert cut is not None
    assert cut.lower == pytest.approx(5.298, abs=0.01) and cut.upper == pytest.approx(9.988, abs=0.01)
    advice = idle_advice(cut, 7200.0, None)
    assert "between 5.3 s and 10.0 s" in advice and "server probes start at 2 h" in advice
    assert "tcp_keepalives_idle <= 4" in advice


def test_known_middlebox_defaults_are_named():
    assert any(box.name == "AWS NLB default" and box.seconds == 350 for box in MIDDLEBOXES)
    summary = PathSummary()
    from analysis.path import _Pair

    summary.pairs[("10.0.0.1", "10.0.0.2")] = _Pair(survived=340.0, survived_by=1, died=352.0, died_by=2, cuts=1)
    cut = summary.idle_cut()
    assert cut is not None and "AWS NLB default 350 s" in cut.matches and "AWS NAT gateway 350 s" in cut.matches
    assert recommended_idle(cut.lower) == 300


def test_a_known_idle_cut_makes_a_late_first_probe_a_finding():
    conv = Conversation().handshake().exchange(0.01)
    expectations = build_expectations(("tcp_keepalives_idle=0",), None, ())
    from analysis.verdict import judge_connection

    model = KeepaliveModel().feed_all(conv.segments)
    model.finish(conv.t0 + 1)
    report = judge_connection(model.connections[0], expectations.server, None, conv.t0 + 1, idle_cut=350.0)
    finding = next(f for f in report.server.findings if f.setting == "tcp_keepalives_idle")
    assert finding.status == "mismatch" and "7200 s" in finding.detail and "350 s (--idle-cut)" in finding.detail


# -- live -----------------------------------------------------------------------------------------


def test_a_stall_raises_one_alarm_saying_keepalives_do_not_apply():
    conv = stalled()
    model = KeepaliveModel().feed_all(conv.segments[:-1])
    monitor = LiveMonitor(model, build_expectations((), "tcp_user_timeout=5000"))
    alarms = monitor.alarms(conv.t0 + 13.5)
    [alarm] = [a for a in alarms if a.kind == "stall"]
    assert alarm.side == "client" and "data unacknowledged for 3.5 s, 5 retransmissions" in alarm.message
    assert "keepalives do not apply while data is in flight" in alarm.message
    assert "gives up at" in alarm.message and "by tcp_user_timeout" in alarm.message
    assert not [a for a in monitor.alarms(conv.t0 + 13.6) if a.kind == "stall"]  # once
