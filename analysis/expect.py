"""What the user says each side's keepalive settings are, resolved to numbers.

Three inputs, three parsers, one result (:func:`build_expectations`):

``--expect NAME=VALUE`` (server side, repeatable)
    Postgres' own GUC names and value syntax, see :func:`parse_expect`.
``--client-dsn CONNINFO`` (client side)
    A libpq connection string, keyword/value or URI form, see
    :func:`parse_conninfo`.  Only ``keepalives``, ``keepalives_idle``,
    ``keepalives_interval``, ``keepalives_count`` and ``tcp_user_timeout`` are
    used.  The password never appears in an error message, a repr or a
    returned value; :func:`redact_dsn` gives a printable copy of the DSN.
``--sysctl [server:|client:]net.ipv4.tcp_keepalive_{time,intvl,probes}=N``
    The kernel defaults of each side's network namespace, see
    :func:`parse_sysctls`.  They are what a setting of 0 (or an unset libpq
    parameter) resolves to.

"Anything not given is not judged": a :class:`Setting` whose ``value`` is
None carries no expectation, and the verdicts must not check it.

Pure: no I/O, standard library only.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

__all__ = [
    "ExpectationError",
    "Setting",
    "SideExpectation",
    "KernelDefaults",
    "Expectations",
    "GUC_NAMES",
    "parse_expect",
    "parse_guc_value",
    "parse_conninfo",
    "redact_dsn",
    "parse_sysctls",
    "build_expectations",
]

INT_MAX = 2**31 - 1
INT_MIN = -(2**31)
# Linux limits for the per-socket options (include/net/tcp.h); setsockopt()
# answers EINVAL outside 1..max.
MAX_TCP_KEEPIDLE = 32767
MAX_TCP_KEEPINTVL = 32767
MAX_TCP_KEEPCNT = 127

_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale
_REDACTED = "***"


class ExpectationError(ValueError):
    """A user-facing, one-line message about a bad --expect/--client-dsn/--sysctl.

    Messages about a DSN never contain the password (or any other value of
    a secret keyword), nor a word of the DSN that is not a known keyword.
    """


# --------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One resolved setting of one side.

    value
        Seconds for idle/interval, a number of probes for count, and
        *seconds* (converted from the milliseconds the user gave) for
        user_timeout, where 0 means "not set: the count rules".  None means
        "not judged".
    given
        What the user wrote, e.g. ``"tcp_keepalives_idle=1min"`` or
        ``"keepalives_idle=30 (client DSN)"``; None when nothing was written.
    source
        Where the value came from, in words: ``"--expect"``, ``"client
        DSN"``, ``"kernel default 7200 s (net.ipv4.tcp_keepalive_time,
        built-in Linux default)"``, ``"kernel default 60 s (--sysctl
        server:net.ipv4.tcp_keepalive_time=60)"``, ``"libpq default (not
        set): ..."``, or ``"not judged: ..."``.
    """

    value: float | int | None
    given: str | None
    source: str

    @property
    def judged(self) -> bool:
        return self.value is not None


@dataclass(frozen=True, slots=True)
class SideExpectation:
    """The expected keepalive behaviour of one endpoint.

    enabled
        True: the side must probe (SO_KEEPALIVE on); False: it must not
        (libpq ``keepalives=0``); None: not judged.
    user_timeout
        In seconds; 0 means "not set" (the count rules), None "not judged".
    enabled_source
        In words, why ``enabled`` is what it is (empty when not judged).
    """

    side: str
    enabled: bool | None
    idle: Setting
    interval: Setting
    count: Setting
    user_timeout: Setting
    enabled_source: str = ""

    def judged(self) -> bool:
        """Is there anything to judge on this side at all?"""
        return self.enabled is not None or any(
            s.value is not None for s in (self.idle, self.interval, self.count, self.user_timeout)
        )

    def settings(self) -> dict[str, Setting]:
        return {"idle": self.idle, "interval": self.interval, "count": self.count, "user_timeout": self.user_timeout}


@dataclass(frozen=True, slots=True)
class KernelDefaults:
    """The keepalive sysctls of one network namespace (net.ipv4.*; IPv6 TCP uses them too).

    ``origins`` holds, per field name, the ``--sysctl`` item (as written)
    that set it; fields not in it are the built-in Linux defaults.
    """

    keepalive_time: int = 7200
    keepalive_intvl: int = 75
    keepalive_probes: int = 9
    source: str = "built-in Linux defaults"
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, name: str) -> str | None:
        """The --sysctl item that set field `name`, or None for the built-in default."""
        for key, text in self.origins:
            if key == name:
                return text
        return None

    def describe(self, name: str) -> str:
        """``"kernel default 7200 s (net.ipv4.tcp_keepalive_time, built-in Linux default)"`` and the like."""
        value = getattr(self, name)
        sysctl = _SYSCTL_BY_FIELD[name]
        amount = f"{value} probes" if name == "keepalive_probes" else f"{value} s"
        origin = self.origin(name)
        if origin is None:
            return f"kernel default {amount} (net.ipv4.{sysctl}, built-in Linux default)"
        return f"kernel default {amount} (--sysctl {origin})"


