"""What the Postgres server says, set beside what the packets say.

Pure: the I/O (psycopg, docker, /proc/sys) lives in `kaobs.pgsource`, which
hands this module plain records read from the server:

* :class:`GucReading` per keepalive GUC from ``pg_settings`` on a TCP session:
  ``reset_val`` is the server-wide value (what a session without its own
  ``SET``/``options=-c`` runs), ``setting`` what the monitoring session's
  socket runs (Postgres' show hook reads it back with getsockopt, so a GUC of 0
  shows the kernel default of the server's network namespace), ``source`` where
  the server-wide value came from;
* :class:`Backend` rows of ``pg_stat_activity``.

From them: the server side's expectation (:func:`server_expectation`, 0
resolved to kernel defaults with the origin of every number), each captured
connection named after its backend (:func:`match_connections`), the note
for a session whose packets disagree with the server-wide setting while
others agree (:func:`session_notes`), and what became of the backend of a
connection the server aborted by keepalive (:func:`abort_checks`).

Postgres has no view of another backend's session GUCs, so a per-session
``SET tcp_keepalives_idle`` can only be inferred from the packets; the notes
say so and say how to check.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from analysis.expect import (
    ExpectationError,
    Expectations,
    KernelDefaults,
    Setting,
    SideExpectation,
    parse_conninfo,
    parse_guc_value,
)
from analysis.model import Connection
from analysis.verdict import SETTING_NAMES, ConnectionReport

__all__ = [
    "GUCS",
    "GucReading",
    "KernelReading",
    "ServerInfo",
    "Backend",
    "AbortCheck",
    "ConnectionPostgres",
    "PostgresView",
    "unix_socket_reason",
    "server_expectation",
    "session_options",
    "apply_session_options",
    "match_connections",
    "session_notes",
    "abort_checks",
    "BackendTracker",
    "normalize_address",
]

GUCS = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
FIELD_OF_GUC = {
    "tcp_keepalives_idle": "idle",
    "tcp_keepalives_interval": "interval",
    "tcp_keepalives_count": "count",
    "tcp_user_timeout": "user_timeout",
}
KERNEL_FIELD = {"idle": "keepalive_time", "interval": "keepalive_intvl", "count": "keepalive_probes"}
SYSCTL_OF_FIELD = {
    "keepalive_time": "net.ipv4.tcp_keepalive_time",
    "keepalive_intvl": "net.ipv4.tcp_keepalive_intvl",
    "keepalive_probes": "net.ipv4.tcp_keepalive_probes",
}
SOCKOPT_OF_FIELD = {"keepalive_time": "TCP_KEEPIDLE", "keepalive_intvl": "TCP_KEEPINTVL", "keepalive_probes": "TCP_KEEPCNT"}
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
CLOCK_TOLERANCE_S = 2.0
CHECK_HINT = "check with `SHOW {guc}` in that session, or pg_stat_activity.query for a SET"


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
        return {"tcp_user_timeout": "ms", "tcp_keepalives_count": None}.get(self.name, "s")

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


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server as the monitoring TCP session sees it."""

    address: str | None  # inet_server_addr(); None on a Unix socket
    port: int | None
    version: str
    own_pid: int  # the monitoring session's backend, left out of matching
    read_at: float  # Unix time of the reading (server clock)
    missing_roles: tuple[str, ...] = ()  # of pg_read_all_settings / pg_read_all_stats


@dataclass(frozen=True, slots=True)
class Backend:
    """One client backend row of pg_stat_activity."""

    pid: int
    usename: str | None
    datname: str | None
    application_name: str | None
    client_addr: str | None  # None: Unix socket, or hidden (insufficient privilege)
    client_hostname: str | None
    client_port: int | None
    backend_start: float | None
    state: str | None
    state_change: float | None
    query_mentions: tuple[str, ...] = ()  # keepalive GUC names in its last query (a SET?)
    hidden: bool = False  # row of another role without pg_read_all_stats

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "usename": self.usename,
            "datname": self.datname,
            "application_name": self.application_name,
            "client_hostname": self.client_hostname,
            "backend_start": self.backend_start,
            "state": self.state,
            "state_change": self.state_change,
        }


