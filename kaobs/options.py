"""What the kaobs commands share: the user-error type, the expectation options, and turning them into expectations.

Its own module so that `kaobs.cli`, `kaobs.watch` and `kaobs.lab` all import
it and none of them imports another's command module.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence

import click

from analysis.expect import Expectations, build_expectations
from analysis.pgsettings import apply_session_options
from analysis.settings import GUC_NAMES, ExpectationError
from kaobs.report import COLOR_CHOICES, ONLY_CHOICES, TextOptions
from kaobs.status import ExitStatus


class UserError(Exception):
    """Bad input from the user, or something asked for that cannot be done: one line, exit 2."""


def fail(message: str) -> NoReturn:
    click.echo(f"kaobs: error: {message}", err=True)
    sys.exit(ExitStatus.ERROR)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf: ``nan < 0.1`` is False, so click's range lets nan through.

    A duration of nan never ends (``now >= start + nan`` is never true).
    """

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def expectation_options(function):
    """--expect/--client-dsn/--sysctl/--port/--hz/--format, shared by analyze, watch and lab."""
    options = [
        click.option("--expect", "expect", multiple=True, metavar="GUC=VALUE",
                     help="Server setting to check, with Postgres' GUC name and units: "
                          f"{', '.join(GUC_NAMES)}. Repeatable."),
        click.option("--client-dsn", metavar="CONNINFO",
                     help="The client's libpq connection string (key=value or URI); only keepalive parameters are "
                          "used, the password is never printed."),
        click.option("--sysctl", "sysctls", multiple=True, metavar="[server:|client:]NAME=N",
                     help="Kernel defaults used where a setting is 0 or unset, e.g. net.ipv4.tcp_keepalive_time=600; net.ipv4.tcp_retries2=N bounds a stall with data in flight."),
        click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535), default=(5432,), show_default=True,
                     help="Server port; says which side is the server. Repeatable."),
        click.option("--hz", type=click.Choice(["100", "250", "300", "1000"]), default="250", show_default=True,
                     help="Kernel HZ of the probing hosts, which sets how late a timer may fire (the timer wheel's "
                          "granularity). On each host: grep 'CONFIG_HZ=' /boot/config-$(uname -r) (or zgrep it in "
                          "/proc/config.gz); or measure it: the 'jiffies:' line of /proc/timer_list grows by HZ a "
                          "second."),
        click.option("--format", "output_format", type=click.Choice(FORMATS), default="text", show_default=True,
                     help="text: the report for people; json: the complete document, every connection and probe "
                          "(the JSON contract in README.md); mermaid: one connection's keepalive episode as a "
                          "Mermaid sequenceDiagram (the worst one, or --connection N), which GitHub draws between "
                          "a ```mermaid line and a ``` line."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_expectations(expect: Sequence[str], client_dsn: str | None, sysctls: Sequence[str]) -> Expectations:
    """The expectations the options say; the client DSN's ``options=-c`` set the server side of its sessions."""
    try:
        return apply_session_options(build_expectations(expect, client_dsn, sysctls), client_dsn)[0]
    except ExpectationError as error:
        raise UserError(str(error)) from None


def idle_cut_option(function):
    """--idle-cut: a middlebox's idle timeout the user knows about (AWS NLB 350 s, Azure 240 s, IPVS 900 s ...)."""
    return click.option(
        "--idle-cut", type=click.FloatRange(min=1.0, max=432_000.0), metavar="SECONDS", default=None,
        help="The path forgets connections idle this long (a load balancer, NAT or firewall): a side whose first "
             "keepalive probe comes later is a finding.")(function)


FORMATS = ("text", "json", "mermaid")


@dataclass(frozen=True, slots=True)
class Output:
    """How results are shown: the text report's choices, --quiet, --color, and the --html page's file."""

    text: TextOptions
    quiet: bool = False
    color: str = "auto"
    html: str | None = None

    def check_html(self) -> None:
        """Refuse an --html path that cannot be written before any work (it is written at the end)."""
        if self.html is None:
            return
        folder = os.path.dirname(os.path.abspath(self.html))
        if not os.path.isdir(folder):
            raise UserError(f"--html {self.html}: no such directory {folder}")
        target = self.html if os.path.exists(self.html) else folder
        if not os.access(target, os.W_OK):
            raise UserError(f"--html {self.html}: permission denied")


def output_options(function):
    """--only/--summary/--all (what the text report lists), --quiet and --color, shared by analyze, watch and lab."""
    options = [
        click.option("--only", "only", multiple=True, type=click.Choice(ONLY_CHOICES),
                     help="List only these connections in the text report (repeatable): mismatch (settings the "
                          "packets contradict), abort (ended by a keepalive abort), probing (keepalive probes seen), path (a "
                          "middlebox cut it, or data stuck in flight). "
                          "The totals still count every connection."),
        click.option("--summary", is_flag=True,
                     help="One line per connection in the text report (id, verdict, endpoints, backend, the reason) "
                          "instead of a block."),
        click.option("--all", "show_all", is_flag=True,
                     help="Also list connections without keepalive activity (by default they are only counted)."),
        click.option("--quiet", "-q", is_flag=True,
                     help="Only the report and errors: no progress, no live view, no warnings on stderr (they are "
                          "in the report); alarms of watch and lab still go to stderr."),
        click.option("--color", type=click.Choice(COLOR_CHOICES), default="auto", show_default=True,
                     help="Colors in the text output: auto (on a terminal, unless NO_COLOR is set), always, never."),
        click.option("--connection", "connection", type=click.IntRange(min=1), metavar="N",
                     help="Only connection #N: the text report lists just it, --format mermaid draws it (default: "
                          "the worst)."),
        click.option("--html", "html", metavar="FILE", type=click.Path(dir_okay=False),
                     help="Also write the keepalive timelines as one self-contained HTML page (opens offline): "
                          "per connection the client's kernel, the path and the server's kernel on a broken time "
                          "axis, with the verdict beside; the troubled connections first."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_output(output_format: str, only: Sequence[str], summary: bool, show_all: bool, quiet: bool,
                color: str, connection: int | None = None, html: str | None = None) -> Output:
    """The output options; --only/--summary/--all/--connection shape the text report (the JSON is always complete;
    mermaid draws one connection: --connection, or the worst one --only keeps)."""
    if output_format == "json" and (only or summary or show_all or connection is not None):
        used = [name for name, given in (("--only", only), ("--summary", summary), ("--all", show_all),
                                         ("--connection", connection is not None)) if given]
        verb = "shapes" if len(used) == 1 else "shape"
        raise UserError(f"{' and '.join(used)} {verb} the text report; the JSON document always holds every connection")
    if output_format == "mermaid" and (summary or show_all):
        used = [name for name, given in (("--summary", summary), ("--all", show_all)) if given]
        raise UserError(f"{' and '.join(used)} {'shapes' if len(used) == 1 else 'shape'} the text report; --format "
                        "mermaid draws one connection (--connection N, or the worst one --only keeps)")
    return Output(TextOptions(frozenset(only), summary, show_all, connection), quiet, color, html)


def html_written(err, output: Output, drawn: int) -> None:
    """Say on stderr where the --html page went (stdout holds the report, maybe JSON); nothing with --quiet."""
    if output.quiet or output.html is None:
        return
    try:
        size = os.path.getsize(output.html)
    except OSError:
        size = 0
    err.print(f"kaobs: timelines written to {output.html} ({drawn} connection(s) drawn, {size / 1e6:.1f} MB)",
              markup=False, highlight=False, soft_wrap=True)


def write_html_file(output: Output, run, reports, expectations, title: str, postgres=None) -> None:
    """The --html page of a finished run (watch, lab: their reports are held anyway), said on stderr."""
    if output.html is None:
        return
    from kaobs.htmlreport import write_html
    from kaobs.report import error_console

    drawn = write_html(output.html, run, reports, expectations, title=title, postgres=postgres)
    html_written(error_console(output.color), output, drawn)


class FileMode(click.ParamType):
    """Permissions in octal, as chmod takes them (600, 0640, 0o644)."""

    name = "mode"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text) or int(text, 8) > 0o777:
            self.fail(f"{value!r} is not a file mode: give it in octal, as chmod takes it (600, 640, 644)", param, ctx)
        return int(text, 8)


def write_mode_option(function):
    """--write-mode, for the commands that --write a capture (watch, lab)."""
    return click.option(
        "--write-mode", type=FileMode(), default="600", show_default=True, metavar="MODE",
        help="Permissions of the --write file, in octal: only its owner may read it unless you say otherwise "
             "(a capture says who talked to the database; with --full-packets it holds queries and passwords).",
    )(function)


def filter_expression(words: Sequence[str]) -> str | None:
    """tcpdump's filter expression from the command's trailing words (``kaobs watch tcp port 5432``), compiled now.

    A syntax error is one line before anything starts.
    """
    expression = " ".join(words).strip() or None
    if expression is not None:
        from sniffer.bpf import PacketFilter
        from sniffer.records import CaptureError

        try:
            PacketFilter(expression)
        except CaptureError as error:
            raise UserError(str(error)) from None
    return expression


class CaptureTime(click.ParamType):
    """A point in time for --since/--until: Unix seconds, or an ISO 8601 date and time (UTC unless it says otherwise).

    UTC because the reports print capture times in UTC.
    """

    name = "time"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        if re.fullmatch(r"[0-9]+(\.[0-9]*)?", text):
            return float(text)
        try:
            when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not a time: give Unix seconds (1764597727.5) or an ISO 8601 date and time "
                      "(2026-12-01T14:02:07, UTC unless an offset is given)", param, ctx)
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        return when.timestamp()


_CAPTURE_NAME = re.compile(r"(^|/)[^ ]*\.(pcap|pcapng|cap|gz|zst|xz|bz2)[0-9]*$")


def split_captures(arguments: Sequence[str], read_paths: Sequence[str]) -> tuple[list[str], str | None]:
    """The capture files and the filter expression in ``kaobs analyze``'s arguments, as tcpdump reads them.

    With ``-r FILE`` every argument is the expression (``kaobs analyze -r f.pcap tcp port 5432``).
    Without, the leading arguments that name files (or ``-``, standard input) are the captures and
    the rest is the expression (``kaobs analyze a.pcap b.pcap 'host 10.0.0.5'``).
    """
    if read_paths:
        captures, words = list(read_paths), list(arguments)
    else:
        captures = []
        for argument in arguments:
            if argument != "-" and not os.path.exists(argument):
                break
            captures.append(argument)
        words = list(arguments[len(captures):])
        if not captures:
            if not words:
                raise UserError("no capture given: kaobs analyze FILE... [EXPRESSION] (or -r FILE; - reads standard input)")
            raise UserError(f"{words[0]}: no such file")
    if words and _CAPTURE_NAME.search(words[0]) and " " not in words[0]:
        raise UserError(f"{words[0]}: no such file")  # a missing capture, not a filter expression
    return captures, " ".join(words) if words else None


def stdout_closed() -> None:
    """The reader of our standard output went away (``kaobs analyze ... | head``): that is not a failure.

    Whatever is still written goes nowhere, so neither the rest of the report
    nor the interpreter's final flush raises BrokenPipeError (Python's own advice).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class ListenAddressType(click.ParamType):
    """``HOST:PORT``, ``:PORT`` or ``[IPv6]:PORT`` for --metrics (parsed in `kaobs.metrics`)."""

    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        from kaobs.metrics import ListenAddress, parse_listen_address

        if isinstance(value, ListenAddress):
            return value
        try:
            return parse_listen_address(value)
        except ValueError as error:
            self.fail(f"{value!r}: {error}", param, ctx)


def metrics_options(function):
    """--metrics/--metrics-linger, shared by watch and lab."""
    options = [
        click.option("--metrics", "metrics_address", type=ListenAddressType(), default=None, metavar="HOST:PORT",
                     help="Serve Prometheus metrics over HTTP on HOST:PORT (':9432': every address; port 0: a free "
                          "one, said on stderr)."),
        click.option("--metrics-linger", type=FiniteFloatRange(min=0), default=0.0, show_default=True, metavar="S",
                     help="With --metrics: after the run, keep serving until Prometheus has scraped the final "
                          "numbers, at most S seconds (give one scrape interval or more for a --duration run)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function
