"""The keepalive model and verdicts on segments built in code, one rule at a time.

Scenarios and numbers come from docs/kernel-keepalive.md (and the captures it cites).
"""
from __future__ import annotations

import pytest

from analysis.expect import build_expectations
from analysis.model import KeepaliveModel, seq_diff
from analysis.pipeline import analyze_segments
from analysis.tolerance import timer_tolerance, wheel_granularity
from tests.builders import Conversation, Peer


def run(conv: Conversation, expect=(), client_dsn=None, sysctls=(), ports=(5432,)):
    expectations = build_expectations(expect, client_dsn, sysctls)
    model, reports = analyze_segments(conv.segments, expectations, ports)
    return model, reports


def seed_conversation(t_rst: float | None = 15.13) -> Conversation:
    """The seed run: idle 3, interval 2, count 3; two answered probes, then the client vanishes."""
    conv = Conversation().handshake(0.0).exchange(0.040)  # client's last packet at 0.042
    conv.probe("server", 3.054).answer("client", 3.0541)
    conv.probe("server", 6.075).answer("client", 6.0751)
    conv.probe("server", 9.082).probe("server", 11.098).probe("server", 13.114)
    if t_rst is not None:
        conv.rst("server", t_rst)
    return conv


SEED_EXPECT = ("tcp_keepalives_idle=3", "tcp_keepalives_interval=2", "tcp_keepalives_count=3")


def findings(report, side="server"):
    return {f.setting: f for f in report.side(side).findings}


# -- classification -------------------------------------------------------------


def test_seed_probes_answers_and_abort_are_recognised():
    _, [report] = run(seed_conversation())
    server = report.server
    assert server.keepalive_probe_count == 5
    assert server.answered == 2
    assert server.window_probe_count == 0
    assert server.abort is not None and server.abort.reason == "keepalive_count"
    assert server.observed.count == 3
    assert server.observed.idle == pytest.approx(3.007, abs=0.002)  # 9.082 - 6.0751 is the smallest
    assert server.observed.interval == pytest.approx(2.016, abs=0.001)
    assert report.connection.end_reason == "keepalive_abort"
    assert report.client.keepalive_probe_count == 0
    assert report.verdict == "unverified"  # probes seen, nothing expected


def test_seed_matches_its_settings_and_exit_reason():
    _, [report] = run(seed_conversation(), SEED_EXPECT)
    f = findings(report)
    assert {k: v.status for k, v in f.items()} == {
        "tcp_keepalives_idle": "match",
        "tcp_keepalives_interval": "match",
        "tcp_keepalives_count": "match",
    }
    assert report.verdict == "match"


@pytest.mark.parametrize(
    "expect, setting",
    [
        (("tcp_keepalives_idle=5",), "tcp_keepalives_idle"),
        (("tcp_keepalives_interval=1",), "tcp_keepalives_interval"),
        (("tcp_keepalives_count=5", "tcp_keepalives_interval=2"), "tcp_keepalives_count"),
        (("tcp_keepalives_count=2", "tcp_keepalives_interval=2"), "tcp_keepalives_count"),
    ],
)
def test_wrong_expectations_are_mismatches(expect, setting):
    _, [report] = run(seed_conversation(), expect)
    assert findings(report)[setting].status == "mismatch", findings(report)[setting]
    assert report.verdict == "mismatch"


def test_one_byte_probes_of_other_stacks_count():
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("server", 3.02, one_byte=True).answer("client", 3.021)
    _, [report] = run(conv)
    assert report.server.keepalive_probe_count == 1
    assert report.server.answered == 1


def test_data_retransmission_is_not_a_probe():
    conv = Conversation().handshake().data("server", 0.01, 300)
    conv.segments.append(conv.segments[-1].__class__(**{**_fields(conv.segments[-1]), "frame": 99, "t": conv.t0 + 0.3}))
    _, [report] = run(conv)
    assert report.server.keepalive_probe_count == 0
    assert report.server.endpoint.retransmissions == 1


def _fields(segment):
    return {name: getattr(segment, name) for name in segment.__slots__}


