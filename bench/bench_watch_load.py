#!/usr/bin/env python3
"""Load benchmark: does `kaobs watch` keep up with a busy Docker bridge?

Run as root: ``python3 bench/bench_watch_load.py [--seconds 60]``.

What it sets up, all on an internal Docker network of its own, labelled
``kaobs.lab=<run id>`` and removed at the end (also on errors and Ctrl-C):

* a Postgres server (kaobs/postgres:15-local) with short keepalives
  (idle 2 s, interval 1 s, count 3), so idle connections probe all the time;
* a few idle persistent psycopg sessions (libpq keepalives idle 3 s,
  interval 1 s, count 3, so both sides probe), run from the host in a client
  container's network namespace, as `kaobs lab` does;
* one more session in a second container that vanishes a third of the way
  into the load (iptables DROP in its namespace): unanswered server probes
  and a keepalive abort while the bridge is busy;
* pgbench in a third container, select-only (``-S -M prepared``: the most
  packets per CPU second), for the load.

While the load runs, ``tcpdump -i <bridge> -s 96 -w`` (the reference, with a
big buffer) and ``kaobs watch --interface <bridge> --format json`` capture the
same bridge. The benchmark reads:

* packets per second: from the server's veth counters (rx + tx of its eth0,
  which is every packet of port 5432 on this network) and from tcpdump's count;
  a bridge's own statistics do not count the frames it forwards between ports;
* kaobs's CPU: utime + stime from /proc/<pid>/stat, during the load (as % of
  one core) and over its whole life (start-up included);
* kernel drops: kaobs's JSON ``input.kernel_drops`` (PACKET_STATISTICS) and
  tcpdump's "dropped by kernel";
* probes: every keepalive probe and abort that ``kaobs analyze`` finds in
  tcpdump's file (and, with --tshark, that tshark's tcp.analysis.keep_alive
  flags) must be in kaobs watch's report: same connection and side, time
  within 5 ms (frame numbers differ between the two captures).

It prints a markdown table and exits 0 when the target is met (no drops,
every probe, under 10 % of a core), 1 when not, 2 when the benchmark could
not run. Options worth knowing:

* ``--nice -10``: kaobs and tcpdump at a higher priority (process nice and,
  since each runs in a session of its own, autogroup nice). On a 2-CPU
  machine pgbench and Postgres take both CPUs, and at nice 0 tcpdump and
  kaobs are both left waiting for a CPU for seconds and drop packets;
  "runnable but waiting" in the table shows it.
* ``--watch-env KAOBS_CAPTURE=socket``: the plain socket path instead of the
  TPACKET_V3 ring, for before/after figures.
* ``--table``: a second kaobs watch with the live table on a terminal (a pty),
  whose CPU and drops are reported too.
* ``--tshark``: also match tshark's tcp.analysis.keep_alive frames (slow).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kaobs.lab.docker import LOCAL_IMAGE, LabEnvironment, client_spec, docker, labels  # noqa: E402 - after the path fix
from kaobs.lab.scenario import FAULT_NONE, LabError, Scenario, Session  # noqa: E402

PORT = 5432
SERVER_SETTINGS = (("tcp_keepalives_idle", "2"), ("tcp_keepalives_interval", "1"), ("tcp_keepalives_count", "3"))
CLIENT_KEEPALIVES = (("keepalives", "1"), ("keepalives_idle", "3"), ("keepalives_interval", "1"), ("keepalives_count", "3"))
MATCH_WINDOW_S = 0.005
TARGET_CPU_PERCENT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot run: one line, exit 2."""


# -- pure helpers (measured numbers in, verdicts out) ------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeSeen:
    """A keepalive probe (or an abort) as one report shows it: which connection, which side, when."""

    client: str
    server: str
    side: str
    t: float
    kind: str = "probe"  # "probe" or "abort"


def probes_of(report: dict[str, Any]) -> list[ProbeSeen]:
    """Keepalive probes and keepalive aborts in a kaobs JSON report (analyze or watch)."""
    out: list[ProbeSeen] = []
    for conn in report.get("connections", []):
        for side_name, side in conn["sides"].items():
            for probe in side["probes"]:
                if probe["kind"] == "keepalive":
                    out.append(ProbeSeen(conn["client"], conn["server"], side_name, probe["t"]))
            abort = side.get("abort")
            if abort is not None:
                out.append(ProbeSeen(conn["client"], conn["server"], side_name, abort["t"], "abort"))
    return out


