"""The text report for people: readable at 80 and 200 columns and in a pipe, and the few connections that matter first.

Every recorded capture is rendered three ways (a terminal of 80 columns, one
of 200, a pipe) with the expectations that make its settings tables widest:
every settings row must keep its status on the row, no line may be cut, the
80-column form may not pass 80 columns, and all three must hold the same
words (wrapping only moves line breaks). The triage at the end, `--only`,
`--summary` and the collapsing of quiet connections are checked on
conversations built in code.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from analysis.expect import build_expectations
from analysis.pgsessions import ConnectionPostgres, PostgresView
from analysis.pipeline import Analysis, AnalysisRun
from kaobs.report import TRIAGE_LIMIT, TextOptions, render_text, text_console
from sniffer.pcapfile import CaptureReader
from tests.builders import Conversation, Peer

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = json.loads((ROOT / "captures" / "manifest.json").read_text())["captures"]
# A client DSN that leaves everything to libpq's defaults: the longest provenance there is.
WIDEST = ["--client-dsn", "application_name=x", "--sysctl", "client:net.ipv4.tcp_keepalive_time=7200"]


def options_of(args: list[str]) -> tuple[list[str], str | None, list[str]]:
    expect, dsn, sysctls = [], None, []
    for flag, value in zip(args[::2], args[1::2]):
        if flag == "--expect":
            expect.append(value)
        elif flag == "--client-dsn":
            dsn = value
        elif flag == "--sysctl":
            sysctls.append(value)
    return expect, dsn, sysctls


def analyzed(capture: str, args: list[str]):
    expect, dsn, sysctls = options_of(args)
    expectations = build_expectations(expect, dsn, sysctls)
    run = AnalysisRun(sources=[capture])
    analysis = Analysis([5432])
    reader = CaptureReader(ROOT / "captures" / capture)
    analysis.feed(reader.records())
    analysis.finish()
    return run, list(analysis.reports(expectations)), expectations


def rendered(run, reports, expectations, *, width: int | None, postgres=None, options=None) -> str:
    """The report on a terminal of `width` columns, or (None) in a pipe."""
    out = io.StringIO()
    if width is None:
        console = Console(file=out, soft_wrap=True, highlight=False, color_system=None)
    else:
        console = Console(file=out, width=width, force_terminal=True, highlight=False, color_system=None)
    render_text(console, run, reports, expectations, postgres, options)
    return out.getvalue()


def row_pattern(role: str, finding) -> re.Pattern:
    """The row of a finding: status first, then side, setting, expected (with its note), observed, on one line."""
    observed = "(probes seen|no probe)" if finding.key == "enabled" else re.escape(finding.observed)
    return re.compile(rf"^ {{4}}{finding.status} +{role} +{re.escape(finding.setting)} +"
                      rf"{re.escape(finding.value_text)}( \[\d+\])? +{observed}$")


CASES = [(e["file"], e["expect_args"] + (WIDEST if "--client-dsn" not in e["expect_args"] else [])) for e in ENTRIES]


@pytest.mark.parametrize("capture,args", CASES, ids=[c for c, _ in CASES])
def test_every_settings_row_keeps_its_status_at_80_and_200_columns_and_in_a_pipe(capture, args):
    run, reports, expectations = analyzed(capture, args)
    every = TextOptions(show_all=True)  # the quiet connections' rows too
    texts = {width: rendered(run, reports, expectations, width=width, options=every) for width in (80, 200, None)}
    findings = [(side.role, f) for r in reports for side in (r.server, r.client) for f in side.findings]
    assert findings, "each capture is judged on something"
    for width, text in texts.items():
        lines = text.splitlines()
        assert "…" not in text and "..." not in text.replace("... ", ""), f"something was cut at {width}"
        for role, finding in findings:
            pattern = row_pattern(role, finding)
            assert any(pattern.search(line) for line in lines), (width, role, finding.setting, text)
        if width is not None:
            too_wide = [line for line in lines if len(line) > width]
            assert too_wide == [], too_wide
    # Wrapping moves line breaks, nothing else: the same words in the same order everywhere.
    assert texts[80].split() == texts[200].split() == texts[None].split()


def test_in_a_pipe_a_long_line_stays_one_line():
    run, reports, expectations = analyzed("seed_idle3_int2_cnt3_dead_client.pcap", WIDEST)
    run.warnings.append("w " * 150 + "end")
    text = rendered(run, reports, expectations, width=None)
    assert f"warning: {'w ' * 150}end" in text.splitlines()
    legend = [line for line in text.splitlines() if line.startswith("    [")]
    assert legend and all(line.endswith(")") or line.endswith("rules") or line.endswith("=1") for line in legend)
    wrapped = rendered(run, reports, expectations, width=80)
    continuation = [line for line in wrapped.splitlines() if line.startswith("  w w")]
    assert continuation, "on a terminal the long line is wrapped, its continuation indented"


def test_the_command_writes_to_a_pipe_without_hard_wrapping(tmp_path):
    """`kaobs analyze ... | grep`: no line of stdout or stderr is broken at 80 or 200 columns."""
    cut = tmp_path / ("long-name-" + "x" * 120 + ".pcap")
    cut.write_bytes((ROOT / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap").read_bytes()[:-30])
    done = subprocess.run([sys.executable, "-m", "kaobs", "analyze", str(cut), "--expect", "tcp_keepalives_idle=3",
                           "--client-dsn", ""], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [warning] = done.stderr.splitlines()
    assert warning.startswith("kaobs: warning: ") and str(cut) in warning and len(warning) > 200
    assert any(line.startswith("warning: ") and str(cut) in line for line in done.stdout.splitlines())
    assert "\x1b[" not in done.stdout + done.stderr  # no color in a pipe


def test_text_console_does_not_wrap_in_a_pipe():
    console = text_console()  # pytest's stdout is not a terminal
    assert console.soft_wrap is True


# -- probe numbers, notes, plain words ----------------------------------------------------------------


def test_probes_are_numbered_across_the_connection_and_the_series_says_unanswered_n_of_count():
    run, [report], expectations = analyzed("seed_idle3_int2_cnt3_dead_client.pcap",
                                           ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_count=3"])
    text = rendered(run, [report], expectations, width=200)
    probes = [line.split("s  ", 1)[1] for line in text.splitlines() if "server probe" in line]
    assert probes == [
        "server probe 1 after 3.004 s idle: answered in 0.02 ms",
        "server probe 2 after 3.021 s idle: answered in 0.02 ms",
        "server probe 3 after 3.007 s idle: unanswered 1/3",
        "server probe 4: unanswered 2/3",
        "server probe 5: unanswered 3/3",
    ]


def test_without_a_count_the_aborted_series_gives_its_own_length():
    run, [report], expectations = analyzed("seed_idle3_int2_cnt3_dead_client.pcap", [])
    text = rendered(run, [report], expectations, width=200)
    assert "server probe 4: unanswered 2/3" in text and "ABORT (RST) after 3 unanswered" in text


def test_a_count_the_user_timeout_replaces_is_explained_not_left_bare():
    run, reports, expectations = analyzed("user_timeout_4000_idle1_int1_cnt10.pcap",
                                          ENTRIES_BY_FILE["user_timeout_4000_idle1_int1_cnt10.pcap"])
    text = rendered(run, reports, expectations, width=None)
    assert re.search(r"unobservable +server +tcp_keepalives_count +10 +3$", text, re.MULTILINE)
    assert "server tcp_keepalives_count: not judged: tcp_user_timeout is set: it replaces the count" in text
    # the series is the one tcp_user_timeout cut short, not the count of 10
    assert "unanswered 3/3" in text and "/10" not in text


def test_the_client_switch_says_what_was_seen():
    run, reports, expectations = analyzed("both_sides_server_idle3_client_idle2.pcapng",
                                          ENTRIES_BY_FILE["both_sides_server_idle3_client_idle2.pcapng"])
    text = rendered(run, reports, expectations, width=None)
    assert re.search(r"match +client +keepalives +on +probes seen$", text, re.MULTILINE)


def test_provenance_is_a_numbered_note_once_per_report():
    run, reports, expectations = analyzed("per_session_idle2_vs_idle4.pcap", ["--expect", "tcp_keepalives_idle=0",
                                                                              "--sysctl", "net.ipv4.tcp_keepalive_time=2"])
    text = rendered(run, reports, expectations, width=None)
    assert text.count("[1] kernel default 2 s (--sysctl net.ipv4.tcp_keepalive_time=2)") == 1
    assert len(re.findall(r"tcp_keepalives_idle +2 s \[1\]", text)) == 2  # both connections refer to it


def test_a_contradiction_is_said_in_plain_words_and_an_easy_agreement_is_not_said():
    run, reports, expectations = analyzed("per_session_idle2_vs_idle4.pcap", ["--expect", "tcp_keepalives_idle=2"])
    text = rendered(run, reports, expectations, width=None)
    assert ("server tcp_keepalives_idle: probe 1 came 4.044 s after the last packet the server accepted, at +0.048 s, "
            "due after 2.000 s: 2.044 s late (more than the 47 ms a 2 s timer may be late)") in text
    assert "allowed -10 ms" not in text and "wheel granularity" not in text  # the JSON's detail, not for people
    seed_run, seed, seed_expectations = analyzed("seed_idle3_int2_cnt3_dead_client.pcap",
                                                 ENTRIES_BY_FILE["seed_idle3_int2_cnt3_dead_client.pcap"])
    assert "close call" not in rendered(seed_run, seed, seed_expectations, width=None)  # 7 to 21 ms late: nothing to say


def test_a_close_call_says_which_tolerance_decided():
    run, reports, expectations = analyzed("user_timeout_4000_idle1_int1_cnt10.pcap",
                                          ENTRIES_BY_FILE["user_timeout_4000_idle1_int1_cnt10.pcap"])
    text = rendered(run, reports, expectations, width=None)
    assert ("server tcp_keepalives_idle: probe 2 came 1.036 s after the answer to probe 1, 36 ms after it was due: "
            "a close call, within the 47 ms a 1 s timer may be late at this HZ") in text


ENTRIES_BY_FILE = {e["file"]: e["expect_args"] for e in ENTRIES}


# -- the strip -----------------------------------------------------------------------------------------


def strips(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if re.match(r"^ {4}(server|client|path) {2,}", line)]


def test_the_strip_draws_the_seed_in_one_line_under_the_headline():
    run, [report], expectations = analyzed("seed_idle3_int2_cnt3_dead_client.pcap",
                                           ENTRIES_BY_FILE["seed_idle3_int2_cnt3_dead_client.pcap"])
    for width in (80, 200, None):
        text = rendered(run, [report], expectations, width=width)
        assert strips(text) == ["server  data \u00b7\u00b7\u00b7idle 3.0 s\u00b7\u00b7\u00b7 \u2713 \u2713 \u2717 \u2717 \u2717 RST"]
        lines = text.splitlines()
        assert lines[2].startswith("    server  data ")  # under the headline and its span, before the events


@pytest.mark.parametrize("capture, expected", [
    ("both_sides_server_idle3_client_idle2.pcapng",
     ["server  data \u00b7\u00b7\u00b7idle 3.1 s\u00b7\u00b7\u00b7 \u2713 \u2713 \u2713 FIN",
      "client  data \u00b7\u00b7\u00b7idle 2.0 s\u00b7\u00b7\u00b7 \u2713\u00d74 FIN"]),
    ("middlebox_drop_idle8_server_side.pcap",
     ["server  data \u00b7\u00b7\u00b7\u00b7idle 12.2 s\u00b7\u00b7\u00b7\u00b7 \u2717 \u2702path drop \u2717 \u2717 RST"] * 2),
    ("stall_retries2_5_client_side.pcap",
     ["client  \u00b7\u00b7\u00b7idle 10.0 s\u00b7\u00b7\u00b7 data \u21bb\u00d76 gave up \u2702path drop"]),
    ("zero_window_client_stops_reading.pcap", ["server  0-window\u00d76"]),
])
def test_the_strip_of_both_sides_a_path_cut_a_stall_and_zero_window_probes(capture, expected):
    run, reports, expectations = analyzed(capture, ENTRIES_BY_FILE[capture])
    assert strips(rendered(run, reports, expectations, width=None, options=TextOptions(show_all=True))) == expected


def test_a_long_run_of_answered_probes_is_counted_and_the_strip_fits_80_columns():
    conv = Conversation().handshake(0).exchange(0.01)
    t = 0.01
    for _ in range(60):
        t += 2.0
        conv.probe("server", t).answer("client", t + 0.001)
    for _ in range(2):
        t += 1.0
        conv.probe("server", t)
    conv.rst("server", t + 1.0)
    analysis = Analysis([5432])
    analysis.model.feed_all(conv.segments)
    analysis.finish()
    reports = list(analysis.reports(None))
    text = rendered(AnalysisRun(sources=["built"]), reports, None, width=80)
    [strip] = strips(text)
    assert strip == "server  data \u00b7\u00b7\u00b7idle 2.0 s\u00b7\u00b7\u00b7 \u2713\u00d760 \u2717 \u2717 RST"
    assert all(len(line) <= 80 for line in text.splitlines())


def test_an_output_that_cannot_write_the_glyphs_gets_plain_ones(tmp_path):
    run, [report], expectations = analyzed("seed_idle3_int2_cnt3_dead_client.pcap", [])
    out = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    console = Console(file=out, soft_wrap=True, highlight=False, color_system=None)
    render_text(console, run, [report], expectations)
    out.seek(0)
    assert strips(out.read()) == ["server  data ---idle 3.0 s--- + + x x x RST"]
    env = {**__import__("os").environ, "PYTHONIOENCODING": "latin-1"}
    done = kaobs("analyze", "captures/seed_idle3_int2_cnt3_dead_client.pcap", env=env)
    assert done.returncode == 0 and done.stderr == ""
    assert "    server  data ---idle 3.0 s--- + + x x x RST" in done.stdout.splitlines()


# -- triage -------------------------------------------------------------------------------------------

EXPECT = ["tcp_keepalives_idle=2", "tcp_keepalives_interval=1", "tcp_keepalives_count=2"]


def many_connections(quiet: int, mismatched: int, aborted: int, healthy: int):
    """Connections built in code: quiet ones, ones probing after 4 s (idle 2 expected), aborted ones, healthy ones."""
    conversations = []
    port = 40000

    def new() -> Conversation:
        nonlocal port
        port += 1
        return Conversation(client=Peer("10.9.0.2", port, 1000))

    for _ in range(quiet):
        conversations.append(new().handshake(0).exchange(0.01).fin("client", 1.0))
    for _ in range(mismatched):
        conv = new().handshake(0).exchange(0.01).probe("server", 4.02).answer("client", 4.021)
        conversations.append(conv.fin("client", 5.0))
    for _ in range(aborted):  # from a host of its own: the same host answering elsewhere would make it the path's drop
        conv = new()
        conv.client.address = "10.9.0.3"
        conv = conv.handshake(0).exchange(0.01).probe("server", 2.02).answer("client", 2.021)
        conversations.append(conv.probe("server", 4.03).probe("server", 5.04).rst("server", 6.05))
    for _ in range(healthy):
        conv = new().handshake(0).exchange(0.01).probe("server", 2.02).answer("client", 2.021)
        conversations.append(conv.probe("server", 4.03).answer("client", 4.031).fin("client", 5.0))
    model_segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    analysis = Analysis([5432])
    analysis.model.feed_all(model_segments)
    analysis.finish()
    expectations = build_expectations(EXPECT)
    return AnalysisRun(sources=["built"]), list(analysis.reports(expectations)), expectations


def test_problems_come_last_worst_first_and_quiet_connections_are_counted():
    run, reports, expectations = many_connections(quiet=5, mismatched=2, aborted=1, healthy=1)
    text = rendered(run, reports, expectations, width=None)
    lines = text.splitlines()
    assert sum(1 for line in lines if re.match(r"#\d+ (NO_KEEPALIVE)", line)) == 0
    assert sum(1 for line in lines if re.match(r"#\d+ (MISMATCH|MATCH)  ", line)) == 4
    start = lines.index("Problems, worst first (3):")
    triage = lines[start + 1:start + 4]
    assert [line.split()[1] for line in triage] == ["MISMATCH", "MISMATCH", "MATCH"]
    assert "server tcp_keepalives_idle: expected 2 s, observed 4." in triage[0]
    assert "the server aborted it at" in triage[2] and "the client stopped answering" in triage[2]
    assert lines[-2] == "5 connection(s) without keepalive activity not listed (--all lists them)"
    assert lines[-1].startswith("9 connection(s): 2 match, 2 mismatch, 5 no_keepalive")


def test_all_lists_the_quiet_ones_too():
    run, reports, expectations = many_connections(quiet=3, mismatched=1, aborted=0, healthy=0)
    text = rendered(run, reports, expectations, width=None, options=TextOptions(show_all=True))
    assert len(re.findall(r"^#\d+ NO_KEEPALIVE  ", text, re.MULTILINE)) == 3
    assert "not listed" not in text


def test_only_and_summary():
    run, reports, expectations = many_connections(quiet=3, mismatched=2, aborted=1, healthy=2)
    text = rendered(run, reports, expectations, width=None, options=TextOptions(only=frozenset({"mismatch"}),
                                                                                  summary=True))
    lines = [line for line in text.splitlines() if line]
    assert [line.split()[1] for line in lines[:2]] == ["MISMATCH", "MISMATCH"]
    assert all(": server tcp_keepalives_idle: expected 2 s, observed" in line for line in lines[:2])
    assert "Problems" not in text  # the list is the problems already
    assert lines[-2] == "6 connection(s) not listed (--only mismatch)"
    probing = rendered(run, reports, expectations, width=None, options=TextOptions(only=frozenset({"probing"})))
    assert len(re.findall(r"^#\d+ ", probing, re.MULTILINE)) == 5  # the healthy ones too, as blocks
    assert "Problems, worst first (3):" in probing  # then the triage: they are not all problems
    aborts = rendered(run, reports, expectations, width=None, options=TextOptions(only=frozenset({"abort"}), summary=True))
    assert len(re.findall(r"^#\d+ ", aborts, re.MULTILINE)) == 1


def test_the_triage_keeps_at_most_its_limit_and_counts_the_rest():
    run, reports, expectations = many_connections(quiet=0, mismatched=TRIAGE_LIMIT + 7, aborted=0, healthy=0)
    text = rendered(run, reports, expectations, width=None, options=TextOptions(summary=True))
    start = text.index("Problems, worst first")
    assert text[start:].count("MISMATCH") == TRIAGE_LIMIT
    assert "... and 7 more (mismatch; --only mismatch --summary lists them)" in text


def test_the_backend_is_named_in_the_summary_line():
    from tests.test_pgmeta import backend

    run, reports, expectations = many_connections(quiet=0, mismatched=1, aborted=0, healthy=0)
    view = PostgresView(dsn="host=db")
    view.connections = {reports[0].connection.index: ConnectionPostgres(backend=backend(4242, 40001))}
    text = rendered(run, reports, expectations, width=None, postgres=view, options=TextOptions(summary=True))
    assert re.search(r"^#1 MISMATCH 10\.9\.0\.2:40001 -> 10\.9\.0\.1:5432 pid 4242 'api': ", text, re.MULTILINE)


def test_connection_lists_just_that_one():
    run, reports, expectations = many_connections(quiet=1, mismatched=2, aborted=0, healthy=0)
    text = rendered(run, reports, expectations, width=None, options=TextOptions(connection=2))
    assert re.findall(r"^#(\d+) ", text, re.MULTILINE) == ["2"]
    assert "2 connection(s) not listed (--connection 2)" in text
    missing = rendered(run, reports, expectations, width=None, options=TextOptions(connection=9))
    assert "no connection #9 (the connections are numbered 1 to 3)" in missing


# -- the command line ---------------------------------------------------------------------------------


def kaobs(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaobs", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def test_only_summary_all_shape_the_text_and_are_refused_with_json():
    done = kaobs("analyze", "captures/per_session_idle2_vs_idle4.pcap", "--expect", "tcp_keepalives_idle=2",
                 "--only", "mismatch", "--summary")
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("#2 MISMATCH 192.168.96.3:38722 -> 192.168.96.2:5432: ")
    refused = kaobs("analyze", "captures/per_session_idle2_vs_idle4.pcap", "--format", "json", "--only", "mismatch")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == ("kaobs: error: --only shapes the text report; the JSON document always holds every "
                              "connection\n")


@pytest.mark.parametrize("args, env, colored", [
    (["--color", "always"], {}, True),
    (["--color", "always"], {"NO_COLOR": "1"}, True),  # asked for explicitly
    (["--color", "never"], {}, False),
    ([], {}, False),  # auto: not a terminal
])
def test_color_auto_always_never(args, env, colored):
    import os

    done = kaobs("analyze", "captures/per_session_idle2_vs_idle4.pcap", "--expect", "tcp_keepalives_idle=2", *args,
                 env={**os.environ, **env})
    assert ("\x1b[" in done.stdout) == colored, done.stdout[:300]


def test_no_color_is_honoured_on_a_terminal():
    from kaobs.report import _color_options

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, _environ={"NO_COLOR": "1"}, **_color_options("auto"))
    console.print("x", style="red")
    assert "\x1b[31m" not in out.getvalue()


def test_quiet_leaves_only_the_report(tmp_path):
    cut = tmp_path / "cut.pcap"
    cut.write_bytes((ROOT / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap").read_bytes()[:-30])
    done = kaobs("analyze", str(cut), "--quiet")
    assert done.returncode == 0 and done.stderr == ""
    assert "warning: " in done.stdout  # the warning is in the report


# -- help ---------------------------------------------------------------------------------------------


def test_help_is_not_cut_and_every_option_is_described():
    import click

    from kaobs.cli import main

    top = kaobs("--help").stdout
    commands = top[top.index("Commands:"):].splitlines()[1:]
    assert [line.split()[0] for line in commands] == ["analyze", "lab", "watch"]
    for line in commands:  # whole sentences, not cut by click's 45-character short help
        assert line.endswith(".") and not line.endswith("..."), line
    ctx = click.Context(main)
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"kaobs {name} {param.opts[0]} has no help"
    hz = kaobs("analyze", "--help").stdout
    assert "CONFIG_HZ" in hz and "/proc/timer_list" in hz
    assert ctx is not None


def test_progress_is_silent_when_stderr_is_not_a_terminal():
    done = kaobs("analyze", "captures/seed_idle3_int2_cnt3_dead_client.pcap")
    assert done.returncode == 0 and done.stderr == ""


def test_progress_on_a_terminal_shows_rate_percent_and_time_left(tmp_path):
    from kaobs.progress import BATCH, AnalyzeProgress
    from tests.pcap_builders import LINKTYPE_RAW, Record, Tcp, frame_for, pcap

    conv = Conversation().handshake(0)
    for i in range(BATCH + 100):  # more than one batch, so the display is updated mid-file
        conv.data("client", 0.001 * (i + 1), 10)
    path = tmp_path / "big.pcap"
    records = [Record(int(s.t * 1e9), frame_for(LINKTYPE_RAW, Tcp(s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags,
                                                                  s.window, b"x" * s.payload_len)))
               for s in conv.segments]
    path.write_bytes(pcap(records, LINKTYPE_RAW))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    analysis = Analysis([5432])
    with AnalyzeProgress([str(path)], console, enabled=True) as progress:
        progress.feed(analysis, CaptureReader(path).records(), str(path), 0)
    shown = out.getvalue()
    assert "reading big.pcap" in shown and "packets" in shown and "/s" in shown and "%" in shown
    assert progress.records == BATCH + 103
    assert analysis.model.connections[0].client.port == 41000
