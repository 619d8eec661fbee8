"""The server's keepalive settings as Postgres reports them, turned into the server side's expectation.

Pure: the I/O (psycopg, docker, /proc/sys) lives in `kaobs.postgres`, which
hands this module plain records read from the server: a :class:`GucReading`
per keepalive GUC from ``pg_settings`` on a TCP session (``reset_val`` is the
server-wide value, what a session without its own ``SET``/``options=-c``
runs; ``setting`` what the monitoring session's socket runs, read back with
getsockopt, so a GUC of 0 shows the kernel default of the server's network
namespace; ``source`` where the server-wide value came from).

From them, :func:`server_expectation` resolves each 0 to a kernel default with
the origin of every number; :func:`apply_session_options` applies what an
application's own DSN sets for its sessions (``options=-c``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from analysis.conninfo import parse_conninfo
from analysis.expect import Expectations, Setting, SideExpectation
from analysis.gucvalue import parse_guc_value
from analysis.kernel_defaults import KernelDefaults
from analysis.settings import BY_GUC, SETTINGS, ExpectationError

# pg_settings.source values that are not server-wide: they apply to some sessions only.
NON_SERVER_WIDE_SOURCES = {
    "user": "ALTER ROLE ... SET",
    "database": "ALTER DATABASE ... SET",
    "database user": "ALTER ROLE ... IN DATABASE ... SET",
    "client": "the monitoring connection's own options",
    "session": "SET in the monitoring session",
}
# Clocks of the capturing host and the server may differ a little; a backend
# that started within this of a connection's SYN is that connection's.


# -- records read from the server ------------------------------------------------


@dataclass(frozen=True, slots=True)
class GucReading:
    """One keepalive GUC from pg_settings, read on a TCP session.

    server_wide
        ``reset_val``: the value sessions start with, in the GUC's base unit
        (s, or ms for tcp_user_timeout); 0 = the kernel default (not set).
    session
        ``setting`` on the monitoring TCP session: the socket's value as the
        server reads it back (for a GUC of 0, the kernel default of the
        server's network namespace); None when unknown, -1 when the server
        could not read it.
    source
        ``pg_settings.source``: default, configuration file, command line,
        environment variable, user, database, ...
    """

    name: str
    server_wide: int
    session: int | None
    source: str
    sourcefile: str | None = None
    sourceline: int | None = None

    @property
    def unit(self) -> str | None:
        return BY_GUC[self.name].unit

    def origin(self) -> str:
        """``pg_settings.source: configuration file /etc/postgresql.conf:12``."""
        where = f"pg_settings.source: {self.source}"
        if self.sourcefile:
            where += f" {self.sourcefile}" + (f":{self.sourceline}" if self.sourceline else "")
        return where


@dataclass(frozen=True, slots=True)
class KernelReading:
    """The keepalive sysctls of one network namespace, and where they were read."""

    values: Mapping[str, int]  # KernelDefaults field -> value
    where: str  # "container pg's network namespace", "this host's /proc/sys"




# -- the DSN must reach the server over TCP -------------------------------------


def unix_socket_reason(params: Mapping[str, str], env_host: str | None = None) -> str | None:
    """Why a conninfo (as libpq parsed it) would reach the server over a Unix socket, or None for TCP.

    libpq takes ``hostaddr`` as a TCP address; otherwise a ``host`` that is
    empty (and no PGHOST) or starts with ``/`` or ``@`` is a Unix-socket
    directory (or abstract socket).  Postgres applies no keepalive GUC to a
    Unix-socket session and reports 0 for every one of them, which says
    nothing about TCP sessions.
    """
    hostaddrs = [h for h in (params.get("hostaddr") or "").split(",") if h.strip()]
    hosts_text = params.get("host")
    if hosts_text is None or hosts_text == "":
        hosts_text = env_host or ""
    hosts = hosts_text.split(",") if hosts_text else [""]
    for index, host in enumerate(hosts):
        if index < len(hostaddrs):
            continue
        host = host.strip()
        if host == "":
            return ("no host given: libpq then connects over the default Unix socket, where Postgres reports 0 for "
                    "every keepalive setting (they apply to TCP sessions only); give the server's TCP address, "
                    "e.g. host=127.0.0.1")
        if host.startswith(("/", "@")):
            return (f"host={host} is a Unix socket, where Postgres reports 0 for every keepalive setting (they "
                    "apply to TCP sessions only), which says nothing about TCP sessions; give the server's TCP "
                    "address, e.g. host=127.0.0.1")
    return None


# -- server-side expectation from the server -------------------------------------


def _kernel_choice(
    kernel_field: str,
    reading: GucReading,
    user_kernel: KernelDefaults,
    container: KernelReading | None,
    local: KernelReading | None,
) -> tuple[int, str, list[str]]:
    """The kernel default a GUC of 0 resolves to: (value, where it came from, warnings).

    Order: --sysctl (what the user said wins), the server container's
    namespace (--container), the value the server read back from its own TCP
    socket (getsockopt on the monitoring session: its namespace's default),
    this host's /proc/sys (only offered when the server address is local),
    the built-in Linux default.
    """
    setting = next(s for s in SETTINGS if s.kernel_field == kernel_field)
    sysctl = setting.sysctl
    warnings: list[str] = []
    socket_value = reading.session if reading.session is not None and reading.session > 0 else None
    candidates: list[tuple[int, str]] = []
    if user_kernel.origin(kernel_field) is not None:
        candidates.append((getattr(user_kernel, kernel_field), f"--sysctl {user_kernel.origin(kernel_field)}"))
    for namespace in (container,):
        if namespace is not None and kernel_field in namespace.values:
            candidates.append((namespace.values[kernel_field], f"{sysctl} in {namespace.where}"))
    if socket_value is not None:
        candidates.append((socket_value, f"{sysctl} of the server's network namespace, read back by the server "
                                         f"from its TCP socket (getsockopt {setting.sockopt})"))
    if local is not None and kernel_field in local.values:
        candidates.append((local.values[kernel_field], f"{sysctl} in {local.where}"))
    if not candidates:
        return getattr(KernelDefaults(), kernel_field), f"{sysctl}, built-in Linux default (nothing could be read)", []
    value, where = candidates[0]
    for other, other_where in candidates[1:]:
        if other != value:
            warnings.append(f"{sysctl}: {value} from {where.split(',')[0]} but {other} from {other_where.split(',')[0]}; "
                            f"using {value}")
    return value, where, warnings


def server_expectation(
    readings: Sequence[GucReading],
    explicit: SideExpectation,
    user_kernel: KernelDefaults | None = None,
    container: KernelReading | None = None,
    local: KernelReading | None = None,
) -> tuple[SideExpectation, list[str], list[str]]:
    """The server side's expectation from pg_settings: (expectation, lines saying where each number came from, warnings).

    A GUC given with --expect (`explicit`) keeps the user's value; a
    difference from the server's is a warning.  A server-wide 0 resolves to
    the kernel default (see :func:`_kernel_choice`); tcp_user_timeout 0
    stays 0 ("not set").  A value from ALTER ROLE/DATABASE (pg_settings
    source user/database) is used but flagged: it is what the monitoring
    role's sessions run, not necessarily everyone's.
    """
    user_kernel = user_kernel or KernelDefaults()
    by_name = {r.name: r for r in readings}
    settings: dict[str, Setting] = {}
    lines: list[str] = []
    warnings: list[str] = []
    for entry in SETTINGS:
        guc, key = entry.guc, entry.key
        mine: Setting = getattr(explicit, key)
        reading = by_name.get(guc)
        if reading is None:
            settings[key] = mine
            continue
        unit = reading.unit
        shown = f"{reading.server_wide} {unit}" if unit else f"{reading.server_wide}"
        if reading.source in NON_SERVER_WIDE_SOURCES:
            warnings.append(
                f"{guc}={shown} comes from {NON_SERVER_WIDE_SOURCES[reading.source]} (pg_settings.source: "
                f"{reading.source}): it applies to the monitoring role's sessions; other sessions may run another value")
        if key == "user_timeout":
            value: float | int = reading.server_wide / 1000
            text = f"{guc} = {shown} ({reading.origin()})" + ("" if reading.server_wide else ": not set, the count rules")
            source = f"server: {reading.source}"
        elif reading.server_wide == 0:
            kernel_field = entry.kernel_field
            number, where, more = _kernel_choice(kernel_field, reading, user_kernel, container, local)
            warnings.extend(more)
            value = number
            amount = f"{number} probes" if key == "count" else f"{number} s"
            text = f"{guc} = 0 ({reading.origin()}) -> kernel default {amount}: {where}"
            source = "server: 0 = kernel default"
        else:
            value = reading.server_wide
            text = f"{guc} = {shown} ({reading.origin()})"
            source = f"server: {reading.source}"
        if mine.judged:
            # --expect, or the client DSN's options=-c (the sessions of that application run it)
            given = f"--expect {mine.given}" if mine.source == "--expect" else f"{mine.given} [{mine.source}]"
            lines.append(f"{text}; {given} is used instead")
            if float(mine.value) != float(value):  # type: ignore[arg-type]
                warnings.append(f"{given} differs from the server's {guc} ({text.split(' = ', 1)[1]}): "
                                "judging against it")
            settings[key] = mine
            continue
        lines.append(text)
        settings[key] = Setting(value, f"{guc}={reading.server_wide} (pg_settings)", source)
    side = SideExpectation(
        "server", True, settings["idle"], settings["interval"], settings["count"], settings["user_timeout"],
        "Postgres turns SO_KEEPALIVE on for every TCP connection",
    )
    return side, lines, warnings


# -- the client's real DSN: options=-c tcp_keepalives_*=N --------------------------

_OPTION_RE = re.compile(r"(?:-c\s*|--)([A-Za-z0-9_.-]+)=(.*)", re.S)


def _split_options(options: str) -> list[str]:
    """libpq/Postgres `options` splitting: whitespace separates, a backslash makes the next character literal."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    started = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
            started = True
        elif char == "\\":
            escaped = True
            started = True
        elif char.isspace():
            if started:
                words.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    return words


def session_options(dsn: str) -> dict[str, int]:
    """The server keepalive GUCs an application's DSN sets for its own sessions (``options=-c name=value``).

    Returns {GUC name: value in its base unit}.  Forms accepted as the
    server accepts them: ``-c name=value``, ``-cname=value``,
    ``--name=value``, dashes or underscores in the name.  Raises
    ExpectationError (never showing a password) for a malformed DSN or value.
    """
    params = parse_conninfo(dsn)
    options = params.get("options")
    if not options:
        return {}
    words = _split_options(options)
    found: dict[str, int] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            word = "-c" + words[index + 1]
            index += 1
        index += 1
        match = _OPTION_RE.fullmatch(word)
        if not match:
            continue
        name = match.group(1).replace("-", "_").lower()
        if name not in BY_GUC:
            continue
        try:
            found[name] = parse_guc_value(name, match.group(2))
        except ExpectationError as error:
            raise ExpectationError(f"--client-dsn options: {str(error).removeprefix('--expect ')}") from None
    return found


def apply_session_options(expectations: Expectations, client_dsn: str | None) -> tuple[Expectations, list[str]]:
    """Server-side expectations for the sessions of an application whose DSN sets keepalive GUCs with options=-c.

    Such a DSN sets the server's GUC for each of its sessions, overriding
    the server-wide value; --expect for the same GUC still wins.  Returns
    the expectations and lines saying what was applied.
    """
    if client_dsn is None:
        return expectations, []
    found = session_options(client_dsn)
    if not found:
        return expectations, []
    server = expectations.server
    lines: list[str] = []
    changes: dict[str, Setting] = {}
    for guc, number in found.items():
        key = BY_GUC[guc].key
        current: Setting = getattr(server, key)
        if current.judged and current.source == "--expect":
            lines.append(f"client DSN options=-c {guc}={number}: --expect {current.given} is used instead")
            continue
        if key == "user_timeout":
            value: float | int = number / 1000
        elif number == 0:
            continue  # 0 = the kernel default: whatever the server side resolves it to already
        else:
            value = number
        changes[key] = Setting(value, f"{guc}={number} (client DSN options)", "client DSN options=-c (per session)")
        lines.append(f"client DSN options=-c {guc}={number}: the server runs it for this application's sessions")
    if not changes:
        return expectations, lines
    server = replace(server, enabled=True, enabled_source=server.enabled_source or
                     "Postgres turns SO_KEEPALIVE on for every TCP connection", **changes)
    return Expectations(server, expectations.client), lines
