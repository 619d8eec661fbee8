#!/usr/bin/env python3
"""Re-record the real captures of captures/manifest.json from PostgreSQL 15 in Docker.

    python3 captures/record.py                 # every recordable entry, into captures/
    python3 captures/record.py --out /tmp/x    # somewhere else (the privileged test does this)
    python3 captures/record.py --only dead_client_idle3_int2_cnt3.pcap

Why a script: a capture in the repository is only evidence if anybody can make
it again and see the same thing. Every entry of the manifest carries the
server's GUCs, the client's libpq parameters and per-session settings, the
sysctls of both network namespaces and a small plan (when the client
vanishes, how long it holds its connections, which interface is captured,
IPv4 or IPv6); this script turns that into the lab of `kaobs lab` plus a
tcpdump, and the tests judge the result with the same `must_show` assertions
as the committed files.

One recording, start to end (bounded in time, all on this machine):
  1. `kaobs.lab.docker.LabEnvironment`: an internal Docker network of its own
     labelled kaobs.lab=capt-<random>, the server (kaobs/postgres:15-local,
     `postgres --tcp_keepalives_idle=3 ...`, `--sysctl`s), and the client's
     network namespace (a `sleep` container of the same image);
  2. for IPv6, a second internal network with a random ULA /64, same labels,
     that both containers join (labenv's network is IPv4 only);
  3. tcpdump, the standard tool and not kaobs's own capture code (so the tests
     read files kaobs did not write), on the lab bridge or on `-i any -y
     LINUX_SLL2`, filtered on the server's address and port, snaplen 128;
  4. the psycopg client `kaobs.lab.client` in the client's namespace (via
     nsenter): it opens the sessions, applies their settings, then idles for
     `hold` seconds (or until the end) and drops its sockets;
  5. "the client vanishes" at `vanish_after` seconds after the client is idle:
     labenv's iptables DROP of everything in its namespace (plus ip6tables for
     IPv6), so it neither answers nor sends and no FIN/RST is ever seen;
  6. after `capture_seconds` tcpdump stops and each record is cut at the end of
     its TCP header by kaobs's `strip_payloads` (original length kept): headers
     only, no query text; a .pcapng entry is then converted by editcap;
  7. everything labelled with this run's id is removed, whatever happened.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from analysis.settings import CLIENT  # noqa: E402
from kaobs.lab.docker import (  # noqa: E402
    IMAGE_ENV,
    LOCAL_IMAGE,
    LabEnvironment,
    docker,
    labels,
    nsenter,
)
from kaobs.lab.scenario import (  # noqa: E402
    FAULT_CLIENT_RETURNS,
    FAULT_CLIENT_VANISHES,
    FAULT_MIDDLEBOX_DROP,
    FAULT_NONE,
    LabError,
    Scenario,
    Session,
)
from sniffer.pcapwrite import strip_payloads  # noqa: E402

MANIFEST = HERE / "manifest.json"
SNAPLEN = 128  # tcpdump's cut; each record is then cut at the end of its TCP header
STEP_TIMEOUT = 30
SCENARIOS = ("client_vanishes", "healthy", "stop_reading", "middlebox", "client_returns")
SIDE_BRIDGE = {"server": "bridge", "client": "client_bridge"}
"""With a router (middlebox), which lab bridge a side's capture is taken on."""


class RecordError(RuntimeError):
    """A recording could not be made (Docker, tcpdump or the client failed)."""


# -- the manifest -----------------------------------------------------------------


