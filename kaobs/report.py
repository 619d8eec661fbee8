"""Reports: one JSON document (a stable contract) and a text view for people, rendered here and only here.

Both are built from the judged connections (`ConnectionReport`s) and the
run's `AnalysisRun`, so `kaobs analyze`, the final report of `kaobs watch` and
`kaobs lab` print the same thing. The JSON layout is documented in README.md;
keys are only ever added, never renamed or removed. A long report is written
one connection at a time (`write_json_streamed`, `render_text`), so its size
does not set the memory kaobs needs.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Sequence

from rich.console import Console
from rich.text import Text

from analysis.expect import Expectations, SideExpectation
from analysis.model import END_REASONS, KEEPALIVE, WINDOW
from analysis.path import PathSummary, idle_advice
from analysis.pgsessions import PostgresView
from analysis.stalls import StallReport
from analysis.pipeline import AnalysisRun, tally
from analysis.settings import CLIENT, ENABLED_KEY, SERVER, SETTINGS
from analysis.tolerance import PROCESSING_SLACK_S
from analysis.verdict import VERDICTS, Check, ConnectionReport, Finding, SideReport
from analysis.words import age, utc_clock

JSON_FORMAT_VERSION = 1
TIMELINE_HEAD = 12
TIMELINE_TAIL = 8

VERDICT_STYLE = {"match": "bold green", "mismatch": "bold red", "unverified": "yellow", "no_keepalive": "dim"}
STATUS_STYLE = {"match": "green", "mismatch": "bold red", "unobservable": "yellow"}


# -- JSON ---------------------------------------------------------------------


def to_json(
    run: AnalysisRun, reports: list[ConnectionReport], expectations: Expectations | None,
    postgres: PostgresView | None = None,
) -> dict[str, Any]:
    summary = {"connections": len(reports), **tally(reports)}
    path = PathSummary()
    for report in reports:
        path.add(report.connection, report.path_cut)
    return _document(run, summary, expectations, postgres,
                     [_with_postgres(_connection_json(r), r, postgres) for r in reports], path)


def write_json_streamed(
    out: IO[str], run: AnalysisRun, reports: Iterable[ConnectionReport], expectations: Expectations | None,
    postgres: PostgresView | None = None,
) -> dict[str, int]:
    """Write what `echo_json(to_json(run, list(reports), expectations))` writes, holding one report at a time.

    The summary comes before the connections, so each connection's JSON goes
    to a temporary file first, indented as it sits in the document. Returns
    the verdict counts (for the exit code).
    """
    encoder = json.JSONEncoder(indent=1)
    counts = dict.fromkeys(VERDICTS, 0)
    total = 0
    path = PathSummary()
    with tempfile.TemporaryFile("w+", encoding="utf-8", prefix="kaobs-json-") as spool:
        for report in reports:
            counts[report.verdict] += 1
            path.add(report.connection, report.path_cut)
            spool.write("\n  " if total == 0 else ",\n  ")
            total += 1
            # Nested two levels deep; JSON strings hold no raw newline, so re-indenting is exact.
            spool.write("".join(encoder.iterencode(_with_postgres(_connection_json(report), report, postgres)))
                        .replace("\n", "\n  "))
        document = _document(run, {"connections": total, **counts}, expectations, postgres, [], path)
        head = "".join(encoder.iterencode(document))
        assert head.endswith('"connections": []\n}')
        if total == 0:
            out.write(head + "\n")
        else:
            out.write(head[: -len("]\n}")])
            spool.seek(0)
            shutil.copyfileobj(spool, out)
            out.write("\n ]\n}\n")
    out.flush()
    return counts


def _document(
    run: AnalysisRun, summary: dict[str, int], expectations: Expectations | None,
    postgres: PostgresView | None, connections: list[dict[str, Any]], path: PathSummary,
) -> dict[str, Any]:
    return {
        "kaobs": {"format": JSON_FORMAT_VERSION},
        "input": {
            "sources": run.sources,
            "packets": run.packets,
            "tcp_segments": run.segments,
            "duplicates_dropped": run.duplicates,
            "ignored_segments": run.ignored_segments,
            "start": run.capture_start,
            "end": run.capture_end,
            "warnings": run.warnings,
            "kernel_drops": run.kernel_drops,
            "capture_path": run.capture_path,
            "filter": run.filter,
            "unreadable_packets": {"cut_by_snaplen": run.cut_by_snaplen, "untimed": run.untimed_packets,
                                   "unsupported_link_type": run.unsupported_packets},
            "time_backwards": run.time_backwards,
        },
        "expectations": _expectations_json(expectations),
        "timer_hz": run.hz,
        "summary": summary,
        "postgres": None if postgres is None else postgres.to_json(),
        "path": _path_json(path, expectations),
        "connections": connections,
    }


def _path_json(path: PathSummary, expectations: Expectations | None) -> dict[str, Any]:
    cut = path.idle_cut()
    warnings = path.warnings()
    idle_cut = None
    if cut is not None:
        idle_cut = {"lower": cut.lower, "upper": cut.upper, "evidence": cut.evidence, "matches": cut.matches,
                    "client_host": cut.hosts[0], "server_host": cut.hosts[1],
                    "advice": idle_advice(cut, *_first_probe_idles(expectations))}
    return {"idle_cut": idle_cut, "warnings": warnings}


def _first_probe_idles(expectations: Expectations | None) -> tuple[float | None, float | None]:
    """When each side's first probe comes after the last packet, as expected (None: not known)."""
    if expectations is None:
        return None, None
    return tuple(side.idle.value if side.enabled is not False else None  # type: ignore[return-value]
                 for side in (expectations.server, expectations.client))


def _with_postgres(out: dict[str, Any], report: ConnectionReport, postgres: PostgresView | None) -> dict[str, Any]:
    """The connection as Postgres knows it (`--dsn`, null without a database reading), then what the path did."""
    info = None if postgres is None else postgres.connections.get(report.connection.index)
    out["postgres"] = None if info is None else info.to_json()
    cut = report.path_cut
    out["path_cut"] = None if cut is None else {"kind": cut.kind, "t": cut.t, "evidence": cut.evidence, "far": cut.far,
                                                "idle_before": cut.idle_before, "inferred": cut.inferred}
    after = report.after_end
    out["after_end"] = None if after is None else {"side": after.side, "t": after.t, "frame": after.frame,
                                                   "what": after.what, "told_t": after.told_t,
                                                   "segments": after.segments}
    return out