# -- per connection -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AbortCheck:
    """What became of the backend after the server's keepalive abort of its connection."""

    status: str  # "gone" | "alive" | "unknown"
    pid: int | None
    abort_t: float
    checked_at: float | None
    detail: str

    @property
    def outlived(self) -> bool:
        return self.status == "alive"

    def to_json(self) -> dict:
        return {"status": self.status, "pid": self.pid, "abort_t": self.abort_t, "checked_at": self.checked_at,
                "detail": self.detail}


@dataclass(slots=True)
class ConnectionPostgres:
    """One captured connection as Postgres knows it."""

    backend: Backend | None = None
    reason: str | None = None  # why no backend is named
    notes: list[str] = field(default_factory=list)  # per-session setting differences
    after_abort: AbortCheck | None = None

    def to_json(self) -> dict:
        return {
            "matched": self.backend is not None,
            "backend": None if self.backend is None else self.backend.to_json(),
            "reason": self.reason,
            "session_notes": list(self.notes),
            "after_abort": None if self.after_abort is None else self.after_abort.to_json(),
        }


@dataclass(slots=True)
class PostgresView:
    """Everything the reports show about the server; `error` set when it could not be read."""

    dsn: str  # redacted
    error: str | None = None
    server: ServerInfo | None = None
    settings: list[GucReading] = field(default_factory=list)
    setting_lines: list[str] = field(default_factory=list)  # where each number came from
    warnings: list[str] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    connections: dict[int, ConnectionPostgres] = field(default_factory=dict)

    def outlived(self) -> list[tuple[int, AbortCheck]]:
        """Connections whose backend outlived the server's keepalive abort: a finding of its own."""
        return [(i, c.after_abort) for i, c in self.connections.items() if c.after_abort and c.after_abort.outlived]

    def to_json(self) -> dict:
        server = self.server
        return {
            "dsn": self.dsn,
            "error": self.error,
            "server": None if server is None else {
                "address": server.address, "port": server.port, "version": server.version, "read_at": server.read_at,
            },
            "settings": {
                r.name: {"server_wide": r.server_wide, "unit": r.unit, "source": r.source, "sourcefile": r.sourcefile,
                         "sourceline": r.sourceline, "monitoring_session": r.session}
                for r in self.settings
            },
            "resolved": list(self.setting_lines),
            "warnings": list(self.warnings),
            "backends_seen": len(self.backends),
            "backends_outlived_abort": len(self.outlived()),
        }


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
    sysctl = SYSCTL_OF_FIELD[kernel_field]
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
                                         f"from its TCP socket (getsockopt {SOCKOPT_OF_FIELD[kernel_field]})"))
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
    for guc in GUCS:
        key = FIELD_OF_GUC[guc]
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
            kernel_field = KERNEL_FIELD[key]
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
        if name not in GUCS:
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
        key = FIELD_OF_GUC[guc]
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


# -- connections named ----------------------------------------------------------------


def normalize_address(address: str | None) -> str | None:
    """An IP address in one canonical text form (IPv4-mapped IPv6 as IPv4); other text unchanged."""
    if address is None:
        return None
    text = address.strip().strip("[]")
    text = text.split("/")[0]  # inet may carry a prefix length
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _clock(t: float | None) -> str:
    import datetime as _dt

    if t is None:
        return "?"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%H:%M:%S")


