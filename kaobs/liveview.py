"""What `kaobs watch` shows while packets come: rendering of the model's state for a terminal or a log.

Two forms, both built here from the model, the `LiveMonitor` and a time
("now", the capture clock) so they can be tested without a network:

* `event_line` / `alarm_line`: one plain line per event (new connection,
  probe, answer, abort, RST/FIN, alarm), with the wall-clock time, for a
  stdout that is not a terminal (logs, pipes, CI);
* `live_table`: the terminal view, one row per connection side with last
  activity, probes out, next probe and abort expected, and the verdict so far.

Nothing here reads a clock, a socket or a terminal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from analysis.expect import Expectations
from analysis.model import END_REASONS, WINDOW, Connection, KeepaliveModel, ModelEvent
from analysis.outlook import Alarm, LiveMonitor
from analysis.path import path_reset
from analysis.settings import CLIENT, SERVER
from analysis.tolerance import DEFAULT_HZ
from analysis.verdict import judge_connection
from analysis.words import local_clock
from kaobs.report import VERDICT_STYLE

MAX_ROWS = 20
"""Connections shown in the terminal view; the rest are counted in one line."""
RECENT_LINES = 8


def connection_name(conn: Connection) -> str:
    return f"#{conn.index} {conn.client.endpoint} -> {conn.server.endpoint}"


def event_line(event: ModelEvent) -> str | None:
    """One plain line for a model event, or None for events not worth a line."""
    conn = event.connection
    when = local_clock(event.t)
    side = event.side
    if event.kind == "connection":
        # Lines are made after the segment was fed, so saw_syn is already known.
        how = "new connection" if conn.saw_syn else "connection already open when the capture began"
        return f"{when} {connection_name(conn)} {how}"
    if event.kind == "probe" and event.probe is not None:
        probe = event.probe
        if probe.kind == WINDOW:
            return f"{when} #{conn.index} {side} zero-window probe (persist timer, not keepalive)"
        since = ""
        if probe.since_accepted is not None:
            since = f", {probe.t - probe.since_accepted:.3f} s after last accepted"
        return f"{when} #{conn.index} {side} keepalive probe #{probe.series_index}{since}"
    if event.kind == "answer" and event.probe is not None:
        probe = event.probe
        peer = CLIENT if side == SERVER else SERVER
        delay = (probe.answer_t - probe.t) * 1000 if probe.answer_t is not None else 0.0
        return f"{when} #{conn.index} {peer} answered {side} probe #{probe.series_index} (+{delay:.2f} ms)"
    if event.kind == "abort" and event.reset is not None:
        return (f"{when} #{conn.index} {side} ABORT (RST) after {event.reset.unanswered_probes} unanswered "
                f"probe(s): connection ended by keepalive")
    if event.kind == "reset":
        cut = path_reset(conn, conn.start)
        if cut is not None:
            return f"{when} ALARM #{conn.index} PATH RST: {cut.evidence}"
        return f"{when} #{conn.index} {side} RST: connection ended (not a keepalive abort)"
    if event.kind == "fin":
        return f"{when} #{conn.index} {side} FIN: closing"
    if event.kind == "after_end" and conn.after_end is not None:
        return (f"{when} #{conn.index} {side} found out the connection had ended, "
                f"{conn.after_end.t - conn.end:.3f} s later, on its next send ({conn.after_end.what})")
    return None


def alarm_line(alarm: Alarm, now: float) -> str:
    """An alarm as one line, stamped with the wall-clock time it was raised."""
    return f"{local_clock(now)} ALARM #{alarm.connection.index} {alarm.message}"


# -- terminal view ------------------------------------------------------------


@dataclass(slots=True)
class LiveHeader:
    """The first line of the terminal view."""

    title: str
    interfaces: Sequence[str]
    filter: str
    started: float
    packets: int = 0
    segments: int = 0
    drops: int = 0
    recent: list[str] = field(default_factory=list)


def live_table(
    model: KeepaliveModel,
    monitor: LiveMonitor,
    expectations: Expectations | None,
    now: float,
    hz: int = DEFAULT_HZ,
    max_rows: int = MAX_ROWS,
) -> Group:
    """Per connection: a heading (state, last activity, verdict so far) and one row per side.

    A side row says how many probes it sent, how many of the current series
    are unanswered, and when the next probe and the abort are expected.
    """
    parts: list = []
    shown = chosen_connections(model.connections, max_rows)
    server = expectations.server if expectations is not None else None
    client = expectations.client if expectations is not None else None
    for conn in shown:
        verdict = judge_connection(conn, server, client, now, hz).verdict
        heading = Text()
        heading.append(f"#{conn.index} ", style="bold")
        heading.append(f"{conn.client.endpoint} -> {conn.server.endpoint}  ")
        heading.append(_state_words(conn), style="" if conn.end_reason == "open" else "dim")
        heading.append(f", last packet {local_clock(conn.end, millis=False)} ({_ago(now - conn.end)})  so far: ")
        heading.append(verdict.upper(), style=VERDICT_STYLE.get(verdict, ""))
        parts.append(heading)
        table = Table(box=None, padding=(0, 2, 0, 0), show_edge=False, header_style="dim", expand=False)
        for column in ("   side", "probes", "unanswered", "next probe", "abort expected"):
            table.add_column(column, no_wrap=True)
        for role in (SERVER, CLIENT):
            outlook = monitor.outlook(conn, role)
            table.add_row(
                f"   {role}",
                str(outlook.probes),
                Text(str(outlook.unanswered), style="bold red" if outlook.unanswered else ""),
                _due(outlook.next_probe, now),
                Text(_due(outlook.abort_due, now), style="red" if outlook.abort_due is not None else ""),
            )
        parts.append(table)
    hidden = len(model.connections) - len(shown)
    if hidden > 0:
        parts.append(Text(f"... {hidden} more connection(s), closed or quiet longest", style="dim"))
    return Group(*parts)


def live_view(
    header: LiveHeader,
    model: KeepaliveModel,
    monitor: LiveMonitor,
    expectations: Expectations | None,
    now: float,
    hz: int = DEFAULT_HZ,
) -> Group:
    """The whole terminal view: a status line, the table, and the latest events and alarms."""
    status = Text()
    if header.title:
        status.append(header.title + "  ", style="bold")
    status.append(f"watching {', '.join(header.interfaces)} [{header.filter}]  ")
    status.append(f"{_ago(now - header.started, suffix='')} elapsed, {header.packets} packets, "
                  f"{header.segments} TCP segments, {len(model.connections)} connection(s)")
    if header.drops:
        status.append(f", {header.drops} dropped by the kernel", style="bold red")
    parts: list = [status]
    if model.connections:
        parts.append(live_table(model, monitor, expectations, now, hz))
    else:
        parts.append(Text("no Postgres connection seen yet", style="dim"))
    if header.recent:
        parts.append(Text(""))
        for line in header.recent[-RECENT_LINES:]:
            parts.append(Text(line, style="bold red" if " ALARM " in line else "dim"))
    parts.append(Text("Ctrl-C: stop and print the report", style="dim"))
    return Group(*parts)


def chosen_connections(connections: Sequence[Connection], limit: int) -> list[Connection]:
    """Open connections first, then the most recently active, at most `limit`, in index order."""
    if len(connections) <= limit:
        return list(connections)
    ranked = sorted(connections, key=lambda c: (c.end_reason == "open", c.end), reverse=True)[:limit]
    return sorted(ranked, key=lambda c: c.index)


def _state_words(conn: Connection) -> str:
    return END_REASONS.get(conn.end_reason, conn.end_reason)


def _due(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    delta = t - now
    when = local_clock(t, millis=False)
    return f"{when} (in {delta:.1f} s)" if delta >= 0 else f"{when} ({-delta:.1f} s ago)"


def _ago(seconds: float, suffix: str = " ago") -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s{suffix}"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s{suffix}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{suffix}"