def _expectations_json(expectations: Expectations | None) -> dict[str, Any]:
    if expectations is None:
        return {SERVER: None, CLIENT: None}
    return {SERVER: _side_expectation_json(expectations.server), CLIENT: _side_expectation_json(expectations.client)}


def _side_expectation_json(side: SideExpectation) -> dict[str, Any] | None:
    if not side.judged():
        return None
    out: dict[str, Any] = {"enabled": side.enabled}
    for key in (s.key for s in SETTINGS):
        setting = getattr(side, key)
        out[key] = None if setting.value is None else {"value": setting.value, "source": setting.source}
    return out


def _connection_json(report: ConnectionReport) -> dict[str, Any]:
    conn = report.connection
    return {
        "id": conn.index,
        "client": conn.client.endpoint,
        "server": conn.server.endpoint,
        "start": conn.start,
        "end": conn.end,
        "end_reason": conn.end_reason,
        "began_before_capture": not conn.saw_syn,
        "verdict": report.verdict,
        "sides": {SERVER: _side_json(report.server), CLIENT: _side_json(report.client)},
    }


def _side_json(side: SideReport) -> dict[str, Any]:
    endpoint = side.endpoint
    lost = {id(p) for p in side.lost_answers}
    probes = []
    for probe in endpoint.probes:
        keepalive = probe.kind == KEEPALIVE
        probes.append(
            {
                "frame": probe.frame,
                "t": probe.t,
                "kind": probe.kind,
                "answered": (probe.answer_t is not None and id(probe) not in lost) if keepalive else None,
                "answer_t": probe.answer_t,
                "answer_lost": (id(probe) in lost) if keepalive else None,
            }
        )
    observed = side.observed
    return {
        "endpoint": endpoint.endpoint,
        "keepalive_probes": side.keepalive_probe_count,
        "answered_probes": side.answered,
        "lost_answers": len(side.lost_answers),
        "window_probes": side.window_probe_count,
        "retransmissions": endpoint.retransmissions,
        "observed": {
            "idle": observed.idle,
            "interval": observed.interval,
            "count": observed.count,
            "user_timeout": observed.user_timeout,
        },
        "abort": None if side.abort is None else {"t": side.abort.t, "reason": side.abort.reason},
        "findings": [
            {"setting": f.setting, "expected": f.expected, "observed": f.observed, "status": f.status, "detail": f.detail}
            for f in side.findings
        ],
        "probes": probes,
        "stalls": [_stall_json(stall) for stall in side.stalls],
    }


def _stall_json(report: StallReport) -> dict[str, Any]:
    stall = report.stall
    give_up = report.give_up
    return {
        "start": stall.first_sent,
        "kind": stall.kind,
        "retransmissions": report.retransmissions,
        "resends": list(stall.resends),
        "outcome": report.outcome,
        "end": stall.end_t,
        "idle_before": stall.idle_before,
        "gave_up_between": None if report.gave_up_between is None else list(report.gave_up_between),
        "give_up": None if give_up is None else {"t": give_up.t, "rule": give_up.rule, "observed": give_up.observed},
        "inferred": report.inferred,
        "mismatch": report.mismatch,
    }


# -- text -----------------------------------------------------------------------
#
# Lines are built short enough for an 80-column terminal (the settings table:
# status first, provenance as numbered notes under it); prose that is longer
# (notes, Postgres lines) is wrapped on a terminal with its indentation kept,
# and never wrapped in a pipe or a file, so that one line stays one line for
# grep.

ONLY_CHOICES = ("mismatch", "abort", "probing", "path")
"""What `--only` can ask for: contradicted settings, keepalive aborts, keepalive probes seen, path failures
(a middlebox's cut, a stall with data in flight)."""
TRIAGE_LIMIT = 40
"""Problem connections named at the end of the report, per kind; more are counted, so memory stays bounded."""
TRIAGE_KINDS = ("mismatch", "outlived", "path", "abort")
"""The problem kinds, worst first: settings the packets contradict, a backend that outlived its
connection's keepalive abort, a path that cut the connection or data stuck in flight, a keepalive abort
(the peer stopped answering)."""


@dataclass(frozen=True, slots=True)
class TextOptions:
    """Which connections the text report lists and how (`--only`, `--summary`, `--all`)."""

    only: frozenset[str] = frozenset()
    summary: bool = False
    show_all: bool = False
    connection: int | None = None
    """--connection N: only that connection."""


class Lines:
    """Writes report lines: one console line each in a pipe; wrapped, indentation kept, on a terminal.

    Whether to wrap is the console's own `soft_wrap` (`text_console` sets it
    when stdout is not a terminal). A line that fits is printed as it is; a
    longer one is folded at word boundaries, its continuation indented a
    little more. Nothing is ever cut.
    """

    def __init__(self, console: Console) -> None:
        self.console = console

    def __call__(self, text: Text | str = "", indent: int = 0, style: str = "", hang: int = 2) -> None:
        body = text if isinstance(text, Text) else Text(text, style=style)
        console = self.console
        pad = Text(" " * indent)
        if console.soft_wrap or indent + body.cell_len <= console.width:
            console.print(pad + body, soft_wrap=True)
            return
        first = body.wrap(console, max(20, console.width - indent), overflow="fold")[0]
        first.rstrip()
        console.print(pad + first, soft_wrap=True)
        rest = body[len(first.plain):]
        rest = rest[len(rest.plain) - len(rest.plain.lstrip(" ")):]
        for part in rest.wrap(console, max(20, console.width - indent - hang), overflow="fold"):
            part.rstrip()
            console.print(Text(" " * (indent + hang)) + part, soft_wrap=True)


