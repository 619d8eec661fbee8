"""The Postgres server beside the packets (``--dsn``): settings, sessions, and whether a backend is gone.

The I/O edge of `analysis.pgsettings` and `analysis.pgsessions`: everything
here connects, queries or reads files and hands plain records to the pure
code there. `Postgres` is the one object `kaobs analyze` and `kaobs watch`
use; `MonitoringSession` is its psycopg connection.

The monitoring account needs no superuser rights, only

    CREATE ROLE monitor LOGIN PASSWORD '...';
    GRANT pg_read_all_settings, pg_read_all_stats TO monitor;

(pg_read_all_settings: every row of pg_settings with its source file;
pg_read_all_stats: client address, port and state of other roles' sessions
in pg_stat_activity).  Every failure to reach or read the server becomes a
:class:`PostgresError` with one line that never contains the password.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from analysis.conninfo import (
    SECRET_KEYWORDS,
    display_dsn,
    parse_conninfo,
    unknown_keyword_problem,
    uri_userinfo_ambiguous,
)
from analysis.expect import Expectations
from analysis.kernel_defaults import KernelDefaults, parse_sysctls
from analysis.model import Connection
from analysis.pgsessions import (
    AbortCheck,
    Backend,
    BackendMatcher,
    BackendTracker,
    ConnectionPostgres,
    PostgresView,
    ServerInfo,
    SessionNotes,
    abort_checks,
    normalize_address,
    server_aborted,
    staleness_warning,
)
from analysis.pgsettings import (
    GucReading,
    KernelReading,
    server_expectation,
    unix_socket_reason,
)
from analysis.settings import GUC_NAMES, NAMESPACE_DEFAULTS, ExpectationError
from analysis.verdict import ConnectionReport

DEFAULT_CONNECT_TIMEOUT_S = 5
MONITOR_ROLES = ("pg_read_all_settings", "pg_read_all_stats")
SYSCTL_FILES = {s.kernel_field: s.proc_path for s in NAMESPACE_DEFAULTS}
"""Where each keepalive sysctl of a network namespace is read."""


class PostgresError(Exception):
    """The server could not be reached or read: one line, no password."""


class PostgresInterrupted(PostgresError):
    """Ctrl-C (or SIGTERM) while connecting: the user gave up waiting, the server did not refuse."""


class _SignalsSeen:
    """Notes a Ctrl-C or SIGTERM while connecting, and still interrupts as they would.

    libpq's wait may turn the interruption into a connection error of its
    own ("server terminated abnormally", "timeout expired") for a server that
    never answered; what was seen says what really happened.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_SignalsSeen":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def explain_connect_error(message: str, target: str, timeout: float | None, address: str = "") -> str:
    """libpq's error for a failed connection, as one line that says what to do.

    `target` is the redacted DSN.  Recognised: authentication (wrong or
    missing password, no pg_hba.conf entry), refused, timeout, unknown
    host, missing role or database.  `address` (host:port from the DSN)
    is named when libpq's message does not name one (psycopg's timeout).
    """
    text = _one_line(message).removeprefix("connection failed: ")
    lowered = text.lower()
    where = re.search(r'connection to server at "([^"]+)"(?: \([^)]*\))?, port (\d+)', text)
    at = f" at {where.group(1)}:{where.group(2)}" if where else (f" at {address}" if address else "")
    reason = re.sub(r"^.*? failed: (FATAL: )?", "", text).strip()
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        what = f"authentication failed{at}: {reason} (check the password, ~/.pgpass or PGPASSWORD)"
    elif "no password supplied" in lowered:
        what = f"the server{at} asks for a password and none was given (password=, PGPASSWORD or ~/.pgpass)"
    elif "no pg_hba.conf entry" in lowered:
        what = f"refused by pg_hba.conf{at}: {reason} (add a host line for the monitoring account)"
    elif "connection refused" in lowered:
        what = f"connection refused{at}: no server listening there"
    elif "timeout expired" in lowered or "timed out" in lowered:
        after = f" within {timeout:g} s" if timeout else ""
        what = f"no answer{at}{after} (connect_timeout): the host is unreachable or a firewall drops the packets"
    elif "resolve host" in lowered or "translate host name" in lowered:
        what = f"unknown host: {reason}"
    else:
        what = reason or text
    return f"--dsn {target}: {what}; the packet analysis ran without the database"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 2:
            text = text.replace(secret, "***")
    return text


