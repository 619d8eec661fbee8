"""What the kaobs commands share: the user-error type, the expectation options, and turning them into expectations.

Its own module so that `kaobs.cli`, `kaobs.watch` and `kaobs.lab` all import
it and none of them imports another's command module.
"""
from __future__ import annotations

import math
import sys
from typing import NoReturn, Sequence

import click

from analysis.expect import Expectations, build_expectations
from analysis.pgsettings import apply_session_options
from analysis.settings import GUC_NAMES, ExpectationError
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
    """The expectations the options say; the client DSN's ``options=-c`` set the server side of its sessions."""
    try:
        return apply_session_options(build_expectations(expect, client_dsn, sysctls), client_dsn)[0]
    except ExpectationError as error:
        raise UserError(str(error)) from None
