"""The exit status of every kaobs command, decided in one place (httpie's ``status.py`` is the model).

0: nothing contradicts the expectations. 1: something does (a setting the
packets contradict, or a backend that outlived its connection's keepalive
abort). 2: what was asked could not be done: bad usage, unreadable input, no
capture, or a database that could not be read (the packet report is still
printed then). A reader of the report that went away (``kaobs analyze ... | head``)
is not a failure: the status is still the analysis's (the commands call
`exit_status` with the verdicts counted as the reports were made, printed or not).
"""
from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from analysis.pgsessions import PostgresView


class ExitStatus(IntEnum):
    OK = 0
    MISMATCH = 1
    ERROR = 2


def exit_status(verdicts: Mapping[str, int], postgres: "PostgresView | None" = None) -> ExitStatus:
    """The status of a finished analysis, from its verdict counts and what the database said (with --dsn)."""
    if postgres is not None and postgres.error is not None:
        return ExitStatus.ERROR
    if verdicts.get("mismatch") or (postgres is not None and postgres.outlived()):
        return ExitStatus.MISMATCH
    return ExitStatus.OK