def render_text(
    console: Console, run: AnalysisRun, reports: Iterable[ConnectionReport], expectations: Expectations | None,
    postgres: PostgresView | None = None, options: TextOptions | None = None, unlisted: Unlisted | None = None,
) -> dict[str, int]:
    """The text report; `reports` may be a generator (read once). Returns the verdict counts.

    Each connection listed gets a block (or one line with `--summary`);
    connections without keepalive activity are counted, not listed, unless
    `--all`. The report ends with the problem connections, worst first, and
    the totals. Only small summary lines are kept for that ending, and at
    most `TRIAGE_LIMIT` of each kind: memory does not grow with the capture.
    `unlisted` counts connections judged earlier that this report would
    only count (`kaobs watch` keeps no more of them: `Unlisted`).
    """
    options = options or TextOptions()
    out = Lines(console)
    for warning in run.warnings:
        out(f"warning: {warning}", style="yellow")
    if postgres is not None:
        render_postgres(console, postgres)
    counts = dict.fromkeys(VERDICTS, 0)
    total = listed = quiet = filtered = 0
    legend = Legend()
    triage = Triage()
    path = PathSummary()
    if unlisted is not None:
        for verdict, number in unlisted.counts.items():
            counts[verdict] += number
        total, quiet, filtered = unlisted.total, unlisted.quiet, unlisted.filtered
        path = copy.deepcopy(unlisted.path)
    for report in reports:
        counts[report.verdict] += 1
        total += 1
        path.add(report.connection, report.path_cut)
        kinds = report_kinds(report, postgres)
        if is_listed(report, kinds, options):
            listed += 1
            if options.summary:
                out(summary_line(report, postgres))
            else:
                render_connection(console, report, expectations, postgres=postgres, legend=legend)
        elif options.only or options.connection is not None:
            filtered += 1
        else:
            quiet += 1
        triage.add(report, kinds, postgres)
    if not total:
        out(f"No Postgres connection in {', '.join(run.sources)} ({run.segments} TCP segments, none on the "
            f"server port{_filtered_words(run)}).")
        return counts
    if options.summary and listed:
        out()
    for line, style in path_lines(path, expectations):
        body = line.lstrip(" ")
        out(Text(body, style=style), indent=len(line) - len(body), hang=6)
    if options.connection is not None and not listed:
        out(f"no connection #{options.connection} (the connections are numbered 1 to {total})", style="yellow")
    if listed > 1 and not (options.only and options.only <= {"mismatch", "abort"}):
        triage.render(out)
    if quiet:
        out(f"{quiet} connection(s) without keepalive activity not listed (--all lists them)", style="dim")
    if filtered:
        chosen = (f"--connection {options.connection}" if options.connection is not None
                  else f"--only {','.join(sorted(options.only))}")
        out(f"{filtered} connection(s) not listed ({chosen})", style="dim")
    parts = [f"{n} {v}" for v, n in counts.items() if n]
    out(f"{total} connection(s): " + ", ".join(parts) + f"  [{run.packets} packets, {run.segments} TCP segments"
        + _filtered_words(run) + "]")
    return counts


def path_lines(path: PathSummary, expectations: Expectations | None) -> list[tuple[str, str]]:
    """The path across connections: the idle cut it shows, with the advice, and what does not fit."""
    lines: list[tuple[str, str]] = []
    cut = path.idle_cut()
    if cut is not None:
        lines.append((f"path: {idle_advice(cut, *_first_probe_idles(expectations))}", "bold yellow"))
        lines += [(f"  {line}", "dim") for line in cut.evidence]
    lines += [(f"path: warning: {warning}", "yellow") for warning in path.warnings()]
    if lines:
        lines.append(("", ""))
    return lines


def report_kinds(report: ConnectionReport, postgres: PostgresView | None = None) -> frozenset[str]:
    """What a connection is, for `--only` and the triage: mismatch, abort, probing, path, outlived."""
    kinds = set()
    if report.verdict == "mismatch":
        kinds.add("mismatch")
    if report.server.abort is not None or report.client.abort is not None:
        kinds.add("abort")
    if report.server.probes or report.client.probes:
        kinds.add("probing")
    if report.path_cut is not None or _troubled_stalls(report):
        kinds.add("path")
    info = None if postgres is None else postgres.connections.get(report.connection.index)
    if info is not None and info.after_abort is not None and info.after_abort.outlived:
        kinds.add("outlived")
    return frozenset(kinds)


def is_listed(report: ConnectionReport, kinds: frozenset[str], options: TextOptions) -> bool:
    if options.connection is not None:
        return report.connection.index == options.connection
    if options.only:
        return bool(kinds & options.only)
    return options.show_all or bool(kinds) or not _without_activity(report)


