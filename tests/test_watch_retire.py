"""`kaobs watch` for weeks: ended connections are judged as they retire and leave memory, and the final report is the same.

Replays a churn of short connections (plus ones that probe, mismatch, and
one aborted by keepalive) through `run_live` with a fake capture and clock,
once as it runs now (retiring) and once with a model that keeps every
connection (today's behaviour before issue 12): the model holds only a few
connections at a time, `on_judged` hears of each connection once, and the
verdicts, the text report and the JSON document are the same.
"""
from __future__ import annotations

import io
import json
import threading

import pytest
from rich.console import Console

import kaobs.watch as watch
from analysis.expect import build_expectations
from analysis.pipeline import Analysis
from kaobs.report import TextOptions, render_text, text_needs, write_json_streamed
from tests.builders import Conversation, Peer
from tests.test_model import SEED_EXPECT, seed_conversation
from tests.test_watch import FakeClock, ReplayCapture

EXPECT = build_expectations(SEED_EXPECT)


def churn(count: int = 120) -> list[Conversation]:
    """`count` short connections, one every 0.4 s, each closed by FIN both ways; every 10th probes first, every 30th
    too early (idle 2 s instead of 3: a mismatch); and the seed run (aborted by keepalive) among them."""
    conversations = [seed_conversation()]
    for i in range(count):
        conv = Conversation(client=Peer("10.9.0.2", 42000 + i, 1000 + 7 * i))
        start = 1.0 + 0.4 * i
        conv.handshake(start).exchange(start + 0.01)
        end = start + 0.05
        if i % 10 == 0:
            idle = 2.0 if i % 30 == 0 else 3.0
            conv.probe("server", start + 0.012 + idle).answer("client", start + 0.0121 + idle)
            end = start + idle + 0.5
        conv.fin("client", end).fin("server", end + 0.001).ack("client", end + 0.002)
        conversations.append(conv)
    return conversations


