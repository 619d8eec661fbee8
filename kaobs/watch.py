"""`kaobs watch`: the keepalive model on live traffic, with alarms, until Ctrl-C or --duration.

`run_live` is the live pipeline (the lab uses it too): records from a
`LiveCapture` go to the analysis (`analysis.pipeline`) as they arrive, `LiveMonitor` alarms are
checked several times a second, and the live view is drawn — a rich table on
a terminal, one plain line per event otherwise, nothing on stdout with
``--format json`` (alarms then go to stderr). When it ends (duration, the
`stop` event, Ctrl-C) it returns the same `AnalysisRun` and reports that
`kaobs analyze` prints, so the final report and exit codes are the same.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from array import array
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import click
from rich.console import Console
from rich.live import Live

from analysis.expect import Expectations
from analysis.model import Connection, ModelEvent
from analysis.outlook import ExpectationsFor, LiveMonitor
from analysis.pipeline import Analysis, AnalysisRun, judge_in_order
from analysis.verdict import VERDICTS, ConnectionReport
from analysis.words import local_clock
from kaobs.liveview import BackendOf, LiveHeader, alarm_line, event_line, live_view, verdict_line
from kaobs.options import (
    FiniteFloatRange,
    UserError,
    expectation_options,
    filter_expression,
    idle_cut_option,
    make_expectations,
    make_output,
    metrics_options,
    output_options,
    stdout_closed,
    write_html_file,
    write_mode_option,
)
from kaobs.mermaid import write_mermaid
from kaobs.report import (
    TextOptions,
    Unlisted,
    error_console,
    render_text,
    text_console,
    text_needs,
    write_json_streamed,
)
from kaobs.spool import ReportSpool
from kaobs.status import exit_status
from sniffer.capture import LiveCapture, Rotation
from sniffer.records import CaptureError

if TYPE_CHECKING:
    from kaobs.metrics import WatchMetrics

ALARM_CHECK_S = 0.25
"""How often alarms are looked for: well under the 1 s grace LiveMonitor allows."""
VIEW_REFRESH_S = 0.5
"""How often the terminal table is rebuilt (each rebuild judges the shown connections)."""


def run_live(
    capture: LiveCapture,
    *,
    expectations: Expectations | None,
    ports: Sequence[int],
    hz: int,
    output_format: str,
    duration: float | None,
    stop: threading.Event,
    console: Console | None = None,
    title: str = "",
    clock: Callable[[], float] = time.time,
    on_tick: Callable[[list, float], list[str]] | None = None,
    idle_cut: float | None = None,
    expectations_for: ExpectationsFor | None = None,
    hide: Callable[[Connection], bool] | None = None,
    backend_of: BackendOf | None = None,
    quiet: bool = False,
    err: Console | None = None,
    on_judged: Callable[[ConnectionReport], None] | None = None,
    metrics: WatchMetrics | None = None,
    needs_report: Callable[[ConnectionReport], bool] | None = None,
    text_options: TextOptions | None = None,
    on_dropped: Callable[[Connection], None] | None = None,
) -> tuple[AnalysisRun, "JudgedReports"]:
    """Feed the model from `capture` until `duration`, `stop`, or Ctrl-C; return the final run and reports.

    `output_format` "json" (or `quiet`) shows nothing live on `console`
    (alarms go to stderr); "text" shows a rich live view when the console is
    a terminal and one line per event when it is not. The capture is opened
    if it is not yet, and left open: the caller closes it (which finishes its
    pcap). `clock` is the capture's clock (kernel timestamps are wall-clock
    time); tests replay recorded segments with a clock of their own.

    `expectations_for` gives a connection's own expectations (sessions may
    differ; default: `expectations` for all), used live and for the final
    reports alike, so that both say the same. Connections `hide` says are
    not the user's (kaobs's own --dsn session) are neither shown nor
    reported. `backend_of` names a connection's backend (--dsn).

    Memory stays bounded however long it runs: a connection that ended (and
    saw nothing for a few seconds, see `KeepaliveModel`) is judged then,
    with its own expectations, and leaves the model and the monitor for
    good. `on_judged` sees every reported connection once, when its final
    verdict is known: as it retires, or at the end for those still there.
    A retired report goes to a temporary file (`ReportSpool`) when
    `needs_report` says the final report needs it whole (default: all of
    them), else it is only counted (`Unlisted`, by `text_options`) and
    `on_dropped` hears of it. The reports returned merge both, by index.

    `metrics` (--metrics) is given the model's events as they come and the
    capture's counters a few times a second; its verdicts come through
    `on_judged`.
    """
    console = console or text_console()
    err = err or error_console()
    capture.open()
    started = capture.started or clock()
    deadline = None if duration is None else started + duration
    events: list[ModelEvent] = []
    verdicts: dict[int, str] = {}
    counts = dict.fromkeys(VERDICTS, 0)
    spool = ReportSpool()
    unlisted = Unlisted()
    options = text_options or TextOptions()

    def retire(conn: Connection) -> None:
        """A connection leaving the model for good: judged now, as the end of the run would judge it."""
        verdicts.pop(conn.index, None)
        if monitor.is_hidden(conn):
            monitor.forget(conn)
            if on_dropped is not None:
                on_dropped(conn)
            return
        [report] = judge_in_order([conn], expectations, max(clock(), conn.end), hz, idle_cut, analysis.path,
                                  monitor.expectations_of)
        monitor.forget(conn)
        counts[report.verdict] += 1
        if on_judged is not None:
            on_judged(report)
        if needs_report is None or needs_report(report):
            spool.put(report)
        else:
            unlisted.add(report, options)
            if on_dropped is not None:
                on_dropped(conn)

    analysis = Analysis(ports, retired=_Retiring(retire), on_event=events.append, hz=hz, revive=False,
                        linger=LINGER_S, linger_after_abort=LINGER_AFTER_ABORT_S)
    model = analysis.model
    monitor = LiveMonitor(model, expectations, hz, expectations_for=expectations_for, hidden=hide)
    header = LiveHeader(title=title, interfaces=capture.interfaces, filter=capture.filter, started=started)
    if output_format != "text" or quiet:  # JSON or a diagram on stdout: nothing live there
        mode = "json"
    else:
        mode = "table" if console.is_terminal else "lines"

    def say(line: str, alarm: bool = False) -> None:
        if mode == "lines":
            try:
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            except BrokenPipeError:  # `kaobs watch | head -5`: nobody reads any more, so stop, as tcpdump would
                stdout_closed()
                stop.set()
        elif mode == "table":
            header.recent.append(line)
            del header.recent[:-50]
            if alarm:  # kept above the view, wrapped to the terminal
                console.print(line, style="bold red", markup=False, highlight=False)
        elif alarm:
            err.print(f"kaobs: {line}", style="bold red", markup=False, highlight=False)

    if mode == "lines":
        what = f"{title}: " if title else ""
        say(f"{what}watching {', '.join(capture.interfaces)} [{capture.filter}]"
            + (f" for {duration:g} s" if duration is not None else " until Ctrl-C"))
    live: Live | None = None
    if mode == "table":
        # Drawn when rebuilt (every VIEW_REFRESH_S), not by rich's own refresh thread: rendering the
        # table costs ~15 ms, and redrawing an unchanged view 4 times a second took ~5 % of a core.
        live = Live(console=console, transient=False, auto_refresh=False)
        live.start()
    last_alarm_check = last_view = 0.0
    # Tens of thousands of short-lived record tuples a second set off the cyclic GC hundreds of
    # times a second (~7 % of the per-packet cost); they hold no cycles. Collect rarely, and never
    # rescan what exists already (modules, the model's past).
    gc_threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(gc_threshold[0], 50_000), *gc_threshold[1:])
    try:
        while not stop.is_set():
            now = clock()
            if deadline is not None and now >= deadline:
                break
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
            analysis.feed(capture.read(wait))
            if events:
                for event in events:
                    if hide is not None and hide(event.connection):
                        continue
                    if metrics is not None:
                        metrics.on_event(event)
                    line = event_line(event, monitor)
                    if line is not None:
                        say(line, alarm=" ALARM " in line)
                events.clear()
            now = clock()
            if now - last_alarm_check >= ALARM_CHECK_S:
                last_alarm_check = now
                for alarm in monitor.alarms(now):
                    say(alarm_line(alarm, now), alarm=True)
                if on_tick is not None:  # --dsn: name connections, check backends after aborts
                    for line in on_tick(model.connections, now):
                        say(line, alarm=line.startswith("postgres: FINDING"))
                if mode == "lines":
                    _say_verdicts(model.connections, monitor, now, verdicts, say)
                if metrics is not None:
                    metrics.on_tick(model.connections, capture.stats(), now, monitor.is_hidden)
            if live is not None and now - last_view >= VIEW_REFRESH_S:
                last_view = now
                stats = capture.stats()
                header.packets, header.segments, header.drops = stats.packets - stats.duplicates, stats.segments, stats.drops
                header.ended = len(spool) + unlisted.total
                live.update(live_view(header, model, monitor, now, console.height, backend_of), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        gc.set_threshold(*gc_threshold)
        gc.unfreeze()
        if live is not None:
            live.stop()
    end = clock()
    analysis.finish(end)
    if mode == "lines":
        _say_verdicts(model.connections, monitor, end, verdicts, say)
    stats = capture.stats()
    run = AnalysisRun(sources=[f"live:{name}" for name in capture.interfaces], hz=hz)
    run.packets = stats.packets
    run.segments = stats.segments
    run.duplicates = stats.duplicates
    run.ignored_segments = model.segments_ignored
    run.capture_start = started
    run.capture_end = end
    run.kernel_drops = stats.drops
    run.capture_path = getattr(capture, "path", None)
    ring_notes = [note for note in getattr(capture, "path_notes", []) if note != "KAOBS_CAPTURE=socket"]
    if ring_notes:
        run.warnings.append(
            f"no packet ring ({'; '.join(ring_notes)}): packets were read one system call each, "
            "which costs ~10x the CPU on a busy interface")
    if stats.drops:
        run.warnings.append(
            f"the kernel dropped {stats.drops} of {stats.kernel_packets} packets (receive buffer full): "
            "probes may be missing from this report")
    if mode == "lines":
        seen = sum(1 for c in model.connections if not monitor.is_hidden(c)) + len(spool) + unlisted.total
        say(f"{local_clock(end)} stopped after {end - started:.1f} s: {stats.packets - stats.duplicates} packets, "
            f"{stats.segments} TCP segments, {seen} connection(s)")
    reports = [report for report in analysis.reports(expectations, end, idle_cut, monitor.expectations_of)
               if hide is None or not hide(report.connection)]
    if metrics is not None:
        metrics.on_tick(model.connections, stats, end, monitor.is_hidden, final=True)
    for report in reports:
        counts[report.verdict] += 1
        if on_judged is not None:
            on_judged(report)
    return run, JudgedReports(spool, reports, unlisted, counts)


LINGER_S = 2.0
"""How long an ended connection stays in a live model after its last packet (a FIN's retransmission, the last ACK)
before it is judged and leaves: memory holds the open connections and those that ended this recently."""
LINGER_AFTER_ABORT_S = 600.0
"""How long a connection aborted by keepalive stays in a live model: its peer coming back later (and learning of the
abort) is part of its story. Other ended connections leave after the model's linger (5 s of quiet)."""


class _Retiring:
    """A `RetiredStore` that keeps nothing: each connection is handed to `retire` (judged, reported) and gone."""

    def __init__(self, retire: Callable[[Connection], None]) -> None:
        self.put = retire

    def get(self, index: int) -> Connection:  # pragma: no cover - the model does not revive (revive=False)
        raise KeyError(index)

    def holds(self, index: int) -> bool:
        return False


class JudgedReports(Sequence[ConnectionReport]):
    """The final reports of a live run, by connection index: the retired ones read back from their spool, then merged
    with those judged at the end. Iterating holds one report at a time (and may be repeated); `counts` tallies every
    reported connection, the ones only counted (`unlisted`, for the text report) included.
    """

    def __init__(self, spool: ReportSpool, live: list[ConnectionReport], unlisted: Unlisted,
                 counts: dict[str, int]) -> None:
        self.spool = spool
        self.live = live
        self.unlisted = unlisted
        self.counts = counts
        self._order = spool.order() if len(spool) else array("q")
        self._plan: array | None = None

    @property
    def retired(self) -> int:
        """Connections judged as they retired (whole reports on the spool, or only counted)."""
        return len(self.spool) + self.unlisted.total

    def __len__(self) -> int:
        return len(self._order) + len(self.live)

    def _merged(self) -> array:
        """Per place in index order: a spool position (>= 0) or -1 - a place in `live`."""
        if self._plan is None:
            plan = array("q")
            order, live, spool = self._order, self.live, self.spool
            i = j = 0
            while i < len(order) or j < len(live):
                if j >= len(live) or (i < len(order) and spool.index_at(order[i]) < live[j].connection.index):
                    plan.append(order[i])
                    i += 1
                else:
                    plan.append(-1 - j)
                    j += 1
            self._plan = plan
        return self._plan

    def _at(self, place: int) -> ConnectionReport:
        where = self._merged()[place]
        return self.live[-1 - where] if where < 0 else self.spool.load(where)

    def __getitem__(self, place):  # type: ignore[override]
        if isinstance(place, slice):
            return [self._at(i) for i in range(*place.indices(len(self)))]
        if place < 0:
            place += len(self)
        if not 0 <= place < len(self):
            raise IndexError(place)
        return self._at(place)

    def __iter__(self) -> Iterator[ConnectionReport]:
        if not len(self._order):
            yield from self.live
            return
        for place in range(len(self)):
            yield self._at(place)

    def close(self) -> None:
        self.spool.close()


def _say_verdicts(connections: Sequence[Connection], monitor: LiveMonitor, now: float, said: dict[int, str],
                  say: Callable[[str], None]) -> None:
    """One line for each connection whose verdict so far changed (once it has one worth saying)."""
    for conn in connections:
        if monitor.is_hidden(conn):
            continue
        report = monitor.verdict(conn, now)
        before = said.get(conn.index)
        if report.verdict != before and not (before is None and report.verdict == "no_keepalive"):
            said[conn.index] = report.verdict
            say(verdict_line(report, now))


# -- the command -----------------------------------------------------------------


def install_stop_handlers(stop: threading.Event, on_stop: Callable[[], None] | None = None) -> Callable[[], None]:
    """SIGTERM and SIGINT set `stop` (a second Ctrl-C interrupts for real); returns a function restoring the old handlers.

    Only possible in the main thread; elsewhere nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if on_stop is not None:
            on_stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def set_priority(niceness: int) -> None:
    """Raise (or lower) this process's CPU priority, for a capture on a machine the load saturates.

    With autogroup scheduling, a nice value only ranks processes within their
    session's group, so the group's own value is set too. Measured here
    (bench/bench_watch_load.py, 2 CPUs saturated by pgbench): at nice 0 both
    tcpdump and kaobs lose most packets; at -10 neither drops any.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError as error:
        raise click.UsageError(f"--nice {niceness}: {error.strerror}") from None
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(niceness))
    except OSError:
        pass  # no autogroup scheduling: the process priority is all there is


