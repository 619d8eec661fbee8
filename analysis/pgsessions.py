"""Postgres sessions set beside the captured connections: who they are, and what became of them.

Pure: `kaobs.postgres` reads ``pg_stat_activity`` and hands this module
:class:`Backend` rows. From them each captured connection is named after its
backend (:func:`match_connections`) or told why not; a session whose packets
contradict a server-wide setting while others agree gets a note
(:func:`session_notes`); and for a connection the server aborted by
keepalive, whether its backend is gone (:func:`abort_checks`).

Postgres has no view of another backend's session GUCs, so a per-session
``SET tcp_keepalives_idle`` can only be inferred from the packets; the notes
say so and say how to check.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from analysis.expect import Setting, SideExpectation
from analysis.model import END_REASONS, Connection
from analysis.pgsettings import GucReading
from analysis.settings import SERVER, SETTINGS, setting_name
from analysis.verdict import ConnectionReport
from analysis.words import age, utc_clock

# Clocks of the capturing host and the server may differ a little; a backend
CLOCK_TOLERANCE_S = 2.0
CHECK_HINT = "check with `SHOW {guc}` in that session, or pg_stat_activity.query for a SET"


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
    own_session: dict | None = None
    """kaobs's own monitoring session when a live capture saw it: {"connection", "client", "pid"}; it is left
    out of the reports (not the user's traffic)."""

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
            "own_session": self.own_session,
        }




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




def _fits(conn: Connection, backend: Backend, tolerance: float) -> str | None:
    """Why `backend` (same client address and port) is not this connection's, or None when it may be."""
    start = backend.backend_start
    if start is None:
        return None
    if start > conn.end + tolerance:
        return (f"backend pid {backend.pid} with this client address and port started at {utc_clock(start, millis=False)}, after this "
                f"connection's last packet at {utc_clock(conn.end, millis=False)}: the client port was reused")
    if conn.saw_syn and start < conn.start - tolerance:
        return (f"backend pid {backend.pid} with this client address and port started at {utc_clock(start, millis=False)}, before this "
                f"connection's SYN at {utc_clock(conn.start, millis=False)}: another connection (or the clocks differ by more than "
                f"{tolerance:g} s)")
    return None


def match_connections(
    connections: Iterable[Connection],
    backends: Sequence[Backend],
    server: ServerInfo | None,
    tolerance: float = CLOCK_TOLERANCE_S,
) -> dict[int, ConnectionPostgres]:
    """Name each captured connection after its pg_stat_activity row (client address and port), or say why not."""
    matcher = BackendMatcher(backends, server, tolerance)
    return {conn.index: matcher.match(conn) for conn in connections}


class BackendMatcher:
    """`match_connections` one connection at a time (the backends indexed once), for reports streamed by."""

    def __init__(self, backends: Sequence[Backend], server: ServerInfo | None,
                 tolerance: float = CLOCK_TOLERANCE_S) -> None:
        self.server = server
        self.tolerance = tolerance
        self.own = server.own_pid if server is not None else None
        visible = [b for b in backends if b.pid != self.own and not b.hidden]
        self.own_keys = {(normalize_address(b.client_addr), b.client_port) for b in backends if b.pid == self.own}
        self.hidden = sum(1 for b in backends if b.hidden)
        self.by_key: dict[tuple[str | None, int | None], Backend] = {}
        self.addresses: dict[str, int] = {}
        for b in visible:
            address = normalize_address(b.client_addr)
            if address is None or b.client_port is None or b.client_port < 0:
                continue
            self.by_key[(address, b.client_port)] = b
            self.addresses[address] = self.addresses.get(address, 0) + 1

    def match(self, conn: Connection) -> ConnectionPostgres:
        info = ConnectionPostgres()
        client_address = normalize_address(conn.client.address)
        if (client_address, conn.client.port) in self.own_keys:
            info.reason = f"kaobs's own monitoring session (--dsn, backend pid {self.own})"
            return info
        candidate = self.by_key.get((client_address, conn.client.port))
        if candidate is not None:
            why = _fits(conn, candidate, self.tolerance)
            if why is None:
                info.backend = candidate
            else:
                info.reason = why
            return info
        info.reason = _unmatched_reason(conn, client_address, self.addresses, self.server, self.hidden)
        return info


