"""Postgres' own syntax for the keepalive GUCs' values, and ``--expect NAME=VALUE``.

``--expect tcp_keepalives_idle=1min`` must mean what the server would run
for the same text in postgresql.conf or ``-c``: Postgres' parse_int() with
its time units, and the ranges Postgres and Linux allow. Where Postgres
would silently round, kaobs refuses and names what the server would run:
an expectation must say exactly what the server runs.

Pure: no I/O, standard library only.
"""
from __future__ import annotations

import difflib
import math
import re
from fractions import Fraction
from typing import Sequence

from analysis.kernel_defaults import C_SPACE, sysctl_short_name, unquote
from analysis.settings import (
    BY_GUC,
    BY_LIBPQ,
    ENABLED_LIBPQ,
    GUC_NAMES,
    INT_MAX,
    INT_MIN,
    SYSCTL_NAMES,
    ExpectationError,
)

# Postgres' time_unit_conversion_table (src/backend/utils/misc/guc.c), per base
# unit, largest first.  Unit names are case-sensitive there too.
_TIME_UNITS: dict[str, tuple[tuple[str, Fraction], ...]] = {
    "s": (("d", Fraction(86400)), ("h", Fraction(3600)), ("min", Fraction(60)), ("s", Fraction(1)),
          ("ms", Fraction(1, 1000)), ("us", Fraction(1, 1000000))),
    "ms": (("d", Fraction(86400000)), ("h", Fraction(3600000)), ("min", Fraction(60000)), ("s", Fraction(1000)),
           ("ms", Fraction(1)), ("us", Fraction(1, 1000))),
}
_UNITS_HINT = 'valid units are "us", "ms", "s", "min", "h" and "d" (case-sensitive)'
_MAX_UNIT_LEN = 3
# strtol(base 0) and strtod as parse_int() uses them.
_STRTOL_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_STRTOD_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OCTAL_RE = re.compile(r"[+-]?0[0-7]+")


def parse_guc_value(name: str, value: str) -> int:
    """Parse one server GUC value as Postgres does and return it in the GUC's base unit.

    `name` is one of :data:`GUC_NAMES`; the base unit is seconds for
    tcp_keepalives_idle/interval, milliseconds for tcp_user_timeout, a plain
    count for tcp_keepalives_count.  Accepted, as by Postgres' parse_int():
    an integer (decimal, or hex ``0x1E``), a decimal fraction or exponent
    (``1.5e3``), optionally followed by a time unit ``us``, ``ms``, ``s``,
    ``min``, ``h`` or ``d`` (not for the count), whitespace allowed around
    the number and the unit, the whole optionally single- or double-quoted.

    Decision where Postgres would silently round: Postgres rounds a value
    that is not a whole number of base units (``1500ms`` for a seconds GUC
    becomes 2 s, ``2.5`` becomes 2, and ``0.01h`` becomes 60 s because a
    fractional ``h`` is first rounded to whole minutes).  Here such a value
    is an error that names what Postgres would run: an expectation must
    say exactly what the server runs.  A leading-zero number such as
    ``010`` (octal 8 to Postgres, 10 to a reader) is an error for the same
    reason; ``00`` and ``007`` mean the same either way and are accepted.

    Raises ExpectationError for a malformed value or one outside the range
    Postgres and Linux allow (see the GUC table in this module).
    """
    item = f"{name}={value}"
    guc = BY_GUC.get(name.strip(C_SPACE).lower())
    if guc is None:
        raise ExpectationError(_unknown_guc_message(item, name))
    text = unquote(value)
    if not text:
        raise ExpectationError(f"--expect {item}: empty value")
    number, rest, pg_value, octal = _strtonum(text)
    if number is None:
        raise ExpectationError(f"--expect {item}: not a number Postgres accepts for {guc.guc}")
    exact = number
    rest = rest.lstrip(C_SPACE)
    unit_name = guc.unit
    if rest:
        if guc.unit is None:
            raise ExpectationError(f"--expect {item}: {guc.guc} is a count and takes no unit")
        unit = rest
        for index, char in enumerate(rest):
            if char in C_SPACE:
                unit = rest[:index]
                break
        if len(unit) > _MAX_UNIT_LEN or rest[len(unit):].strip(C_SPACE) or unit not in dict(_TIME_UNITS[guc.unit]):
            raise ExpectationError(f"--expect {item}: invalid unit for {guc.guc}; {_UNITS_HINT}")
        table = _TIME_UNITS[guc.unit]
        position = [u for u, _ in table].index(unit)
        multiplier = table[position][1]
        exact = number * multiplier
        # convert_to_base_unit(): a fractional value is rounded to the next
        # smaller unit of the same base first.
        pg_value = pg_value * float(multiplier)
        if position + 1 < len(table):
            smaller = float(table[position + 1][1])
            pg_value = _rint(pg_value / smaller) * smaller
        unit_name = unit
    if not math.isfinite(pg_value) or not INT_MIN <= _rint(pg_value) <= INT_MAX:
        raise ExpectationError(f"--expect {item}: out of range; allowed: {guc.guc_range}")
    pg_int = int(_rint(pg_value))
    base = guc.unit or ""
    what = f"{pg_int} {base}".rstrip()
    if octal is not None:
        raise ExpectationError(
            f"--expect {item}: Postgres reads the leading-zero number {octal} as octal "
            f"({int(octal, 8)}), not {int(octal, 10)}: write it without the leading zero"
        )
    if exact.denominator != 1:
        written = f"{float(exact):g} {base}".rstrip()
        noun = {"s": "seconds", "ms": "milliseconds", None: "probes"}[guc.unit]
        raise ExpectationError(
            f"--expect {item}: {text} is {written}, not a whole number of {noun}; Postgres would silently "
            f"round it to {what}: give the value the server really runs"
        )
    if exact != pg_int:
        raise ExpectationError(
            f"--expect {item}: Postgres would run {text} as {what}, not {exact} {base} (it first rounds a "
            f"fractional {unit_name} to a whole number of the next smaller unit): give it in a smaller unit"
        )
    if not 0 <= pg_int <= guc.guc_high:
        shown = f" is {what}:" if rest else ":"
        raise ExpectationError(f"--expect {item}{shown} out of range; allowed: {guc.guc_range}")
    return pg_int