def _rotation(write_path: str | None, file_size: float | None, seconds: float | None,
              file_count: int | None) -> Rotation | None:
    """tcpdump's -C/-G/-W for --write, checked: each needs what it rotates."""
    given = [name for name, value in (("--file-size", file_size), ("--rotate-seconds", seconds),
                                      ("--file-count", file_count)) if value is not None]
    if not given:
        return None
    if not write_path:
        raise UserError(f"{given[0]} rotates the --write file: give --write FILE.pcap")
    if file_count is not None and file_size is None and seconds is None:
        raise UserError("--file-count needs --file-size or --rotate-seconds: it bounds the files they start")
    size = None if file_size is None else max(1, round(file_size * 1_000_000))
    return Rotation(size, seconds, file_count)


@click.command(short_help="Watch live Postgres traffic, then print the report.")
@click.argument("expression_words", nargs=-1, metavar="[EXPRESSION]")
@click.option("--interface", "-i", "interfaces", multiple=True, metavar="IF",
              help="Capture on this interface (repeatable): a Docker bridge, a veth, lo, eth0; 'any' for all, new ones included.")
@click.option("--container", metavar="NAME",
              help="Capture the traffic of this Docker container (its bridge, filtered on its address).")
@click.option("--network", metavar="NAME", help="Capture on this Docker network's bridge.")
@expectation_options
@click.option("--duration", type=FiniteFloatRange(min=0.0), metavar="S",
              help="Stop after S seconds; 0 (the default): run until Ctrl-C or SIGTERM, then print the report.")
