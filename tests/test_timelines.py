"""The pictures' parts without a browser: the episode's marks, the broken time axis, the page's bounds, Mermaid's text.

What the pages look like in a real browser is tests/test_html_report.py;
here are the rules: which moments are drawn and where (the seed's first
probe and abort due, a stall that keeps keepalive from running), how the
axis breaks (two hours of idle and two seconds of probes both readable),
how many lanes a long capture gets while every connection is counted,
what the page escapes, which connection a Mermaid diagram draws, and the
options' errors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from analysis.pipeline import Analysis, AnalysisRun
from kaobs.cli import run
from kaobs.episode import (
    ABORT,
    ABORT_DUE,
    ANSWER,
    FIRST_PROBE_DUE,
    GIVE_UP_DUE,
    LAST_DATA,
    PROBE,
    TOLERANCE,
    build_episode,
    idle_before_death,
)
from kaobs.htmlreport import HtmlReport, broken_axis, time_label
from kaobs.mermaid import clean, sequence_diagram
from tests.builders import Conversation, Peer
from tests.test_text_report import ENTRIES_BY_FILE, analyzed, many_connections

ROOT = Path(__file__).resolve().parents[1]
SEED = "seed_idle3_int2_cnt3_dead_client.pcap"


def seed():
    _, [report], _ = analyzed(SEED, ENTRIES_BY_FILE[SEED])
    return report


# -- the episode ----------------------------------------------------------------------------------------


def test_the_seed_episode_has_its_probes_answers_tolerances_and_the_deadlines_the_settings_predict():
    episode = build_episode(seed())
    rel = [(m.kind, m.lane, round(m.t - episode.start, 3)) for m in episode.marks]
    assert rel == [(LAST_DATA, "client", 0.05), (PROBE, "server", 3.054), (ANSWER, "client", 3.054),
                   (PROBE, "server", 6.075), (ANSWER, "client", 6.075), (PROBE, "server", 9.082),
                   (PROBE, "server", 11.098), (PROBE, "server", 13.114), (ABORT, "server", 15.13)]
    assert [m.answered for m in episode.marks if m.kind == PROBE] == [True, True, False, False, False]
    # idle 3 s from the answer to probe 2 (+6.075): first probe due +9.075, abort after 3 probes 2 s apart +15.075
    assert [(d.kind, round(d.t - episode.start, 3)) for d in episode.deadlines] == [
        (FIRST_PROBE_DUE, 9.075), (ABORT_DUE, 15.075)]
    bands = [b for b in episode.bands if b.kind == TOLERANCE]
    assert len(bands) == 6  # three idle checks, two intervals, the interval before the abort
    idle = bands[0]
    assert round(idle.start - episode.start, 3) == 3.04 and round(idle.end - episode.start, 3) == 3.321
    assert "allowed -10 ms/+271 ms" in idle.text and "agrees" in idle.text
    assert idle_before_death(seed()) == ("keepalive abort", pytest.approx(3.007, abs=0.001))


def test_a_stall_draws_its_give_up_and_no_keepalive_deadline_behind_it():
    _, reports, _ = analyzed("middlebox_drop_idle8_client_side.pcap",
                             ENTRIES_BY_FILE["middlebox_drop_idle8_client_side.pcap"])
    episode = build_episode(reports[1])
    client = [d for d in episode.deadlines if d.lane == "client"]
    # data in flight: the retransmission timer runs, not keepalive; tcp_user_timeout=5000 gives up at +15.440
    assert [(d.kind, round(d.t - episode.start, 2)) for d in client] == [(GIVE_UP_DUE, 15.44)]
    assert [b.kind for b in episode.bands if b.lane == "client"] == ["stall", "give_up"]
    assert sum(1 for m in episode.marks if m.kind == "resend") == 5
    assert idle_before_death(reports[1]) == ("path drop", pytest.approx(9.975, abs=0.001))


# -- the broken axis --------------------------------------------------------------------------------------


def test_two_hours_of_idle_and_two_seconds_of_probes_are_both_readable():
    t0 = 1000.0
    times = [t0, t0 + 0.05, *(t0 + 7200.05 + 2 * i for i in range(5)), t0 + 7210.05]
    axis = broken_axis(times, t0)
    [gap] = axis.gaps
    assert (gap.start, gap.end) == (t0 + 0.05, t0 + 7200.05)
    span = axis.x(t0 + 7210.05) - axis.x(t0)
    probes = [axis.x(t0 + 7200.05 + 2 * i) for i in range(5)]
    assert [round(b - a, 6) for a, b in zip(probes, probes[1:])] == [2.0] * 4  # linear where the probes are
    assert gap.width < 10 < span < 25  # the idle drawn short, and still the longest stretch
    assert gap.width > 2
    ticks = axis.ticks(t0, t0 + 7210.05)
    assert ticks[axis.x(gap.end)] == "+2h00m00s"  # the axis says where it resumes
    assert all(label.startswith("+") for label in ticks.values())


def test_a_capture_of_seconds_is_not_broken():
    axis = broken_axis([m.t for m in build_episode(seed()).marks] + [seed().connection.start], seed().connection.start)
    assert axis.gaps == []
    assert axis.x(seed().connection.start + 7.5) == pytest.approx(7.5)


@pytest.mark.parametrize("seconds, step, label", [(3.0, 2.0, "+3 s"), (2.5, 0.5, "+2.5 s"), (400, 100, "+6m40s"),
                                                  (7219.2, 100, "+2h00m19s")])
def test_time_labels(seconds, step, label):
    assert time_label(seconds, step) == label


# -- the page's bounds ------------------------------------------------------------------------------------


def test_a_long_capture_draws_a_bounded_number_of_lanes_and_counts_every_connection(tmp_path):
    run_info, reports, expectations = many_connections(quiet=30, mismatched=9, aborted=3, healthy=8)
    path = tmp_path / "page.html"
    page = HtmlReport(str(path), lanes_per_kind=4, other_lanes=5)
    for report in reports:
        page.add(report)
    drawn = page.finish(run_info, expectations)
    text = path.read_text()
    assert drawn == 4 + 3 + 5  # 4 of the 9 mismatches, the 3 aborts, 5 healthy (probing before quiet)
    sections = re.findall(r'<section class="conn" id="c(\d+)" data-connection="\d+" data-verdict="(\w+)"', text)
    assert [v for _, v in sections] == ["mismatch"] * 4 + ["match"] * 3 + ["match"] * 5
    assert "<b>50 connection(s)</b>" in text
    assert "Problems, worst first (12)" in text
    assert "38 more counted above and not drawn" in text
    assert text.count('class="bokeh-item"') == drawn + 1  # a figure per lane, and the histogram
    assert "keepalive abort" in text  # the histogram of the aborted ones


def test_quiet_connections_are_drawn_only_when_no_probing_one_needs_the_place(tmp_path):
    run_info, reports, expectations = many_connections(quiet=3, mismatched=0, aborted=0, healthy=0)
    path = tmp_path / "page.html"
    page = HtmlReport(str(path))
    for report in reports:
        page.add(report)
    assert page.finish(run_info, expectations) == 3
    assert "Idle before death" not in path.read_text()


def test_what_the_page_shows_is_escaped(tmp_path):
    conv = Conversation(client=Peer("10.9.0.2", 41000, 1000)).handshake(0).exchange(0.01)
    conv.probe("server", 2.02).rst("server", 3.0)
    analysis = Analysis([5432])
    analysis.model.feed_all(conv.segments)
    analysis.finish()
    name = "</script><script>alert(1)</script>.pcap"
    path = tmp_path / "page.html"
    page = HtmlReport(str(path), title=f"kaobs: {name}")
    for report in analysis.reports(None):
        page.add(report)
    page.finish(AnalysisRun(sources=[name]), None)
    text = path.read_text()
    assert "<script>alert(1)" not in text and "&lt;/script&gt;&lt;script&gt;alert(1)" in text


# -- the command line -------------------------------------------------------------------------------------


def kaobs(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = run(list(args))
    except SystemExit as exit_:  # the one-line errors exit at once
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_html_goes_beside_the_report_and_is_said_on_stderr(tmp_path, capsys):
    path = tmp_path / "seed.html"
    code, out, err = kaobs(capsys, "analyze", str(ROOT / "captures" / SEED), *ENTRIES_BY_FILE[SEED], "--html",
                           str(path))
    assert code == 0 and out.startswith("#1 MATCH")
    assert err == f"kaobs: timelines written to {path} (1 connection(s) drawn, 1.3 MB)\n"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and 'data-probes="5"' in text
    assert "server  data \u00b7\u00b7\u00b7idle 3.0 s\u00b7\u00b7\u00b7 \u2713 \u2713 \u2717 \u2717 \u2717 RST" in text
    assert "https://" not in text.split("</head>")[1]  # nothing fetched: BokehJS is in the page


@pytest.mark.parametrize("args, words", [
    (["--html", "/nonexistent-dir/x.html"], "--html /nonexistent-dir/x.html: no such directory /nonexistent-dir"),
    (["--html", "/tmp"], "Invalid value for '--html': File '/tmp' is a directory."),
    (["--format", "json", "--connection", "1"], "--connection shapes the text report; the JSON document always"),
    (["--format", "mermaid", "--summary"], "--summary shapes the text report; --format mermaid draws one"),
])
def test_refused_options_are_one_line_exit_2(args, words, capsys):
    code, out, err = kaobs(capsys, "analyze", str(ROOT / "captures" / SEED), *args)
    assert code == 2 and out == ""
    assert err.startswith(f"kaobs: error: {words}") and err.count("\n") == 1


def test_mermaid_draws_the_worst_connection_unless_told_which(capsys):
    capture = str(ROOT / "captures" / "per_session_idle2_vs_idle4.pcap")
    _, worst, _ = kaobs(capsys, "analyze", capture, "--expect", "tcp_keepalives_idle=2", "--format", "mermaid")
    assert "%% kaobs: connection #2 192.168.96.3:38722 -> 192.168.96.2:5432, MISMATCH" in worst
    _, first, _ = kaobs(capsys, "analyze", capture, "--expect", "tcp_keepalives_idle=2", "--format", "mermaid",
                        "--connection", "1")
    assert "connection #1 " in first and "MATCH" in first
    code, none, _ = kaobs(capsys, "analyze", capture, "--format", "mermaid", "--connection", "9")
    assert none.startswith("sequenceDiagram\n") and "no connection no. 9" in none and code == 0
    _, only, _ = kaobs(capsys, "analyze", str(ROOT / "captures" / "middlebox_drop_idle8_client_side.pcap"),
                       "--format", "mermaid", "--only", "abort")
    assert "no connection that --only keeps" in only


def test_the_seed_as_a_sequence_diagram():
    text = sequence_diagram(seed(), SEED)
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram"
    assert "    participant C as client 172.17.0.1:45734" in lines
    assert "    participant S as server 172.17.0.2:5432" in lines
    assert "    C->>S: last packet before the idle (+0.050 s)" in lines
    assert "    S->>C: probe 1 after 3.004 s idle (+3.054 s)" in lines
    assert "    C-->>S: answer to probe 1 in 0.02 ms" in lines
    assert "    S-xC: probe 5: unanswered 3/3 (+13.114 s)" in lines
    assert "    S-)C: ABORT (RST) after 3 unanswered probe(s): keepalive count reached (+15.130 s)" in lines
    assert lines[-1] == ("    Note over C,S: MATCH<br/>server tcp_keepalives_idle 3 s \u2713 3.004 s<br/>"
                         "server tcp_keepalives_interval 2 s \u2713 2.016 s<br/>server tcp_keepalives_count 3 \u2713 3")
    assert not any(";" in line or "#" in line for line in lines[1:] if not line.strip().startswith("%%"))


def test_answered_probes_in_a_row_are_one_loop():
    conv = Conversation().handshake(0).exchange(0.01)
    t = 0.01
    for _ in range(12):
        t += 2.0
        conv.probe("server", t).answer("client", t + 0.001)
    conv.fin("client", t + 1)
    analysis = Analysis([5432])
    analysis.model.feed_all(conv.segments)
    analysis.finish()
    [report] = list(analysis.reports(None))
    text = sequence_diagram(report)
    assert "    loop probes 1 to 12, +2.010 s .. +24.010 s, about every 2.0 s: all answered" in text
    assert text.count("->>S: probe") + text.count("->>C: probe") == 1


def test_clean_keeps_mermaid_statements_whole():
    assert clean("a; b #2\n c") == "a, b no. 2 c"


def test_mermaid_on_watch_prints_nothing_live(monkeypatch):
    from tests.test_watch import replay, seed_conversation

    _, reports, text, _ = replay(seed_conversation(), output_format="mermaid")
    assert text == "" and reports


def test_the_json_is_the_same_with_a_page_beside_it(tmp_path, capsys):
    capture = str(ROOT / "captures" / "middlebox_drop_idle8_server_side.pcap")
    args = ENTRIES_BY_FILE["middlebox_drop_idle8_server_side.pcap"]
    _, plain, _ = kaobs(capsys, "analyze", capture, *args, "--format", "json")
    _, beside, _ = kaobs(capsys, "analyze", capture, *args, "--format", "json", "--html", str(tmp_path / "p.html"))
    assert beside == plain and json.loads(beside)["connections"]


def test_the_readme_shows_the_seed_diagram_kaobs_prints(capsys, monkeypatch):
    """The README's ```mermaid block is what `--format mermaid` gives for the seed (tests/test_html_report.py
    checks that mermaid.js draws that)."""
    monkeypatch.chdir(ROOT)  # the diagram names the capture as given
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```mermaid\n(sequenceDiagram\n.*?)```", readme, re.DOTALL).group(1)
    _, out, _ = kaobs(capsys, "analyze", "captures/seed_idle3_int2_cnt3_dead_client.pcap", *ENTRIES_BY_FILE[SEED],
                      "--format", "mermaid")
    assert block == out