def _unmatched_reason(conn: Connection, client_address: str | None, addresses: Mapping[str, int],
                      server: ServerInfo | None, hidden: int) -> str:
    endpoint = conn.client.endpoint
    if conn.end_reason != "open":
        return (f"the connection ended in the capture ({END_REASONS.get(conn.end_reason, conn.end_reason)}); no backend "
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
    notes = SessionNotes(server)
    for report in reports:
        notes.add(report)
    out: dict[int, list[str]] = {}
    for report in reports:
        found = notes.notes_for(report, matched.get(report.connection.index) if matched else None)
        if found:
            out[report.connection.index] = found
    return out


class SessionNotes:
    """`session_notes` in two passes over reports that need not be held: `add` each, then `notes_for` each.

    Between the passes only each connection's status per server-wide setting is kept (for those judged on one).
    """

    def __init__(self, server: SideExpectation) -> None:
        self.server = server
        self.keys = [s.key for s in SETTINGS]
        self.status: dict[str, dict[int, str]] = {key: {} for key in self.keys}

    def add(self, report: ConnectionReport) -> None:
        for finding in report.server.findings:
            for key in self.keys:
                if finding.setting == setting_name(key, SERVER):
                    self.status[key][report.connection.index] = finding.status

    def notes_for(self, report: ConnectionReport, info: ConnectionPostgres | None = None) -> list[str]:
        index = report.connection.index
        differing: list[str] = []
        agreeing: set[int] = set()
        gucs: list[str] = []
        for key in self.keys:
            setting: Setting = getattr(self.server, key)
            if not _from_server(setting) or self.status[key].get(index) != "mismatch":
                continue
            guc = setting_name(key, SERVER)
            gucs.append(guc)
            agreeing.update(i for i, s in self.status[key].items() if s == "match")
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
            return []
        if agreeing:
            others = ", ".join(f"#{i}" for i in sorted(agreeing)[:5]) + (" ..." if len(agreeing) > 5 else "")
            why = f"{others} {'agrees' if len(agreeing) == 1 else 'agree'}: this session may have its own setting (SET / options=-c)"
        else:
            why = ("no connection agrees: the setting may have changed since the capture (pg_settings is read "
                   "now), or this session has its own (SET / options=-c)")
        text = (f"per-session setting? {'; '.join(differing)}; {why}; server-wide value assumed; "
                f"{CHECK_HINT.format(guc=gucs[0])}")
        if info is not None and info.backend is not None:
            mentioned = [g for g in gucs if g in info.backend.query_mentions]
            if mentioned:
                text += f" (backend pid {info.backend.pid}'s last query mentions {', '.join(mentioned)})"
        return [text]


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
        after = f" ({age(checked_at - abort_t)} after the abort)" if checked_at is not None else ""
        survivor = by_pid.get(pid) if pid is not None else None
        if survivor is None and pid is None:
            candidate = by_key.get((normalize_address(conn.client.address), conn.client.port))
            if candidate is not None and (candidate.backend_start is None or candidate.backend_start <= abort_t + tolerance):
                survivor = candidate
        if survivor is not None:
            state = f"state {survivor.state}" + (f" since {utc_clock(survivor.state_change, millis=False)}" if survivor.state_change else "")
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

    def forget(self, index: int) -> None:
        """A connection nobody will ask about again (it left a long live run)."""
        self._pids.pop(index, None)
        self._backends.pop(index, None)

    def backend(self, index: int) -> Backend | None:
        return self._backends.get(index)

    @property
    def pids(self) -> dict[int, int]:
        return dict(self._pids)