def test_zero_window_probes_are_not_keepalives():
    """A client that stops reading: window 0, the server's persist probes share the shape."""
    conv = Conversation().handshake().data("client", 0.01)
    conv.data("server", 0.02, 60000)
    conv.set_window("client", 0).ack("client", 0.05)
    for t in (0.61, 1.07, 1.93, 3.66, 7.21):
        conv.probe("server", t).answer("client", t + 0.0001)
    _, [report] = run(conv, SEED_EXPECT)
    assert report.server.window_probe_count == 5
    assert report.server.keepalive_probe_count == 0
    assert report.verdict != "mismatch"


def test_probe_shape_with_data_in_flight_is_not_a_keepalive():
    conv = Conversation().handshake().exchange(0.01)
    conv.send_unacked("server", 0.5, 200)
    conv.probe("server", 1.0)
    _, [report] = run(conv)
    assert report.server.keepalive_probe_count == 0
    assert report.server.window_probe_count == 1


def test_sequence_numbers_wrap_around():
    conv = Conversation(server=Peer("10.9.0.1", 5432, (1 << 32) - 150))
    conv.handshake().exchange(0.01)  # the server's 300 bytes cross 2**32
    assert conv.segments[-2].seq > conv.segments[-1].ack  # wrapped
    conv.probe("server", 3.02).answer("client", 3.021)
    conv.probe("server", 6.03)
    _, [report] = run(conv)
    assert report.server.keepalive_probe_count == 2
    assert report.server.answered == 1
    assert seq_diff(5, (1 << 32) - 5) == 10
    assert seq_diff((1 << 32) - 5, 5) == -10


def test_connection_that_began_before_the_capture():
    """The first segment seen is a probe at next-1; the peer's ACK tells where next is."""
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("server", 3.02).answer("client", 3.021)
    conv.probe("server", 6.03).answer("client", 6.031)
    conv.segments = [s for s in conv.segments if s.t >= conv.t0 + 3.0]
    _, [report] = run(conv)
    assert report.server.keepalive_probe_count == 2
    assert report.server.answered == 2
    assert not report.connection.saw_syn
    assert report.server.probes[0].anchor is None  # idle unknown for the first
    assert report.server.observed.idle == pytest.approx(3.009, abs=0.001)


def test_first_pure_ack_at_next_is_not_mistaken_for_a_probe():
    conv = Conversation().handshake().exchange(0.01)
    conv.ack("server", 1.0).data("server", 1.5, 50).ack("client", 1.51)
    conv.segments = [s for s in conv.segments if s.t >= conv.t0 + 1.0]
    _, [report] = run(conv)
    assert report.server.keepalive_probe_count == 0


def test_received_probes_do_not_reset_the_receivers_timer():
    """Both sides probing (server idle 3, client idle 2): neither moves the other's schedule."""
    conv = Conversation().handshake().exchange(0.048)  # server's result 0.049, client's ACK 0.050
    conv.probe("client", 2.06).answer("server", 2.065)
    conv.probe("server", 3.25).answer("client", 3.2505)
    conv.probe("client", 4.08).answer("server", 4.0805)
    model, [report] = run(
        conv,
        ("tcp_keepalives_idle=3",),
        client_dsn="host=db keepalives_idle=2 keepalives_interval=1 keepalives_count=2",
    )
    server_probe = report.server.probes[0]
    assert server_probe.anchor == pytest.approx(conv.t0 + 0.050)  # not the client's probe at 2.00
    client_second = report.client.probes[1]
    assert client_second.anchor == pytest.approx(conv.t0 + 2.065)  # the server's ACK, not its probe at 3.25
    assert findings(report, "client")["keepalives_idle"].status == "match"
    assert findings(report, "server")["tcp_keepalives_idle"].status == "match"  # 200 ms late is within 256 ms


def test_answer_lost_between_capture_point_and_prober():
    """An answer on the wire, yet the next probe comes one interval later: it never arrived."""
    conv = Conversation().handshake().exchange(0.01)  # last accepted 0.012
    conv.probe("server", 3.02).answer("client", 3.021)
    conv.probe("server", 5.04).probe("server", 7.06).rst("server", 9.08)
    _, [report] = run(conv, SEED_EXPECT)
    server = report.server
    assert len(server.lost_answers) == 1
    assert server.answered == 0
    assert [p.index for p in server.probes] == [1, 2, 3]
    assert server.abort.unanswered_probes == 3
    assert report.verdict == "match"


