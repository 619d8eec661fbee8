"""The `kaobs` command: a thin layer of options over `sniffer` and `analysis`.

Every user error ends here as one line on stderr and exit status 2; a
contradiction between the settings and the packets is 1 (`kaobs.status`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Sequence

import click

from analysis.pipeline import Analysis, AnalysisRun
from kaobs.lab.command import lab
from kaobs.options import (UserError, expectation_options, fail, idle_cut_option, make_expectations, make_output,
                           output_options)
from kaobs.progress import AnalyzeProgress
from kaobs.report import (
    echo_json,
    error_console,
    render_text,
    text_console,
    to_json,
    write_json_streamed,
)
from kaobs.spool import ConnectionSpool
from kaobs.status import ExitStatus, exit_status
from kaobs.watch import watch
from sniffer.pcapfile import CaptureReader
from sniffer.records import CaptureError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kaobs")
def main() -> None:
    """kaobs: watch TCP keepalives of PostgreSQL connections and check them against the settings."""


@main.command(short_help="Judge the keepalives in pcap/pcapng files.")
@click.argument("captures", nargs=-1, required=True, metavar="CAPTURE...")
@expectation_options
@click.option("--dsn", metavar="CONNINFO",
              help="Read the server's keepalive settings and sessions now, over TCP (needs pg_read_all_settings "
                   "and pg_read_all_stats); judged against the capture. The password is never printed.")
@click.option("--container", "server_container", metavar="NAME",
              help="With --dsn: the server's Docker container, whose network namespace's sysctls resolve a setting of 0.")
@idle_cut_option
@output_options
def analyze(captures: tuple[str, ...], expect, client_dsn, sysctls, ports, hz, output_format, dsn=None,
            server_container=None, idle_cut=None, only=(), summary=False, show_all=False, quiet=False,
            color="auto") -> None:
    """Analyze saved pcap/pcapng files (several files are read in order as one capture).

    Exit 0 when nothing contradicts the expectations, 1 when something does,
    2 for bad usage or unreadable input.
    """
    output = make_output(output_format, only, summary, show_all, quiet, color)
    expectations = make_expectations(expect, client_dsn, sysctls)
    run = AnalysisRun(sources=list(captures), hz=int(hz))
    err = error_console(color)

    def warn(message: str) -> None:
        run.warnings.append(message)
        if not quiet:
            err.print(f"kaobs: warning: {message}", style="yellow", markup=False)

    # Ended connections go to a spool on disk as the capture is read: memory stays bounded by the
    # connections alive at a time. With --dsn every report is held: the matching needs them together.
    spool = ConnectionSpool() if dsn is None else None
    analysis = Analysis(ports, retired=spool, hz=int(hz))
    progress = AnalyzeProgress(captures, err, enabled=not quiet and err.is_terminal)
    try:
        with progress:
            for index, path in enumerate(captures):
                try:
                    reader = CaptureReader(path, warn=warn)
                    progress.feed(analysis, reader.records(), path, index)
                except CaptureError as error:
                    raise UserError(str(error)) from None
                stats = reader.stats
                run.packets += stats.packets
                run.segments += stats.segments
                run.duplicates += stats.duplicates
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
        reports = analysis.reports(expectations, idle_cut=idle_cut)
        if postgres is None:
            # A report going to a file while stderr is a terminal: count its connections there too.
            with (progress if not sys.stdout.isatty() else contextlib.nullcontext()):
                reports = progress.counting(reports, model.opened) if not sys.stdout.isatty() else reports
                if output_format == "json":
                    counts = write_json_streamed(sys.stdout, run, reports, expectations)
                else:
                    counts = render_text(text_console(color), run, reports, expectations, options=output.text)
            sys.exit(exit_status(counts))
        held = list(reports)
        view = postgres.finish(held)
        if output_format == "json":
            document = to_json(run, held, expectations, view)
            echo_json(document)
            counts = document["summary"]
        else:
            counts = render_text(text_console(color), run, held, expectations, view, options=output.text)
        sys.exit(exit_status(counts, view))
    finally:
        if spool is not None:
            spool.close()


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
