"""Prometheus metrics of a live watch: `kaobs watch --metrics HOST:PORT` (and `kaobs lab --metrics`).

Two halves. `WatchMetrics` turns what the live pipeline sees into
Prometheus metrics (`prometheus_client`, a registry of its own): the wire's
events as they come (probes, answers, new connections: `on_event`), the
capture's counters and the open connections a few times a second
(`on_tick`), and each connection's final judgment once it is known
(`on_judged`: verdict, aborts, stalls, the path's cut, contradicted
settings, idle before death). `MetricsServer` serves the registry over HTTP
in the Prometheus text format, from a thread of its own, and can stay up
after the run until Prometheus has scraped the final numbers (`linger`):
without that, a short `kaobs watch --duration 60` ends before anyone sees
what it found.

Labels are of bounded cardinality only: the side (server, client), the
server's endpoint (address:port of the Postgres server), the verdict, the
abort reason, the stall kind and outcome, the cause of death, the setting.
Never a client's address or port: one series per connection would grow
without bound on a server with connection churn.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from analysis.expect import Expectations
from analysis.model import KEEPALIVE, WINDOW, Connection, ModelEvent
from analysis.settings import BY_KEY, SETTINGS, SIDES, setting_name
from analysis.verdict import MISMATCH, VERDICTS, ConnectionReport
from kaobs.episode import idle_before_death
from sniffer.capture import LiveStats

disable_created_metrics()  # no `_created` twin of every counter: twice the series for a start time nobody queries

DEFAULT_PORT = 9432
"""The port the docs, the container image and the DaemonSet use (next to Postgres' 5432)."""

KEEPALIVE_BUCKETS = (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 75.0, 90.0, 120.0, 180.0, 240.0, 300.0, 350.0,
                     450.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0, 7200.0, 7500.0, 10800.0, 21600.0, float("inf"))
"""Histogram bounds in seconds for keepalive scales: the lab's and tests' 1-10 s, Linux's 75 s interval and
7200 s idle (7500 s: a 7200 s timer that fired late, or RFC 5382's 7440 s NAT minimum), and the idle
timeouts of common middleboxes (240 Azure, 350 AWS, 600 GCP, 900 IPVS, 1200 Cloud NAT; analysis.path)."""

OPEN_SCAN_S = 1.0
"""How often the open connections are counted (a scan of the model's connections)."""

DEATH_CAUSE_LABELS = {"keepalive abort": "keepalive_abort", "path reset": "path_reset", "path drop": "path_drop",
                      "stall given up": "stall_given_up"}


class MetricsError(Exception):
    """A --metrics address that cannot be served: said in one line by the command."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where the metrics are served: `host` "" means every address (IPv4 and IPv6 where the machine has it)."""

    host: str
    port: int

    def __str__(self) -> str:
        if not self.host:
            return f":{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """`HOST:PORT`, `:PORT` (every address), `[IPv6]:PORT`; port 0 picks a free port. Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 address goes in brackets before the port: [::1]:9432")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT or :PORT (e.g. :{DEFAULT_PORT} or 127.0.0.1:{DEFAULT_PORT})")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets: [::1]:9432")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, not {port!r}")
    return ListenAddress(host, int(port))


