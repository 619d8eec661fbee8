"""What `kaobs watch` shows while packets come: rendering of the model's state for a terminal or a log.

Two forms, both built here from the model, the `LiveMonitor` and a time
("now", the capture clock) so they can be tested without a network:

* `event_line` / `alarm_line` / `verdict_line`: one plain line per event
  (new connection, probe, answer, abort, RST/FIN, alarm, a verdict so far
  that changed), with the wall-clock time, for a stdout that is not a
  terminal (logs, pipes, CI);
* `live_view`: the terminal view, sized to the terminal: a status line, the
  connections in trouble first (one heading line each, plus a line per side
  that has something to show: probes, unanswered ones, next probe and abort
  expected), the latest events and a footer that always stay on screen.

Probes are numbered across the connection, per side, as in the final report.
Nothing here reads a clock, a socket or a terminal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from rich.console import Group
from rich.text import Text

from analysis.model import END_REASONS, KEEPALIVE, WINDOW, Connection, KeepaliveModel, ModelEvent
from analysis.outlook import Alarm, LiveMonitor, SideOutlook
from analysis.path import path_reset
from analysis.pgsessions import Backend
from analysis.settings import CLIENT, SERVER
from analysis.verdict import ConnectionReport
from analysis.words import local_clock
from kaobs.report import VERDICT_STYLE, check_words, one_line_reason

MAX_ROWS = 40
"""Lines for the connections when the terminal's height is not known."""
RECENT_LINES = 8
"""The latest events under the table, fewer on a short terminal (never fewer than MIN_RECENT)."""
MIN_RECENT = 3

BackendOf = Callable[[int], "Backend | None"]


def connection_name(conn: Connection) -> str:
    return f"#{conn.index} {conn.client.endpoint} -> {conn.server.endpoint}"


def probe_number(conn: Connection, side: str, t: float) -> int:
    """The keepalive probe at `t`'s number across the connection (1, 2, 3, ...), as the final report counts."""
    return sum(1 for p in conn.side(side).probes if p.kind == KEEPALIVE and p.t <= t)


def event_line(event: ModelEvent, monitor: LiveMonitor | None = None) -> str | None:
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
        number = probe_number(conn, side, probe.t)
        if probe.series_index == 1:
            since = ""
            if probe.since_accepted is not None:
                since = f", {probe.t - probe.since_accepted:.3f} s after the last packet it accepted"
            return f"{when} #{conn.index} {side} keepalive probe {number}{since}"
        count = monitor.timer(conn, side) if monitor is not None else None
        of = f"/{count.count}" if count is not None and count.count and not count.user_timeout else ""
        return (f"{when} #{conn.index} {side} keepalive probe {number}, {probe.series_index}{of} in the series "
                f"({probe.series_index - 1} unanswered before it)")
    if event.kind == "answer" and event.probe is not None:
        probe = event.probe
        peer = CLIENT if side == SERVER else SERVER
        delay = (probe.answer_t - probe.t) * 1000 if probe.answer_t is not None else 0.0
        return f"{when} #{conn.index} {peer} answered {side} probe {probe_number(conn, side, probe.t)} (+{delay:.2f} ms)"
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
    message = alarm.message
    if alarm.kind == "mismatch" and alarm.report is not None and alarm.finding is not None and alarm.check is not None:
        side = alarm.report.side(alarm.side)
        message = f"{alarm.side} {alarm.finding.setting}: {check_words(alarm.report, side, alarm.check)}"
    return f"{local_clock(now)} ALARM #{alarm.connection.index} {message}"


def verdict_line(report: ConnectionReport, now: float) -> str:
    """A connection's verdict so far, when it changed: the same words the final report's summary uses."""
    return (f"{local_clock(now)} #{report.connection.index} so far: {report.verdict.upper()} "
            f"({one_line_reason(report)})")


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
    ended: int = 0
    """Connections that ended, were judged and left the view (a long run keeps only the recent ones)."""


def live_table(
    model: KeepaliveModel,
    monitor: LiveMonitor,
    now: float,
    max_rows: int = MAX_ROWS,
    backend_of: BackendOf | None = None,
) -> Group:
    """The connections, troubled first, in at most `max_rows` lines (one line says how many more there are).

    Per connection a heading (verdict so far, endpoints, backend, state, last
    activity) and a line per side that has something to show.
    """
    ranked = ranked_connections(model.connections, monitor, now)
    parts: list[Text] = []
    shown = 0
    for position, conn in enumerate(ranked):
        block = _connection_lines(conn, monitor, now, backend_of)
        room = max_rows - len(parts) - (0 if position == len(ranked) - 1 else 1)
        if len(block) > room:
            if shown == 0 and room >= 1:
                parts.extend(block[:room])  # at least the most troubled connection's heading
                shown = 1
            break
        parts.extend(block)
        shown += 1
    hidden = len(ranked) - shown
    if hidden > 0:
        open_ = sum(1 for c in ranked[shown:] if c.end_reason == "open")
        parts.append(_line(f"... {hidden} more connection(s) ({open_} open), less troubled or quiet longest",
                           style="dim"))
    return Group(*parts)