def load_manifest(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["captures"]


def recordable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries this script can make again (the user's seed capture is not one)."""
    return [e for e in entries if e["how"].get("scenario")]


def scenario_of(entry: dict[str, Any]) -> Scenario:
    """The lab scenario of a manifest entry (pure: the manifest's settings as labenv data)."""
    how, settings = entry["how"], entry["settings"]
    if how["scenario"] not in SCENARIOS:
        raise RecordError(f"{entry['file']}: unknown scenario {how['scenario']!r}")
    server, client = settings["server"], settings["client"]

    def pairs(mapping: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return tuple((name, str(value)) for name, value in mapping.items())

    sessions = tuple(
        Session(options=pairs(s.get("options", {})), sets=pairs(s.get("sets", {})), stop_reading=bool(s.get("stop_reading")),
                every=s.get("every"), query_after=s.get("query_after"))
        for s in client["sessions"])
    fault = {"client_vanishes": FAULT_CLIENT_VANISHES, "client_returns": FAULT_CLIENT_RETURNS,
             "middlebox": how.get("fault", FAULT_MIDDLEBOX_DROP)}.get(how["scenario"], FAULT_NONE)
    return Scenario(
        server_settings=pairs(server.get("gucs", {})),
        server_sysctls=tuple((k, int(v)) for k, v in server.get("sysctls", {}).items()),
        client_sysctls=tuple((k, int(v)) for k, v in client.get("sysctls", {}).items()),
        client_params=pairs(client.get("libpq", {})),
        sessions=sessions,
        fault=fault,
        duration=float(how["capture_seconds"]),
        idle_cut=how.get("idle_cut"),
    )


# -- IPv6 -----------------------------------------------------------------------------


def join_ipv6_network(env: LabEnvironment) -> tuple[str, str]:
    """Put the lab's server and client on a second, IPv6 internal network; (its bridge, the server's IPv6 address).

    Same labels as the lab, so the lab's cleanup removes it too. The /64 is a
    random ULA (RFC 4193), so it does not meet another lab's subnet.
    """
    assert env.server is not None and env.client is not None
    groups = secrets.token_hex(5)
    subnet = f"fd{groups[:2]}:{groups[2:6]}:{groups[6:10]}:6::/64"
    name = f"{env.network}-v6"
    network_id = docker("network", "create", "--internal", "--ipv6", "--subnet", subnet,
                        *labels(env.run_id), name, timeout=60).strip()
    for endpoint in (env.server, env.client):
        docker("network", "connect", name, endpoint.name, timeout=60)
    fmt = "{{(index .NetworkSettings.Networks \"" + name + "\").GlobalIPv6Address}}"
    address = docker("inspect", "-f", fmt, env.server.name, timeout=30).strip()
    if not address:
        raise RecordError(f"the server got no IPv6 address on {name}")
    return f"br-{network_id[:12]}", address


def cut_off_ipv6(env: LabEnvironment) -> None:
    """labenv's vanish drops IPv4 only (iptables); drop IPv6 in the client's namespace too."""
    assert env.client is not None
    for chain in ("INPUT", "OUTPUT"):
        done = nsenter(env.client, "ip6tables", "-w", "5", "-I", chain, "-j", "DROP")
        if done.returncode != 0:
            raise RecordError(f"ip6tables in the client's namespace: {' '.join(done.stderr.split())}")


# -- reading a child's lines ---------------------------------------------------------------


class Lines:
    """A child's output lines through a thread and a queue.

    select() on a pipe plus a buffered readline() loses lines: one read can
    pull several lines into the buffer, and select() then waits for bytes that
    already came. A reader thread has no such trap, and `get` has a timeout.
    """

    def __init__(self, stream) -> None:
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def get(self, timeout: float) -> str | None:
        """The next line; "" when none came within `timeout`; None at the end of the output."""
        try:
            line = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return ""
        if line is not None:
            self._seen.append(line)
        return line

    def rest(self, timeout: float = 5.0) -> str:
        """Everything seen and still to come (the child has ended or is ending)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self._seen.append(line)
        return "".join(self._seen)


def wait_for_line(lines: Lines, accept, what: str, timeout: float = STEP_TIMEOUT) -> None:
    """Wait until `accept(line)` says yes (True) or fails (a message); RecordError at the end of output or time."""
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(deadline - time.monotonic())
        if line is None:
            break
        verdict = accept(line) if line else None
        if verdict is True:
            return
        if isinstance(verdict, str):
            raise RecordError(f"{what}: {verdict}")
        if not line and time.monotonic() >= deadline:
            break
    raise RecordError(f"{what}: {' '.join(lines.rest(0.5).split())[-300:] or 'no output'}")


# -- tcpdump -----------------------------------------------------------------------------


class Tcpdump:
    """tcpdump on one interface, filtered on the server; started before the client connects."""

    def __init__(self, interface: str, server_ip: str, port: int, path: Path) -> None:
        argv = ["tcpdump", "-i", interface, "-s", str(SNAPLEN), "-U", "-n", "-w", str(path)]
        if interface == "any":
            argv += ["-y", "LINUX_SLL2"]
        argv += [f"host {server_ip} and tcp port {port}"]
        self.argv = argv
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = Lines(self.process.stderr)
        try:
            wait_for_line(self.lines, lambda line: "listening on" in line or None, "tcpdump did not start", 10)
        except RecordError:
            self.stop()
            raise

    def stop(self) -> str:
        """SIGINT (tcpdump flushes and prints its counts), bounded; returns what it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.lines.rest()


# -- headers only ------------------------------------------------------------------------


def cut_to_headers(src: Path, dst: Path) -> int:
    """Write `src` (tcpdump's pcap) to `dst` with each record cut at the end of its TCP header; the packet count.

    kaobs's own headers-only rewriter does the cut (the wire length stays, so
    payload sizes stay right; no query text or message content is kept). A
    `dst` ending in .pcapng is then converted by editcap, so one real capture
    also exercises the pcapng reader.
    """
    if not src.exists() or src.stat().st_size < 24:
        raise RecordError(f"tcpdump wrote no capture ({src})")
    if dst.suffix != ".pcapng":
        return strip_payloads(src, dst).packets
    stripped = src.with_name("stripped.pcap")
    packets = strip_payloads(src, stripped).packets
    sh_editcap = subprocess.run(["editcap", "-F", "pcapng", str(stripped), str(dst)], capture_output=True, text=True, timeout=60)
    if sh_editcap.returncode != 0:
        raise RecordError(f"editcap -F pcapng failed: {' '.join(sh_editcap.stderr.split())}")
    return packets


# -- one recording -------------------------------------------------------------------------------


@dataclass
class Recorded:
    file: str
    packets: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def image() -> str:
    return os.environ.get(IMAGE_ENV, LOCAL_IMAGE)


def wait_ready(lines: Lines) -> None:
    """Read the lab client's JSON lines until it says every session is idle ("ready")."""

    def accept(line: str):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if event.get("event") == "error":
            return f"the lab client failed: {event.get('message')}"
        return event.get("event") == "ready" or None

    wait_for_line(lines, accept, "the lab client did not get ready")


def stop_client(client: subprocess.Popen) -> None:
    """Our own client process, by its handle: stdin closed (it stops by itself), then SIGTERM, then SIGKILL."""
    if client.poll() is not None:
        return
    try:
        if client.stdin:
            client.stdin.close()
        client.terminate()
        client.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        client.kill()
        client.wait(timeout=5)


def record_entry(entry: dict[str, Any], out_dir: Path, companions: dict[str, dict[str, Any]] | None = None) -> Recorded:
    """Make one capture of the manifest again, into out_dir/entry["file"].

    An entry whose ``how.also`` names another entry (the same experiment
    captured on the other side of the router) is recorded in the same run,
    with one tcpdump on each side: `companions` maps file names to entries.
    """
    how = entry["how"]
    scenario = scenario_of(entry)
    began = time.monotonic()
    capture_seconds = float(how["capture_seconds"])
    hold = how.get("hold")
    also = (companions or {}).get(how.get("also", ""))
    with tempfile.TemporaryDirectory(prefix="kaobs-rec-") as tmp, \
            LabEnvironment(scenario, image(), run_id=f"capt-{secrets.token_hex(4)}", lifetime=capture_seconds + 120) as env:
        assert env.server is not None
        bridge, server_ip = env.bridge, env.server.ip
        if how.get("side") in SIDE_BRIDGE:
            bridge = getattr(env, SIDE_BRIDGE[how["side"]])
        if int(how.get("family", 4)) == 6:
            bridge, server_ip = join_ipv6_network(env)
            env.server.ip = server_ip  # the lab client connects to this address
        raw = Path(tmp) / "raw.pcap"
        dump = Tcpdump("any" if how.get("interface") == "any" else bridge, server_ip, scenario.port, raw)
        other = None
        if also is not None:
            other_raw = Path(tmp) / "other.pcap"
            other = Tcpdump(getattr(env, SIDE_BRIDGE[also["how"]["side"]]), server_ip, scenario.port, other_raw)
        client = None
        try:
            # The client idles `hold` seconds, then drops its sockets (FIN; RST with unread data);
            # without `hold` it outlives the capture and is stopped after it.
            client = env.start_client(max_seconds=float(hold) if hold is not None else capture_seconds + 10)
            wait_ready(Lines(client.stdout))
            t0 = time.monotonic()
            vanish = how.get("vanish_after")
            if vanish is not None:
                time.sleep(max(0.0, t0 + float(vanish) - time.monotonic()))
                env.vanish(CLIENT)
                if int(how.get("family", 4)) == 6:
                    cut_off_ipv6(env)
            returns = how.get("return_after")
            if returns is not None:
                # The cut heals; the client, none the wiser, closes its sessions (Terminate, FIN).
                time.sleep(max(0.0, t0 + float(returns) - time.monotonic()))
                env.heal(CLIENT)
                assert client.stdin is not None
                client.stdin.write("close\n")
                client.stdin.flush()
            time.sleep(max(0.0, t0 + capture_seconds - time.monotonic()))
        finally:
            tail = dump.stop()
            if other is not None:
                tail += other.stop()
            if client is not None:
                stop_client(client)
        out_dir.mkdir(parents=True, exist_ok=True)
        packets = cut_to_headers(raw, out_dir / entry["file"])
        if also is not None:
            packets += cut_to_headers(other_raw, out_dir / also["file"])
        notes = [line for line in tail.splitlines() if "dropped by kernel" in line and not line.startswith("0 ")]
    recorded = entry["file"] + (f" and {also['file']}" if also is not None else "")
    return Recorded(recorded, packets, time.monotonic() - began, notes)


def record_all(entries: list[dict[str, Any]], out_dir: Path, jobs: int = 1) -> list[Recorded]:
    """Record the given entries, `jobs` at a time (each in its own lab, so they do not meet)."""
    tools = ["tcpdump", "nsenter", "iptables", "ip6tables"] + (["editcap"] if any(e["file"].endswith(".pcapng") for e in entries) else [])
    for tool in tools:
        if shutil.which(tool) is None:
            raise RecordError(f"{tool} is needed (bash scripts/setup.sh installs it)")
    by_file = {e["file"]: e for e in entries}
    chosen, covered = [], set()
    for entry in entries:  # a pair is recorded once, by whichever of the two comes first
        if entry["file"] in covered:
            continue
        covered.update({entry["file"], entry["how"].get("also", "")})
        chosen.append(entry)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda e: record_entry(e, out_dir, by_file), chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the captures (default: captures/)")
    parser.add_argument("--only", action="append", default=[], metavar="FILE", help="record only this entry (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="recordings at a time (default 2)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("record.py: error: needs root (tcpdump, nsenter, iptables in a namespace)", file=sys.stderr)
        return 2
    entries = recordable(load_manifest(args.manifest))
    if args.only:
        unknown = set(args.only) - {e["file"] for e in entries}
        if unknown:
            print(f"record.py: error: not a recordable manifest entry: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        wanted = set(args.only) | {e["how"].get("also") for e in entries if e["file"] in args.only}
        entries = [e for e in entries if e["file"] in wanted]
    try:
        for done in record_all(entries, args.out, args.jobs):
            print(f"{done.file}: {done.packets} packets, recorded in {done.seconds:.1f} s", *done.notes)
    except (RecordError, LabError, subprocess.TimeoutExpired) as error:
        print(f"record.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