@click.option("--write", "-w", "write_path", metavar="FILE.pcap", type=click.Path(dir_okay=False),
              help="Keep the capture in a pcap file: headers only unless --full-packets.")
@click.option("--full-packets", is_flag=True, help="With --write, keep whole packets (query text, passwords!).")
@click.option("--file-size", "-C", "file_size", type=FiniteFloatRange(min=0.0, min_open=True), metavar="MB",
              help="With --write, as tcpdump -C: start a new file before one would pass MB million bytes; the next "
                   "ones are FILE1, FILE2, ...")
@click.option("--rotate-seconds", "-G", "rotate_seconds", type=FiniteFloatRange(min=0.0, min_open=True), metavar="S",
              help="With --write, as tcpdump -G: a new file every S seconds, its name FILE through strftime "
                   "(e.g. -w 'pg-%Y%m%d-%H%M%S.pcap'; local time).")
@click.option("--file-count", "-W", "file_count", type=click.IntRange(min=1), metavar="N",
              help="With --file-size or --rotate-seconds, as tcpdump -W: keep at most N files, deleting the oldest "
                   "(with --file-size: FILE0 ... FILE<N-1>, written over in a ring).")
@write_mode_option
@click.option("--dsn", metavar="CONNINFO",
              help="Read the server's settings and sessions over TCP: name connections, check backends after aborts.")