class Recording(Analysis):
    """The real analysis, remembering the most connections its model held at once."""

    instances: list["Recording"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.most = 0
        Recording.instances.append(self)

    def feed(self, records) -> None:
        super().feed(records)
        self.most = max(self.most, len(self.model.connections))


def replay(monkeypatch, conversations, *, retiring: bool, needs_report=None, duration: float = 70.0):
    segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    clock = FakeClock(segments[0].t - 0.5)
    capture = ReplayCapture(segments, clock)
    judged: list[tuple[int, str, float]] = []
    Recording.instances.clear()
    with monkeypatch.context() as patch:
        patch.setattr(watch, "Analysis", Recording)
        if not retiring:
            patch.setattr(watch, "_Retiring", lambda retire: None)  # a model that keeps every connection
        run, reports = watch.run_live(
            capture, expectations=EXPECT, ports=(5432,), hz=250, output_format="json", duration=duration,
            stop=threading.Event(), console=Console(file=io.StringIO()), clock=clock,
            on_judged=lambda report: judged.append((report.connection.index, report.verdict, clock.t)),
            needs_report=needs_report)
    [analysis] = Recording.instances
    return run, reports, judged, analysis, clock.t


def text_of(run, reports, unlisted=None) -> str:
    out = io.StringIO()
    render_text(Console(file=out, width=140, color_system=None), run, reports, EXPECT, unlisted=unlisted)
    return out.getvalue()


def json_of(run, reports) -> dict:
    out = io.StringIO()
    write_json_streamed(out, run, reports, EXPECT)
    return json.loads(out.getvalue())


def test_ended_connections_leave_memory_and_the_report_is_the_same(monkeypatch):
    conversations = churn()
    run, reports, judged, analysis, end = replay(monkeypatch, conversations, retiring=True)
    run_all, reports_all, judged_all, analysis_all, _ = replay(monkeypatch, conversations, retiring=False)

    total = len(conversations)
    assert analysis_all.most == total  # before: every connection stayed
    assert analysis.most < 25, analysis.most  # now: those of the last few seconds, and the aborted one
    assert reports.retired > 100 and len(reports) == total
    # each connection judged once, most of them long before the end of the run
    assert sorted(index for index, _, _ in judged) == list(range(1, total + 1))
    assert sum(1 for _, _, t in judged if t < end - 10) > 100
    assert all(t >= end for _, _, t in judged_all)  # without retiring, all at the end

    assert [(r.connection.index, r.verdict) for r in reports] == [(r.connection.index, r.verdict) for r in reports_all]
    assert {index: verdict for index, verdict, _ in judged} == {r.connection.index: r.verdict for r in reports_all}
    verdicts = {r.verdict for r in reports_all}
    assert {"match", "mismatch", "no_keepalive"} <= verdicts
    assert reports.counts == {v: sum(1 for r in reports_all if r.verdict == v) for v in reports.counts}
    assert text_of(run, reports) == text_of(run_all, reports_all)
    assert json_of(run, reports) == json_of(run_all, reports_all)
    reports.close()


def test_a_text_report_keeps_only_what_it_lists_and_counts_the_rest(monkeypatch):
    conversations = churn()
    needs = text_needs(TextOptions())
    run, reports, _, _, _ = replay(monkeypatch, conversations, retiring=True, needs_report=needs)
    run_all, reports_all, _, _, _ = replay(monkeypatch, conversations, retiring=False)
    listed = sum(1 for r in reports_all if needs(r))
    assert reports.unlisted.total > 90 and len(reports) == len(reports_all) - reports.unlisted.total
    assert len(reports) >= listed
    assert sum(reports.counts.values()) == len(reports_all)
    text = text_of(run, reports, reports.unlisted)
    assert text == text_of(run_all, reports_all)
    assert "connection(s) without keepalive activity not listed" in text


def test_the_aborted_connection_stays_long_enough_to_see_its_peer_come_back(monkeypatch):
    """The seed's client comes back 30 s after the server's abort: the model (linger 5 s) still has it."""
    conv = seed_conversation()
    conv.data("client", 45.0)  # the client returns; the server answers with a RST
    conv.rst("server", 45.0005)
    conversations = [conv] + churn(60)[1:]
    _, reports, judged, _, _ = replay(monkeypatch, conversations, retiring=True)
    first = reports[0]
    assert first.connection.after_end is not None and first.connection.after_end.what == "data"
    assert [index for index, _, _ in judged].count(1) == 1


@pytest.mark.parametrize("duration", ["0", None])
def test_duration_zero_or_none_runs_until_stopped(monkeypatch, duration):
    """`--duration 0` is accepted (it was refused below 0.1) and means the same as no --duration: until Ctrl-C or
    SIGTERM."""
    from kaobs.cli import run

    captured = {}

    class NoCapture:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def stop(self) -> None:
            pass

    def fake_run_live(capture, **kwargs):
        captured.update(kwargs)
        raise watch.CaptureError("stopped by the test")

    monkeypatch.setattr(watch.os, "geteuid", lambda: 0)
    monkeypatch.setattr(watch, "LiveCapture", NoCapture)
    monkeypatch.setattr(watch, "run_live", fake_run_live)
    with pytest.raises(SystemExit) as stopped:  # the fake capture error: one line, exit 2
        run(["watch", "-i", "lo"] + (["--duration", duration] if duration is not None else []))
    assert stopped.value.code == 2 and captured["duration"] is None


def test_a_negative_duration_is_refused(capsys):
    from kaobs.cli import run

    with pytest.raises(SystemExit) as stopped:
        run(["watch", "-i", "lo", "--duration", "-1"])
    assert stopped.value.code == 2 and "--duration" in capsys.readouterr().err


def test_the_terminal_view_counts_the_connections_that_left_it(monkeypatch):
    conversations = churn(60)
    segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    clock = FakeClock(segments[0].t - 0.5)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, height=40, color_system=None)
    _, reports = watch.run_live(ReplayCapture(segments, clock), expectations=EXPECT, ports=(5432,), hz=250,
                                output_format="text", duration=40.0, stop=threading.Event(), console=console,
                                clock=clock)
    ended = [int(line.split("(+")[1].split()[0]) for line in out.getvalue().splitlines() if " ended, in the report)" in line]
    assert ended and max(ended) > 30 and max(ended) <= reports.retired
