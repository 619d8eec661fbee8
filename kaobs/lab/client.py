"""The lab's Postgres client: persistent psycopg sessions that report what they do as JSON lines.

`kaobs lab` runs this module *inside the client container's network
namespace* (``nsenter --net=/proc/PID/ns/net python3 -m kaobs.labclient``), so
the client is a network endpoint of its own that a fault can cut off, while
the code and psycopg come from the host (the Postgres image has no Python).

It opens every session of the spec (JSON on the command line, no password:
libpq reads PGPASSWORD from the environment), applies the per-session
settings (libpq ``options=-c ...`` at connection start, then ``SET``), asks
the server with ``SHOW`` what each session really runs, and then stays idle —
an idle connection is what keepalives are about. Every step is one JSON line
on stdout (``{"event": "connected", ...}``), so the lab can show it and match
connections on the wire to sessions by their local port.

A session with ``stop_reading`` sends a query with a large result and never
reads it: once the client's receive buffer is full the server's send queue fills and it
probes the zero window (persist timer), which must not be taken for
keepalives. A session with ``every`` sends ``SELECT 1`` that often (a busy
connection); one with ``query_after`` sends it once, that long after the
client is ready (a connection that idled, then speaks: through a middlebox
that forgot it, its data never gets through, or meets a RST). Queries are
sent without waiting (libpq's non-blocking calls), so one stalled session
does not hold up the others.

It ends by itself: when its stdin closes (the lab went away, even killed),
on SIGTERM/SIGINT, or after ``max_seconds``. It never reconnects and sends
nothing but the queries asked for, what libpq needs to notice a dead
connection, and, when the lab writes ``close`` on its stdin, a Terminate
message and a FIN on every session (a client back after a network cut,
closing its connections).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

# The result a stop-reading session asks for and never reads: ~200 MB, far more
# than any socket buffer, so the server's send queue stays full until the end.
BIG_RESULT_QUERY = b"SELECT repeat('x', 1000) FROM generate_series(1, 200000)"
SHOWN_SETTINGS = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
CONNECT_TIMEOUT_S = 10


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed at once: the lab reads them as they come."""
    record = {"event": event, "t": time.time(), **fields}
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def conninfo_for(spec: dict[str, Any], session: dict[str, Any]) -> str:
    """The libpq string of one session: host, port, user, the client's keepalive params, per-session options."""
    params: dict[str, str] = {
        "host": spec["host"],
        "port": str(spec["port"]),
        "user": spec.get("user", "postgres"),
        "dbname": spec.get("dbname", "postgres"),
        "sslmode": "disable",  # nothing but the startup packet: a clean capture
        "gssencmode": "disable",
        "connect_timeout": str(CONNECT_TIMEOUT_S),
        "application_name": f"kaobs-lab-{session.get('index', 0)}",
    }
    params.update({k: str(v) for k, v in spec.get("libpq", {}).items()})
    options = " ".join(f"-c {name}={value}" for name, value in session.get("options", []))
    if options:
        params["options"] = options
    return make_conninfo(**params)