@dataclass(slots=True)
class Unlisted:
    """Connections the text report only counts, counted as they were judged (so nothing else of them is kept).

    What `render_text` does with a connection it does not list, done
    beforehand: its verdict counted, its path evidence added, and whether
    it was left out for being quiet or by --only/--connection.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    total: int = 0
    quiet: int = 0
    filtered: int = 0
    path: PathSummary = field(default_factory=PathSummary)

    def add(self, report: ConnectionReport, options: TextOptions) -> None:
        self.counts[report.verdict] += 1
        self.total += 1
        self.path.add(report.connection, report.path_cut)
        if options.only or options.connection is not None:
            self.filtered += 1
        else:
            self.quiet += 1


def text_needs(options: TextOptions) -> Callable[[ConnectionReport], bool]:
    """Whether the text report needs a connection's whole report: it lists it, or it is a problem (the triage).

    The others are only counted (`Unlisted`); their kinds are all empty, so
    the triage would not have shown them either.
    """
    def needs(report: ConnectionReport) -> bool:
        kinds = report_kinds(report)
        return bool(kinds) or is_listed(report, kinds, options)

    return needs


def _without_activity(report: ConnectionReport) -> bool:
    """Nothing keepalive-shaped happened: no probe of either kind, no abort, nothing judged either way."""
    return (report.verdict == "no_keepalive" and not report.server.window_probe_count
            and not report.client.window_probe_count and report.path_cut is None and report.after_end is None
            and not _troubled_stalls(report))


def _troubled_stalls(report: ConnectionReport) -> list[tuple[str, StallReport]]:
    """Stalls that were not just TCP recovering a lost segment: given up on, reset, or still going."""
    return [(side.role, stall) for side in (report.server, report.client) for stall in side.stalls
            if stall.outcome != "acked"]


class Triage:
    """The problem connections, as one line each, kept for the end of the report (at most TRIAGE_LIMIT per kind)."""

    def __init__(self, limit: int = TRIAGE_LIMIT) -> None:
        self.limit = limit
        self.lines: dict[str, list[Text]] = {kind: [] for kind in TRIAGE_KINDS}
        self.counts: dict[str, int] = dict.fromkeys(TRIAGE_KINDS, 0)

    def add(self, report: ConnectionReport, kinds: frozenset[str], postgres: PostgresView | None) -> None:
        kind = next((k for k in TRIAGE_KINDS if k in kinds), None)
        if kind is None:
            return
        self.counts[kind] += 1
        if len(self.lines[kind]) < self.limit:
            self.lines[kind].append(summary_line(report, postgres))

    def render(self, out: Lines) -> None:
        problems = sum(self.counts.values())
        if not problems:
            return
        out(Text(f"Problems, worst first ({problems}):", style="bold"))
        for kind in TRIAGE_KINDS:
            for line in self.lines[kind]:
                out(line, indent=2, hang=4)
            more = self.counts[kind] - len(self.lines[kind])
            if more:
                out(f"... and {more} more ({kind}; --only {'abort' if kind == 'outlived' else kind} --summary lists them)",
                    indent=2, style="dim")
        out()


def summary_line(report: ConnectionReport, postgres: PostgresView | None = None) -> Text:
    """One line for a connection: id, verdict, endpoints, backend when known, and the one-line reason."""
    conn = report.connection
    line = Text()
    line.append(f"#{conn.index} ", style="bold")
    line.append(report.verdict.upper(), style=VERDICT_STYLE[report.verdict])
    line.append(f" {conn.client.endpoint} -> {conn.server.endpoint}")
    backend = backend_words(postgres, conn.index)
    if backend:
        line.append(f" {backend}")
    line.append(f": {one_line_reason(report, postgres)}")
    return line


def one_line_reason(report: ConnectionReport, postgres: PostgresView | None = None) -> str:
    """Why the connection is what it is, in one short clause."""
    bad = [(side, f) for side in (report.server, report.client) for f in side.findings if f.status == "mismatch"]
    if bad:
        side, finding = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return (f"{side.role} {finding.setting}: expected {finding.value_text}, "
                f"{_observed_words(report, side, finding)}{more}")
    info = None if postgres is None else postgres.connections.get(report.connection.index)
    if info is not None and info.after_abort is not None and info.after_abort.outlived:
        return f"backend pid {info.after_abort.pid} outlived its connection's keepalive abort"
    cut = report.path_cut
    if cut is not None:
        idle = f" after {cut.idle_before:.1f} s idle" if cut.idle_before is not None else ""
        how = {"reset": "reset by a middlebox", "drop": "dropped by the path"}.get(cut.kind, cut.kind)
        words = f"{how}{idle}" + (" (inferred: silent longer than the path keeps connections)" if cut.inferred else "")
        aborted = next((side for side in (report.server, report.client) if side.abort is not None), None)
        if aborted is not None:
            words += (f"; the {aborted.role} aborted it after {aborted.abort.unanswered_probes} unanswered "  # type: ignore[union-attr]
                      "probe(s)")
        return words
    stalls = _troubled_stalls(report)
    if stalls:
        role, stall = stalls[0]
        what = "zero-window probes" if stall.kind == WINDOW else "data unacknowledged"
        ending = {"gave_up": "the kernel gave up in silence", "reset": "ended by a RST",
                  "open": "still going at the end"}.get(stall.outcome, stall.outcome)
        return f"{role} {what}, {stall.retransmissions} resend(s), {ending}; keepalives do not apply"
    for side in (report.server, report.client):
        if side.abort is not None:
            peer = CLIENT if side.role == SERVER else SERVER
            return (f"the {side.role} aborted it at {utc_clock(side.abort.t)} after {side.abort.unanswered_probes} "
                    f"unanswered probe(s): the {peer} stopped answering")
    activity = []
    for side in (report.server, report.client):
        if side.probes:
            activity.append(f"{side.role} {len(side.probes)} probe(s), {side.answered} answered")
        if side.window_probe_count:
            activity.append(f"{side.role} {side.window_probe_count} zero-window probe(s), not keepalive")
    verdict = {"match": "the settings agree", "unverified": "nothing judged (no expectation given)",
               "no_keepalive": "no keepalive probe"}[report.verdict]
    return "; ".join(activity + [verdict])


def _observed_words(report: ConnectionReport, side: SideReport, finding: Finding) -> str:
    """What was seen instead: the observed number, or what did not come."""
    if finding.key == ENABLED_KEY:
        return "probes seen" if side.probes else "no probe seen"
    check = finding.deciding
    t0 = report.connection.start
    if check is not None and check.what == "quiet" and check.since is not None:
        return f"no probe in the idle span from +{check.since - t0:.3f} s"
    if check is not None and check.what == "missing" and check.due is not None:
        event = "the abort" if finding.key in ("count", "user_timeout") else "the probe"
        return f"{event} due at +{check.due - t0:.3f} s did not come"
    if finding.observed != "-":
        return f"observed {finding.observed}"
    return "contradicted"


class Legend:
    """Where expected values came from, numbered once per report: `[1]` in the table, the words under it."""

    PLAIN = ("--expect", "client DSN", "lab --libpq")

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, source: str) -> tuple[str, bool]:
        """(" [n]" or "", whether n is new) for a source; the plainest sources get no note."""
        if not source or source in self.PLAIN or source.endswith("(client DSN)"):
            return "", False
        number = self.numbers.get(source)
        if number is not None:
            return f" [{number}]", False
        number = self.numbers[source] = len(self.numbers) + 1
        return f" [{number}]", True


def _filtered_words(run: AnalysisRun) -> str:
    """What the user's filter left out, for the summary line (nothing without a filter)."""
    if run.filter is None or run.filter.get("filtered_out") is None:
        return ""
    return f", {run.filter['filtered_out']} left out by the filter"