def missing_from(reference: list[ProbeSeen], reported: list[ProbeSeen], window: float = MATCH_WINDOW_S,
                 start: float | None = None, end: float | None = None) -> tuple[list[ProbeSeen], int]:
    """Reference probes (within [start, end]) that no reported probe matches; and how many were compared.

    A match is the same connection, side and kind, within `window` seconds:
    the two captures number frames differently, but the kernel stamps one
    packet with one time for every socket that sees it.
    """
    by_key: dict[tuple, list[float]] = {}
    for p in reported:
        by_key.setdefault((p.client, p.server, p.side, p.kind), []).append(p.t)
    missing = []
    compared = 0
    for p in reference:
        if (start is not None and p.t < start) or (end is not None and p.t > end):
            continue
        compared += 1
        times = by_key.get((p.client, p.server, p.side, p.kind), [])
        if not any(abs(t - p.t) <= window for t in times):
            missing.append(p)
    return missing, compared


def parse_tcpdump_counts(stderr: str) -> dict[str, int]:
    """tcpdump's closing lines: '123 packets captured', '... received by filter', '... dropped by kernel'."""
    out = {}
    for key in ("captured", "received by filter", "dropped by kernel"):
        match = re.search(r"(\d+) packets? " + key, stderr)
        if match:
            out[key] = int(match.group(1))
    return out


