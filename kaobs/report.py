"""Reports: one JSON document (a stable contract) and a text view for people, rendered here and only here.

Both are built from the judged connections (`ConnectionReport`s) and the
run's `AnalysisRun`, so `kaobs analyze`, the final report of `kaobs watch` and
`kaobs lab` print the same thing. The JSON layout is documented in README.md;
keys are only ever added, never renamed or removed. A long report is written
one connection at a time (`write_json_streamed`, `render_text`), so its size
does not set the memory kaobs needs.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from typing import IO, Any, Iterable

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from analysis.expect import Expectations, SideExpectation
from analysis.model import END_REASONS, KEEPALIVE, WINDOW
from analysis.pgsessions import PostgresView
from analysis.pipeline import AnalysisRun, tally
from analysis.settings import CLIENT, SERVER, SETTINGS
from analysis.verdict import VERDICTS, ConnectionReport, SideReport
from analysis.words import utc_clock

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
    return _document(run, summary, expectations, postgres,
                     [_with_postgres(_connection_json(r), r, postgres) for r in reports])


def write_json_streamed(
    out: IO[str], run: AnalysisRun, reports: Iterable[ConnectionReport], expectations: Expectations | None,
) -> dict[str, int]:
    """Write what `echo_json(to_json(run, list(reports), expectations))` writes, holding one report at a time.

    The summary comes before the connections, so each connection's JSON goes
    to a temporary file first, indented as it sits in the document. Returns
    the verdict counts (for the exit code).
    """
    encoder = json.JSONEncoder(indent=1)
    counts = dict.fromkeys(VERDICTS, 0)
    total = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8", prefix="kaobs-json-") as spool:
        for report in reports:
            counts[report.verdict] += 1
            spool.write("\n  " if total == 0 else ",\n  ")
            total += 1
            # Nested two levels deep; JSON strings hold no raw newline, so re-indenting is exact.
            spool.write("".join(encoder.iterencode(_with_postgres(_connection_json(report), report, None)))
                        .replace("\n", "\n  "))
        document = _document(run, {"connections": total, **counts}, expectations, None, [])
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
    postgres: PostgresView | None, connections: list[dict[str, Any]],
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
        "connections": connections,
    }


def _with_postgres(out: dict[str, Any], report: ConnectionReport, postgres: PostgresView | None) -> dict[str, Any]:
    """The connection as Postgres knows it (`--dsn`); null without a database reading."""
    info = None if postgres is None else postgres.connections.get(report.connection.index)
    out["postgres"] = None if info is None else info.to_json()
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
    }


# -- text -----------------------------------------------------------------------


def render_text(
    console: Console, run: AnalysisRun, reports: Iterable[ConnectionReport], expectations: Expectations | None,
    postgres: PostgresView | None = None,
) -> dict[str, int]:
    """The text report; `reports` may be a generator (read once). Returns the verdict counts."""
    for warning in run.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    if postgres is not None:
        render_postgres(console, postgres)
    counts = dict.fromkeys(VERDICTS, 0)
    total = 0
    for report in reports:
        render_connection(console, report, expectations, postgres=postgres)
        counts[report.verdict] += 1
        total += 1
    if not total:
        console.print(f"No Postgres connection in {', '.join(run.sources)} ({run.segments} TCP segments, none on the "
                      f"server port{_filtered_words(run)}).")
        return counts
    parts = [f"{n} {v}" for v, n in counts.items() if n]
    console.print(f"{total} connection(s): " + ", ".join(parts) + f"  [{run.packets} packets, {run.segments} TCP segments"
                  + _filtered_words(run) + "]")
    return counts


def _filtered_words(run: AnalysisRun) -> str:
    """What the user's filter left out, for the summary line (nothing without a filter)."""
    if run.filter is None or run.filter.get("filtered_out") is None:
        return ""
    return f", {run.filter['filtered_out']} left out by the filter"