def ranked_connections(connections: Sequence[Connection], monitor: LiveMonitor, now: float) -> list[Connection]:
    """Visible connections, troubled first: contradicted settings, then alarms or unanswered probes, then
    keepalive aborts, then open ones probing (in the order they came, so that rows do not jump about), then
    open quiet ones, then closed ones (most recent first)."""
    def rank(conn: Connection) -> tuple[int, float]:
        verdict = monitor.verdict(conn, now).verdict
        open_ = conn.end_reason == "open"
        if verdict == "mismatch":
            level = 0 if open_ else 1
        elif conn.index in monitor.alarmed or conn.server.series_unanswered or conn.client.series_unanswered:
            level = 2
        elif conn.end_reason == "keepalive_abort":
            level = 3
        elif open_ and (conn.server.probes or conn.client.probes):
            level = 4
        elif open_:
            level = 5
        else:
            level = 6
        return level, (conn.index if level <= 4 else -conn.end)

    return sorted((c for c in connections if not monitor.is_hidden(c)), key=rank)


def _connection_lines(conn: Connection, monitor: LiveMonitor, now: float, backend_of: BackendOf | None) -> list[Text]:
    report = monitor.verdict(conn, now)
    heading = Text(no_wrap=True, overflow="ellipsis")
    heading.append(f"#{conn.index} ", style="bold")
    heading.append(report.verdict.upper(), style=VERDICT_STYLE.get(report.verdict, ""))
    heading.append(f" so far  {conn.client.endpoint} -> {conn.server.endpoint}")
    backend = backend_of(conn.index) if backend_of is not None else None
    if backend is not None:
        app = f" {backend.application_name!r}" if backend.application_name else ""
        heading.append(f"  pid {backend.pid}{app}", style="cyan")
    heading.append(f"  {END_REASONS.get(conn.end_reason, conn.end_reason)}", style="" if conn.end_reason == "open" else "dim")
    heading.append(f", last packet {_ago(now - conn.end)}")
    lines = [heading]
    for role in (SERVER, CLIENT):
        outlook = monitor.outlook(conn, role)
        if _empty(outlook):
            continue
        lines.append(_side_line(outlook, monitor.timer(conn, role).count, now))
    return lines


def _empty(outlook: SideOutlook) -> bool:
    return not outlook.probes and outlook.next_probe is None and outlook.abort_due is None


def _side_line(outlook: SideOutlook, count: int | None, now: float) -> Text:
    """`   server  4 probes, 2/3 unanswered, abort expected 12:00:07 (in 3.5 s), next probe 12:00:05 (in 1.5 s)`:
    the most pressing first, as a narrow terminal cuts the end."""
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(f"   {outlook.role:<6}  {outlook.probes} probe{'' if outlook.probes == 1 else 's'}")
    if outlook.unanswered:
        of = f"/{count}" if count else ""
        line.append(f", {outlook.unanswered}{of} unanswered", style="bold red")
    if outlook.abort_due is not None:
        line.append(f", abort expected {_due(outlook.abort_due, now)}", style="red")
    if outlook.next_probe is not None:
        line.append(f", next probe {_due(outlook.next_probe, now)}")
    return line


def live_view(
    header: LiveHeader,
    model: KeepaliveModel,
    monitor: LiveMonitor,
    now: float,
    height: int | None = None,
    backend_of: BackendOf | None = None,
) -> Group:
    """The whole terminal view in at most `height` lines: a status line, the table, the latest events, a footer.

    The table takes what the other parts leave, so the latest events and the
    footer are never pushed off a short terminal.
    """
    visible = [c for c in model.connections if not monitor.is_hidden(c)]
    status = Text(no_wrap=True, overflow="ellipsis")
    if header.title:
        status.append(header.title + "  ", style="bold")
    status.append(f"{_ago(now - header.started, suffix='')} on {', '.join(header.interfaces)}: {len(visible)} "
                  f"connection(s)" + (f" (+{header.ended} ended, in the report)" if header.ended else "")
                  + f", {header.packets} packets")
    if header.drops:
        status.append(f", {header.drops} dropped by the kernel", style="bold red")
    status.append(f"  [{header.filter}]", style="dim")
    recent = header.recent[-RECENT_LINES:]
    if height is not None:
        recent = recent[-max(MIN_RECENT, min(RECENT_LINES, (height - 6) // 3)):] if recent else recent
    # status, table, blank, recent events, footer; one spare line for the cursor
    rows = MAX_ROWS if height is None else max(1, height - 1 - (1 + len(recent) if recent else 0) - 1 - 1)
    parts: list = [status]
    if visible:
        parts.append(live_table(model, monitor, now, rows, backend_of))
    else:
        parts.append(_line("no Postgres connection seen yet", style="dim"))
    if recent:
        parts.append(Text(""))
        for line in recent:
            parts.append(_line(line, style="bold red" if " ALARM " in line else "dim"))
    parts.append(_line("Ctrl-C: stop and print the report", style="dim"))
    return Group(*parts)


def _line(text: str, style: str = "") -> Text:
    """One screen line, cut with an ellipsis rather than wrapped (the view is sized in lines)."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


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