def cpu_seconds(stat_line: str) -> float:
    """utime + stime of a /proc/<pid>/stat line, in seconds (the command name may hold spaces)."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(slots=True)
class Figures:
    """What one run measured."""

    seconds: float = 0.0
    pps_veth: float = 0.0
    pps_tcpdump: float = 0.0
    tcpdump_packets: int = 0
    tcpdump_drops: int | None = None
    kaobs_packets: int = 0
    kaobs_drops: int | None = None
    kaobs_path: str = "?"
    cpu_load_percent: float = 0.0
    cpu_total_s: float = 0.0
    kaobs_life_s: float = 0.0
    pgbench_tps: float | None = None
    reference_probes: int = 0
    reference_aborts: int = 0
    missing: list[ProbeSeen] = field(default_factory=list)
    tshark_probes: int | None = None
    tshark_missing: int | None = None
    stop_s: float | None = None
    runqueue_wait_percent: float | None = None
    cpu_us_per_packet: float = 0.0
    cpu_us_per_read: float = 0.0
    load_average: str = ""
    nice: int = 0
    longest_stall_s: float | None = None
    cpu_user_system: tuple[float, float] | None = None
    table_cpu_percent: float | None = None
    table_drops: int | None = None
    pgbench_args: str = "-S"

    def verdict(self) -> tuple[bool, list[str]]:
        reasons = []
        if self.kaobs_drops is None:
            reasons.append("kaobs's report gives no kernel drop count")
        elif self.kaobs_drops:
            reasons.append(f"kaobs: {self.kaobs_drops} kernel drops")
        if self.missing or self.tshark_missing:
            reasons.append(f"{len(self.missing) + (self.tshark_missing or 0)} probe(s)/abort(s) missing from kaobs watch")
        if self.cpu_load_percent >= TARGET_CPU_PERCENT:
            reasons.append(f"kaobs used {self.cpu_load_percent:.1f} % of a core (target < {TARGET_CPU_PERCENT:g} %)")
        if self.reference_probes == 0:
            reasons.append("no probe on the wire: nothing was compared")
        return not reasons, reasons


def table(fig: Figures) -> str:
    """The results as a markdown table (readable as plain text too)."""
    ok, reasons = fig.verdict()
    found = fig.reference_probes + fig.reference_aborts - len(fig.missing)
    rows = [
        ("load", f"pgbench {fig.pgbench_args}, {fig.seconds:.0f} s" + (f", {fig.pgbench_tps:,.0f} tps" if fig.pgbench_tps else "")),
        ("packets/s on the bridge (server veth rx+tx)", f"{fig.pps_veth:,.0f}"),
        ("packets/s seen by tcpdump (whole capture, idle start and end included)", f"{fig.pps_tcpdump:,.0f}"),
        ("packets: tcpdump / kaobs watch", f"{fig.tcpdump_packets:,} / {fig.kaobs_packets:,}"),
        ("kernel drops: tcpdump / kaobs watch",
         f"{'?' if fig.tcpdump_drops is None else fig.tcpdump_drops} / {'?' if fig.kaobs_drops is None else fig.kaobs_drops}"),
        ("kaobs capture path", fig.kaobs_path + (f" (kaobs and tcpdump at nice {fig.nice})" if fig.nice else "")),
        ("kaobs CPU during the load", f"{fig.cpu_load_percent:.1f} % of one core"),
        ("kaobs CPU during the load: user / system seconds",
         "-" if fig.cpu_user_system is None else f"{fig.cpu_user_system[0]:.2f} / {fig.cpu_user_system[1]:.2f}"),
        ("kaobs CPU per packet on the bridge / per packet it read", f"{fig.cpu_us_per_packet:.2f} us / {fig.cpu_us_per_read:.2f} us"),
        ("kaobs CPU over its life (start-up included)",
         f"{fig.cpu_total_s:.2f} s in {fig.kaobs_life_s:.0f} s ({100 * fig.cpu_total_s / max(fig.kaobs_life_s, 1e-9):.1f} %)"),
        ("keepalive probes + aborts in tcpdump's file (kaobs analyze)",
         f"{fig.reference_probes} + {fig.reference_aborts}"),
        ("... of them reported by kaobs watch (same connection, side, ±5 ms)",
         f"{found} of {fig.reference_probes + fig.reference_aborts}"),
    ]
    if fig.tshark_probes is not None:
        rows.append(("tshark tcp.analysis.keep_alive probes / missing from kaobs watch",
                     f"{fig.tshark_probes} / {fig.tshark_missing}"))
    if fig.runqueue_wait_percent is not None:
        rows.append(("kaobs runnable but waiting for a CPU during the load", f"{fig.runqueue_wait_percent:.1f} % of the time"))
    if fig.longest_stall_s is not None:
        rows.append(("kaobs's longest stretch without any CPU during the load (sampled every 0.1 s)",
                     f"{fig.longest_stall_s:.1f} s"))
    if fig.table_cpu_percent is not None:
        rows.append(("second kaobs watch with the live table on a terminal: CPU during the load / kernel drops",
                     f"{fig.table_cpu_percent:.1f} % / {'?' if fig.table_drops is None else fig.table_drops}"))
    if fig.load_average:
        rows.append(("machine load average at the end of the load (2 CPUs)", fig.load_average))
    if fig.stop_s is not None:
        rows.append(("kaobs watch: SIGINT to exit", f"{fig.stop_s:.2f} s"))
    rows.append(("verdict (no drops, every probe, < 10 % of a core)", "PASS" if ok else "FAIL: " + "; ".join(reasons)))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


# -- I/O ------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def veth_packets(pid: int) -> int:
    """rx + tx packets of eth0 in the network namespace of `pid` (/proc/<pid>/net/dev)."""
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "eth0":
                numbers = rest.split()
                return int(numbers[1]) + int(numbers[9])
    raise BenchError("the server container has no eth0")


def read_cpu_split(pid: int) -> tuple[float, float] | None:
    """(utime, stime) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
    except OSError:
        return None
    fields = line[line.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def read_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return cpu_seconds(f.read())
    except OSError:
        return None


def read_schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of the process's main thread."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
        return int(run_ns), int(wait_ns)
    except (OSError, ValueError):
        return None


def has_packet_socket(pid: int) -> bool:
    """Does `pid` hold an AF_PACKET socket yet? (its capture is open)"""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/packet") as f:
            next(f)
            return any(line.split()[-1] in inodes for line in f)
    except (OSError, StopIteration, IndexError):
        return False


class TableWatch:
    """A second `kaobs watch` whose stdout is a terminal (a pty of 50x160): the rich live table, redrawn as it runs.

    The pty is drained by a `cat` at the same priority as kaobs into a file
    (a terminal that is not read blocks its writer, and this script may be
    starved on a busy machine); the final report's "the kernel dropped N of
    M packets" warning gives its drops.
    """

    def __init__(self, bridge: str, args: argparse.Namespace, workdir: str) -> None:
        import fcntl
        import pty
        import termios

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.output = os.path.join(workdir, "table.out")
        with open(self.output, "wb") as out:
            self.drain = subprocess.Popen(["cat"], stdin=master, stdout=out, start_new_session=True,
                                          preexec_fn=niceness(args.nice))
        self.proc = subprocess.Popen(
            ["kaobs", "watch", "--interface", bridge, "--duration", str(args.seconds + 240)],
            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=dict(os.environ, TERM="xterm", **args.watch_env),
            start_new_session=True, preexec_fn=niceness(args.nice))
        os.close(slave)
        os.close(master)

    def finish(self) -> int | None:
        """SIGINT, wait, and the kernel drops its report names (0 when it names none)."""
        stop_process(self.proc, signal.SIGINT, timeout=60)
        try:
            self.drain.wait(timeout=10)  # ends once the pty's last writer closed it
        except subprocess.TimeoutExpired:
            stop_process(self.drain)
        with open(self.output, "rb") as f:
            f.seek(max(0, os.path.getsize(self.output) - 20000))
            tail = f.read()
        text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", tail).decode(errors="replace")
        match = re.search(r"kernel dropped (\d+) of", text)
        if match:
            return int(match.group(1))
        return 0 if re.search(r"connection\(s\):|No Postgres connection", text) else None


class StallWatch:
    """Samples a process's run time every 0.1 s during the load: the longest stretch it got no CPU at all.

    A capture survives a stall only while its buffer lasts (kaobs's ring: ~5 s of 60k packets/s).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = read_schedstat(self.pid)
        since = time.monotonic()
        while not self._stop.wait(0.1):
            now_stat = read_schedstat(self.pid)
            now = time.monotonic()
            if now_stat is None or last is None:
                return
            if now_stat[0] != last[0]:
                since = now
            self.longest = max(self.longest, now - since)
            last = now_stat

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(1)
        return self.longest


class LineReader:
    """A subprocess's stdout lines on a queue (so waits are bounded)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        thread.start()

    def _run(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise BenchError(f"a lab client ended before '{event}'")
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "error":
                raise BenchError(f"a lab client failed: {record.get('message')}")
            if record.get("event") == event:
                return record
        raise BenchError(f"a lab client did not report '{event}' within {timeout:g} s")


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """End one process we started, by its pid."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass


def niceness(increment: int):
    """A preexec_fn giving the child (in a session of its own) `increment` of niceness.

    With autogroup scheduling a process's nice only ranks it within its
    session's group; the group itself competes with the others by the nice
    written to /proc/self/autogroup, so both are set.
    """
    if not increment:
        return None

    def apply() -> None:
        os.nice(increment)
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(increment))
        except OSError:
            pass

    return apply


def check_prerequisites(image: str) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (packet capture, nsenter, iptables)")
    for tool in ("docker", "tcpdump", "nsenter", "iptables"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if shutil.which("kaobs") is None:
        raise BenchError("the kaobs command is not installed (pip install -e .)")


def run(args: argparse.Namespace) -> Figures:
    check_prerequisites(args.image)
    run_id = "bench-" + secrets.token_hex(3)
    scenario = Scenario(server_settings=SERVER_SETTINGS, client_params=CLIENT_KEEPALIVES,
                        sessions=tuple(Session() for _ in range(args.idle_sessions)), fault=FAULT_NONE,
                        duration=min(600.0, args.seconds + 120))
    lifetime = args.seconds + 300  # every container ends by itself even if this process is killed
    workdir = tempfile.mkdtemp(prefix="kaobs-bench-")
    pcap = os.path.join(workdir, "tcpdump.pcap")
    procs: list[subprocess.Popen] = []
    fig = Figures(seconds=args.seconds, nice=args.nice,
                  pgbench_args=f"-c {args.clients} -j {args.threads} -S -M {args.protocol}")
    env = LabEnvironment(scenario, args.image, run_id=run_id, log=log, lifetime=lifetime)
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        log(f"lab {run_id}: network, server, client containers")
        env.start()
        assert env.server is not None and env.client is not None
        bridge = env.bridge
        for role in ("vanisher", "pgbench"):
            docker("run", "-d", "--name", f"kaobs-lab-{run_id}-{role}", "--network", env.network, *labels(run_id),
                   "--entrypoint", "sleep", args.image, str(lifetime), timeout=120)
        vanisher = env._endpoint(f"kaobs-lab-{run_id}-vanisher")
        pg_env = dict(os.environ, PGPASSWORD=env.password)
        pgbench_base = ["docker", "exec", "-e", "PGPASSWORD", f"kaobs-lab-{run_id}-pgbench", "pgbench",
                        "-h", env.server.ip, "-p", str(PORT), "-U", "postgres"]
        log("pgbench -i (before the captures start)")
        done = subprocess.run(pgbench_base + ["-i", "-q", "-s", "1", "postgres"], env=pg_env,
                              capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise BenchError(f"pgbench -i failed: {' '.join(done.stderr.split())[-300:]}")

        log(f"tcpdump and kaobs watch on {bridge}")
        tcpdump = subprocess.Popen(
            ["tcpdump", "-i", bridge, "-n", "-s", "96", "-B", str(64 * 1024), "-w", pcap, f"tcp port {PORT}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=niceness(args.nice))
        procs.append(tcpdump)
        kaobs_out = open(os.path.join(workdir, "watch.json"), "w+")
        kaobs_err = open(os.path.join(workdir, "watch.stderr"), "w+")
        watch_cmd = ["kaobs", "watch", "--interface", bridge, "--duration", str(args.seconds + 240),
                     "--format", "json", *args.watch_arg]
        kaobs_started = time.monotonic()
        # Own sessions: with autogroup scheduling (kernel.sched_autogroup_enabled) a session shares one CPU
        # share, and kaobs or tcpdump would otherwise compete with this script and the lab clients.
        kaobs = subprocess.Popen(watch_cmd, stdout=kaobs_out, stderr=kaobs_err, env=dict(os.environ, **args.watch_env),
                                 start_new_session=True, preexec_fn=niceness(args.nice))
        procs.append(kaobs)
        table = TableWatch(bridge, args, workdir) if args.table else None
        if table is not None:
            procs += [table.proc, table.drain]
        deadline = time.monotonic() + 30
        while not has_packet_socket(kaobs.pid):
            if kaobs.poll() is not None or time.monotonic() > deadline:
                kaobs_err.seek(0)
                raise BenchError(f"kaobs watch did not start capturing: {kaobs_err.read().strip()[-300:]}")
            time.sleep(0.1)
        time.sleep(0.5)

        log(f"{args.idle_sessions} idle sessions + 1 that will vanish")
        idle_client = env.start_client(max_seconds=args.seconds + 120)
        procs.append(idle_client)
        vanisher_spec = client_spec(scenario.with_(sessions=(Session(),)), env.server.ip, args.seconds + 120)
        client_env = dict(os.environ, PGPASSWORD=env.password, PYTHONUNBUFFERED="1")
        vanisher_client = subprocess.Popen(
            ["nsenter", f"--net={vanisher.netns}", sys.executable, "-m", "kaobs.lab.client", "--spec",
             json.dumps(vanisher_spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=client_env, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        procs.append(vanisher_client)
        LineReader(idle_client).wait_for("ready", 30)
        LineReader(vanisher_client).wait_for("ready", 30)
        time.sleep(args.warmup)  # a few probe rounds before the load

        log(f"pgbench -c {args.clients} -j {args.threads} -T {args.seconds:g} -S -M {args.protocol}")
        cpu0, veth0, t0 = read_cpu(kaobs.pid), veth_packets(env.server.pid), time.monotonic()
        table_cpu0 = read_cpu(table.proc.pid) if table is not None else None
        sched0 = read_schedstat(kaobs.pid)
        stalls = StallWatch(kaobs.pid)
        split0 = read_cpu_split(kaobs.pid)
        pgbench = subprocess.Popen(
            pgbench_base + ["-c", str(args.clients), "-j", str(args.threads), "-T", str(int(args.seconds)), "-S",
                            "-n", "-M", args.protocol, "postgres"], env=pg_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(pgbench)
        time.sleep(args.seconds / 3)
        log("the vanishing client's namespace drops everything now")
        for chain in ("INPUT", "OUTPUT"):
            done = subprocess.run(["nsenter", f"--net={vanisher.netns}", "iptables", "-w", "5", "-I", chain, "-j", "DROP"],
                                  capture_output=True, text=True, timeout=20)
            if done.returncode != 0:
                raise BenchError(f"iptables in the vanisher's namespace failed: {done.stderr.strip()}")
        try:
            out, _ = pgbench.communicate(timeout=args.seconds + 120)
        except subprocess.TimeoutExpired:
            raise BenchError("pgbench did not finish in time") from None
        cpu1, veth1, t1 = read_cpu(kaobs.pid), veth_packets(env.server.pid), time.monotonic()
        table_cpu1 = read_cpu(table.proc.pid) if table is not None else None
        if table_cpu0 is not None and table_cpu1 is not None:
            fig.table_cpu_percent = 100 * (table_cpu1 - table_cpu0) / (t1 - t0)
        sched1 = read_schedstat(kaobs.pid)
        fig.longest_stall_s = stalls.stop()
        split1 = read_cpu_split(kaobs.pid)
        if split0 and split1:
            fig.cpu_user_system = (split1[0] - split0[0], split1[1] - split0[1])
        if sched0 and sched1:
            fig.runqueue_wait_percent = 100 * (sched1[1] - sched0[1]) / 1e9 / (t1 - t0)
        match = re.search(r"tps = ([\d.]+)", out or "")
        fig.pgbench_tps = float(match.group(1)) if match else None
        if pgbench.returncode != 0:
            log(f"pgbench exit {pgbench.returncode}: {' '.join((out or '').split())[-300:]}")
        load_s = t1 - t0
        fig.seconds = load_s
        fig.pps_veth = (veth1 - veth0) / load_s
        if cpu0 is None or cpu1 is None:
            raise BenchError("kaobs watch ended during the load")
        fig.cpu_load_percent = 100 * (cpu1 - cpu0) / load_s
        fig.cpu_us_per_packet = 1e6 * (cpu1 - cpu0) / max(1, veth1 - veth0)
        with open("/proc/loadavg") as f:
            fig.load_average = " ".join(f.read().split()[:3])
        time.sleep(args.tail)  # idle probes after the load, seen by both

        cpu_end = read_cpu(kaobs.pid) or cpu1
        sigint_t = time.monotonic()
        kaobs.send_signal(signal.SIGINT)
        try:
            kaobs.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise BenchError("kaobs watch did not end within 60 s of SIGINT") from None
        fig.stop_s = time.monotonic() - sigint_t
        if table is not None:
            fig.table_drops = table.finish()
        fig.cpu_total_s = cpu_end
        fig.kaobs_life_s = sigint_t - kaobs_started
        time.sleep(0.3)
        stop_process(tcpdump, signal.SIGINT)
        counts = parse_tcpdump_counts(tcpdump.stderr.read() if tcpdump.stderr else "")
        fig.tcpdump_packets = counts.get("captured", 0)
        fig.tcpdump_drops = counts.get("dropped by kernel")
        kaobs_out.seek(0)
        try:
            watched = json.load(kaobs_out)
        except ValueError:
            kaobs_err.seek(0)
            raise BenchError(f"kaobs watch gave no JSON report: {kaobs_err.read().strip()[-300:]}") from None
        shutil.copy(kaobs_out.name, os.path.join(args.keep, "watch.json")) if args.keep else None
        inputs = watched["input"]
        fig.kaobs_packets = inputs["packets"]
        fig.kaobs_drops = inputs.get("kernel_drops")
        fig.kaobs_path = inputs.get("capture_path") or "?"
        load_packets = fig.pps_veth * fig.seconds
        fig.cpu_us_per_read = fig.cpu_us_per_packet * load_packets / max(1.0, load_packets - (fig.kaobs_drops or 0))
        fig.pps_tcpdump = fig.tcpdump_packets / max(1e-9, (inputs["end"] or 0) - (inputs["start"] or 0))

        log("kaobs analyze on tcpdump's file")
        done = subprocess.run(["kaobs", "analyze", pcap, "--format", "json"], capture_output=True, text=True, timeout=900)
        if done.returncode not in (0, 1):
            raise BenchError(f"kaobs analyze failed: {done.stderr.strip()[-300:]}")
        reference = probes_of(json.loads(done.stdout))
        reported = probes_of(watched)
        window = (inputs["start"] + 0.05, inputs["end"] - 0.05)
        in_window = [p for p in reference if window[0] <= p.t <= window[1]]
        fig.reference_probes = sum(1 for p in in_window if p.kind == "probe")
        fig.reference_aborts = sum(1 for p in in_window if p.kind == "abort")
        fig.missing, _ = missing_from(in_window, reported)
        if args.tshark:
            fig.tshark_probes, fig.tshark_missing = tshark_check(pcap, reported, window)
        if args.keep:
            shutil.copy(pcap, os.path.join(args.keep, "tcpdump.pcap"))
        return fig
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        signal.signal(signal.SIGTERM, previous_sigterm)
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def tshark_check(pcap: str, reported: list[ProbeSeen], window: tuple[float, float]) -> tuple[int, int]:
    """Probes tshark flags as keep-alives (data-less or 1-byte, seq = next - 1), matched to kaobs watch's.

    tshark knows no sides: a probe from the server port is the server's.
    """
    if shutil.which("tshark") is None:
        raise BenchError("tshark is not installed")
    done = subprocess.run(
        ["tshark", "-n", "-r", pcap, "-Y", "tcp.analysis.keep_alive", "-T", "fields", "-e", "frame.time_epoch",
         "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport"],
        capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise BenchError(f"tshark failed: {done.stderr.strip()[-300:]}")
    probes = []
    for line in done.stdout.splitlines():
        t, src, sport, dst, dport = line.split("\t")
        if int(sport) == PORT:
            probes.append(ProbeSeen(f"{dst}:{dport}", f"{src}:{sport}", "server", float(t)))
        else:
            probes.append(ProbeSeen(f"{src}:{sport}", f"{dst}:{dport}", "client", float(t)))
    missing, compared = missing_from(probes, reported, start=window[0], end=window[1])
    return compared, len(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="prepared",
                        help="pgbench -M (default prepared: the cheapest per query, so the most packets/s)")
    parser.add_argument("--idle-sessions", type=int, default=3, help="idle persistent sessions that probe (default 3)")
    parser.add_argument("--warmup", type=float, default=4.0, help="idle probing before the load, s")
    parser.add_argument("--tail", type=float, default=4.0, help="idle probing after the load, s")
    parser.add_argument("--image", default=LOCAL_IMAGE)
    parser.add_argument("--tshark", action="store_true", help="also check tshark's keep-alive probes (slow)")
    parser.add_argument("--keep", metavar="DIR", help="keep tcpdump.pcap and watch.json here")
    parser.add_argument("--watch-arg", action="append", default=[], help="extra argument for kaobs watch")
    parser.add_argument("--watch-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for kaobs watch (e.g. KAOBS_CAPTURE=socket)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--table", action="store_true",
                        help="also run a second kaobs watch with the live table on a terminal (a pty) and measure it")
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="run kaobs watch and tcpdump with this niceness increment (e.g. -10 on a machine busy "
                             "with other work; both get the same)")
    args = parser.parse_args(argv)
    if not 5 <= args.seconds <= 300:
        print("bench_watch_load: error: --seconds must be in [5, 300]", file=sys.stderr)
        return 2
    try:
        args.watch_env = dict(item.split("=", 1) for item in args.watch_env)
    except ValueError:
        print("bench_watch_load: error: --watch-env takes NAME=VALUE", file=sys.stderr)
        return 2
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    try:
        fig = run(args)
    except (BenchError, LabError) as error:
        print(f"bench_watch_load: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_watch_load: interrupted", file=sys.stderr)
        return 2
    print(table(fig))
    for p in fig.missing[:20]:
        print(f"missing from kaobs watch: {p.kind} {p.side} {p.client} -> {p.server} at {p.t:.6f}")
    if args.json:
        with open(args.json, "w") as f:
            data = {k: getattr(fig, k) for k in Figures.__slots__ if k != "missing"}
            data["missing"] = [p.__dict__ if hasattr(p, "__dict__") else [p.client, p.server, p.side, p.t, p.kind]
                               for p in fig.missing]
            data["verdict"] = fig.verdict()
            json.dump(data, f, indent=1)
    return 0 if fig.verdict()[0] else 1


if __name__ == "__main__":
    sys.exit(main())
