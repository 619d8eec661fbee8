"""What the kaobs commands share: the user-error type, the expectation options, and turning them into expectations.

Its own module so that `kaobs.cli`, `kaobs.watch` and `kaobs.lab` all import
it and none of them imports another's command module.
"""
from __future__ import annotations

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
        click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                     help="text: the report for people; json: the complete document, every connection and probe "
                          "(the JSON contract in README.md)."),
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


@dataclass(frozen=True, slots=True)
class Output:
    """How results are shown: the text report's choices, --quiet and --color."""

    text: TextOptions
    quiet: bool = False
    color: str = "auto"


def output_options(function):
    """--only/--summary/--all (what the text report lists), --quiet and --color, shared by analyze, watch and lab."""
    options = [
        click.option("--only", "only", multiple=True, type=click.Choice(ONLY_CHOICES),
                     help="List only these connections in the text report (repeatable): mismatch (settings the "
                          "packets contradict), abort (ended by a keepalive abort), probing (keepalive probes seen). "
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
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_output(output_format: str, only: Sequence[str], summary: bool, show_all: bool, quiet: bool,
                color: str) -> Output:
    """The output options; --only/--summary/--all shape the text report only (the JSON is always complete)."""
    if output_format == "json" and (only or summary or show_all):
        used = [name for name, given in (("--only", only), ("--summary", summary), ("--all", show_all)) if given]
        verb = "shapes" if len(used) == 1 else "shape"
        raise UserError(f"{' and '.join(used)} {verb} the text report; the JSON document always holds every connection")
    return Output(TextOptions(frozenset(only), summary, show_all), quiet, color)