def render_connection(
    console: Console, report: ConnectionReport, expectations: Expectations | None, verbose: bool = False,
    postgres: PostgresView | None = None,
) -> None:
    conn = report.connection
    headline = Text()
    headline.append(f"#{conn.index} ", style="bold")
    headline.append(f"{conn.client.endpoint} -> {conn.server.endpoint}  ")
    headline.append(report.verdict.upper(), style=VERDICT_STYLE[report.verdict])
    headline.append(f"  {utc_clock(conn.start)} .. {utc_clock(conn.end)} ({conn.end - conn.start:.3f} s), {_end_words(conn.end_reason)}")
    if not conn.saw_syn:
        headline.append("  (began before the capture)", style="dim")
    console.print(headline)
    for line in timeline(report):
        console.print(Text("    " + line))
    if postgres is not None:
        for line, alarm in postgres_connection_lines(postgres, conn.index):
            console.print(Text("    " + line, style="bold red" if alarm else ""))
    findings = [(side.role, f) for side in (report.server, report.client) for f in side.findings]
    if findings:
        table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 2), show_header=True, header_style="bold")
        for column in ("side", "setting", "expected", "observed", "status"):
            table.add_column(column, no_wrap=True)
        for role, f in findings:
            table.add_row(role, f.setting, Text(f.expected), Text(f.observed), Text(f.status, style=STATUS_STYLE[f.status]))
        console.print(Padding(table, (0, 0, 0, 4), expand=False))
        for role, f in findings:
            if f.status != "unobservable" or verbose:
                console.print(Text(f"      {role} {f.setting}: {f.detail}", style="dim" if f.status == "match" else ""))
    else:
        for side in (report.server, report.client):
            o = side.observed
            if side.probes or side.abort:
                console.print(
                    f"    {side.role}: observed idle {_s(o.idle)}, interval {_s(o.interval)}, "
                    f"count {o.count if o.count is not None else '-'} (no expectation given: not judged)"
                )
    console.print()


def render_postgres(console: Console, postgres: PostgresView) -> None:
    """The server as read with --dsn: where each setting came from, and what could not be read."""
    for line, style in postgres_server_lines(postgres):
        console.print(Text(line, style=style))
    console.print()


def timeline(report: ConnectionReport) -> list[str]:
    """Probes, answers and the abort of both sides, in time order, relative to the start."""
    conn = report.connection
    t0 = conn.start
    events: list[tuple[float, str]] = []
    for side in (report.server, report.client):
        endpoint = side.endpoint
        for view in side.probes:
            probe = view.probe
            if probe.answer_t is None:
                answer = "unanswered"
            elif view.answer_lost:
                answer = f"answer at +{probe.answer_t - t0:.3f} s lost before reaching the {side.role}"
            else:
                answer = f"answered +{(probe.answer_t - probe.t) * 1000:.2f} ms"
            since = f", {probe.t - view.anchor:.3f} s after last accepted" if view.anchor is not None and view.index == 1 else ""
            events.append((probe.t, f"{side.role} keepalive probe #{view.index}{since}: {answer}"))
        window_probes = [p for p in endpoint.probes if p.kind == WINDOW]
        if window_probes:
            first, last = window_probes[0], window_probes[-1]
            events.append(
                (first.t, f"{side.role} zero-window probes x{len(window_probes)} +{first.t - t0:.3f}..+{last.t - t0:.3f} s (persist timer, not keepalive)")
            )
        if side.abort is not None:
            least = "" if side.abort.since_accepted is not None else "at least "  # the series began before the capture
            events.append((side.abort.t, f"{side.role} ABORT (RST) after {least}{side.abort.unanswered_probes} unanswered probe(s): {side.abort.reason}"))
        elif endpoint.reset is not None:
            events.append((endpoint.reset.t, f"{side.role} RST (not a keepalive abort)"))
        if endpoint.fin_t is not None:
            events.append((endpoint.fin_t, f"{side.role} FIN"))
    events.sort(key=lambda e: e[0])
    lines = [f"+{t - t0:8.3f} s  {text}" for t, text in events]
    if len(lines) > TIMELINE_HEAD + TIMELINE_TAIL:
        hidden = len(lines) - TIMELINE_HEAD - TIMELINE_TAIL
        lines = lines[:TIMELINE_HEAD] + [f"           ... {hidden} more events (see --format json)"] + lines[-TIMELINE_TAIL:]
    return lines


def _end_words(reason: str) -> str:
    return "still open at the end of the capture" if reason == "open" else END_REASONS.get(reason, reason)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


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
                      f"application_name {backend.application_name!r}{host}, started {utc_clock(backend.backend_start)}, "
                      f"state {backend.state}{since}", False))
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


class _ReportConsole(Console):
    """rich's Console, but a reader that went away (``| head``) raises BrokenPipeError to the command.

    rich's own answer is exit 1, which says the analysis failed; the command
    decides instead (`kaobs.options.stdout_closed`).
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def text_console() -> Console:
    """The console reports go to: the terminal's width, or no hard wrap below 200 columns in a pipe or file."""
    return _ReportConsole(highlight=False, width=None if sys.stdout.isatty() else 200)


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