@click.option("--nice", "niceness", type=click.IntRange(-20, 19), default=0, show_default=True, metavar="N",
              help="Run at this scheduling priority (e.g. -10) so a saturated machine does not starve the capture.")
@idle_cut_option
@metrics_options
@output_options
def watch(expression_words, interfaces, container, network, expect, client_dsn, sysctls, ports, hz, output_format,
          duration, write_path, full_packets, file_size=None, rotate_seconds=None, file_count=None,
          write_mode=0o600, dsn=None, niceness=0, idle_cut=None, only=(),
          summary=False, show_all=False, quiet=False, color="auto", connection=None, html=None,
          metrics_address=None, metrics_linger=0.0) -> None:
    """Watch live Postgres traffic: probes, answers, aborts and alarms as they happen, then the report.

    Without --interface/--container/--network, captures on the Docker
    bridges of running containers that listen on the Postgres port.
    Exit 0 when nothing contradicts the expectations, 1 when something
    does, 2 for bad usage or when capture is impossible.
    """
    from sniffer.discovery import DiscoveryError, find_target

    output = make_output(output_format, only, summary, show_all, quiet, color, connection, html)
    expectations = make_expectations(expect, client_dsn, sysctls)
    expression = filter_expression(expression_words)
    if duration is not None and duration <= 0:
        duration = None  # until stopped, as tcpdump runs
    if full_packets and not write_path:
        raise UserError("--full-packets only makes sense with --write FILE.pcap")
    rotation = _rotation(write_path, file_size, rotate_seconds, file_count)
    if os.geteuid() != 0:
        raise UserError("live capture needs root (CAP_NET_RAW): run kaobs watch as root, or analyze a capture file")
    try:
        target = find_target(interfaces=interfaces, container=container, network=network, ports=ports)
    except DiscoveryError as error:
        raise UserError(str(error)) from None
    metrics = server = None
    if metrics_address is not None:  # listening before anything else starts: a port in use is said at once
        from kaobs.metrics import MetricsError, metrics_say, start_metrics

        try:
            metrics, server = start_metrics(metrics_address, expectations, metrics_say(quiet, metrics_address))
        except MetricsError as error:
            raise UserError(str(error)) from None
        click.get_current_context().call_on_close(server.close)  # however the watch ends
    postgres = None
    if dsn is not None:
        from kaobs.postgres import Postgres

        postgres = Postgres.read(dsn, expectations, sysctls, container, live=True,
                                 say_error=lambda line: click.echo(f"kaobs: error: {line}", err=True))
        if postgres.interrupted:  # Ctrl-C while connecting: the user stopped before anything was watched
            sys.exit(exit_status({}, postgres.view))
        expectations = postgres.expectations
        if metrics is not None:
            metrics.set_expectations(expectations)
    output.check_html()
    if niceness:
        set_priority(niceness)
    stop = threading.Event()
    capture = LiveCapture(target.interfaces, ports, write=write_path, full_packets=full_packets, hosts=target.hosts,
                          expression=expression, write_mode=write_mode, rotation=rotation)
    restore = install_stop_handlers(stop, capture.stop)
    console = text_console(color)
    # A long run keeps whole only the reports its final report shows: the text report lists the connections with
    # keepalive activity and counts the rest; the JSON, the HTML page and the diagram's choice need every one.
    needs = text_needs(output.text) if output_format == "text" and output.html is None else None
    try:
        with capture:
            run, reports = run_live(
                capture, expectations=expectations, ports=ports, hz=int(hz), output_format=output_format,
                duration=duration, stop=stop, console=console, title=target.description,
                on_tick=postgres.tick_lines if postgres is not None else None, idle_cut=idle_cut,
                hide=postgres.is_own if postgres is not None else None,
                backend_of=postgres.backend_of if postgres is not None else None,
                quiet=quiet, err=error_console(color), needs_report=needs, text_options=output.text,
                on_dropped=postgres.forget if postgres is not None else None, metrics=metrics,
                on_judged=metrics.on_judged if metrics is not None else None)
    except CaptureError as error:
        raise UserError(str(error)) from None
    finally:
        restore()
    if expression is not None:
        run.filter = {"expression": expression, "since": None, "until": None, "filtered_out": None}
    view = None
    shown: Callable[[], Iterable[ConnectionReport]] = lambda: reports  # noqa: E731 - each pass reads them again
    if postgres is not None:
        view = postgres.prepare(reports)  # then each pass names the connections as they go by
        shown = lambda: postgres.annotate(reports)  # noqa: E731
        postgres.close()
    try:
        if output_format == "json":
            write_json_streamed(sys.stdout, run, shown(), expectations, view)
        elif output_format == "mermaid":
            write_mermaid(sys.stdout, shown(), output.text, source=target.description, postgres=view)
        else:
            if not console.is_terminal and not quiet:
                console.print()
            render_text(console, run, shown(), expectations, view, options=output.text, unlisted=reports.unlisted)
            if view is not None and view.own_session is not None:
                console.print(f"kaobs's own --dsn session (#{view.own_session['connection']}, client "
                              f"{view.own_session['client']}) is left out", style="dim", markup=False, highlight=False)
            if write_path:
                files = capture.written_files
                what = files[-1] if len(files) == 1 else f"{len(files)} files, the last {files[-1]}"
                console.print(f"capture written to {what} ({'whole packets' if full_packets else 'headers only'})")
    except BrokenPipeError:
        stdout_closed()  # `kaobs watch | head`: the watch itself stands
    write_html_file(output, run, shown(), expectations, f"kaobs watch: {target.description}", view)
    reports.close()
    if server is not None:
        from kaobs.metrics import end_metrics, metrics_say

        end_metrics(server, metrics_linger, metrics_say(quiet, server.address))
    sys.exit(exit_status(reports.counts, view))