@dataclass
class MonitoringSession:
    """One monitoring connection to the server, over TCP only.

    ``connect_timeout`` applies when the DSN and PGCONNECT_TIMEOUT do not
    set one; ``application_name`` is ``kaobs`` unless the DSN names one.
    """

    dsn: str
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    redacted: str = ""
    _conn: object | None = field(default=None, repr=False)
    _secrets: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.redacted = display_dsn(self.dsn)  # rebuilt from what was parsed: never the text as given

    # -- connecting ----------------------------------------------------------

    def _params(self) -> dict[str, str]:
        try:
            parse_conninfo(self.dsn)  # our parser first: its errors never show a value
        except ExpectationError as error:
            raise PostgresError(str(error).replace("--client-dsn", "--dsn")) from None
        if uri_userinfo_ambiguous(self.dsn):
            raise PostgresError(
                f"--dsn {self.redacted}: the URI's user:password part holds an '@' or '/' that is not "
                "percent-encoded, so libpq would take a piece of the password for the host or port: encode @ as "
                "%40 and / as %2F")
        problem = unknown_keyword_problem(self.dsn)
        if problem is not None:  # libpq refuses it; its message would quote what follows the keyword
            raise PostgresError(f"--dsn {self.redacted}: {problem}")
        try:
            from psycopg.conninfo import conninfo_to_dict

            params = {k: str(v) for k, v in conninfo_to_dict(self.dsn).items() if v is not None}
        except Exception:  # noqa: BLE001 - libpq's message may quote a piece of a password
            raise PostgresError(f"--dsn {self.redacted}: libpq cannot parse this connection string") from None
        self._secrets = tuple(params[k] for k in SECRET_KEYWORDS if params.get(k))
        return params

    def connect(self) -> "MonitoringSession":
        """Connect (refusing a Unix socket before and after); raises PostgresError."""
        import psycopg

        params = self._params()
        # libpq falls back on PGHOST/PGHOSTADDR for what the DSN leaves out
        effective = {key: os.environ[env] for key, env in (("host", "PGHOST"), ("hostaddr", "PGHOSTADDR"))
                     if os.environ.get(env)}
        effective.update({key: value for key, value in params.items() if value})
        unix = unix_socket_reason(effective)
        if unix is not None:
            raise PostgresError(f"--dsn {self.redacted}: {unix}")
        extra: dict[str, object] = {"autocommit": True}
        timeout = params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")
        if not timeout:
            extra["connect_timeout"] = int(self.connect_timeout)
        if "application_name" not in params:
            extra["application_name"] = "kaobs"
        try:
            effective_timeout = float(timeout) if timeout else float(self.connect_timeout)
        except ValueError:
            effective_timeout = None
        signals = _SignalsSeen()
        try:
            with signals:
                self._conn = psycopg.connect(self.dsn, **extra)
        except KeyboardInterrupt:
            raise PostgresInterrupted(f"--dsn {self.redacted}: interrupted while connecting, before the server "
                                      "answered; the packet analysis ran without the database") from None
        except psycopg.Error as error:
            if signals.seen:
                raise PostgresInterrupted(f"--dsn {self.redacted}: interrupted while connecting, before the server "
                                          "answered; the packet analysis ran without the database") from None
            host = (params.get("hostaddr") or params.get("host") or "").split(",")[0]
            port = (params.get("port") or os.environ.get("PGPORT") or "5432").split(",")[0]
            address = f"{host}:{port}" if host and "," not in params.get("host", "") else ""
            raise PostgresError(_scrub(explain_connect_error(str(error), self.redacted, effective_timeout, address),
                                       self._secrets)) from None
        except OSError as error:
            raise PostgresError(_scrub(f"--dsn {self.redacted}: {_one_line(str(error))}; the packet analysis ran "
                                       "without the database", self._secrets)) from None
        address = self._one("SELECT host(inet_server_addr())")
        if address is None:
            self.close()
            raise PostgresError(f"--dsn {self.redacted}: the session runs over a Unix socket (inet_server_addr() is "
                                "NULL), where Postgres reports 0 for every keepalive setting (they apply to TCP "
                                "sessions only), which says nothing about TCP sessions; give the server's TCP address")
        return self

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # type: ignore[attr-defined]
            finally:
                self._conn = None

    def __enter__(self) -> "MonitoringSession":
        return self.connect() if self._conn is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        import psycopg

        if self._conn is None:
            raise PostgresError(f"--dsn {self.redacted}: not connected")
        try:
            with self._conn.cursor() as cursor:  # type: ignore[attr-defined]
                cursor.execute(sql, params)
                return list(cursor.fetchall())
        except psycopg.Error as error:
            raise PostgresError(_scrub(f"--dsn {self.redacted}: {_one_line(str(error))}", self._secrets)) from None

    def client_endpoint(self) -> tuple[str, int] | None:
        """This session's own address and port, as its packets carry them (to leave it out of a live view)."""
        if self._conn is None:
            return None
        try:
            fd = self._conn.pgconn.socket  # type: ignore[attr-defined]
            with socket.socket(fileno=os.dup(fd)) as sock:
                address, port = sock.getsockname()[:2]
        except (OSError, AttributeError, ValueError):
            return None
        normalized = normalize_address(address)
        return None if normalized is None else (normalized, port)

    def _one(self, sql: str, params: Sequence[object] = ()) -> object:
        rows = self._query(sql, params)
        return rows[0][0] if rows else None

    # -- reading ----------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        address, port, version, pid, now = self._query(
            "SELECT host(inet_server_addr()), inet_server_port(), current_setting('server_version'), "
            "pg_backend_pid(), extract(epoch from clock_timestamp())::float8")[0]
        missing = tuple(
            role for role, has in self._query(
                "SELECT r, pg_has_role(current_user, r, 'USAGE') FROM unnest(%s::text[]) AS r", (list(MONITOR_ROLES),))
            if not has)
        return ServerInfo(address, port, version, pid, float(now), missing)

    def read_settings(self) -> list[GucReading]:
        """The keepalive GUCs from pg_settings: reset_val (server-wide), setting (this TCP session), source."""
        rows = self._query(
            "SELECT name, reset_val, setting, source, sourcefile, sourceline FROM pg_settings "
            "WHERE name = ANY(%s) ORDER BY name", (list(GUC_NAMES),))
        readings = []
        for name, reset_val, setting, source, sourcefile, sourceline in rows:
            readings.append(GucReading(name, int(reset_val), int(setting) if setting is not None else None, source,
                                       sourcefile, sourceline))
        return readings

    def poll_backends(self) -> list[Backend]:
        """Client backends in pg_stat_activity, the monitoring session included (matching leaves it out)."""
        rows = self._query(
            "SELECT pid, usename, datname, application_name, host(client_addr), client_hostname, client_port, "
            "extract(epoch from backend_start)::float8, state, extract(epoch from state_change)::float8, "
            "ARRAY(SELECT g FROM unnest(%s::text[]) AS g WHERE position(g in lower(coalesce(query, ''))) > 0), "
            "query = '<insufficient privilege>' "
            "FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "OR (backend_type IS NULL AND query = '<insufficient privilege>')",  # others' rows hide their type too
            (list(GUC_NAMES),))
        return [Backend(pid, user, db, app, addr, hostname, port, start, state, change, tuple(mentions or ()),
                        bool(hidden))
                for pid, user, db, app, addr, hostname, port, start, state, change, mentions, hidden in rows]

    def backend_alive(self, pid: int) -> bool:
        return bool(self._one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)))

    def confirm_dead(self, pid: int, timeout: float = 5.0, poll: float = 0.2,
                     clock: Callable[[], float] = time.monotonic) -> tuple[bool, float]:
        """Poll until backend `pid` is gone from pg_stat_activity or `timeout` passes: (gone, seconds waited).

        Bounded: at most timeout/poll + 1 queries.  A backend exits as soon as
        it reads the error from its aborted socket, which is at once when it
        is idle and only after its query when busy.
        """
        start = clock()
        while True:
            if not self.backend_alive(pid):
                return True, clock() - start
            if clock() - start >= timeout:
                return False, clock() - start
            time.sleep(poll)

    def now(self) -> float:
        return float(self._one("SELECT extract(epoch from clock_timestamp())::float8"))