def render_connection(
    console: Console, report: ConnectionReport, expectations: Expectations | None = None, verbose: bool = False,
    postgres: PostgresView | None = None, legend: Legend | None = None,
) -> None:
    """One connection: headline, timeline, Postgres lines, the settings table and what decided it."""
    out = Lines(console)
    legend = legend or Legend()
    conn = report.connection
    headline = Text()
    headline.append(f"#{conn.index} ", style="bold")
    headline.append(report.verdict.upper(), style=VERDICT_STYLE[report.verdict])
    headline.append(f"  {conn.client.endpoint} -> {conn.server.endpoint}")
    out(headline)
    when = Text(f"{utc_clock(conn.start)} .. {utc_clock(conn.end)} UTC ({conn.end - conn.start:.3f} s), "
                f"{end_words(conn.end_reason)}")
    if not conn.saw_syn:
        when.append(" (began before the capture)", style="dim")
    out(when, indent=4)
    for line in strip_lines(report, strip_glyphs(console.encoding)):
        out(line, indent=4, hang=8)
    for line in timeline(report):
        out(line, indent=4, hang=13)
    if postgres is not None:
        for line, alarm in postgres_connection_lines(postgres, conn.index):
            out(line, indent=4, style="bold red" if alarm else "", hang=10)
    sides = [side for side in (report.server, report.client) if side.findings]
    if not sides:
        for side in (report.server, report.client):
            o = side.observed
            if side.probes or side.abort:
                out(f"{side.role}: observed idle {_s(o.idle)}, interval {_s(o.interval)}, "
                    f"count {o.count if o.count is not None else '-'} (no expectation given: not judged)", indent=4)
        console.print()
        return
    rows: list[tuple[str, str, str, str, str]] = []
    new_sources: list[tuple[int, str]] = []
    for side in sides:
        for f in side.findings:
            mark, new = legend.mark(f.source)
            if new:
                new_sources.append((legend.numbers[f.source], f.source))
            rows.append((f.status, side.role, f.setting, f.value_text + mark, observed_cell(side, f)))
    header = ("status", "side", "setting", "expected", "observed")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(5)]

    def row_text(cells: Sequence[str], status_style: str) -> Text:
        text = Text()
        for i, cell in enumerate(cells):
            last = i == len(cells) - 1
            text.append(cell if last else cell.ljust(widths[i]) + "  ", style=status_style if i == 0 else "")
        return text

    out(row_text(header, "bold"), indent=4)
    for row in rows:
        out(row_text(row, STATUS_STYLE[row[0]]), indent=4)
    for number, source in new_sources:
        out(f"[{number}] {source}", indent=4, style="dim", hang=4)
    for side in sides:
        for f in side.findings:
            words = finding_words(report, side, f, verbose)
            if words is not None:
                out(f"{side.role} {f.setting}: {words}", indent=4, style="" if f.status == "mismatch" else "dim", hang=4)
    console.print()


def observed_cell(side: SideReport, finding: Finding) -> str:
    if finding.key == ENABLED_KEY:
        return "probes seen" if side.probes else "no probe"
    return finding.observed


def finding_words(report: ConnectionReport, side: SideReport, finding: Finding, verbose: bool = False) -> str | None:
    """What decided a finding, in plain words, where it is worth a line.

    A contradiction always says what was seen and what the settings said; an
    agreement only when the timer wheel's tolerance decided it (the event was
    later than the processing slack alone allows); "unobservable" only when
    the table shows an observed number that was not judged. `verbose`: every
    finding's detail.
    """
    if finding.status == "mismatch":
        check = finding.deciding
        return check_words(report, side, check) if check is not None else finding.detail
    if finding.status == "match":
        timed = [c for c in finding.checks if c.ok and c.due is not None and c.t is not None and c.tolerance is not None]
        late = max(timed, key=lambda c: c.t - c.due, default=None)  # type: ignore[operator]
        if late is not None and _close_call(late):
            return _tolerance_words(report, side, late)
        return finding.detail if verbose else None
    if finding.observed != "-" or verbose:
        return f"not judged: {finding.detail}"
    return None


def _close_call(check: Check) -> bool:
    """Did the tolerance decide this agreement? The event came later than processing alone explains, and
    used more than half of the lateness the timer wheel allows."""
    assert check.t is not None and check.due is not None and check.tolerance is not None
    late = check.t - check.due
    return late > PROCESSING_SLACK_S and late > check.tolerance.late / 2


def _numbers(side: SideReport) -> dict[float, int]:
    """Each keepalive probe's number across the connection (1, 2, 3, ...), by its time."""
    return {view.t: number for number, view in enumerate(side.probes, 1)}


def _event_words(side: SideReport, check: Check) -> str:
    if check.what == "abort":
        return "the abort"
    number = _numbers(side).get(check.t) if check.t is not None else None
    return f"probe {number}" if number is not None else "the probe"


def _since_words(report: ConnectionReport, side: SideReport, check: Check) -> str:
    """What a timer counted from: the last accepted packet (the answer to probe n?), or probe n."""
    t0 = report.connection.start
    since = check.since
    if since is None:
        return "?"
    numbers = _numbers(side)
    if check.setting == "interval" or since in numbers and check.what in ("abort", "missing"):
        number = numbers.get(since)
        if number is not None:
            return f"probe {number}"
    answered = next((n for n, v in enumerate(side.probes, 1) if v.probe.answer_t == since), None)
    if answered is not None:
        return f"the answer to probe {answered}"
    return f"the last packet the {side.role} accepted, at +{since - t0:.3f} s"