@dataclass(frozen=True, slots=True)
class Expectations:
    server: SideExpectation
    client: SideExpectation


# --------------------------------------------------------------------------
# Server: --expect NAME=VALUE, with Postgres' GUC value syntax
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Guc:
    name: str
    unit: str | None  # base unit: "s", "ms", or None (a plain count)
    low: int
    high: int
    field: str  # SideExpectation field
    kernel: str | None  # KernelDefaults field that 0 resolves to
    range_text: str


_GUCS: dict[str, _Guc] = {
    g.name: g
    for g in (
        _Guc("tcp_keepalives_idle", "s", 0, MAX_TCP_KEEPIDLE, "idle", "keepalive_time",
             f"0 = kernel default, or 1..{MAX_TCP_KEEPIDLE} s (the Linux limit)"),
        _Guc("tcp_keepalives_interval", "s", 0, MAX_TCP_KEEPINTVL, "interval", "keepalive_intvl",
             f"0 = kernel default, or 1..{MAX_TCP_KEEPINTVL} s (the Linux limit)"),
        _Guc("tcp_keepalives_count", None, 0, MAX_TCP_KEEPCNT, "count", "keepalive_probes",
             f"0 = kernel default, or 1..{MAX_TCP_KEEPCNT} (the Linux limit)"),
        _Guc("tcp_user_timeout", "ms", 0, INT_MAX, "user_timeout", None,
             f"0 = not set, or 1..{INT_MAX} ms"),
    )
}
GUC_NAMES: tuple[str, ...] = tuple(_GUCS)

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


def _unquote(text: str) -> str:
    text = text.strip(_C_SPACE)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


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
    guc = _GUCS.get(name.strip(_C_SPACE).lower())
    if guc is None:
        raise ExpectationError(_unknown_guc_message(item, name))
    text = _unquote(value)
    if not text:
        raise ExpectationError(f"--expect {item}: empty value")
    number, rest, pg_value, octal = _strtonum(text)
    if number is None:
        raise ExpectationError(f"--expect {item}: not a number Postgres accepts for {guc.name}")
    exact = number
    rest = rest.lstrip(_C_SPACE)
    unit_name = guc.unit
    if rest:
        if guc.unit is None:
            raise ExpectationError(f"--expect {item}: {guc.name} is a count and takes no unit")
        unit = rest
        for index, char in enumerate(rest):
            if char in _C_SPACE:
                unit = rest[:index]
                break
        if len(unit) > _MAX_UNIT_LEN or rest[len(unit):].strip(_C_SPACE) or unit not in dict(_TIME_UNITS[guc.unit]):
            raise ExpectationError(f"--expect {item}: invalid unit for {guc.name}; {_UNITS_HINT}")
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
        raise ExpectationError(f"--expect {item}: out of range; allowed: {guc.range_text}")
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
    if not guc.low <= pg_int <= guc.high:
        shown = f" is {what}:" if rest else ":"
        raise ExpectationError(f"--expect {item}{shown} out of range; allowed: {guc.range_text}")
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
    stripped = text.lstrip(_C_SPACE)
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


_LIBPQ_TO_GUC = {
    "keepalives_idle": "tcp_keepalives_idle",
    "keepalives_interval": "tcp_keepalives_interval",
    "keepalives_count": "tcp_keepalives_count",
}


