"""One lab run: capture on the lab bridge, the client, the fault at the right moment, and the end.

`LabRun` conducts it: the environment (`kaobs.lab.docker`), a capture on the
lab bridge, the client, the fault after the surviving side's Nth answered
probe (seen on the wire by a keepalive model of its own), and the end (the
abort plus a grace period, or the time bound). The capture is consumed by
the caller: the live view of `kaobs lab`, or a plain loop that records a
pcap (`record_scenario`, for captures/record.py).
"""
from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from analysis.expect import Expectations
from analysis.model import KeepaliveModel, ModelEvent
from analysis.settings import CLIENT
from kaobs.lab.docker import READY_TIMEOUT_S, LabEnvironment
from kaobs.lab.plan import RETURN_AFTER_S, fault_delay, time_bound
from kaobs.lab.scenario import (
    FAULT_CLIENT_RETURNS,
    ROUTED_FAULTS,
    LabError,
    Scenario,
    session_expectations,
    surviving_side,
    vanishing_side,
)
from sniffer.capture import LiveCapture
from sniffer.records import Record

CLIENT_READY_TIMEOUT_S = 30.0


LOST_REPORT_WAIT_S = 5.0
"""When the client must notice the abort, how long its libpq may take to say so."""


@dataclass(slots=True)
class LabEvent:
    """Something the lab did or the client reported, for the live view and the report."""

    t: float
    kind: str  # client events ("connected", "settings", "set", "stopped_reading", "ready", "connection_lost", ...), "fault", "end", "error"
    message: str
    data: dict = field(default_factory=dict)