def check_words(report: ConnectionReport, side: SideReport, check: Check) -> str:
    """A contradiction in plain words: what came (or not), when it was due, by how much it missed."""
    t0 = report.connection.start
    if check.what in ("probe", "abort") and check.due is not None and check.since is not None and check.t is not None:
        delta = check.t - check.due
        window = check.tolerance
        words = (f"{_event_words(side, check)} came {check.t - check.since:.3f} s after {_since_words(report, side, check)}, "
                 f"due after {check.due - check.since:.3f} s: {abs(delta):.3f} s {'early' if delta < 0 else 'late'}")
        if window is not None:
            words += (f" (a timer may fire at most {_ms(window.early)} early)" if delta < 0
                      else f" (more than the {_ms(window.late)} a {check.due - check.since:g} s timer may be late)")
        return words
    if check.what == "quiet" and check.due is not None and check.since is not None:
        return (f"no keepalive probe in the idle span from +{check.since - t0:.3f} s; one was due "
                f"{check.due - check.since:g} s into it, at +{check.due - t0:.3f} s")
    if check.what == "missing" and check.due is not None:
        event = "the abort" if check.setting in ("count", "user_timeout") else "a probe"
        return (f"{event} due at +{check.due - t0:.3f} s ({check.due - (check.since or check.due):.3f} s after "
                f"{_since_words(report, side, check)}) did not come")
    if check.what == "extra_probe":
        return f"{_event_words(side, check)} came where the settings say the connection is aborted instead"
    return check.detail


def _tolerance_words(report: ConnectionReport, side: SideReport, check: Check) -> str:
    assert check.t is not None and check.due is not None and check.tolerance is not None and check.since is not None
    length = check.due - check.since
    return (f"{_event_words(side, check)} came {check.t - check.since:.3f} s after {_since_words(report, side, check)}, "
            f"{(check.t - check.due) * 1000:.0f} ms after it was due: a close call, within the "
            f"{_ms(check.tolerance.late)} a {length:g} s timer may be late at this HZ")


def _ms(seconds: float) -> str:
    return f"{seconds:g} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def render_postgres(console: Console, postgres: PostgresView) -> None:
    """The server as read with --dsn: where each setting came from, and what could not be read."""
    out = Lines(console)
    for line, style in postgres_server_lines(postgres):
        indent = len(line) - len(line.lstrip(" "))
        out(Text(line.lstrip(" "), style=style), indent=indent, hang=2)
    console.print()


# -- the strip: a connection's keepalive episode at a glance, one line per side --------------------------

STRIP_GLYPHS = {"answered": "\u2713", "unanswered": "\u2717", "dot": "\u00b7", "resend": "\u21bb", "cut": "\u2702",
                "times": "\u00d7"}
"""✓ answered probe, ✗ unanswered (as the prober saw it), · idle, ↻ retransmission, ✂ the path's cut, × a run."""
PLAIN_GLYPHS = {"answered": "+", "unanswered": "x", "dot": "-", "resend": "~", "cut": "%", "times": "*"}
"""For an output whose encoding has no such characters (PYTHONIOENCODING=latin-1, a legacy locale): a
traceback there would lose the whole report."""
STRIP_RUN = 4
"""This many equal probes in a row, or more, are written once with their count (✓×12)."""
STRIP_WIDTH = 68
"""What a strip may take at 80 columns: the block's indent (4) and the side's name (8) come first."""