def test_user_timeout_replaces_the_count():
    """idle 1, interval 1, count 10, user_timeout 4000: last ACK 2.06, probes 3.08 4.11 5.13, RST 6.15."""
    conv = Conversation().handshake().data("client", 2.0).data("server", 2.05, 20).ack("client", 2.06)
    for t in (3.08, 4.11, 5.13):
        conv.probe("server", t)
    conv.rst("server", 6.15)
    base = ("tcp_keepalives_idle=1", "tcp_keepalives_interval=1", "tcp_keepalives_count=10")
    _, [alone] = run(conv, base)
    assert findings(alone)["tcp_keepalives_count"].status == "mismatch"
    assert alone.verdict == "mismatch"
    _, [with_timeout] = run(conv, base + ("tcp_user_timeout=4000",))
    f = findings(with_timeout)
    assert f["tcp_user_timeout"].status == "match"
    assert f["tcp_keepalives_count"].status == "unobservable"
    assert with_timeout.server.abort.reason == "user_timeout"
    assert with_timeout.verdict == "match"
    _, [too_long] = run(conv, base + ("tcp_user_timeout=8000",))
    assert findings(too_long)["tcp_user_timeout"].status == "mismatch"


def test_probe_sent_after_user_timeout_passed_is_a_mismatch():
    conv = Conversation().handshake().data("client", 2.0).data("server", 2.05, 20).ack("client", 2.06)
    for t in (3.08, 4.11, 5.13, 6.15, 7.17):
        conv.probe("server", t)
    _, [report] = run(conv, ("tcp_keepalives_idle=1", "tcp_keepalives_interval=1", "tcp_user_timeout=4000"))
    assert findings(report)["tcp_user_timeout"].status == "mismatch"


@pytest.mark.parametrize("delay, status", [(3.0, "match"), (3.2, "match"), (3.5, "mismatch"), (2.9, "mismatch")])
def test_idle_tolerance_follows_the_timer_wheel(delay, status):
    conv = Conversation().handshake().exchange(0.01)  # client's last packet 0.012
    conv.probe("server", 0.012 + delay).answer("client", 0.013 + delay)
    _, [report] = run(conv, ("tcp_keepalives_idle=3",))
    assert findings(report)["tcp_keepalives_idle"].status == status
    assert "256 ms" in findings(report)["tcp_keepalives_idle"].detail


def test_missing_probe_over_a_long_idle_span_is_a_mismatch():
    conv = Conversation().handshake().exchange(0.01).exchange(20.0)
    _, [report] = run(conv, ("tcp_keepalives_idle=3",))
    f = findings(report)["tcp_keepalives_idle"]
    assert f.status == "mismatch" and "no keepalive probe" in f.detail


def test_trailing_idle_without_probe_is_a_mismatch_and_short_one_unobservable():
    long_conv = Conversation().handshake().exchange(0.01)
    long_conv.ack("server", 10.0)  # something else on the wire much later; the server never probed
    _, [report] = run(long_conv, ("tcp_keepalives_idle=3",))
    assert findings(report)["tcp_keepalives_idle"].status == "mismatch"
    short = Conversation().handshake().exchange(0.01)
    _, [report] = run(short, ("tcp_keepalives_idle=3",))
    assert findings(report)["tcp_keepalives_idle"].status == "unobservable"
    assert report.verdict == "no_keepalive"


def test_missing_abort_is_a_mismatch():
    conv = seed_conversation(t_rst=None)
    conv.ack("server", 20.0)  # capture goes on past the abort that should have come at ~15.1
    conv.segments.pop()  # a later segment elsewhere would be another connection; use the end instead
    model, [report] = run(conv, SEED_EXPECT)
    # capture ends at the last probe: the abort is not yet due, so nothing to blame
    assert findings(report)["tcp_keepalives_count"].status == "unobservable"
    other = Conversation(client=Peer("10.9.0.3", 41001, 7)).handshake(19.0)
    conv.segments.extend(other.segments)
    _, reports = run(conv, SEED_EXPECT)
    assert findings(reports[0])["tcp_keepalives_count"].status == "mismatch"