class Session:
    """One connection and what it was asked to do."""

    def __init__(self, index: int, spec: dict[str, Any], session: dict[str, Any]) -> None:
        self.index = index
        self.spec = spec
        self.session = session
        self.conn: psycopg.Connection | None = None
        self.local = ""
        self.lost = False
        self.closed = False
        self.stop_reading = bool(session.get("stop_reading"))
        self.every = session.get("every")
        self.query_after = session.get("query_after")
        self.next_query: float | None = None  # monotonic time of the next query, set once the client is ready
        self.busy_since: float | None = None  # a query sent, its result not read yet

    def open(self) -> None:
        conn = psycopg.connect(conninfo_for(self.spec, self.session), autocommit=True)
        self.conn = conn
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            host, port = sock.getsockname()[:2]
            peer_host, peer_port = sock.getpeername()[:2]
        finally:
            sock.close()
        self.local = f"{host}:{port}"
        emit("connected", session=self.index, local=self.local, server=f"{peer_host}:{peer_port}",
             options=self.session.get("options", []))
        for name, value in self.session.get("sets", []):
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(str(value))))
            emit("set", session=self.index, name=name, value=str(value))
        shown = {}
        for name in SHOWN_SETTINGS:
            row = conn.execute(f"SHOW {name}").fetchone()
            shown[name] = row[0] if row else None
        emit("settings", session=self.index, local=self.local, settings=shown)
        if self.stop_reading:
            self._send_and_stop_reading()

    def _send_and_stop_reading(self) -> None:
        """Ask for a huge result and never read it: the window closes, the server's queue fills."""
        assert self.conn is not None
        pgconn = self.conn.pgconn
        # The receive buffer is left alone: shrinking it under an offered
        # window makes the kernel drop data in flight, and the server then
        # retransmits (RTO backoff) instead of probing a clean zero window.
        pgconn.send_query(BIG_RESULT_QUERY)
        while pgconn.flush() != 0:
            time.sleep(0.01)
        emit("stopped_reading", session=self.index, local=self.local, query_bytes_expected=200000 * 1000)

    def fileno(self) -> int:
        assert self.conn is not None
        return self.conn.pgconn.socket

    def schedule(self, ready: float) -> None:
        """Plan the first query, from the moment every session is idle."""
        if self.every is not None:
            self.next_query = ready + float(self.every)
        elif self.query_after is not None:
            self.next_query = ready + float(self.query_after)

    def maybe_query(self, now: float) -> None:
        """Send SELECT 1 when it is due and nothing is pending; never waits for the answer."""
        if self.lost or self.closed or self.next_query is None or now < self.next_query or self.busy_since is not None:
            return
        assert self.conn is not None
        pgconn = self.conn.pgconn
        try:
            pgconn.send_query(b"SELECT 1")
            pgconn.flush()
        except psycopg.OperationalError as error:
            self._lost(_one_line(error))
            return
        self.busy_since = now
        emit("query_sent", session=self.index, local=self.local)
        self.next_query = now + float(self.every) if self.every is not None else None

    def on_readable(self) -> None:
        """Something came in: a query's result, a notice, or the kernel's error for a dead connection."""
        assert self.conn is not None
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as error:
            self._lost(_one_line(error))
            return
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            self._lost(_one_line(pgconn.error_message.decode(errors="replace")))
            return
        if self.busy_since is not None and not pgconn.is_busy():
            while pgconn.get_result() is not None:
                pass
            emit("query_done", session=self.index, local=self.local, seconds=round(time.monotonic() - self.busy_since, 3))
            self.busy_since = None

    def _lost(self, error: str) -> None:
        self.lost = True
        emit("connection_lost", session=self.index, local=self.local, error=error)

    def close_now(self) -> None:
        """Close as an application does: a Terminate message, then FIN (psycopg's close)."""
        if self.conn is not None and not self.closed:
            self.closed = True
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            emit("closed", session=self.index, local=self.local)

    def close(self) -> None:
        if self.conn is not None and not self.closed:
            try:
                # Closing would send a Terminate message and a FIN: after a fault
                # they could never arrive, and before one they must not end the
                # experiment. The lab kills the network anyway; just drop the fd.
                os.close(self.conn.pgconn.socket)
            except OSError:
                pass


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def run(spec: dict[str, Any]) -> int:
    deadline = time.monotonic() + float(spec.get("max_seconds", 120))
    stop = {"now": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sessions = [Session(i, spec, s) for i, s in enumerate(spec.get("sessions") or [{}])]
    try:
        for session in sessions:
            session.open()
    except psycopg.Error as error:
        emit("error", message=_one_line(error))
        return 1
    emit("ready", sessions=len(sessions))
    ready = time.monotonic()
    for session in sessions:
        session.schedule(ready)
    stdin_open = True
    commands = b""
    while not stop["now"] and time.monotonic() < deadline:
        now = time.monotonic()
        for session in sessions:
            session.maybe_query(now)
        watched = [s for s in sessions if not s.lost and not s.closed and not s.stop_reading]
        fds: list[Any] = list(watched)
        if stdin_open:
            fds.append(sys.stdin)
        due = [s.next_query for s in sessions if s.next_query is not None and not s.lost]
        timeout = min(0.5, max(0.0, deadline - now), *(max(0.0, t - now) for t in due))
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        for item in readable:
            if item is sys.stdin:
                data = sys.stdin.buffer.read1(4096)
                if not data:  # EOF: the lab is gone
                    stop["now"] = True
                    stdin_open = False
                    continue
                commands += data
                while b"\n" in commands:
                    command, commands = commands.split(b"\n", 1)
                    if command.strip() == b"close":
                        for session in sessions:
                            session.close_now()
            else:
                item.on_readable()
    emit("exit", reason="stopped" if stop["now"] else "max_seconds")
    for session in sessions:
        session.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--spec":
        print("usage: python3 -m kaobs.labclient --spec JSON", file=sys.stderr)
        return 2
    try:
        spec = json.loads(args[1])
    except json.JSONDecodeError as error:
        print(f"kaobs.labclient: bad --spec: {error}", file=sys.stderr)
        return 2
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