def _rint(value: float) -> float:
    """C rint() in the default rounding mode: round half to even."""
    if not math.isfinite(value):
        return value
    return float(round(value))


def _strtonum(text: str) -> tuple[Fraction | None, str, float, str | None]:
    """parse_int()'s number scan: strtol(base 0), falling back to strtod at '.', 'e', 'E'.

    Returns (exact value, rest of the text, the double Postgres computes, the
    digits when they are an octal number that a reader would take for
    another decimal one, else None).
    """
    stripped = text.lstrip(C_SPACE)
    match = _STRTOL_RE.match(stripped)
    # strtol leaves endptr at the start of the *original* text on no conversion
    next_char = stripped[match.end():match.end() + 1] if match else text[:1]
    if next_char in (".", "e", "E"):
        match = _STRTOD_RE.match(stripped)
        if match is None:
            return None, text, 0.0, None
        number = Fraction(match.group(0))
        return number, stripped[match.end():], float(match.group(0)), None
    if match is None:
        return None, text, 0.0, None
    token = match.group(0)
    digits = token.lstrip("+-")
    if digits[:2] in ("0x", "0X"):
        integer = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        integer = int(digits, 8)
    else:
        integer = int(digits)
    if token.startswith("-"):
        integer = -integer
    octal = token if _OCTAL_RE.fullmatch(token) and int(digits, 8) != int(digits, 10) else None
    return Fraction(integer), stripped[match.end():], float(integer), octal


def _unknown_guc_message(item: str, name: str) -> str:
    valid = ", ".join(GUC_NAMES)
    lowered = name.lower()
    sysctl = sysctl_short_name(lowered)
    if f"net.ipv4.{sysctl}" in SYSCTL_NAMES:
        hint = f"that is a kernel sysctl: pass it with --sysctl {item}"
    elif lowered in BY_LIBPQ and BY_LIBPQ[lowered].guc != lowered:
        hint = (f"{lowered} is the client's libpq parameter (put it in --client-dsn); "
                f"the server GUC is {BY_LIBPQ[lowered].guc}")
    elif lowered == ENABLED_LIBPQ:
        hint = "Postgres always turns keepalives on for a TCP connection; there is no server setting for it"
    else:
        close = difflib.get_close_matches(lowered, GUC_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else ""
    message = f"--expect {item}: unknown setting {name!r}"
    if hint:
        message += f"; {hint}"
    return f"{message} (valid: {valid})"


def parse_expect_items(items: Sequence[str]) -> dict[str, tuple[str, str, int]]:
    if isinstance(items, str):
        items = [items]
    found: dict[str, tuple[str, str, int]] = {}
    for raw in items:
        item = raw.strip(C_SPACE)
        name, sep, value = item.partition("=")
        name = name.strip(C_SPACE)
        if not sep or not name:
            raise ExpectationError(
                f"--expect {item!r}: expected NAME=VALUE, e.g. tcp_keepalives_idle=60 (valid names: {', '.join(GUC_NAMES)})"
            )
        key = name.lower()  # GUC names are case-insensitive in Postgres
        if key not in BY_GUC:
            raise ExpectationError(_unknown_guc_message(item, name))
        value = value.strip(C_SPACE)
        base_value = parse_guc_value(key, value)
        if key in found and found[key][2] != base_value:
            raise ExpectationError(f"--expect {key} given twice, as {found[key][0]!r} and {item!r}")
        found.setdefault(key, (item, unquote(value), base_value))
    return found


def parse_expect(items: Sequence[str]) -> dict[str, str]:
    """Validate ``--expect NAME=VALUE`` items; return {GUC name: value text}.

    Names are the server GUCs tcp_keepalives_idle, tcp_keepalives_interval,
    tcp_keepalives_count and tcp_user_timeout, case-insensitive (as in
    Postgres), returned in lower case; spaces around ``=`` are allowed, and
    the value may be quoted (the quotes are dropped from the returned text).
    Each value is checked with :func:`parse_guc_value`.  An unknown name is
    an error that lists the valid ones and suggests the closest one (or
    --sysctl / --client-dsn when the name is a sysctl or a libpq parameter).
    A name given twice with different values is an error; twice with the
    same value (``60`` and ``1min``) is accepted and the first is kept.
    """
    return {name: text for name, (_, text, _) in parse_expect_items(items).items()}