def test_client_with_keepalives_off_must_not_probe():
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("client", 7200.5).answer("server", 7200.51)
    _, [report] = run(conv, client_dsn="host=db keepalives=0")
    assert findings(report, "client")["keepalives"].status == "mismatch"
    quiet = Conversation().handshake().exchange(0.01).exchange(30.0)
    _, [report] = run(quiet, client_dsn="host=db keepalives=0")
    assert findings(report, "client")["keepalives"].status == "match"


def test_kernel_default_applies_to_zero_and_sysctl_overrides_it():
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("server", 60.05).answer("client", 60.051)
    _, [default] = run(conv, ("tcp_keepalives_idle=0",))
    assert findings(default)["tcp_keepalives_idle"].status == "mismatch"  # 7200 s default
    _, [tuned] = run(conv, ("tcp_keepalives_idle=0",), sysctls=("net.ipv4.tcp_keepalive_time=60",))
    assert findings(tuned)["tcp_keepalives_idle"].status == "match"


def test_plain_reset_is_not_a_keepalive_abort():
    conv = Conversation().handshake().exchange(0.01).rst("client", 1.0)
    _, [report] = run(conv)
    assert report.connection.end_reason == "reset"
    assert report.client.abort is None and report.server.abort is None


def test_connections_are_told_apart_and_server_found_by_port():
    a = Conversation().handshake().exchange(0.01)
    b = Conversation(client=Peer("10.9.0.7", 50000, 5), server=Peer("10.9.0.1", 5433, 77)).handshake(0.5)
    b.probe("server", 3.6).answer("client", 3.61)
    model, reports = run(Conversation(segments=sorted(a.segments + b.segments, key=lambda s: s.t)), ports=(5432, 5433))
    assert len(reports) == 2
    assert {r.connection.server.endpoint for r in reports} == {"10.9.0.1:5432", "10.9.0.1:5433"}
    model, reports = run(Conversation(segments=sorted(a.segments + b.segments, key=lambda s: s.t)), ports=(5433,))
    assert len(reports) == 1 and model.segments_ignored == len(a.segments)


def test_ipv6_endpoints_are_bracketed():
    conv = Conversation(client=Peer("fd00::2", 41000, 1), server=Peer("fd00::1", 5432, 2)).handshake()
    _, [report] = run(conv)
    assert report.connection.server.endpoint == "[fd00::1]:5432"


def test_events_are_emitted_for_live_reports():
    events = []
    model = KeepaliveModel(on_event=events.append)
    model.feed_all(seed_conversation().segments)
    kinds = [e.kind for e in events]
    assert kinds.count("probe") == 5 and kinds.count("answer") == 2 and kinds[-1] == "abort"


@pytest.mark.parametrize(
    "timeout, granularity",
    [(0.2, 0.004), (1, 0.032), (2, 0.032), (3, 0.256), (60, 2.048), (7200, 131.072)],
)
def test_timer_wheel_granularity_matches_the_kernel_table(timeout, granularity):
    assert wheel_granularity(timeout) == pytest.approx(granularity)
    assert timer_tolerance(timeout).late <= timeout / 8 + 0.02


def test_reset_after_the_prober_sent_data_is_not_a_keepalive_abort():
    """A client probes, is answered, sends a Terminate and resets: not its keepalive timer.

    Found by the 1M-packet benchmark, where the model called this a keepalive
    abort with a lost answer because nothing had been accepted since the answer.
    """
    conv = Conversation().handshake().exchange(0.01)
    conv.probe("client", 10.0).answer("server", 10.001).data("client", 12.0, 5).rst("client", 12.001)
    _, [report] = run(conv)
    assert report.connection.end_reason == "reset"
    assert report.client.abort is None
    assert [p.answer_lost for p in report.client.probes] == [False]


def test_port_reuse_leaves_the_old_connections_end_at_its_last_segment():
    old = Conversation().handshake().exchange(0.01).fin("client", 1.0).fin("server", 1.001).ack("client", 1.002)
    new = Conversation(segments=[]).handshake(20.0)
    for segment in new.segments:
        segment.frame += len(old.segments)
    model, reports = run(Conversation(segments=old.segments + new.segments))
    assert len(reports) == 2
    first, second = (r.connection for r in reports)
    assert first.end - old.t0 == pytest.approx(1.002)
    assert second.start - old.t0 == pytest.approx(20.0)