def strip_glyphs(encoding: str | None) -> dict[str, str]:
    """The strip's glyphs, or plain ones when the output's encoding cannot write them."""
    try:
        "".join(STRIP_GLYPHS.values()).encode(encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return PLAIN_GLYPHS
    return STRIP_GLYPHS


def strip_lines(report: ConnectionReport, glyphs: dict[str, str] = STRIP_GLYPHS) -> list[str]:
    """``server  data ···idle 3.0 s··· ✓ ✓ ✗ ✗ ✗ RST``: each side's keepalive episode in one line.

    Per side that probed, aborted, stalled or sent zero-window probes, in time
    order: the last packet it accepted before an idle (``data``) and how long
    the idle ran until its first probe, each probe answered (✓) or not (✗),
    data it sent that the peer never took (``data ↻×5``, and how that ended),
    then how the side ended (``RST``, ``FIN``) and the path's cut (``✂``).
    A run of equal probes is written once with its count, so a strip fits
    80 columns.
    """
    cut = report.path_cut
    lines = []
    for side in (report.server, report.client):
        items = _strip_items(report, side, glyphs)
        if not items:
            continue
        if cut is not None:
            how = f"{glyphs['cut']}path {'RST' if cut.kind == 'reset' else cut.kind}"
            items.append((cut.t, how + (" (inferred)" if cut.inferred else "")))
        items.sort(key=lambda item: item[0])
        tokens = _runs([token for _, token in items], glyphs, STRIP_RUN)
        if len(" ".join(tokens)) > STRIP_WIDTH:
            tokens = _runs(tokens, glyphs, 2)
        lines.append(f"{side.role:<6}  " + " ".join(tokens))
    if not lines and cut is not None and cut.idle_before is not None:
        dots = _dots(cut.idle_before, glyphs)
        how = "RST" if cut.kind == "reset" else cut.kind
        lines.append(f"path    {dots}silent {age(cut.idle_before)}{dots} {glyphs['cut']}{how}"
                     + (" (inferred)" if cut.inferred else ""))
    return lines


def _dots(seconds: float, glyphs: dict[str, str]) -> str:
    """Longer idles get a few more dots: 3 up to 10 s, 6 from 1000 s."""
    return glyphs["dot"] * (3 + min(3, max(0, int(math.log10(max(seconds, 1.0))))))


def _strip_items(report: ConnectionReport, side: SideReport, glyphs: dict[str, str]) -> list[tuple[float, str]]:
    endpoint = side.endpoint
    items: list[tuple[float, str]] = []
    previous_answer: float | None = None
    for number, view in enumerate(side.probes, 1):
        probe = view.probe
        if view.index == 1 and view.anchor is not None and view.anchor != previous_answer:
            dots = _dots(probe.t - view.anchor, glyphs)
            items.append((view.anchor, f"data {dots}idle {age(probe.t - view.anchor)}{dots}"))
        elif number == 1 and view.anchor is None:
            items.append((probe.t, glyphs["dot"] * 2))  # the capture began during the probes
        items.append((probe.t, glyphs["answered"] if view.answered else glyphs["unanswered"]))
        previous_answer = probe.answer_t if view.answered else None
    window_stalls = False
    for stall in side.stalls:
        if stall.outcome == "acked" and stall.retransmissions < 3:
            continue  # a lost segment resent once or twice is just TCP
        first = stall.stall.first_sent
        idle = stall.stall.idle_before
        if idle is not None and idle >= 1:
            dots = _dots(idle, glyphs)
            items.append((first, f"{dots}idle {age(idle)}{dots}"))
        if stall.kind == WINDOW:
            window_stalls = True
            what = f"0-window{glyphs['times']}{stall.retransmissions}"
        else:
            what = f"data {glyphs['resend']}{glyphs['times']}{stall.retransmissions}"
        ending = {"gave_up": " gave up", "reset": "", "acked": " ACK"}.get(stall.outcome, "")
        items.append((first, what + ending))
    if endpoint.window_probes and not window_stalls:
        first = next(p.t for p in endpoint.probes if p.kind == WINDOW)
        items.append((first, f"0-window{glyphs['times']}{endpoint.window_probes}"))
    if not items and side.abort is None:
        return []
    cut = report.path_cut
    if side.abort is not None:
        items.append((side.abort.t, "RST"))
    elif endpoint.reset is not None and not (cut is not None and cut.kind == "reset" and cut.t == endpoint.reset.t):
        items.append((endpoint.reset.t, "RST"))
    if endpoint.fin_t is not None:
        items.append((endpoint.fin_t, "FIN"))
    after = report.after_end
    if after is not None and after.side == side.role:
        items.append((after.t, "returns"))
    return items


def _runs(tokens: list[str], glyphs: dict[str, str], least: int) -> list[str]:
    """Runs of `least` or more equal probe glyphs written once with their count: ✓×12."""
    out: list[str] = []
    i = 0
    singles = (glyphs["answered"], glyphs["unanswered"])
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        if tokens[i] in singles and j - i >= least:
            out.append(f"{tokens[i]}{glyphs['times']}{j - i}")
        else:
            out.extend(tokens[i:j])
        i = j
    return out


def timeline(report: ConnectionReport) -> list[str]:
    """Probes, answers and the abort of both sides, in time order, relative to the start.

    Probes are numbered across the connection per side; an unanswered probe
    says its place in the series that the count limits ("unanswered 2/3").
    """
    conn = report.connection
    t0 = conn.start
    events: list[tuple[float, str]] = []
    for side in (report.server, report.client):
        endpoint = side.endpoint
        events.extend(probe_events(side, t0))
        window_probes = [p for p in endpoint.probes if p.kind == WINDOW]
        if window_probes:
            first, last = window_probes[0], window_probes[-1]
            events.append(
                (first.t, f"{side.role} zero-window probes x{len(window_probes)} +{first.t - t0:.3f}..+{last.t - t0:.3f} s "
                          "(persist timer, not keepalive)")
            )
        if side.abort is not None:
            why = "keepalive count reached" if side.abort.reason == "keepalive_count" else "user timeout reached"
            least = "" if side.abort.since_accepted is not None else "at least "  # the series began before the capture
            events.append((side.abort.t, f"{side.role} ABORT (RST) after {least}{side.abort.unanswered_probes} "
                                         f"unanswered probe(s): {why}"))
        elif endpoint.reset is not None and not (report.path_cut is not None and report.path_cut.kind == "reset"
                                                 and report.path_cut.t == endpoint.reset.t):
            events.append((endpoint.reset.t, f"{side.role} RST (not a keepalive abort)"))
        if endpoint.fin_t is not None:
            events.append((endpoint.fin_t, f"{side.role} FIN"))
    events += path_events(report)
    events.sort(key=lambda e: e[0])
    lines = [f"+{t - t0:8.3f} s  {text}" for t, text in events]
    if len(lines) > TIMELINE_HEAD + TIMELINE_TAIL:
        hidden = len(lines) - TIMELINE_HEAD - TIMELINE_TAIL
        lines = lines[:TIMELINE_HEAD] + [f"           ... {hidden} more events (see --format json)"] + lines[-TIMELINE_TAIL:]
    return lines


def path_events(report: ConnectionReport) -> list[tuple[float, str]]:
    """Stalls, the path's cut and the side that learnt of the end too late, as timeline events."""
    t0 = report.connection.start
    events = [(stall.stall.first_sent, stall_words(side.role, stall, t0))
              for side in (report.server, report.client) for stall in side.stalls
              if stall.outcome != "acked" or stall.retransmissions >= 3]  # a lost segment resent once is just TCP
    cut = report.path_cut
    if cut is not None:
        idle = f" after {cut.idle_before:.1f} s idle" if cut.idle_before is not None else ""
        inferred = " (inferred)" if cut.inferred else ""
        events.append((cut.t, f"PATH {cut.kind.upper()}{inferred}{idle}: {cut.evidence}"))
    after = report.after_end
    if after is not None:
        ended = report.connection.end
        told = f"; the {report.connection.ended_by}'s kernel answered with a RST" if after.told_t is not None else ""
        events.append((after.t, f"{after.side} found out {after.t - ended:.3f} s after the connection ended, on its "
                                f"next send ({after.what}){told}"))
    return events


def stall_words(role: str, stall: StallReport, t0: float) -> str:
    """One stall in a line: what stalled, what the kernel did, what bounds it."""
    if stall.kind == WINDOW:
        what = f"{role} zero-window probes (its data queued, the peer's window closed), {stall.retransmissions} probe(s)"
    else:
        what = f"{role} data unacknowledged, {stall.retransmissions} retransmission(s)"
    since = f" from +{stall.stall.first_sent - t0:.3f} s"
    if stall.stall.idle_before is not None and stall.stall.idle_before >= 1:
        since += f" (after {stall.stall.idle_before:.1f} s idle)"
    outcome = stall.outcome
    if outcome == "acked":
        tail = f"; taken at +{(stall.stall.end_t or t0) - t0:.3f} s"
    elif outcome == "reset":
        tail = f"; ended by a RST at +{(stall.stall.end_t or t0) - t0:.3f} s"
    elif outcome == "gave_up":
        assert stall.gave_up_between is not None
        low, high = stall.gave_up_between
        tail = f"; gave up in silence (no RST) between +{low - t0:.3f} s and +{high - t0:.3f} s"
        if stall.mismatch is not None:
            tail += f"; MISMATCH: {stall.mismatch}"
        elif stall.give_up is not None:
            tail += f", as {stall.give_up.rule} says (+{stall.give_up.t - t0:.3f} s)"
        elif stall.inferred is not None:
            tail += f": {stall.inferred.split(': ', 1)[-1]}"
    else:
        tail = "; still going at the end of the capture"
        if stall.give_up is not None:
            tail += f"; the kernel gives up at +{stall.give_up.t - t0:.3f} s by {stall.give_up.rule}"
        elif stall.kind == WINDOW:
            tail += "; only tcp_user_timeout bounds it while the peer answers"
        else:
            tail += "; tcp_user_timeout, or tcp_retries2 (15: about 15 min), bounds it"
    why = " (persist timer)" if stall.kind == WINDOW else ""
    return f"{what}{since}{tail}; keepalives do not apply while data is in flight{why}"


def probe_events(side: SideReport, t0: float) -> list[tuple[float, str]]:
    settings = side.settings
    count_rules = settings is not None and settings.count and not settings.user_timeout
    views = side.probes
    last_series_total = views[-1].index if views and side.abort is not None else None
    events = []
    for number, view in enumerate(views, 1):
        probe = view.probe
        text = f"{side.role} probe {number}"
        if view.index == 1 and view.anchor is not None:
            text += f" after {probe.t - view.anchor:.3f} s idle"
        if view.answered:
            text += f": answered in {(probe.answer_t - probe.t) * 1000:.2f} ms"  # type: ignore[operator]
        else:
            in_last_series = all(v.index > 1 for v in views[number:])
            total = settings.count if count_rules else (last_series_total if in_last_series else None)  # type: ignore[union-attr]
            text += f": unanswered {view.index}" + (f"/{total}" if total else "")
            if view.answer_lost:
                text += f" (its answer at +{probe.answer_t - t0:.3f} s was lost before reaching the {side.role})"  # type: ignore[operator]
        events.append((probe.t, text))
    return events


def end_words(reason: str) -> str:
    return "still open at the end of the capture" if reason == "open" else END_REASONS.get(reason, reason)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def backend_words(postgres: PostgresView | None, index: int) -> str:
    info = None if postgres is None else postgres.connections.get(index)
    backend = None if info is None else info.backend
    if backend is None:
        return ""
    app = f" {backend.application_name!r}" if backend.application_name else ""
    return f"pid {backend.pid}{app}"


def postgres_server_lines(view: PostgresView) -> list[tuple[str, str]]:
    """(line, style) for the head of the text report: the server, where each setting came from, warnings."""
    lines: list[tuple[str, str]] = []
    if view.error is not None:
        lines.append((f"postgres: {view.error}", "yellow"))
        return lines
    server = view.server
    if server is not None:
        lines.append((f"postgres: {server.address}:{server.port} (PostgreSQL {server.version}) via --dsn {view.dsn}; "
                      f"settings and sessions read at {utc_clock(server.read_at)}", "bold"))
    for line in view.setting_lines:
        lines.append((f"  server {line}", ""))
    for warning in view.warnings:
        lines.append((f"  warning: {warning}", "yellow"))
    return lines


def postgres_connection_lines(view: PostgresView, index: int) -> list[tuple[str, bool]]:
    """(line, is_finding) for one connection: its backend or why none, session notes, the backend after the abort."""
    info = view.connections.get(index)
    if info is None:
        return []
    lines: list[tuple[str, bool]] = []
    backend = info.backend
    if backend is not None:
        host = f" ({backend.client_hostname})" if backend.client_hostname else ""
        since = f" since {utc_clock(backend.state_change)}" if backend.state_change else ""
        lines.append((f"postgres: backend pid {backend.pid}, user {backend.usename}, database {backend.datname}, "
                      f"application_name {backend.application_name!r}{host}", False))
        lines.append((f"postgres: started {utc_clock(backend.backend_start)}, state {backend.state}{since}", False))
    elif info.reason:
        lines.append((f"postgres: not matched: {info.reason}", False))
    for note in info.notes:
        lines.append((f"postgres: {note}", False))
    check = info.after_abort
    if check is not None:
        if check.outlived:
            lines.append((f"postgres: FINDING {check.detail}", True))
        elif check.status == "gone":
            lines.append((f"postgres: after the server's keepalive abort: {check.detail}", False))
        else:
            lines.append((f"postgres: after the server's keepalive abort: unknown ({check.detail})", False))
    return lines


# -- consoles ---------------------------------------------------------------------

COLOR_CHOICES = ("auto", "always", "never")


def _color_options(color: str) -> dict[str, Any]:
    """rich's Console arguments for --color: auto (a terminal, unless NO_COLOR is set), always, never."""
    if color == "never":
        return {"color_system": None, "no_color": True}
    if color == "always":
        return {"color_system": "standard", "no_color": False}
    return {}


class _ReportConsole(Console):
    """rich's Console, but a reader that went away (``| head``) raises BrokenPipeError to the command.

    rich's own answer is exit 1, which says the analysis failed; the command
    decides instead (`kaobs.options.stdout_closed`).
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def text_console(color: str = "auto") -> Console:
    """The console reports go to: wrapped at the terminal's width, or never wrapped in a pipe or a file."""
    return _ReportConsole(highlight=False, soft_wrap=not sys.stdout.isatty(), **_color_options(color))


def error_console(color: str = "auto") -> Console:
    """stderr, for warnings, alarms and progress: wrapped on a terminal only, like `text_console`."""
    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty(), **_color_options(color))


def echo_json(document: object, out: IO[str] | None = None) -> None:
    """Print `document` as `json.dumps(document, indent=1)` would, without building the whole string.

    The encoder with indent yields a million small pieces for a big report;
    joining them all at once doubled the peak memory of `kaobs analyze`.
    """
    out = out or sys.stdout
    pieces: list[str] = []
    for piece in json.JSONEncoder(indent=1).iterencode(document):
        pieces.append(piece)
        if len(pieces) >= 16384:
            out.write("".join(pieces))
            pieces.clear()
    pieces.append("\n")
    out.write("".join(pieces))
    out.flush()
