"""The `kaobs` command: a thin layer of options over `sniffer` and `analysis`.

Every user error ends here as one line on stderr and exit status 2; a
contradiction between the settings and the packets is 1 (`kaobs.status`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence

import click

from analysis.pipeline import Analysis, AnalysisRun
from kaobs.lab.command import lab
from analysis.verdict import VERDICTS, ConnectionReport
from kaobs.options import (
    CaptureTime,
    UserError,
    expectation_options,
    fail,
    html_written,
    idle_cut_option,
    make_expectations,
    make_output,
    output_options,
    split_captures,
    stdout_closed,
)
from kaobs.mermaid import write_mermaid
from kaobs.progress import AnalyzeProgress
from kaobs.report import error_console, render_text, text_console, write_json_streamed
from kaobs.spool import ConnectionSpool
from kaobs.status import ExitStatus, exit_status
from kaobs.watch import watch
from sniffer.bpf import PacketFilter
from sniffer.pcapfile import CaptureReader, first_packet_time
from sniffer.records import CaptureError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kaobs")
def main() -> None:
    """kaobs: watch TCP keepalives of PostgreSQL connections and check them against the settings."""


@main.command(short_help="Judge the keepalives in pcap/pcapng files.")
@click.argument("arguments", nargs=-1, metavar="[CAPTURE...] [EXPRESSION]")
@click.option("-r", "--read", "read_paths", multiple=True, metavar="FILE",
              help="A capture to read, as tcpdump -r ('-': standard input). Repeatable; the arguments are then "
                   "all the filter expression.")
@click.option("--since", type=CaptureTime(), metavar="TIME",
              help="Analyse only packets from this time on: Unix seconds or ISO 8601 (UTC unless an offset is given).")
@click.option("--until", type=CaptureTime(), metavar="TIME", help="Analyse only packets up to this time.")
@expectation_options
@click.option("--dsn", metavar="CONNINFO",
              help="Read the server's keepalive settings and sessions now, over TCP (needs pg_read_all_settings "
                   "and pg_read_all_stats); judged against the capture. The password is never printed.")
@click.option("--container", "server_container", metavar="NAME",
              help="With --dsn: the server's Docker container, whose network namespace's sysctls resolve a setting of 0.")
@idle_cut_option
@output_options
def analyze(arguments: tuple[str, ...], read_paths: tuple[str, ...], since, until, expect, client_dsn, sysctls,
            ports, hz, output_format, dsn=None, server_container=None, idle_cut=None, only=(), summary=False,
            show_all=False, quiet=False, color="auto", connection=None, html=None) -> None:
    """Analyze saved captures: pcap or pcapng, gzip/zstd/xz/bzip2 compressed, '-' for standard input.

    Several files are one capture, read in the order of their first packets.
    A filter EXPRESSION (tcpdump's syntax, compiled by libpcap) keeps only
    the packets it matches. Exit 0 when nothing contradicts the
    expectations, 1 when something does, 2 for bad usage or unreadable input.
    """
    output = make_output(output_format, only, summary, show_all, quiet, color, connection, html)
    captures, expression = split_captures(arguments, read_paths)
    if server_container is not None and dsn is None:
        raise UserError("--container needs --dsn: it names the server's container, whose sysctls resolve a setting "
                        "of 0 read with --dsn; without a database give the kernel defaults with --sysctl")
    if since is not None and until is not None and since > until:
        raise UserError("--since is after --until: no packet can be in between")
    packet_filter = None
    if expression is not None or since is not None or until is not None:
        try:
            packet_filter = PacketFilter(expression, since, until)
        except CaptureError as error:
            raise UserError(str(error)) from None
    expectations = make_expectations(expect, client_dsn, sysctls)
    err = error_console(color)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if not quiet:
            err.print(f"kaobs: warning: {message}", style="yellow", markup=False, soft_wrap=True)

    captures = _in_time_order(captures, warn)
    output.check_html()
    run = AnalysisRun(sources=list(captures), hz=int(hz))
    run.warnings = warnings
    # Ended connections go to a spool on disk as the capture is read: memory stays bounded by the
    # connections alive at a time, with --dsn too (see below).
    spool = ConnectionSpool()
    analysis = Analysis(ports, retired=spool, hz=int(hz))
    progress = AnalyzeProgress(captures, err, enabled=not quiet and err.is_terminal)
    try:
        with progress:
            _read_captures(captures, analysis, run, packet_filter, warn, progress)
        analysis.finish()
        model = analysis.model
        run.ignored_segments = model.segments_ignored
        run.capture_start, run.capture_end = model.first_t, model.last_t
        postgres = None
        if dsn is not None:  # after the capture: sessions and settings as they are now
            from kaobs.postgres import Postgres

            postgres = Postgres.read(dsn, expectations, sysctls, server_container,
                                     say_error=lambda line: click.echo(f"kaobs: error: {line}", err=True))
            expectations = postgres.expectations
        counts = dict.fromkeys(VERDICTS, 0)
        view = None
        if postgres is not None:
            # Two passes, each judging the connections again from the spool: the first gathers what naming a
            # connection needs of all the others (per-session notes, the checks after aborts), the second names
            # each one as the report is written. No report is held.
            view = postgres.prepare(analysis.reports(expectations, idle_cut=idle_cut))
            reports = _tallied(postgres.annotate(analysis.reports(expectations, idle_cut=idle_cut)), counts)
        else:
            reports = _tallied(analysis.reports(expectations, idle_cut=idle_cut), counts)
        page = None
        if output.html is not None:
            from kaobs.htmlreport import HtmlReport

            page = HtmlReport(output.html, title=f"kaobs: {', '.join(captures)}", path_summary=analysis.path)
            page.postgres = view
        try:
            if page is not None:
                reports = page.tee(reports)  # the page counts every report as it streams by
            # A report going to a file while stderr is a terminal: count its connections there too.
            with (progress if not sys.stdout.isatty() else contextlib.nullcontext()):
                reports = progress.counting(reports, model.opened) if not sys.stdout.isatty() else reports
                if output_format == "json":
                    write_json_streamed(sys.stdout, run, reports, expectations, view)
                elif output_format == "mermaid":
                    write_mermaid(sys.stdout, reports, output.text, source=", ".join(captures), postgres=view)
                else:
                    render_text(text_console(color), run, reports, expectations, view, options=output.text)
        except BrokenPipeError:
            stdout_closed()  # `kaobs analyze ... | head`: the analysis itself stands
            for _ in reports:
                pass
        if page is not None:
            html_written(err, output, page.finish(run, expectations))
        sys.exit(exit_status(counts, view))
    finally:
        if spool is not None:  # (tests run it without a spool, keeping every connection)
            spool.close()


def _tallied(reports: Iterator[ConnectionReport], counts: dict[str, int]) -> Iterator[ConnectionReport]:
    """The reports as they come, each counted by verdict (for the exit status, whatever happens to stdout)."""
    for report in reports:
        counts[report.verdict] += 1
        yield report


def _in_time_order(captures: list[str], warn: Callable[[str], None]) -> list[str]:
    """Several files in the order of their first packets (tcpdump -C/-G rotations a glob put out of order).

    Only regular files are looked into (a pipe can be read once); a file
    without a timed packet keeps its place.
    """
    if len(captures) < 2 or not all(os.path.isfile(path) for path in captures):
        return captures
    firsts: list[float | None] = []
    for path in captures:
        try:
            firsts.append(first_packet_time(path))
        except CaptureError:
            firsts.append(None)  # said when it is read
    timed = [i for i, t in enumerate(firsts) if t is not None]
    ordered = list(captures)
    for place, i in zip(timed, sorted(timed, key=lambda i: firsts[i])):  # type: ignore[arg-type, return-value]
        ordered[place] = captures[i]
    if ordered != captures:
        warn("the captures were given out of time order (a shell glob sorts pg.pcap10 before pg.pcap2); read in the "
             f"order of their first packets: {', '.join(ordered)}")
    return ordered


def _read_captures(captures: list[str], analysis: Analysis, run: AnalysisRun, packet_filter: PacketFilter | None,
                   warn: Callable[[str], None], progress: AnalyzeProgress) -> None:
    """Feed every capture to the analysis; Ctrl-C or SIGTERM (a fifo, a pipe from tcpdump) ends the reading, not the report."""
    restore = _interrupt_on_sigterm()
    previous: tuple[str, float] | None = None
    reader = None
    filtered = 0
    try:
        for index, path in enumerate(captures):
            reader = None
            try:
                reader = CaptureReader(path, warn=warn, packet_filter=packet_filter)
                try:
                    progress.feed(analysis, reader.records(), path, index)
                finally:
                    _account(run, reader.stats)
                    filtered += reader.stats.filtered
                    analysis.note_untimed(reader.stats.untimed_flows)
            except CaptureError as error:
                raise UserError(str(error)) from None
            stats = reader.stats
            if previous is not None and stats.first_t is not None and stats.first_t < previous[1]:
                warn(f"{reader.name} begins {previous[1] - stats.first_t:.3f} s before {previous[0]} ends: time goes "
                     "backwards between them (overlapping captures?); timings around the change are wrong")
            if stats.newest_t is not None:
                previous = (reader.name, stats.newest_t)
    except KeyboardInterrupt:
        if reader is not None:
            try:
                reader.conclude()
            except CaptureError:
                pass
        warn(f"interrupted after {run.packets} packets: the report covers what was read until then")
    finally:
        restore()
        if packet_filter is not None:
            run.filter = {**packet_filter.describe(), "filtered_out": filtered}


def _account(run: AnalysisRun, stats) -> None:
    run.packets += stats.packets
    run.segments += stats.segments
    run.duplicates += stats.duplicates
    run.cut_by_snaplen += stats.cut_by_snaplen
    run.untimed_packets += stats.untimed
    run.unsupported_packets += sum(stats.unsupported.values())
    run.time_backwards += stats.backwards


def _interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM ends the reading as Ctrl-C does (``timeout 60 kaobs analyze fifo``); returns the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, old)


main.add_command(watch)
main.add_command(lab)


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point: click with usage errors and our own errors folded into one line."""
    try:
        main.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:  # pragma: no cover - click >= 8.2
        click.echo(error.ctx.get_help() if error.ctx else str(error))
        return ExitStatus.ERROR
    except click.UsageError as error:
        fail(error.format_message().replace("\n", " "))
    except click.Abort:
        fail("interrupted")
    except UserError as error:
        fail(str(error))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return ExitStatus.OK


def entry() -> None:
    sys.exit(run())


if __name__ == "__main__":
    entry()
