"""The `kaobs` command: a thin layer of options over `sniffer` and `analysis`.

Every user error ends here as one line on stderr and exit code 2; a
contradiction between the settings and the packets is exit code 1.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import click
from rich.console import Console

from analysis.analyze import judge_all, judge_in_order
from analysis.expect import Expectations, ExpectationError, build_expectations
from analysis.model import KeepaliveModel
from analysis.report import AnalysisRun, exit_code, render_text, to_json, write_json_streamed
from analysis.spool import ConnectionSpool, connections_in_order
from sniffer.pcapfile import CaptureReader
from sniffer.records import CaptureError

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """Bad input from the user: printed as one line, exit 2."""


def fail(message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
    click.echo(f"kaobs: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def expectation_options(function):
    """--expect/--client-dsn/--sysctl/--port/--hz, shared by analyze, watch and lab."""
    options = [
        click.option("--expect", "expect", multiple=True, metavar="GUC=VALUE",
                     help="Server setting to check, with Postgres' GUC name and units: tcp_keepalives_idle, "
                          "tcp_keepalives_interval, tcp_keepalives_count, tcp_user_timeout. Repeatable."),
        click.option("--client-dsn", metavar="CONNINFO",
                     help="The client's libpq connection string (key=value or URI); only keepalive parameters are "
                          "used, the password is never printed."),
        click.option("--sysctl", "sysctls", multiple=True, metavar="[server:|client:]NAME=N",
                     help="Kernel defaults used where a setting is 0 or unset, e.g. net.ipv4.tcp_keepalive_time=600."),
        click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535), default=(5432,), show_default=True,
                     help="Server port; says which side is the server. Repeatable."),
        click.option("--hz", type=click.Choice(["100", "250", "300", "1000"]), default="250", show_default=True,
                     help="Kernel HZ of the probing hosts: sets the timer-wheel tolerance."),
        click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_expectations(expect: Sequence[str], client_dsn: str | None, sysctls: Sequence[str]) -> Expectations:
    try:
        from analysis.pgmeta import apply_session_options  # the client DSN's options=-c set the server's GUCs

        return apply_session_options(build_expectations(expect, client_dsn, sysctls), client_dsn)[0]
    except ExpectationError as error:
        raise UserError(str(error)) from None


def echo_json(document: object) -> None:
    """Print `document` as `json.dumps(document, indent=1)` would, without building the whole string.

    The encoder with indent yields a million small pieces for a big report;
    joining them all at once doubled the peak memory of `kaobs analyze`.
    """
    out = sys.stdout
    pieces: list[str] = []
    for piece in json.JSONEncoder(indent=1).iterencode(document):
        pieces.append(piece)
        if len(pieces) >= 16384:
            out.write("".join(pieces))
            pieces.clear()
    pieces.append("\n")
    out.write("".join(pieces))
    out.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kaobs")
def main() -> None:
    """kaobs: watch TCP keepalives of PostgreSQL connections and check them against the settings."""


@main.command()
@click.argument("captures", nargs=-1, required=True, metavar="CAPTURE...")
@expectation_options
@click.option("--dsn", metavar="CONNINFO",
              help="Read the server's keepalive settings and sessions now, over TCP (needs pg_read_all_settings "
                   "and pg_read_all_stats); judged against the capture. The password is never printed.")
@click.option("--container", "server_container", metavar="NAME",
              help="With --dsn: the server's Docker container, whose network namespace's sysctls resolve a setting of 0.")
def analyze(captures: tuple[str, ...], expect, client_dsn, sysctls, ports, hz, output_format, dsn=None,
            server_container=None) -> None:
    """Analyze saved pcap/pcapng files (several files are read in order as one capture).

    Exit 0 when nothing contradicts the expectations, 1 when something does,
    2 for bad usage or unreadable input.
    """
    expectations = make_expectations(expect, client_dsn, sysctls)
    run = AnalysisRun(sources=list(captures), hz=int(hz))
    err = Console(stderr=True, highlight=False)

    def warn(message: str) -> None:
        run.warnings.append(message)
        err.print(f"kaobs: warning: {message}", style="yellow", markup=False)

    # Without --dsn (whose reading needs every report at once), ended connections
    # go to a spool on disk as the capture is read: memory stays bounded by the
    # connections alive at a time, whatever the number of connections.
    spool = ConnectionSpool() if dsn is None else None
    model = KeepaliveModel(ports, retired=spool)
    for path in captures:
        try:
            reader = CaptureReader(path, warn=warn)
            model.feed_records(reader.records())  # the fast form of `for segment in reader: feed(segment)`
        except CaptureError as error:
            raise UserError(str(error)) from None
        stats = reader.stats
        run.packets += stats.packets
        run.segments += stats.segments
        run.duplicates += stats.duplicates
    model.finish()
    run.ignored_segments = model.segments_ignored
    run.capture_start, run.capture_end = model.first_t, model.last_t
    postgres = None
    if dsn is not None:  # after the capture: sessions and settings as they are now
        from kaobs.pgsource import read_for_analysis

        expectations, postgres = read_for_analysis(
            dsn, expectations, sysctls, server_container, lambda line: click.echo(f"kaobs: error: {line}", err=True))
    if spool is not None:
        with spool:
            reports = judge_in_order(connections_in_order(model, spool), expectations, model.capture_end, run.hz)
            if output_format == "json":
                counts = write_json_streamed(sys.stdout, run, reports, expectations)
            else:
                counts = render_text(Console(highlight=False, width=None if sys.stdout.isatty() else 200), run,
                                     reports, expectations)
        sys.exit(1 if counts["mismatch"] else 0)  # as exit_code(reports)
    reports = judge_all(model, expectations, model.capture_end, run.hz)
    view = postgres.finish(reports) if postgres is not None else None
    if output_format == "json":
        echo_json(to_json(run, reports, expectations, view))
    else:
        render_text(Console(highlight=False, width=None if sys.stdout.isatty() else 200), run, reports, expectations,
                    view)
    sys.exit(postgres.exit_code(reports) if postgres is not None else exit_code(reports))


from kaobs.watch import watch_command  # noqa: E402 - after the helpers kaobs.watch uses

main.add_command(watch_command())

from kaobs.lab import lab_command  # noqa: E402 - after the helpers kaobs.lab uses

main.add_command(lab_command())


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point: click with usage errors and our own errors folded into one line."""
    try:
        main.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:  # pragma: no cover - click >= 8.2
        click.echo(error.ctx.get_help() if error.ctx else str(error))
        return EXIT_USAGE
    except click.UsageError as error:
        fail(error.format_message().replace("\n", " "))
    except click.Abort:
        fail("interrupted")
    except UserError as error:
        fail(str(error))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return EXIT_OK


def entry() -> None:
    sys.exit(run())


if __name__ == "__main__":
    entry()