# -- kernel defaults of the server's namespace -----------------------------------------


def read_container_kernel(container: str) -> KernelReading:
    """The keepalive sysctls of a Docker container's network namespace (docker exec cat /proc/sys/...)."""
    return _read_container(container)[0]


def _read_container(container: str) -> tuple[KernelReading, set[str]]:
    """The container's keepalive sysctls and its IP addresses (to check that it is the server)."""
    try:
        import docker

        client = docker.from_env(timeout=15)
        target = client.containers.get(container)
        networks = (target.attrs.get("NetworkSettings") or {}).get("Networks") or {}
        addresses = {normalize_address(n.get(key)) for n in networks.values()
                     for key in ("IPAddress", "GlobalIPv6Address") if n.get(key)}
        result = target.exec_run(["cat", *SYSCTL_FILES.values()])
    except Exception as error:  # noqa: BLE001 - docker raises many kinds; one line for the user
        raise PostgresError(f"--container {container}: cannot read its sysctls: {_one_line(str(error))[:200]}") from None
    output = result.output.decode(errors="replace").split() if result.output else []
    if result.exit_code != 0 or len(output) != len(SYSCTL_FILES) or not all(v.isdigit() for v in output):
        raise PostgresError(f"--container {container}: cannot read {', '.join(SYSCTL_FILES.values())} in it")
    values = {name: int(v) for name, v in zip(SYSCTL_FILES, output)}
    return KernelReading(values, f"container {container}'s network namespace"), {a for a in addresses if a}


