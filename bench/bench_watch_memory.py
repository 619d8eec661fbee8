#!/usr/bin/env python3
"""Memory benchmark: does `kaobs watch` stay flat while connections come and go? (issue 12)

Run as root: ``python3 bench/bench_watch_memory.py [--connections 100000]``.

A plain socket server on a free loopback port accepts connections, reads the
client's 100 bytes and closes; a client loop opens and closes
`--connections` short TCP connections to it, one after another (from
127.0.0.2-127.0.0.254 in turn, so that TIME_WAIT never runs out of ports),
bounded in count and in time (`--max-seconds`). Meanwhile:

* ``kaobs watch -i lo --port P --format json`` (this checkout, or the one
  `--kaobs-root` names: a worktree of another commit, for before/after);
* ``tcpdump -i lo -w /dev/null port P``: the yardstick for the capture side
  (what merely reading the packets costs).

It prints the resident memory (VmRSS) of both after the warm-up and every
`--every` connections, the growth after the warm-up, and then, after
SIGINT, the peak resident memory of kaobs while it writes the final JSON
report (sampled every 20 ms, and the kernel's VmHWM high-water mark), the
report's size, and how many connections it holds. Exit status 0 when the
growth after warm-up is within `--target-mb` (20 MB, the issue's target),
1 when not, 2 when the benchmark could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = b"q" * 100
SOURCES = [f"127.0.0.{i}" for i in range(2, 255)]


def status_kb(pid: int, key: str) -> int | None:
    """A `/proc/<pid>/status` field in kB (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return parse_status(status.read()).get(key)
    except OSError:
        return None


def parse_status(text: str) -> dict[str, int]:
    """The kB fields of a /proc status file."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0])
    return out


class Listener:
    """A plain TCP server on loopback: accept, read what the client sends, close (the server's FIN first)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(2)
                conn.recv(len(PAYLOAD))
            except OSError:
                pass
            finally:
                conn.close()
                self.accepted += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def one_connection(port: int, source: str) -> bool:
    """Open, send 100 bytes, wait for the server's close, close: one short connection. False if it failed."""
    try:
        with socket.socket() as conn:
            conn.settimeout(2)
            conn.bind((source, 0))
            conn.connect(("127.0.0.1", port))
            conn.sendall(PAYLOAD)
            conn.recv(1)  # the server's FIN
        return True
    except OSError:
        return False


@dataclass
class Sample:
    connections: int
    seconds: float
    kaobs_kb: int | None
    tcpdump_kb: int | None


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)
    failed: int = 0
    final_peak_kb: int | None = None
    final_hwm_kb: int | None = None
    final_seconds: float | None = None
    json_bytes: int = 0
    json_connections: int | None = None
    kernel_drops: int | None = None
    tcpdump_counts: str = ""


def churn(port: int, total: int, every: int, warmup: int, warmup_seconds: float, deadline: float,
          sample) -> tuple[int, int]:
    """A warm-up (`warmup` connections and `warmup_seconds`, whichever is longer: the model holds the connections
    that ended in the last few seconds, so it reaches its size only then), then `total` connections, sampling after
    the warm-up and every `every`; returns (connections after the warm-up, failed)."""
    done = failed = 0
    started = time.monotonic()
    warm = None
    while time.monotonic() < deadline:
        if warm is None and done >= warmup and time.monotonic() - started >= warmup_seconds:
            warm = done
            time.sleep(1.5)  # let kaobs read what is in its ring
            sample(0, time.monotonic() - started)
        if warm is not None and done - warm >= total:
            break
        if not one_connection(port, SOURCES[done % len(SOURCES)]):
            failed += 1
            if failed > 1000 + done // 10:
                break
        done += 1
        if warm is not None and (done - warm) % every == 0:
            time.sleep(1.5)
            sample(done - warm, time.monotonic() - started)
    return done - (warm or 0), failed


def settle(pid: int, seconds: float = 4.0) -> None:
    """Let the capture catch up and the last connections linger out (a new flow then retires them)."""
    time.sleep(seconds)


def run(args) -> Result:
    if os.geteuid() != 0:
        raise SystemExit("bench_watch_memory: live capture needs root")
    listener = Listener()
    port = listener.port
    workdir = tempfile.mkdtemp(prefix="kaobs-bench-memory-")
    report_path = os.path.join(workdir, "report.json")
    env = {**os.environ, "PYTHONPATH": args.kaobs_root}
    result = Result()
    kaobs = tcpdump = None
    try:
        with open(report_path, "w") as report:
            kaobs = subprocess.Popen([sys.executable, "-m", "kaobs", "watch", "-i", "lo", "--port", str(port),
                                      "--format", "json", "--quiet"],
                                     cwd=args.kaobs_root, env=env, stdout=report, stderr=subprocess.PIPE, text=True)
        if args.tcpdump and shutil.which("tcpdump"):
            tcpdump = subprocess.Popen(["tcpdump", "-i", "lo", "-w", "/dev/null", "port", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(3.0)  # both started and capturing
        if kaobs.poll() is not None:
            raise SystemExit(f"bench_watch_memory: kaobs watch ended at once: {kaobs.stderr.read().strip()}")

        def sample(connections: int, seconds: float) -> None:
            point = Sample(connections, seconds, status_kb(kaobs.pid, "VmRSS"),
                           status_kb(tcpdump.pid, "VmRSS") if tcpdump is not None else None)
            result.samples.append(point)
            print(f"  {connections:>7} connections after warm-up, {seconds:6.1f} s: kaobs {_mb(point.kaobs_kb)}, "
                  f"tcpdump {_mb(point.tcpdump_kb)}", flush=True)

        deadline = time.monotonic() + args.max_seconds
        done, result.failed = churn(port, args.connections, args.every, args.warmup, args.warmup_seconds, deadline,
                                    sample)
        if not result.samples:
            raise SystemExit("bench_watch_memory: the warm-up did not end within --max-seconds")
        settle(kaobs.pid)
        one_connection(port, SOURCES[0])  # a new flow: the model sweeps what ended
        time.sleep(1.5)
        sample(done, time.monotonic() - deadline + args.max_seconds)
        # The final report: SIGINT, then sample its memory every 20 ms until it is written.
        hwm_before = status_kb(kaobs.pid, "VmHWM")
        stopped = time.monotonic()
        kaobs.send_signal(signal.SIGINT)
        peak = 0
        while kaobs.poll() is None:
            rss = status_kb(kaobs.pid, "VmRSS")
            hwm = status_kb(kaobs.pid, "VmHWM")
            if rss is not None:
                peak = max(peak, rss)
            if hwm is not None:
                result.final_hwm_kb = hwm
            time.sleep(0.02)
            if time.monotonic() - stopped > args.max_seconds:
                kaobs.kill()
        result.final_seconds = time.monotonic() - stopped
        result.final_peak_kb = peak or None
        if result.final_hwm_kb is not None and hwm_before is not None and result.final_hwm_kb <= hwm_before:
            result.final_hwm_kb = None  # the run's high-water mark was before the report: not the report's
        err = kaobs.stderr.read()
        if kaobs.returncode not in (0, 1):
            raise SystemExit(f"bench_watch_memory: kaobs watch failed ({kaobs.returncode}): {err.strip()[-500:]}")
        result.json_bytes = os.path.getsize(report_path)
        try:
            with open(report_path) as report:
                document = json.load(report)
            result.json_connections = document["summary"]["connections"]
            result.kernel_drops = document["input"].get("kernel_drops")
        except (OSError, ValueError, KeyError):
            pass
    finally:
        for process in (kaobs, tcpdump):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        if tcpdump is not None:
            result.tcpdump_counts = " ".join(line.strip() for line in (tcpdump.stderr.read() or "").splitlines()
                                             if "packets" in line)
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MB"


def growth(samples: list[Sample], which: str) -> float | None:
    """MB gained from the first sample (after warm-up) to the largest after it."""
    values = [getattr(s, which) for s in samples if getattr(s, which) is not None]
    if len(values) < 2:
        return None
    return (max(values[1:]) - values[0]) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100_000, help="connections after the warm-up")
    parser.add_argument("--warmup", type=int, default=5_000, help="connections before the first figure (at least)")
    parser.add_argument("--warmup-seconds", type=float, default=10.0, help="seconds before the first figure (at least)")
    parser.add_argument("--every", type=int, default=10_000, help="a figure every this many connections")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop the churn after this long")
    parser.add_argument("--target-mb", type=float, default=20.0, help="the most kaobs may grow after warm-up")
    parser.add_argument("--kaobs-root", default=ROOT, help="the kaobs checkout to run (a worktree, for before/after)")
    parser.add_argument("--no-tcpdump", dest="tcpdump", action="store_false", help="no tcpdump yardstick")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.kaobs_root, "kaobs")):
        print(f"bench_watch_memory: --kaobs-root {args.kaobs_root}: no kaobs checkout there", file=sys.stderr)
        return 2
    if min(args.connections, args.every, args.warmup) < 1 or args.max_seconds <= 0:
        print("bench_watch_memory: --connections, --every, --warmup and --max-seconds must be positive",
              file=sys.stderr)
        return 2
    print(f"kaobs watch -i lo (from {args.kaobs_root}) and tcpdump -i lo -w /dev/null; a warm-up of {args.warmup} "
          f"connections and {args.warmup_seconds:g} s, then {args.connections}:", flush=True)
    try:
        result = run(args)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 2
    kaobs_growth, tcpdump_growth = growth(result.samples, "kaobs_kb"), growth(result.samples, "tcpdump_kb")
    first, last = result.samples[0], result.samples[-1]
    print()
    print("| | after warm-up | at the end | growth (max - first) |")
    print("|---|---|---|---|")
    print(f"| kaobs watch RSS | {_mb(first.kaobs_kb)} | {_mb(last.kaobs_kb)} | "
          f"{'-' if kaobs_growth is None else f'{kaobs_growth:+.1f} MB'} |")
    print(f"| tcpdump RSS | {_mb(first.tcpdump_kb)} | {_mb(last.tcpdump_kb)} | "
          f"{'-' if tcpdump_growth is None else f'{tcpdump_growth:+.1f} MB'} |")
    print()
    print(f"connections churned after warm-up: {last.connections} ({result.failed} failed); "
          f"in kaobs's report: {result.json_connections}; kernel drops: {result.kernel_drops}")
    if result.tcpdump_counts:
        print(f"tcpdump: {result.tcpdump_counts}")
    print(f"final JSON report: {result.json_bytes / 1e6:.1f} MB written in {result.final_seconds or 0:.1f} s, "
          f"peak RSS while writing it {_mb(result.final_peak_kb)}"
          + (f" (VmHWM {_mb(result.final_hwm_kb)})" if result.final_hwm_kb else ""))
    within = kaobs_growth is not None and kaobs_growth <= args.target_mb
    print(f"target: growth within {args.target_mb:g} MB after warm-up: {'met' if within else 'NOT met'}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