def _unknown_guc_message(item: str, name: str) -> str:
    valid = ", ".join(GUC_NAMES)
    lowered = name.lower()
    sysctl = _sysctl_short_name(lowered)
    if sysctl in _SYSCTLS:
        hint = f"that is a kernel sysctl: pass it with --sysctl {item}"
    elif lowered in _LIBPQ_TO_GUC:
        hint = (f"{lowered} is the client's libpq parameter (put it in --client-dsn); "
                f"the server GUC is {_LIBPQ_TO_GUC[lowered]}")
    elif lowered == "keepalives":
        hint = "Postgres always turns keepalives on for a TCP connection; there is no server setting for it"
    else:
        close = difflib.get_close_matches(lowered, GUC_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else ""
    message = f"--expect {item}: unknown setting {name!r}"
    if hint:
        message += f"; {hint}"
    return f"{message} (valid: {valid})"


def _parse_expect_items(items: Sequence[str]) -> dict[str, tuple[str, str, int]]:
    if isinstance(items, str):
        items = [items]
    found: dict[str, tuple[str, str, int]] = {}
    for raw in items:
        item = raw.strip(_C_SPACE)
        name, sep, value = item.partition("=")
        name = name.strip(_C_SPACE)
        if not sep or not name:
            raise ExpectationError(
                f"--expect {item!r}: expected NAME=VALUE, e.g. tcp_keepalives_idle=60 (valid names: {', '.join(GUC_NAMES)})"
            )
        key = name.lower()  # GUC names are case-insensitive in Postgres
        if key not in _GUCS:
            raise ExpectationError(_unknown_guc_message(item, name))
        value = value.strip(_C_SPACE)
        base_value = parse_guc_value(key, value)
        if key in found and found[key][2] != base_value:
            raise ExpectationError(f"--expect {key} given twice, as {found[key][0]!r} and {item!r}")
        found.setdefault(key, (item, _unquote(value), base_value))
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
    return {name: text for name, (_, text, _) in _parse_expect_items(items).items()}


# --------------------------------------------------------------------------
# Kernel defaults: --sysctl [server:|client:]net.ipv4.tcp_keepalive_*=N
# --------------------------------------------------------------------------

# sysctl name -> (KernelDefaults field, lowest, highest accepted)
_SYSCTLS: dict[str, tuple[str, int, int]] = {
    "tcp_keepalive_time": ("keepalive_time", 1, INT_MAX),
    "tcp_keepalive_intvl": ("keepalive_intvl", 1, INT_MAX),
    "tcp_keepalive_probes": ("keepalive_probes", 0, 255),  # a u8 in the kernel
}
_SYSCTL_BY_FIELD = {field_name: name for name, (field_name, _, _) in _SYSCTLS.items()}
_SIDES = ("server", "client")


def _sysctl_short_name(name: str) -> str:
    """``net.ipv4.tcp_keepalive_time``, ``net/ipv4/...``, ``/proc/sys/net/ipv4/...`` -> ``tcp_keepalive_time``."""
    name = name.strip(_C_SPACE).replace("/", ".")
    name = name.removeprefix(".proc.sys.")
    return name.removeprefix("net.ipv4.")


def parse_sysctls(items: Sequence[str]) -> tuple[KernelDefaults, KernelDefaults]:
    """Parse ``--sysctl`` items into the (server, client) namespaces' kernel defaults.

    Forms: ``net.ipv4.tcp_keepalive_time=N``, the ``/proc/sys`` slash form
    ``net/ipv4/tcp_keepalive_time=N``, or the bare ``tcp_keepalive_time=N``;
    likewise ``tcp_keepalive_intvl`` and ``tcp_keepalive_probes``.  Without a
    prefix the value applies to both sides; ``server:`` or ``client:`` limits
    it to that side's namespace (a container's can differ from the host's)
    and wins over an unprefixed item whatever the order.  Values are plain
    decimal integers: time and intvl in seconds, at least 1; probes 0..255.
    The same name for the same side twice with different values is an
    error.  Sides not mentioned keep the built-in Linux defaults 7200/75/9.
    """
    if isinstance(items, str):
        items = [items]
    # (scope, field) -> (value, item as written); scope "" = both sides
    given: dict[tuple[str, str], tuple[int, str]] = {}
    for raw in items:
        item = raw.strip(_C_SPACE)
        scope = ""
        body = item
        head, colon, tail = item.partition(":")
        if colon and "=" not in head and "." not in head and "/" not in head:
            scope = head.strip(_C_SPACE).lower()
            if scope not in _SIDES:
                raise ExpectationError(f"--sysctl {item}: unknown side {head!r} (use server: or client:, or no prefix for both)")
            body = tail
        name, sep, value = body.partition("=")
        if not sep:
            raise ExpectationError(f"--sysctl {item}: expected [server:|client:]NAME=N, e.g. net.ipv4.tcp_keepalive_time=600")
        short = _sysctl_short_name(name.lower())
        if short not in _SYSCTLS:
            valid = ", ".join(f"net.ipv4.{n}" for n in _SYSCTLS)
            close = difflib.get_close_matches(short.split(".")[-1], list(_SYSCTLS), n=1, cutoff=0.6)
            hint = f"; did you mean net.ipv4.{close[0]}?" if close else ""
            raise ExpectationError(f"--sysctl {item}: unknown sysctl {name.strip(_C_SPACE)!r}{hint} (valid: {valid})")
        field_name, low, high = _SYSCTLS[short]
        text = _unquote(value)
        if not re.fullmatch(r"[0-9]+", text):
            raise ExpectationError(f"--sysctl {item}: the value must be a whole number")
        number = int(text)
        if not low <= number <= high:
            raise ExpectationError(f"--sysctl {item}: out of range ({low}..{high})")
        key = (scope, field_name)
        if key in given and given[key][0] != number:
            raise ExpectationError(f"--sysctl net.ipv4.{short} given twice for the same side: {given[key][1]!r} and {item!r}")
        given.setdefault(key, (number, item))

    def side_defaults(side: str) -> KernelDefaults:
        values: dict[str, int] = {}
        origins: list[tuple[str, str]] = []
        for field_name in _SYSCTL_BY_FIELD:
            chosen = given.get((side, field_name)) or given.get(("", field_name))
            if chosen is not None:
                values[field_name] = chosen[0]
                origins.append((field_name, chosen[1]))
        if not origins:
            return KernelDefaults()
        source = "; ".join(f"--sysctl {text}" for _, text in origins)
        if len(origins) < len(_SYSCTL_BY_FIELD):
            source += "; built-in Linux defaults for the rest"
        return KernelDefaults(**values, source=source, origins=tuple(origins))

    return side_defaults("server"), side_defaults("client")


# --------------------------------------------------------------------------
# Client: libpq connection strings
# --------------------------------------------------------------------------

# Keywords libpq 18 knows (PQconndefaults), plus the legacy "requiressl" it maps.
_LIBPQ_KEYWORDS = frozenset("""
    application_name channel_binding client_encoding connect_timeout dbname
    fallback_application_name gssdelegation gssencmode gsslib host hostaddr
    keepalives keepalives_count keepalives_idle keepalives_interval krbsrvname
    load_balance_hosts max_protocol_version min_protocol_version oauth_client_id
    oauth_client_secret oauth_issuer oauth_scope options passfile password port
    replication require_auth requirepeer scram_client_key scram_server_key
    service ssl_max_protocol_version ssl_min_protocol_version sslcert sslcertmode
    sslcompression sslcrl sslcrldir sslkey sslkeylogfile sslmode sslnegotiation
    sslpassword sslrootcert sslsni target_session_attrs tcp_user_timeout user
    requiressl
""".split())
# Values never shown: replaced by *** in parse_conninfo()'s result and in redact_dsn().
_SECRET_KEYWORDS = frozenset({"password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"})
_KEEPALIVE_KEYWORDS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")
_URI_PREFIXES = ("postgresql://", "postgres://")
_OTHER_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class _Malformed(Exception):
    """Internal: where and why a DSN does not parse; `safe_from` is where redaction must start hiding."""

    def __init__(self, reason: str, safe_from: int):
        super().__init__(reason)
        self.reason = reason
        self.safe_from = safe_from


def _word(keyword: str) -> str:
    """A keyword as it may appear in a message: only if libpq knows it (else it may be a fragment of a secret)."""
    return keyword if keyword in _LIBPQ_KEYWORDS else "a word that is not a libpq keyword"


def _scan_keyword_value(dsn: str):
    """libpq's conninfo_parse(): yield (keyword, value, value_start, value_end) with raw spans.

    Rules (src/interfaces/libpq/fe-connect.c): whitespace separates pairs and
    may surround ``=``; an unquoted value ends at whitespace; a value in
    single quotes may contain whitespace; in both, a backslash makes the next
    character literal (``\\'`` and ``\\\\``).  Raises _Malformed.
    """
    i, n = 0, len(dsn)
    while i < n:
        if dsn[i] in _C_SPACE:
            i += 1
            continue
        start = i
        while i < n and dsn[i] != "=" and dsn[i] not in _C_SPACE:
            i += 1
        keyword = dsn[start:i]
        while i < n and dsn[i] in _C_SPACE:
            i += 1
        if i >= n or dsn[i] != "=":
            raise _Malformed(
                f"missing \"=\" after {_word(keyword)} at character {start + 1} "
                "(a value with spaces must be in single quotes)", start)
        if not keyword:
            raise _Malformed(f"empty keyword before \"=\" at character {i + 1}", start)
        i += 1
        while i < n and dsn[i] in _C_SPACE:
            i += 1
        value_start = i
        chars: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise _Malformed(
                        f"unterminated quoted string in the value of {_word(keyword)} "
                        f"(the quote opens at character {value_start + 1})", value_start)
                char = dsn[i]
                if char == "\\":
                    i += 1
                    if i < n:
                        chars.append(dsn[i])
                        i += 1
                    continue
                if char == "'":
                    i += 1
                    break
                chars.append(char)
                i += 1
            value_end = i
        else:
            while i < n and dsn[i] not in _C_SPACE:
                if dsn[i] == "\\":
                    i += 1
                    if i < n:
                        chars.append(dsn[i])
                        i += 1
                else:
                    chars.append(dsn[i])
                    i += 1
            value_end = i
        yield keyword, "".join(chars), value_start, value_end


def _pct_decode(text: str, what: str, at: int) -> str:
    """libpq's conninfo_uri_decode(): %XX only ('+' stays '+'); %00 and bad escapes are errors."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        pair = text[i + 1:i + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise _Malformed(f"invalid percent-encoding in {what} (near character {at + i + 1})", at)
        byte = int(pair, 16)
        if byte == 0:
            raise _Malformed(f"forbidden %00 in {what}", at)
        out.append(byte)
        i += 3
    return out.decode("utf-8", "surrogateescape")


def _uri_prefix(dsn: str) -> str | None:
    for prefix in _URI_PREFIXES:
        if dsn.startswith(prefix):
            return prefix
    return None


def _scan_uri(dsn: str) -> list[tuple[str, str]]:
    """libpq's conninfo_uri_parse_options(): (keyword, decoded value) pairs in order.

    ``postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?k=v&...]``;
    ``[...]`` brackets an IPv6 host; hosts and ports are joined with commas as
    libpq does (``h1:5432,h2`` gives host ``h1,h2`` and port ``5432,``);
    query parameters come last and override.  Raises _Malformed.
    """
    prefix = _uri_prefix(dsn)
    assert prefix is not None
    n = len(dsn)
    start = p = len(prefix)
    pairs: list[tuple[str, str]] = []
    while p < n and dsn[p] not in "@/":
        p += 1
    if p < n and dsn[p] == "@":
        q = start
        while dsn[q] not in ":@":
            q += 1
        user = dsn[start:q]
        if user:
            pairs.append(("user", _pct_decode(user, "the user name", start)))
        if dsn[q] == ":":
            r = q + 1
            while dsn[r] != "@":
                r += 1
            password = dsn[q + 1:r]
            if password:
                pairs.append(("password", _pct_decode(password, "the password", q + 1)))
            q = r
        p = q + 1
    else:
        p = start
    hosts: list[str] = []
    ports: list[str] = []
    host_start = p
    while True:
        if p < n and dsn[p] == "[":
            p += 1
            begin = p
            while p < n and dsn[p] != "]":
                p += 1
            if p >= n:
                raise _Malformed(f"no \"]\" closes the IPv6 host address opened at character {begin}", n)
            if p == begin:
                raise _Malformed(f"empty IPv6 host address at character {begin}", n)
            hosts.append(dsn[begin:p])
            p += 1
            if p < n and dsn[p] not in ":/?,":
                raise _Malformed(f"unexpected character at position {p + 1} in the URI (expected \":\" or \"/\")", n)
        else:
            begin = p
            while p < n and dsn[p] not in ":/?,":
                p += 1
            hosts.append(dsn[begin:p])
        terminator = dsn[p] if p < n else ""
        if terminator == ":":
            p += 1
            begin = p
            while p < n and dsn[p] not in "/?,":
                p += 1
            ports.append(dsn[begin:p])
            terminator = dsn[p] if p < n else ""
        if terminator != ",":
            break
        p += 1
        hosts.append(",")
        ports.append(",")
    host_text, port_text = "".join(hosts), "".join(ports)
    if host_text:
        pairs.append(("host", _pct_decode(host_text, "the host list", host_start)))
    if port_text:
        pairs.append(("port", _pct_decode(port_text, "the port list", host_start)))
    if terminator and terminator != "?":
        p += 1
        begin = p
        while p < n and dsn[p] != "?":
            p += 1
        dbname = dsn[begin:p]
        if dbname:
            pairs.append(("dbname", _pct_decode(dbname, "the database name", begin)))
        terminator = dsn[p] if p < n else ""
    if terminator:
        p += 1
        while p < n:
            begin = p
            equals = -1
            while True:
                char = dsn[p] if p < n else ""
                if char == "=":
                    if equals >= 0:
                        keyword = _lenient_decode(dsn[begin:equals])
                        raise _Malformed(f"extra \"=\" in the URI query parameter {_word(keyword)} "
                                         f"at character {p + 1} (encode it as %3D)", begin)
                    equals = p
                    p += 1
                elif char in ("&", ""):
                    end = p
                    if char:
                        p += 1
                    if equals < 0:
                        raise _Malformed(f"missing \"=\" in the URI query parameter at character {begin + 1}", begin)
                    break
                else:
                    p += 1
            keyword = _pct_decode(dsn[begin:equals], "a query parameter name", begin)
            value = _pct_decode(dsn[equals + 1:end], f"the value of the query parameter {_word(keyword)}", begin)
            if keyword == "ssl" and value == "true":  # libpq's JDBC compatibility
                keyword, value = "sslmode", "require"
            pairs.append((keyword, value))
    return pairs


def _lenient_decode(text: str) -> str:
    try:
        return _pct_decode(text, "", 0)
    except _Malformed:
        return text


def _check_unknown_keyword(keyword: str) -> None:
    """Ignore keywords libpq may know; refuse a near-miss of a keepalive keyword (libpq would refuse it too)."""
    if keyword in _LIBPQ_KEYWORDS:
        return
    lowered = keyword.lower()
    if lowered.startswith("tcp_keepalives_"):
        client = lowered.removeprefix("tcp_")
        raise ExpectationError(
            f"--client-dsn: unknown keyword {keyword!r}: that is the server GUC; the libpq parameter is {client} "
            f"(to set the server's for this session: options='-c {lowered}=N')"
        )
    close = difflib.get_close_matches(lowered, _KEEPALIVE_KEYWORDS, n=1, cutoff=0.8)
    if close:
        raise ExpectationError(f"--client-dsn: unknown keyword {keyword!r}: did you mean {close[0]}? "
                               "(libpq keywords are lower case and libpq would refuse this one)")


def _parse_conninfo_pairs(dsn: str) -> list[tuple[str, str]]:
    if _uri_prefix(dsn) is not None:
        pairs = _scan_uri(dsn)
    else:
        scheme = _OTHER_SCHEME_RE.match(dsn.lstrip(_C_SPACE))
        if scheme and _uri_prefix(dsn.lstrip(_C_SPACE)):
            raise _Malformed("a URI must start at the first character (libpq does not skip leading spaces)", 0)
        if scheme:
            raise _Malformed(
                f"a URI must start with postgresql:// or postgres:// (lower case), not {scheme.group(0)!r}", 0)
        pairs = [(keyword, value) for keyword, value, _, _ in _scan_keyword_value(dsn)]
    return pairs


def parse_conninfo(dsn: str) -> dict[str, str]:
    """Parse a libpq connection string as libpq does; return {keyword: value}.

    Both forms of PQconnectdb() are accepted:

    * keyword/value: ``host=db keepalives_idle = 30 password='a b\\'c'``;
      whitespace around ``=`` is allowed, an unquoted value ends at
      whitespace, single quotes allow whitespace, a backslash escapes the next
      character (quoted or not).  A later keyword overrides an earlier one.
    * URI: ``postgresql://`` or ``postgres://`` (lower case, as libpq wants),
      ``user:password@``, hosts ``h1:5432,h2`` (joined as libpq joins them:
      host ``h1,h2``, port ``5432,``), ``[::1]`` for IPv6, ``/dbname``, and
      ``?keyword=value&...`` which override the parts before; every part is
      percent-decoded (``+`` is not a space); ``ssl=true`` becomes
      ``sslmode=require``.

    Keywords libpq knows are returned whatever they are; unknown keywords are
    ignored silently (the DSN may come from a newer libpq) except a near-miss
    of a keepalive keyword (``keepalive_idle``, ``KEEPALIVES=0``,
    ``tcp_keepalives_idle``), which is an error with a suggestion because
    libpq would refuse it and the setting the user meant would be lost.

    Secrets (password, sslpassword, oauth_client_secret, scram_*_key) come
    back as ``***`` so that the result can be logged.  A malformed DSN
    (missing ``=``, unterminated quote, bad percent-escape, unclosed ``[``)
    raises ExpectationError with a position but no part of any value.
    Not done: ``service=`` lookups in pg_service.conf, environment
    variables, and the expansion of a connection string given as ``dbname``.
    """
    try:
        pairs = _parse_conninfo_pairs(dsn)
    except _Malformed as error:
        raise ExpectationError(f"--client-dsn: malformed connection string: {error.reason}") from None
    result: dict[str, str] = {}
    for keyword, value in pairs:
        _check_unknown_keyword(keyword)
        result[keyword] = _REDACTED if keyword in _SECRET_KEYWORDS else value
    return result


def redact_dsn(dsn: str) -> str:
    """The DSN with the value of every secret keyword replaced by ``***``.

    Keyword/value form: ``password='a b'`` becomes ``password=***`` (the
    rest is kept byte for byte; a ``dbname`` holding a connection string or
    URI is redacted inside too).  URI form: the password in the userinfo
    (``user:***@host``) and ``password=***`` query parameters.  Secrets are
    password, sslpassword, oauth_client_secret, scram_client_key and
    scram_server_key.  Never raises: when the DSN is malformed, everything
    from the point where it stops parsing is replaced by ``***`` (it may hold
    a piece of a password), and a URI is redacted on a best-effort reading
    that hides rather than shows.
    """
    if _OTHER_SCHEME_RE.match(dsn.lstrip(_C_SPACE)):
        return _redact_uri(dsn)
    spans: list[tuple[int, int, str]] = []
    cut = None
    try:
        for keyword, value, value_start, value_end in _scan_keyword_value(dsn):
            if keyword in _SECRET_KEYWORDS:
                spans.append((value_start, value_end, _REDACTED))
            elif keyword == "dbname" and ("=" in value or _OTHER_SCHEME_RE.match(value)):
                redacted = redact_dsn(value)
                if redacted != value:
                    quoted = redacted.replace("\\", "\\\\").replace("'", "\\'")
                    spans.append((value_start, value_end, f"'{quoted}'"))
    except _Malformed as error:
        cut = error.safe_from
    out = dsn if cut is None else dsn[:cut] + _REDACTED
    for begin, end, text in sorted(spans, reverse=True):
        out = out[:begin] + text + out[end:]
    return out


def _redact_uri(dsn: str) -> str:
    scheme = _OTHER_SCHEME_RE.match(dsn.lstrip(_C_SPACE))
    assert scheme is not None
    start = len(dsn) - len(dsn.lstrip(_C_SPACE)) + scheme.end()
    spans: list[tuple[int, int]] = []
    # userinfo: libpq looks for '@' before the first '/'; take the *last* such
    # '@' so that an unencoded '@' inside the password is hidden too.
    slash = dsn.find("/", start)
    authority_end = len(dsn) if slash < 0 else slash
    at = dsn.rfind("@", start, authority_end)
    rest_start = start
    if at >= 0:
        colon = dsn.find(":", start, at)
        if colon >= 0 and colon + 1 < at:
            spans.append((colon + 1, at))
        rest_start = at + 1
    # query parameters: a secret's value runs to the next '&' (libpq's rule);
    # a parameter may start after any '?' or '&' (hides more, never less).
    for match in re.finditer(r"[?&]", dsn[rest_start:]):
        begin = rest_start + match.end()
        param = re.match(r"([^=&?]*)=([^&]*)", dsn[begin:])
        if param and _lenient_decode(param.group(1)) in _SECRET_KEYWORDS and param.group(2):
            spans.append((begin + param.start(2), begin + param.end(2)))
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    out = dsn
    for begin, end in reversed(merged):
        out = out[:begin] + _REDACTED + out[end:]
    return out


# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------

_INT_PARAM_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*")


def _libpq_int(keyword: str, value: str) -> int:
    """libpq's pqParseIntParam(): strtol base 10, whitespace around, must fit an int."""
    if not _INT_PARAM_RE.fullmatch(value):
        raise ExpectationError(
            f"--client-dsn: invalid integer value {value!r} for {keyword} (libpq takes only a whole number here)")
    number = int(value.strip(_C_SPACE))
    if not INT_MIN <= number <= INT_MAX:
        raise ExpectationError(f"--client-dsn: {keyword}={value.strip(_C_SPACE)} does not fit an int (libpq refuses it)")
    return number


def _not_judged(reason: str) -> Setting:
    return Setting(None, None, f"not judged: {reason}")


def _unjudged_side(side: str, reason: str) -> SideExpectation:
    s = _not_judged(reason)
    return SideExpectation(side, None, s, s, s, s, "")


_KERNEL_FIELD = {"idle": "keepalive_time", "interval": "keepalive_intvl", "count": "keepalive_probes"}
_CLIENT_KEYWORD = {"idle": "keepalives_idle", "interval": "keepalives_interval", "count": "keepalives_count"}
_CLIENT_LIMIT = {"idle": MAX_TCP_KEEPIDLE, "interval": MAX_TCP_KEEPINTVL, "count": MAX_TCP_KEEPCNT}
_SOCKOPT = {"idle": "TCP_KEEPIDLE", "interval": "TCP_KEEPINTVL", "count": "TCP_KEEPCNT"}


def _server_side(expect: Sequence[str], kernel: KernelDefaults) -> SideExpectation:
    given = _parse_expect_items(expect)
    if not given:
        return _unjudged_side("server", "no --expect given")
    settings: dict[str, Setting] = {}
    for name, guc in _GUCS.items():
        if name not in given:
            settings[guc.field] = _not_judged(f"{name} not given with --expect")
            continue
        item, _, number = given[name]
        if guc.field == "user_timeout":
            source = "--expect" if number else "--expect (0 = not set: the count rules)"
            settings[guc.field] = Setting(number / 1000, item, source)
        elif number == 0:
            assert guc.kernel is not None
            settings[guc.field] = Setting(getattr(kernel, guc.kernel), item, kernel.describe(guc.kernel))
        else:
            settings[guc.field] = Setting(number, item, "--expect")
    return SideExpectation(
        "server", True, settings["idle"], settings["interval"], settings["count"], settings["user_timeout"],
        "Postgres turns SO_KEEPALIVE on for every TCP connection",
    )


def _client_side(dsn: str, kernel: KernelDefaults) -> SideExpectation:
    params = parse_conninfo(dsn)
    settings: dict[str, Setting] = {}
    keepalives = params.get("keepalives")
    if keepalives is not None and _libpq_int("keepalives", keepalives) == 0:
        # libpq skips every keepalive option, and tcp_user_timeout too, when keepalives=0.
        off = f"keepalives={keepalives.strip(_C_SPACE)} (client DSN)"
        for name, keyword in _CLIENT_KEYWORD.items():
            value = params.get(keyword)
            settings[name] = Setting(None, None if value is None else f"{keyword}={value} (client DSN)",
                                     f"not judged: {off} turns client keepalives off")
        value = params.get("tcp_user_timeout")
        settings["user_timeout"] = Setting(
            0.0, None if value is None else f"tcp_user_timeout={value} (client DSN)",
            f"not applied: libpq sets tcp_user_timeout only when keepalives are on ({off})")
        return SideExpectation("client", False, settings["idle"], settings["interval"], settings["count"],
                               settings["user_timeout"], f"{off}: the client must not probe")
    for name, keyword in _CLIENT_KEYWORD.items():
        kernel_field = _KERNEL_FIELD[name]
        value = params.get(keyword)
        if value is None:
            settings[name] = Setting(getattr(kernel, kernel_field), None,
                                     f"libpq default (not set): {kernel.describe(kernel_field)}")
            continue
        number = _libpq_int(keyword, value)
        given = f"{keyword}={value.strip(_C_SPACE)} (client DSN)"
        if number <= 0:
            # libpq clamps a negative value to 0.  libpq's docs say 0 is the
            # system default, but libpq hands the 0 to setsockopt(), which
            # Linux refuses (EINVAL), failing the connection attempt; other
            # client OSes take it as the default.
            settings[name] = Setting(
                getattr(kernel, kernel_field), given,
                f"{kernel.describe(kernel_field)}; caution: a Linux client's libpq fails to connect with "
                f"{keyword}=0 (setsockopt {_SOCKOPT[name]} EINVAL)")
            continue
        if number > _CLIENT_LIMIT[name]:
            raise ExpectationError(
                f"--client-dsn: {keyword}={number} is out of range (1..{_CLIENT_LIMIT[name]} on Linux, "
                f"0 = kernel default): libpq's setsockopt({_SOCKOPT[name]}) would fail")
        settings[name] = Setting(number, given, "client DSN")
    value = params.get("tcp_user_timeout")
    if value is None:
        settings["user_timeout"] = Setting(0.0, None, "libpq default (not set): no user timeout, the count rules")
    else:
        number = max(0, _libpq_int("tcp_user_timeout", value))  # libpq clamps negatives to 0
        given = f"tcp_user_timeout={value.strip(_C_SPACE)} (client DSN)"
        settings["user_timeout"] = Setting(
            number / 1000, given, "client DSN" if number else "client DSN (0 = not set: the count rules)")
    enabled_source = ("libpq default keepalives=1" if keepalives is None
                      else f"keepalives={keepalives.strip(_C_SPACE)} (client DSN)")
    return SideExpectation("client", True, settings["idle"], settings["interval"], settings["count"],
                           settings["user_timeout"], enabled_source)


def build_expectations(
    expect: Sequence[str] = (), client_dsn: str | None = None, sysctls: Sequence[str] = ()
) -> Expectations:
    """Resolve the user's --expect, --client-dsn and --sysctl into per-side expectations.

    Kernel defaults come from :func:`parse_sysctls` (per side; 7200/75/9
    when not given).

    Server side: with no --expect at all it is not judged (enabled None, all
    settings None).  With any --expect, enabled is True (Postgres sets
    SO_KEEPALIVE on every TCP connection); each GUC given is resolved, 0
    meaning the server namespace's kernel default (Postgres reads it back at
    connection start) with a source that says so; tcp_user_timeout=0 stays 0
    ("not set").  A GUC not given is None: not judged, even if a related one
    is.

    Client side: not judged without a DSN (None; an empty string is a DSN,
    all defaults).  With ``keepalives=0`` enabled is False and nothing else
    is judged (libpq then sets no keepalive option and no tcp_user_timeout,
    so user_timeout is 0).  Otherwise enabled is True and each of
    keepalives_idle/interval/count resolves to the client namespace's kernel
    default when unset ("libpq default") or 0 (negative counts as 0, as
    libpq clamps it; the source carries a caution, because libpq passes the
    0 to setsockopt() and Linux refuses it); tcp_user_timeout unset or 0 is 0.
    Values must be integers as libpq parses them, and within the Linux range.
    """
    server_kernel, client_kernel = parse_sysctls(sysctls or ())
    server = _server_side(expect or (), server_kernel)
    if client_dsn is None:
        client = _unjudged_side("client", "no --client-dsn given")
    else:
        client = _client_side(client_dsn, client_kernel)
    return Expectations(server, client)