def read_local_kernel() -> KernelReading | None:
    values = {}
    for name, path in SYSCTL_FILES.items():
        try:
            with open(path) as handle:
                values[name] = int(handle.read().strip())
        except (OSError, ValueError):
            return None
    return KernelReading(values, "this host's /proc/sys (the server address is local)")


def is_local_address(address: str | None) -> bool:
    """Is `address` one of this network namespace's own addresses? (bind test, sends nothing)"""
    address = normalize_address(address)
    if not address:
        return False
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


# -- the one object analyze and watch use ----------------------------------------------------


class Postgres:
    """The database beside the packets (``--dsn``), for `kaobs analyze` and `kaobs watch` alike.

    `Postgres.read` connects, reads the keepalive settings (they become the
    server side's expectations: `expectations`) and the sessions. When the
    server cannot be reached or read, the error is one line (`view.error`)
    and the packets are analysed without it. After the capture, `finish`
    names each connection after its backend, adds per-session notes and
    checks, for each connection the server aborted by keepalive, whether its
    backend is gone.

    Live (`live=True`, `kaobs watch --dsn`) the monitoring session stays open:
    call `tick` from the capture loop as often as you like (it queries at
    most every `poll_every` seconds). It names new connections after their
    backend while they are alive, so that their pid is known after an abort,
    and for each connection the server aborted by keepalive checks (one
    query per tick, for at most `confirm_timeout` seconds) whether the
    backend left pg_stat_activity. A database error while watching becomes a
    warning in the view, never an exception in the capture loop.
    """

    def __init__(self, dsn: str, expectations: Expectations, view: PostgresView, *,
                 session: MonitoringSession | None = None, backends: list[Backend] | None = None,
                 poll_every: float = 1.0, confirm_timeout: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.expectations = expectations
        self.view = view
        self.session = session
        self.backends = backends
        self.poll_every = poll_every
        self.confirm_timeout = confirm_timeout
        self.clock = clock
        self.tracker = BackendTracker()
        self.own_clients: set[tuple[str, int]] = set()  # the monitoring session's client address and port
        self.own_connections: dict[int, str] = {}  # captured connections that were kaobs's own session
        self._not_own: set[int] = set()
        self.checks: dict[int, AbortCheck] = {}  # connection index -> its check, once settled
        self._pending: dict[int, tuple[float, float]] = {}  # index -> (abort t, first check at)
        self._last_poll = float("-inf")
        self._failed = False
        self._notes: SessionNotes | None = None  # set by `prepare` when there are backends to name connections after
        self._matcher: BackendMatcher | None = None
        self._after_abort: dict[int, AbortCheck] = {}
        self.interrupted = False
        """Reading the server was interrupted (Ctrl-C while connecting): watch stops there."""

    @classmethod
    def read(cls, dsn: str, expectations: Expectations, sysctls: Sequence[str] = (), container: str | None = None,
             *, live: bool = False, say_error: Callable[[str], None] | None = None,
             connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, **options) -> "Postgres":
        """Read the server now; with `live`, keep the monitoring session open for `tick`.

        On failure: with `say_error`, say the one line and return a Postgres
        whose `view.error` holds it (the caller goes on with the packets
        alone); without, raise PostgresError.
        """
        try:
            user_kernel, _ = parse_sysctls(sysctls) if sysctls else (KernelDefaults(), None)
            container_kernel, container_addresses = _read_container(container) if container else (None, set())
            session = MonitoringSession(dsn, connect_timeout=connect_timeout).connect()
            try:
                server = session.server_info()
                readings = session.read_settings()
                backends = session.poll_backends()
            except BaseException:
                session.close()
                raise
        except PostgresError as error:
            if say_error is None:
                raise
            message = str(error)
            say_error(message)
            failed = cls(dsn, expectations, PostgresView(dsn=display_dsn(dsn), error=message), **options)
            failed.interrupted = isinstance(error, PostgresInterrupted)
            return failed
        if not live:
            session.close()
        view = PostgresView(dsn=session.redacted, server=server, settings=readings, backends=backends)
        if container_kernel is not None and normalize_address(server.address) not in container_addresses:
            view.warnings.append(f"--container {container} is not the server the DSN reaches ({server.address} is not "
                                 f"one of its addresses {', '.join(sorted(container_addresses)) or 'none'}): its "
                                 "sysctls are not used")
            container_kernel = None
        for role in server.missing_roles:
            view.warnings.append(f"the monitoring role is not a member of {role}: "
                                 + ("some settings may be hidden" if role == "pg_read_all_settings"
                                    else "other roles' sessions show no client address (GRANT pg_read_all_stats)"))
        local = read_local_kernel() if container is None and is_local_address(server.address) else None
        side, lines, warnings = server_expectation(readings, expectations.server, user_kernel, container_kernel, local)
        view.setting_lines, view.warnings = lines, view.warnings + warnings
        postgres = cls(dsn, Expectations(side, expectations.client), view, session=session if live else None,
                       backends=backends, **options)
        if live:
            own = session.client_endpoint()
            if own is not None:
                postgres.own_clients.add(own)
            postgres.own_clients.update((normalize_address(b.client_addr), b.client_port) for b in backends
                                        if b.pid == server.own_pid and b.client_addr and b.client_port)
        return postgres

    def is_own(self, conn: Connection) -> bool:
        """Is this captured connection kaobs's own monitoring session? (Remembered, for the report to say so.)"""
        if conn.index in self.own_connections:
            return True
        if conn.index in self._not_own:
            return False
        server = self.view.server
        if ((normalize_address(conn.client.address), conn.client.port) not in self.own_clients
                or server is not None and server.port is not None and conn.server.port != server.port):
            self._not_own.add(conn.index)
            return False
        self.own_connections[conn.index] = conn.client.endpoint
        self.view.own_session = {"connection": conn.index, "client": conn.client.endpoint,
                                 "pid": server.own_pid if server is not None else None}
        return True

    def forget(self, conn: Connection) -> None:
        """A connection the final report will not show left the live model: drop what is kept of it (long runs)."""
        self._not_own.discard(conn.index)
        self.tracker.forget(conn.index)
        self._pending.pop(conn.index, None)

    def backend_of(self, index: int) -> Backend | None:
        """The backend a live connection was matched to, when known."""
        return self.tracker.backend(index)

    @property
    def failed(self) -> bool:
        """The database could not be read at all (the report says why, the exit status is 2)."""
        return self.view.error is not None

    def _warn(self, message: str) -> None:
        if not self._failed:
            self._failed = True
            self.view.warnings.append(f"while watching: {message}")

    def tick(self, connections: Sequence[Connection], now: float | None = None) -> list[AbortCheck]:
        """Poll (rate-limited); returns the AbortChecks settled in this call, for the live view to show."""
        if self.session is None or self._failed:
            return []
        now = self.clock() if now is None else now
        if now - self._last_poll < min(self.poll_every, 0.2 if self._pending else self.poll_every):
            return []
        self._last_poll = now
        settled: list[AbortCheck] = []
        try:
            backends = self.session.poll_backends()
            self.backends = backends
            self.tracker.update(connections, backends, self.view.server)
            alive = {b.pid for b in backends}
            for conn in connections:
                reset = conn.server.reset
                if reset is None or not reset.after_keepalive or conn.index in self.checks:
                    continue
                abort_t, first = self._pending.setdefault(conn.index, (reset.t, now))
                pid = self.tracker.pid(conn.index)
                if pid is None:
                    check = AbortCheck("unknown", None, abort_t, now, "its backend was never named while the "
                                       "connection was alive (it began before --dsn was read, or cannot be matched)")
                elif pid not in alive:
                    check = AbortCheck("gone", pid, abort_t, now, f"backend pid {pid} is gone from pg_stat_activity "
                                       f"({max(0.0, now - abort_t):.1f} s after the abort)")
                elif now - first >= self.confirm_timeout:
                    row = next((b for b in backends if b.pid == pid), None)
                    state = f", state {row.state}" if row is not None and row.state else ""
                    check = AbortCheck("alive", pid, abort_t, now, f"backend pid {pid} is still in pg_stat_activity "
                                       f"{now - abort_t:.1f} s after its connection's keepalive abort{state}: it "
                                       "outlived the abort")
                else:
                    continue
                self.checks[conn.index] = check
                self._pending.pop(conn.index, None)
                settled.append(check)
        except PostgresError as error:
            self._warn(str(error))
        return settled

    def tick_lines(self, connections: Sequence[Connection], now: float | None = None) -> list[str]:
        """`tick` as lines for the live view: each backend checked after its connection's abort."""
        return [f"postgres: {'FINDING ' if check.outlived else ''}{check.detail}" for check in self.tick(connections, now)]

    def finish(self, reports: Sequence[ConnectionReport]) -> PostgresView:
        """The view for the final report: names (now, or as last seen alive), notes, the backends after aborts."""
        view = self.prepare(reports)
        for _ in self.annotate(reports, keep_all=True):
            pass
        return view

    def prepare(self, reports: Iterable[ConnectionReport]) -> PostgresView:
        """The first of two passes over the final reports (which need not be held: see `annotate`).

        Waits (live) for the backends of connections aborted by keepalive,
        and gathers what naming a connection needs of the others: the
        per-session setting statuses, the latest packet (is the reading
        stale?), the checks after aborts (whose findings head the report).
        """
        self._notes = None
        if self.failed:
            return self.view
        notes = SessionNotes(self.expectations.server)
        latest: float | None = None
        aborted: list[ConnectionReport] = []
        for report in reports:
            notes.add(report)
            end = report.connection.end
            latest = end if latest is None or end > latest else latest
            if server_aborted(report) is not None:
                aborted.append(report)
        if self.session is not None:
            deadline = self.clock() + self.confirm_timeout
            connections = [r.connection for r in aborted]
            while not self._failed and any(r.connection.index not in self.checks for r in aborted) \
                    and self.clock() < deadline:
                self._last_poll = float("-inf")
                self.tick(connections)
                time.sleep(0.2)
        view = self.view
        if self.backends is None:
            return view
        view.connections = {}
        self._notes = notes
        self._matcher = BackendMatcher(self.backends, view.server)
        stale = staleness_warning(latest, view.server.read_at if view.server is not None else None)
        if stale is not None:
            view.warnings.append(stale)
        checked = view.server.read_at if view.server is not None else None
        self._after_abort = abort_checks(aborted, self.backends, checked)
        for report in aborted:  # named now: the report's head counts the backends that outlived their abort
            view.connections[report.connection.index] = self._info(report)
        return view

    def annotate(self, reports: Iterable[ConnectionReport], keep_all: bool = False) -> Iterator[ConnectionReport]:
        """The second pass: each report as it goes by, its connection named in `view.connections` (after `prepare`).

        Unless `keep_all`, a connection's entry leaves the view once the
        consumer moves on when it holds no more than why no backend is
        named: a long capture's report is written without a name held per
        connection.
        """
        view = self.view
        for report in reports:
            if self._notes is None:  # the server could not be read: nothing to name
                yield report
                continue
            index = report.connection.index
            info = view.connections.get(index)
            if info is None:
                info = view.connections[index] = self._info(report)
            yield report
            if not keep_all and info.backend is None and not info.notes and info.after_abort is None:
                view.connections.pop(index, None)

    def _info(self, report: ConnectionReport) -> ConnectionPostgres:
        """A connection named: after its backend now, else as last seen alive; its notes; its backend after an abort."""
        assert self._notes is not None and self._matcher is not None
        index = report.connection.index
        info = self._matcher.match(report.connection)
        info.notes.extend(self._notes.notes_for(report, info))
        check = self._after_abort.get(index)
        if check is not None:
            info.after_abort = check
        tracked = self.tracker.backend(index)
        if info.backend is None and tracked is not None:
            info.backend, info.reason = tracked, None  # as last seen alive
        check = self.checks.get(index)
        if check is not None:
            info.after_abort = check
        return info

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