class WatchMetrics:
    """The metrics of one live run, fed by `run_live` (events, ticks) and by its `on_judged` hook.

    Not thread-safe by itself and needs not be: only the capture thread
    writes; `prometheus_client` locks each value for the scraping thread.
    """

    def __init__(self, expectations: Expectations | None = None, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        side_server = ["side", "server"]
        self.probes = Counter("kaobs_keepalive_probes", "Keepalive probes sent, as seen on the wire.",
                              side_server, registry=r)
        self.answers = Counter("kaobs_keepalive_probe_answers", "Keepalive probes answered on the wire "
                               "(the peer's duplicate ACK crossed the capture point).", side_server, registry=r)
        self.answers_lost = Counter("kaobs_keepalive_probe_answers_lost", "Answers seen on the wire that never "
                                    "reached the prober (its next probe or abort shows it); counted when the "
                                    "connection is judged.", side_server, registry=r)
        self.window_probes = Counter("kaobs_zero_window_probes", "Zero-window probes of the persist timer "
                                     "(data queued, the peer's window 0): not keepalive.", side_server, registry=r)
        self.aborts = Counter("kaobs_keepalive_aborts", "Connections a side aborted after unanswered keepalive "
                              "probes; reason keepalive_count or user_timeout.", ["side", "server", "reason"],
                              registry=r)
        self.stalls = Counter("kaobs_stalls", "Stalls (data unacknowledged, or queued behind a zero window) by "
                              "kind (data, window) and outcome (acked, gave_up, reset, open).",
                              ["side", "server", "kind", "outcome"], registry=r)
        self.path_cuts = Counter("kaobs_path_cuts", "Connections the path (a middlebox), not a peer, cut: kind "
                                 "reset (a RST in a side's name it never sent) or drop.", ["server", "kind"],
                                 registry=r)
        self.mismatches = Counter("kaobs_setting_mismatches", "Connections whose packets contradict a setting, "
                                  "per side and setting.", ["side", "server", "setting"], registry=r)
        self.connections = Counter("kaobs_connections", "Connections judged, by final verdict (match, mismatch, "
                                   "unverified, no_keepalive).", ["server", "verdict"], registry=r)
        self.opened = Counter("kaobs_connections_opened", "Connections seen opening (or already open at the start).",
                              ["server"], registry=r)
        self.open = Gauge("kaobs_connections_open", "Connections open now (no FIN or RST seen).", ["server"],
                          registry=r)
        self.packets = Counter("kaobs_captured_packets", "Packets captured.", registry=r)
        self.segments = Counter("kaobs_captured_tcp_segments", "TCP segments captured.", registry=r)
        self.drops = Counter("kaobs_kernel_drops", "Packets the kernel dropped before kaobs read them "
                             "(receive buffer full): probes may be missing.", registry=r)
        self.idle = Histogram("kaobs_keepalive_idle_seconds", "Observed idle: from the last packet the prober "
                              "accepted to its first keepalive probe.", side_server, buckets=KEEPALIVE_BUCKETS,
                              registry=r)
        self.interval = Histogram("kaobs_keepalive_interval_seconds", "Observed interval: from an unanswered "
                                  "keepalive probe to the next of its series.", side_server,
                                  buckets=KEEPALIVE_BUCKETS, registry=r)
        self.death = Histogram("kaobs_idle_before_death_seconds", "How long a dead connection had been silent "
                               "when the packet that found it dead was sent, by cause (keepalive_abort, "
                               "path_reset, path_drop, stall_given_up): a middlebox's idle timeout shows as a "
                               "peak.", ["server", "cause"], buckets=KEEPALIVE_BUCKETS, registry=r)
        self.settings = Info("kaobs_setting", "The keepalive settings judged against, with their value and "
                             "where it came from.", ["side", "setting"], registry=r)
        self.set_expectations(expectations)
        self._series: dict[tuple[str, int], _Series] = {}
        self._packets = self._segments = self._drops = 0
        self._open_scan = float("-inf")

    def set_expectations(self, expectations: Expectations | None) -> None:
        """The `kaobs_setting_info` series: one per judged setting of each side."""
        self.settings.clear()
        if expectations is None:
            return
        for side in (expectations.server, expectations.client):
            if not side.judged():
                continue
            if side.enabled is not None:
                self.settings.labels(side.side, setting_name("enabled", side.side)).info(
                    {"value": "on" if side.enabled else "off", "source": side.enabled_source or "given"})
            for definition in SETTINGS:
                setting = getattr(side, definition.key)
                if setting.value is None:
                    continue
                self.settings.labels(side.side, definition.name(side.side)).info(
                    {"value": BY_KEY[definition.key].text(setting.value), "source": setting.source})

    def _server(self, conn: Connection) -> "_Series":
        """A server's live series; its first sighting starts its counters at 0, so rate() sees their first rise."""
        endpoint = conn.server
        series = self._series.get((endpoint.address, endpoint.port))
        if series is None:
            server = endpoint.endpoint
            series = self._series[(endpoint.address, endpoint.port)] = _Series(
                server,
                {side: self.probes.labels(side, server) for side in SIDES},
                {side: self.answers.labels(side, server) for side in SIDES},
                {side: self.window_probes.labels(side, server) for side in SIDES},
                {side: self.idle.labels(side, server) for side in SIDES},
                {side: self.interval.labels(side, server) for side in SIDES},
                self.opened.labels(server))
            for side in SIDES:
                self.answers_lost.labels(side, server)
            for verdict in VERDICTS:
                self.connections.labels(server, verdict)
        return series

    # -- live: from the wire -------------------------------------------------------

    def on_event(self, event: ModelEvent) -> None:
        """One event of the model, as it happens (the caller leaves out the connections it hides)."""
        kind = event.kind
        if kind == "probe":
            probe = event.probe
            series = self._server(event.connection)
            if probe.kind == WINDOW:
                series.window_probes[event.side].inc()
                return
            series.probes[event.side].inc()
            if probe.series_index == 1:
                if probe.since_accepted is not None:
                    series.idle[event.side].observe(probe.t - probe.since_accepted)
                return
            probes = event.connection.side(event.side).probes
            if len(probes) >= 2 and probes[-1] is probe:
                previous = probes[-2]
                if (previous.kind == KEEPALIVE and previous.answer_t is None
                        and previous.since_accepted == probe.since_accepted):
                    series.interval[event.side].observe(probe.t - previous.t)
        elif kind == "answer":
            self._server(event.connection).answers[event.side].inc()
        elif kind == "connection":
            self._server(event.connection).opened.inc()

    def on_tick(self, connections: Iterable[Connection], stats: LiveStats, now: float,
                hidden: Callable[[Connection], bool] | None = None, *, final: bool = False) -> None:
        """The capture's counters, and (once a second, or `final`) the connections open now."""
        self.packets.inc(max(0, stats.packets - self._packets))
        self.segments.inc(max(0, stats.segments - self._segments))
        self.drops.inc(max(0, stats.drops - self._drops))
        self._packets, self._segments, self._drops = stats.packets, stats.segments, stats.drops
        if not final and now - self._open_scan < OPEN_SCAN_S:
            return
        self._open_scan = now
        counts = {series.server: 0 for series in self._series.values()}
        for conn in connections:
            if conn.end_reason == "open" and (hidden is None or not hidden(conn)):
                server = self._server(conn).server
                counts[server] += 1
        for server, count in counts.items():
            self.open.labels(server).set(count)

    # -- judged: once per connection -----------------------------------------------

    def on_judged(self, report: ConnectionReport) -> None:
        """A connection's final judgment: its verdict, aborts, stalls, the path's cut, contradicted settings."""
        server = self._server(report.connection).server
        self.connections.labels(server, report.verdict).inc()
        for side in (report.server, report.client):
            lost = len(side.lost_answers)
            if lost:
                self.answers_lost.labels(side.role, server).inc(lost)
            if side.abort is not None:
                self.aborts.labels(side.role, server, side.abort.reason).inc()
            for stall in side.stalls:
                self.stalls.labels(side.role, server, stall.kind, stall.outcome).inc()
            for finding in side.findings:
                if finding.status == MISMATCH:
                    self.mismatches.labels(side.role, server, finding.setting).inc()
        cut = report.path_cut
        if cut is not None:
            self.path_cuts.labels(server, cut.kind).inc()
        death = idle_before_death(report)
        if death is not None:
            cause, idle = death
            self.death.labels(server, DEATH_CAUSE_LABELS.get(cause, cause.replace(" ", "_"))).observe(idle)


@dataclass(slots=True)
class _Series:
    """One server's live series, looked up once: `labels()` costs more than the increment itself."""

    server: str
    probes: dict
    answers: dict
    window_probes: dict
    idle: dict
    interval: dict
    opened: Counter


# -- serving ---------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: the watch's own lines are there."""

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass


class _Server(ThreadingWSGIServer):
    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:  # "::" serves IPv4 too, whatever net.ipv6.bindv6only says
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        super().server_bind()


class _Body:
    """The response body; `close` (called by the server once it is written) counts the scrape as served."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.body = body
        self.on_close = on_close

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        self.on_close()


class MetricsServer:
    """The registry over HTTP (`/metrics`, or any path, as prometheus_client serves it), in a daemon thread.

    `bind` raises MetricsError with the reason when the address cannot be
    listened on (in use, not this machine's, no permission). `linger` waits,
    at most so long, until a scrape that began after `final` has been
    answered: Prometheus then holds the run's last numbers.
    """

    def __init__(self, registry: CollectorRegistry, address: ListenAddress) -> None:
        self.registry = registry
        self.address = address
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._final_at: float | None = None
        self._scraped_final = threading.Event()
        self.scrapes = 0

    def bind(self) -> "MetricsServer":
        host = self.address.host
        family = socket.AF_INET
        if not host:
            family = socket.AF_INET6 if socket.has_ipv6 and _ipv6_usable() else socket.AF_INET
            host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        else:
            try:
                infos = socket.getaddrinfo(host, self.address.port, type=socket.SOCK_STREAM)
            except socket.gaierror as error:
                raise MetricsError(f"--metrics {self.address}: {error.strerror}") from None
            family, host = infos[0][0], infos[0][4][0]

        class Server(_Server):
            address_family = family

        app = make_wsgi_app(self.registry)

        def served(environ, start_response):
            began = time.monotonic()
            body = app(environ, start_response)
            return _Body(body, lambda: self._served(began))

        try:
            self._httpd = make_server(host, self.address.port, served, Server, handler_class=_QuietHandler)
        except OSError as error:
            raise MetricsError(f"--metrics {self.address}: cannot listen: {error.strerror or error}") from None
        return self

    def _served(self, began: float) -> None:
        with self._lock:
            self.scrapes += 1
            if self._final_at is not None and began >= self._final_at:
                self._scraped_final.set()

    @property
    def url(self) -> str:
        """Where a browser or Prometheus finds the metrics (the port chosen when 0 was asked)."""
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        if host in ("0.0.0.0", "::"):
            return f"http://localhost:{port}/metrics (listening on every address)"
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def start(self) -> "MetricsServer":
        if self._httpd is None:
            self.bind()
        assert self._httpd is not None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="kaobs-metrics", daemon=True)
        self._thread.start()
        return self

    def final(self) -> None:
        """The run's numbers are final: scrapes from now on see them."""
        with self._lock:
            self._final_at = time.monotonic()

    def linger(self, seconds: float) -> bool:
        """Wait until a scrape after `final` was answered, at most `seconds`; True when one was."""
        if self._final_at is None:
            self.final()
        return self._scraped_final.wait(max(0.0, seconds))

    def close(self) -> None:
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        self._httpd = None


def _ipv6_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def start_metrics(address: ListenAddress, expectations: Expectations | None,
                  say: Callable[[str], None] | None = None) -> tuple[WatchMetrics, MetricsServer]:
    """The metrics of a run and their server, listening before the capture starts. Raises MetricsError."""
    metrics = WatchMetrics(expectations)
    server = MetricsServer(metrics.registry, address).start()
    if say is not None:
        say(f"metrics on {server.url}")
    return metrics, server


def end_metrics(server: MetricsServer, linger: float, say: Callable[[str], None] | None = None) -> None:
    """After the final numbers: wait (at most `linger` s) for a scrape of them, then stop serving."""
    try:
        server.final()
        if linger > 0:
            if say is not None:
                say(f"serving the final metrics until they are scraped (at most {linger:g} s)")
            if not server.linger(linger) and say is not None:
                say(f"no scrape came within {linger:g} s: the final numbers were not collected")
    finally:
        server.close()


def metrics_say(quiet: bool, address: ListenAddress) -> Callable[[str], None]:
    """How --metrics says where it listens and what its linger did: on stderr; with --quiet only what must be said."""
    def say(line: str) -> None:
        if not quiet or address.port == 0 or line.startswith("no scrape"):
            print(f"kaobs: {line}", file=sys.stderr, flush=True)
    return say