def _age(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"


def _fits(conn: Connection, backend: Backend, tolerance: float) -> str | None:
    """Why `backend` (same client address and port) is not this connection's, or None when it may be."""
    start = backend.backend_start
    if start is None:
        return None
    if start > conn.end + tolerance:
        return (f"backend pid {backend.pid} with this client address and port started at {_clock(start)}, after this "
                f"connection's last packet at {_clock(conn.end)}: the client port was reused")
    if conn.saw_syn and start < conn.start - tolerance:
        return (f"backend pid {backend.pid} with this client address and port started at {_clock(start)}, before this "
                f"connection's SYN at {_clock(conn.start)}: another connection (or the clocks differ by more than "
                f"{tolerance:g} s)")
    return None


def match_connections(
    connections: Iterable[Connection],
    backends: Sequence[Backend],
    server: ServerInfo | None,
    tolerance: float = CLOCK_TOLERANCE_S,
) -> dict[int, ConnectionPostgres]:
    """Name each captured connection after its pg_stat_activity row (client address and port), or say why not."""
    own = server.own_pid if server is not None else None
    visible = [b for b in backends if b.pid != own and not b.hidden]
    own_keys = {(normalize_address(b.client_addr), b.client_port) for b in backends if b.pid == own}
    hidden = sum(1 for b in backends if b.hidden)
    by_key: dict[tuple[str | None, int | None], Backend] = {}
    addresses: dict[str, int] = {}
    for b in visible:
        address = normalize_address(b.client_addr)
        if address is None or b.client_port is None or b.client_port < 0:
            continue
        by_key[(address, b.client_port)] = b
        addresses[address] = addresses.get(address, 0) + 1
    result: dict[int, ConnectionPostgres] = {}
    for conn in connections:
        info = ConnectionPostgres()
        result[conn.index] = info
        client_address = normalize_address(conn.client.address)
        if (client_address, conn.client.port) in own_keys:
            info.reason = f"kaobs's own monitoring session (--dsn, backend pid {own})"
            continue
        candidate = by_key.get((client_address, conn.client.port))
        if candidate is not None:
            why = _fits(conn, candidate, tolerance)
            if why is None:
                info.backend = candidate
                continue
            info.reason = why
            continue
        info.reason = _unmatched_reason(conn, client_address, addresses, server, hidden)
    return result


def _unmatched_reason(conn: Connection, client_address: str | None, addresses: Mapping[str, int],
                      server: ServerInfo | None, hidden: int) -> str:
    endpoint = conn.client.endpoint
    if conn.end_reason != "open":
        ended = {"closed": "closed (FIN)", "reset": "reset (RST)", "keepalive_abort": "aborted by keepalive"}
        return (f"the connection ended in the capture ({ended.get(conn.end_reason, conn.end_reason)}); no backend "
                f"has client {endpoint} now")
    parts: list[str] = [f"no backend has client {endpoint} in pg_stat_activity now"]
    if server is not None and server.address is not None:
        capture_server = normalize_address(conn.server.address)
        if capture_server != normalize_address(server.address) or conn.server.port != server.port:
            parts.append(f"the capture's server endpoint {conn.server.endpoint} is not the address the server has on "
                         f"the --dsn session ({server.address}:{server.port}): a pooler or NAT in between, or another "
                         "server")
    if client_address in addresses:
        parts.append(f"backends from {client_address} exist but on other ports: the session ended after the capture, "
                     "or NAT rewrote the port")
    elif addresses:
        shown = ", ".join(sorted(addresses)[:3]) + (" ..." if len(addresses) > 3 else "")
        parts.append(f"backends' client addresses are {shown}: behind a pooler or NAT the server sees another "
                     "address, or the session ended after the capture")
    else:
        parts.append("the session ended after the capture, or it is behind a pooler or NAT")
    if hidden:
        parts.append(f"{hidden} backend(s) of other roles are hidden: the monitoring role lacks pg_read_all_stats")
    return "; ".join(parts)


# -- per-session settings ---------------------------------------------------------------

_TIMER_KEYS = ("idle", "interval", "count", "user_timeout")


def _from_server(setting: Setting) -> bool:
    return setting.judged and setting.source.startswith("server: ")


def session_notes(
    reports: Sequence[ConnectionReport],
    server: SideExpectation,
    matched: Mapping[int, ConnectionPostgres] | None = None,
) -> dict[int, list[str]]:
    """Per connection, a note where its server-side packets contradict a server-wide setting.

    Postgres shows no other backend's session GUCs, so a session that ran
    ``SET tcp_keepalives_idle`` or connected with ``options=-c`` can only be
    seen in the packets: a connection that contradicts a server-wide value
    while another connection agrees with it most likely has its own setting.
    When no connection agrees, the setting may also have changed since the
    capture (pg_settings is read now).  Only settings read from the server
    are considered (not --expect).
    """
    names = SETTING_NAMES["server"]
    status: dict[str, dict[int, str]] = {key: {} for key in _TIMER_KEYS}
    for report in reports:
        for finding in report.server.findings:
            for key in _TIMER_KEYS:
                if finding.setting == names[key]:
                    status[key][report.connection.index] = finding.status
    notes: dict[int, list[str]] = {}
    for report in reports:
        index = report.connection.index
        differing: list[str] = []
        agreeing: set[int] = set()
        gucs: list[str] = []
        for key in _TIMER_KEYS:
            setting: Setting = getattr(server, key)
            if not _from_server(setting) or status[key].get(index) != "mismatch":
                continue
            guc = names[key]
            gucs.append(guc)
            agreeing.update(i for i, s in status[key].items() if s == "match")
            observed = getattr(report.server.observed, key)
            if key == "count":
                expected, seen = f"{setting.value}", "" if observed is None else f"{observed}"
            elif key == "user_timeout":
                expected = f"{float(setting.value or 0) * 1000:.0f} ms"
                seen = "" if observed is None else f"{observed * 1000:.0f} ms to the abort"
            else:
                expected, seen = f"{float(setting.value or 0):g} s", "" if observed is None else f"{observed:.3f} s"
            differing.append(f"{guc} server-wide {expected}" + (f", packets {seen}" if seen else ""))
        if not differing:
            continue
        if agreeing:
            others = ", ".join(f"#{i}" for i in sorted(agreeing)[:5]) + (" ..." if len(agreeing) > 5 else "")
            why = f"{others} {'agrees' if len(agreeing) == 1 else 'agree'}: this session may have its own setting (SET / options=-c)"
        else:
            why = ("no connection agrees: the setting may have changed since the capture (pg_settings is read "
                   "now), or this session has its own (SET / options=-c)")
        text = (f"per-session setting? {'; '.join(differing)}; {why}; server-wide value assumed; "
                f"{CHECK_HINT.format(guc=gucs[0])}")
        info = matched.get(index) if matched else None
        if info is not None and info.backend is not None:
            mentioned = [g for g in gucs if g in info.backend.query_mentions]
            if mentioned:
                text += f" (backend pid {info.backend.pid}'s last query mentions {', '.join(mentioned)})"
        notes[index] = [text]
    return notes


def staleness_warning(capture_end: float | None, read_at: float | None, limit: float = 300.0) -> str | None:
    """A warning when the capture is much older than the database reading (settings and sessions are from now)."""
    if capture_end is None or read_at is None or read_at - capture_end <= limit:
        return None
    age = read_at - capture_end
    words = f"{age / 3600:.1f} h" if age >= 3600 else f"{age / 60:.0f} min"
    return (f"the capture ended {words} before the server was read: settings and sessions are as they are now, "
            "connections that ended since cannot be named")


# -- dead backends -------------------------------------------------------------------------


def server_aborted(report: ConnectionReport) -> float | None:
    """When the server's kernel aborted the connection by keepalive, or None."""
    abort = report.server.abort
    return None if abort is None else abort.t


def abort_checks(
    reports: Sequence[ConnectionReport],
    backends: Sequence[Backend] | None,
    checked_at: float | None,
    known_pids: Mapping[int, int] | None = None,
    tolerance: float = CLOCK_TOLERANCE_S,
) -> dict[int, AbortCheck]:
    """For each connection the server aborted by keepalive: is its backend gone from pg_stat_activity?

    `backends` is a pg_stat_activity reading taken at `checked_at` (after the
    aborts; None when none could be taken), `known_pids` the backend pid of
    connections named before their abort (live watching).  A backend still
    there with the same pid, or with the same client address and port and a
    start before the abort, outlived its connection: the server's kernel
    dropped the socket but the backend did not notice (busy in a query, or
    blocked elsewhere), a finding of its own.
    """
    result: dict[int, AbortCheck] = {}
    by_pid = {b.pid: b for b in backends or ()}
    by_key = {(normalize_address(b.client_addr), b.client_port): b for b in backends or () if b.client_addr}
    for report in reports:
        abort_t = server_aborted(report)
        if abort_t is None:
            continue
        conn = report.connection
        index = conn.index
        pid = (known_pids or {}).get(index)
        if backends is None:
            result[index] = AbortCheck("unknown", pid, abort_t, None, "pg_stat_activity could not be read")
            continue
        after = f" ({_age(checked_at - abort_t)} after the abort)" if checked_at is not None else ""
        survivor = by_pid.get(pid) if pid is not None else None
        if survivor is None and pid is None:
            candidate = by_key.get((normalize_address(conn.client.address), conn.client.port))
            if candidate is not None and (candidate.backend_start is None or candidate.backend_start <= abort_t + tolerance):
                survivor = candidate
        if survivor is not None:
            state = f"state {survivor.state}" + (f" since {_clock(survivor.state_change)}" if survivor.state_change else "")
            result[index] = AbortCheck(
                "alive", survivor.pid, abort_t, checked_at,
                f"backend pid {survivor.pid} is still in pg_stat_activity{after}, {state}: it outlived its "
                "connection's keepalive abort (the server's kernel dropped the socket; the backend has not noticed: "
                "busy in a query or blocked)")
        elif pid is not None:
            result[index] = AbortCheck("gone", pid, abort_t, checked_at,
                                       f"backend pid {pid} is gone from pg_stat_activity{after}")
        else:
            result[index] = AbortCheck(
                "gone", None, abort_t, checked_at,
                f"no backend has client {conn.client.endpoint} in pg_stat_activity{after} (its pid was not known "
                "before the abort: watch live with --dsn to name it)")
    return result


class BackendTracker:
    """Live: remembers which backend each open connection belongs to, so that its pid is known after the abort.

    Feed it every pg_stat_activity poll with the model's connections; after
    an abort, :meth:`pid` says which backend to look for.
    """

    def __init__(self, tolerance: float = CLOCK_TOLERANCE_S) -> None:
        self.tolerance = tolerance
        self._pids: dict[int, int] = {}
        self._backends: dict[int, Backend] = {}

    def update(self, connections: Iterable[Connection], backends: Sequence[Backend], server: ServerInfo | None) -> None:
        open_connections = [c for c in connections if c.end_reason == "open" and c.index not in self._pids]
        if not open_connections:
            return
        for index, info in match_connections(open_connections, backends, server, self.tolerance).items():
            if info.backend is not None:
                self._pids[index] = info.backend.pid
                self._backends[index] = info.backend

    def pid(self, index: int) -> int | None:
        return self._pids.get(index)

    def backend(self, index: int) -> Backend | None:
        return self._backends.get(index)

    @property
    def pids(self) -> dict[int, int]:
        return dict(self._pids)


# -- text lines for the reports ------------------------------------------------------------


def server_lines(view: PostgresView) -> list[tuple[str, str]]:
    """(line, style) for the head of the text report: the server, where each setting came from, warnings."""
    lines: list[tuple[str, str]] = []
    if view.error is not None:
        lines.append((f"postgres: {view.error}", "yellow"))
        return lines
    server = view.server
    if server is not None:
        lines.append((f"postgres: {server.address}:{server.port} (PostgreSQL {server.version}) via --dsn {view.dsn}; "
                      f"settings and sessions read at {_clock(server.read_at)}", "bold"))
    for line in view.setting_lines:
        lines.append((f"  server {line}", ""))
    for warning in view.warnings:
        lines.append((f"  warning: {warning}", "yellow"))
    return lines


def connection_lines(view: PostgresView, index: int) -> list[tuple[str, bool]]:
    """(line, is_finding) for one connection: its backend or why none, session notes, the backend after the abort."""
    info = view.connections.get(index)
    if info is None:
        return []
    lines: list[tuple[str, bool]] = []
    backend = info.backend
    if backend is not None:
        host = f" ({backend.client_hostname})" if backend.client_hostname else ""
        since = f" since {_clock(backend.state_change)}" if backend.state_change else ""
        lines.append((f"postgres: backend pid {backend.pid}, user {backend.usename}, database {backend.datname}, "
                      f"application_name {backend.application_name!r}{host}, started {_clock(backend.backend_start)}, "
                      f"state {backend.state}{since}", False))
    elif info.reason:
        lines.append((f"postgres: not matched: {info.reason}", False))
    for note in info.notes:
        lines.append((f"postgres: {note}", False))
    check = info.after_abort
    if check is not None:
        if check.outlived:
            lines.append((f"postgres: FINDING {check.detail}", True))
        elif check.status == "gone":
            lines.append((f"postgres: after the server's keepalive abort: {check.detail}", False))
        else:
            lines.append((f"postgres: after the server's keepalive abort: unknown ({check.detail})", False))
    return lines