class TappedCapture(LiveCapture):
    """A live capture that also shows each record to the lab's own keepalive model.

    The lab decides when to inject the fault and when it is over from what is
    on the wire, without reaching into the consumer's model: whoever reads the
    capture (the live view, a recorder) drives this one too.
    """

    def __init__(self, *args, tap: Callable[[list[Record]], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tap = tap

    def read(self, timeout: float = 0.1) -> list[Record]:
        batch = super().read(timeout)
        self._tap(batch)
        return batch


class WireWatch:
    """Answered probes and ends per connection, from a keepalive model of the lab's own (thread-safe counts)."""

    def __init__(self, ports: Sequence[int]) -> None:
        self._lock = threading.Lock()
        self.answered: dict[tuple[int, str], int] = {}
        self.connections: dict[int, str] = {}  # index -> client endpoint
        self.ended: set[int] = set()
        self.last_end_t: float | None = None
        self.model = KeepaliveModel(ports, on_event=self._on_event)

    def feed(self, records: list[Record]) -> None:
        self.model.feed_records(records)

    def _on_event(self, event: ModelEvent) -> None:
        index = event.connection.index
        with self._lock:
            if event.kind == "connection":
                self.connections[index] = event.connection.client.endpoint
            elif event.kind == "answer":
                key = (index, event.side)
                self.answered[key] = self.answered.get(key, 0) + 1
            elif event.kind in ("abort", "reset", "fin"):
                if index not in self.ended:
                    self.ended.add(index)
                    self.last_end_t = event.t

    def snapshot(self) -> tuple[dict[int, str], dict[tuple[int, str], int], set[int], float | None]:
        with self._lock:
            return dict(self.connections), dict(self.answered), set(self.ended), self.last_end_t


class LabRun:
    """Conducts one scenario: a context manager around `LabEnvironment` plus the conductor thread.

    Usage::

        with LabRun(scenario, image, write="x.pcap") as lab:
            with lab.capture() as capture:
                lab.start()          # client, then fault and end in a thread
                for segment in capture: ...   # or run_live(capture, stop=lab.stop_event, ...)
        lab.events, lab.sessions_by_port, lab.expectations_for(port)

    The capture ends when the conductor says the run is over (stop_event)
    or at the time bound.
    """

    def __init__(self, scenario: Scenario, image: str, *, write: str | None = None, full_packets: bool = False,
                 write_mode: int = 0o600,
                 on_event: Callable[[LabEvent], None] | None = None, log: Callable[[str], None] | None = None) -> None:
        self.scenario = scenario
        self.image = image
        self.write = write
        self.full_packets = full_packets
        self.write_mode = write_mode
        self.on_event = on_event
        self.bound = time_bound(scenario)
        self.env = LabEnvironment(scenario, image, log=log or (lambda m: self._note("setup", m)),
                                  lifetime=self.bound + 120)
        self.watch = WireWatch([scenario.port])
        self.stop_event = threading.Event()
        self.events: list[LabEvent] = []
        self.sessions_by_port: dict[str, int] = {}  # client "ip:port" -> session index
        self.session_settings: dict[int, dict] = {}
        self.lost_sessions: set[int] = set()
        self.ready_t: float | None = None
        self.fault_t: float | None = None
        self.end_reason = ""
        self.error: str | None = None
        self._client: subprocess.Popen | None = None
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._capture: TappedCapture | None = None

    # -- context ------------------------------------------------------------------

    def __enter__(self) -> "LabRun":
        self.env.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the client (ours, by its pid), then remove the containers and network. Idempotent."""
        self.stop_event.set()
        client, self._client = self._client, None
        if client is not None:
            try:
                if client.stdin:
                    client.stdin.close()
            except OSError:
                pass
            try:
                client.terminate()
                client.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    client.kill()
                    client.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        for thread in self._threads:
            thread.join(timeout=5)
        self.env.cleanup()

    # -- pieces ------------------------------------------------------------------

    def capture(self) -> TappedCapture:
        """The live capture on the lab bridge; open it before `start()` so the handshake is seen."""
        self._capture = TappedCapture(
            [self.env.bridge], [self.scenario.port], write=self.write, full_packets=self.full_packets, write_mode=self.write_mode,
            tap=self.watch.feed, duration=self.bound + READY_TIMEOUT_S)
        return self._capture

    def start(self) -> None:
        """Start the client and the conductor thread (fault, end)."""
        self._client = self.env.start_client(max_seconds=self.bound + 60)
        reader = threading.Thread(target=self._read_client, name="kaobs-lab-client", daemon=True)
        conductor = threading.Thread(target=self._conduct, name="kaobs-lab-conductor", daemon=True)
        self._threads = [reader, conductor]
        reader.start()
        conductor.start()

    def expectations_for(self, client_endpoint: str, *, judge_vanished: bool = False) -> Expectations:
        """The expectation of the session that owns this client endpoint (the first session's when unknown)."""
        index = self.sessions_by_port.get(client_endpoint, 0)
        return session_expectations(self.scenario, self.scenario.sessions[index], self.env.server_sysctls,
                                    self.env.client_sysctls, judge_vanished=judge_vanished)

    def default_expectations(self) -> Expectations:
        return session_expectations(self.scenario, self.scenario.sessions[0], self.env.server_sysctls, self.env.client_sysctls)

    # -- threads -------------------------------------------------------------------

    def _note(self, kind: str, message: str, **data) -> None:
        event = LabEvent(time.time(), kind, message, data)
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a display problem must not stop the experiment
                pass

    def _read_client(self) -> None:
        client = self._client
        assert client is not None and client.stdout is not None
        for line in client.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _client_event(self, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        kind = record.get("event", "?")
        session = record.get("session")
        if kind == "connected":
            self.sessions_by_port[record["local"]] = session
            options = " ".join(f"-c {n}={v}" for n, v in record.get("options", []))
            self._note(kind, f"session {session} connected from {record['local']}" + (f" (options '{options}')" if options else ""), **record)
        elif kind == "set":
            self._note(kind, f"session {session}: SET {record['name']} = {record['value']}", **record)
        elif kind == "settings":
            self.session_settings[session] = record.get("settings", {})
            shown = ", ".join(f"{k}={v}" for k, v in record.get("settings", {}).items())
            self._note(kind, f"session {session} runs {shown}", **record)
        elif kind == "stopped_reading":
            self._note(kind, f"session {session} asked for a large result and stopped reading ", **record)
        elif kind == "ready":
            self.ready_t = record.get("t", time.time())
            self._note(kind, f"client idle with {record.get('sessions')} session(s)", **record)
        elif kind == "connection_lost":
            self.lost_sessions.add(session)
            self._note(kind, f"session {session}: the client's libpq reports: {record.get('error')}", **record)
        elif kind == "query_sent":
            self._note(kind, f"session {session} sends SELECT 1", **record)
        elif kind == "query_done":
            self._note(kind, f"session {session}: answered in {record.get('seconds')} s", **record)
        elif kind == "closed":
            self._note(kind, f"session {session} closed (Terminate, FIN)", **record)
        elif kind == "error":
            self.error = f"the lab client failed: {record.get('message')}"
            self._note("error", self.error, **record)
        else:
            self._note(kind, f"client: {kind}", **record)

    def _drain_client(self, timeout: float) -> bool:
        """Handle the client's lines for up to `timeout` s; False once its output ended."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if line is None:
                return False
            self._client_event(line)
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return True

    def _conduct(self) -> None:
        try:
            self._conduct_inner()
        except Exception as error:  # noqa: BLE001 - reported, and the run ends cleanly
            self.error = self.error or f"the lab stopped: {error}"
            self._note("error", self.error)
        finally:
            self.stop_event.set()
            if self._capture is not None:
                self._capture.stop()

    def _conduct_inner(self) -> None:
        scenario = self.scenario
        started = time.monotonic()
        client_alive = True
        while self.ready_t is None:
            if not client_alive or self.error or time.monotonic() - started > CLIENT_READY_TIMEOUT_S:
                self.error = self.error or "the lab client did not get ready"
                self._note("error", self.error)
                return
            client_alive = self._drain_client(0.1)
            if self.stop_event.is_set():
                return
        ready = time.monotonic()
        sessions = len(scenario.sessions)
        survivor = surviving_side(scenario.fault)
        delay = fault_delay(scenario)
        need = scenario.fault_after_answered
        routed = scenario.fault in ROUTED_FAULTS
        returned_at: float | None = None
        if routed:
            self.fault_t = time.time()
            self._note("fault", f"FAULT: the path forgets connections idle {scenario.idle_cut:g} s "
                                f"({self.env.fault_method})")
        while not self.stop_event.is_set():
            if client_alive:
                client_alive = self._drain_client(0.1)
            else:
                time.sleep(0.1)
            now = time.monotonic()
            if now - ready > self.bound:
                self.end_reason = "time bound"
                self._note("end", f"time bound of {self.bound:.0f} s reached")
                return
            connections, answered, ended, last_end_t = self.watch.snapshot()
            if self.fault_t is None and survivor is not None:
                counts = [answered.get((index, survivor), 0) for index in connections]
                enough = len(connections) >= sessions and all(c >= need for c in counts)
                if enough or (delay is not None and now - ready >= delay):
                    why = (f"after {need} answered {survivor} probe(s)" if enough and need
                           else f"{now - ready:.1f} s after the client went idle" if not enough else "at once")
                    method = self.env.vanish(vanishing_side(scenario.fault) or CLIENT)
                    self.fault_t = time.time()
                    self._note("fault", f"FAULT: the {vanishing_side(scenario.fault)} vanishes {why}: {method}")
            if routed:
                # Busy sessions (every:) never end; the others end when they meet the forgotten flow.
                busy = {i for i, s in enumerate(scenario.sessions) if s.every is not None}
                waiting = [index for index, client in connections.items()
                           if self.sessions_by_port.get(client, -1) not in busy and index not in ended]
                if connections and len(connections) >= sessions and not waiting and last_end_t is not None \
                        and time.time() - last_end_t >= scenario.grace:
                    self.end_reason = "ended"
                    self._note("end", "every connection that idled past the cut ended")
                    return
                continue
            if connections and len(ended) >= len(connections) and (self.fault_t is not None or survivor is None):
                # Every connection ended: let stragglers (retransmitted RSTs) in, then stop. When the
                # client was the one to abort, give its libpq the time to say so too.
                waited = time.time() - last_end_t if last_end_t is not None else 0.0
                told = survivor != CLIENT or len(self.lost_sessions) >= sessions or waited >= LOST_REPORT_WAIT_S
                if scenario.fault == FAULT_CLIENT_RETURNS and returned_at is None and waited >= RETURN_AFTER_S:
                    self.env.heal(CLIENT)
                    self._tell_client("close")
                    returned_at = time.monotonic()
                    self._note("fault", "the client is back (its packets flow again) and closes its sessions: "
                                        "a Terminate and a FIN each, to a server that has aborted them")
                    continue
                if returned_at is not None and time.monotonic() - returned_at < RETURN_AFTER_S + 1.0:
                    continue  # the client's Terminate, the server's RST
                if waited >= scenario.grace and told:
                    self.end_reason = "ended"
                    self._note("end", "every connection ended")
                    return

    def _tell_client(self, command: str) -> None:
        """A line on the lab client's stdin (`close`: close every session, as an application would)."""
        client = self._client
        if client is not None and client.stdin is not None:
            try:
                client.stdin.write(command + "\n")
                client.stdin.flush()
            except OSError:
                pass


def run_plain(lab: LabRun, consume: Callable[[Record], None] | None = None) -> None:
    """Run `lab` without a live view: read the capture until the conductor stops it (for recorders and tests)."""
    with lab.capture() as capture:
        lab.start()
        for record in capture:
            if consume is not None:
                consume(record)
            if lab.stop_event.is_set():
                break


def record_scenario(scenario: Scenario, image: str, path: str, *, full_packets: bool = False,
                    on_event: Callable[[LabEvent], None] | None = None) -> LabRun:
    """Play `scenario` and keep its capture in `path` (headers only unless `full_packets`); return the finished run.

    For recorders (captures/record.py): the returned `LabRun` says what was
    done — `events`, `sessions_by_port`, `session_settings` (SHOW per
    session), `env.server_sysctls`/`env.client_sysctls`, `fault_t`,
    `end_reason`, `expectations_for(client endpoint)` — after everything it
    created was removed. Raises LabError when the run could not happen.
    """
    lab = LabRun(scenario, image, write=path, full_packets=full_packets, on_event=on_event)
    with lab:
        run_plain(lab)
    if lab.error:
        raise LabError(lab.error)
    return lab
