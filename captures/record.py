#!/usr/bin/env python3
"""Re-record the real captures of captures/manifest.json from PostgreSQL 15 in Docker.

    python3 captures/record.py                 # every recordable entry, into captures/
    python3 captures/record.py --out /tmp/x    # somewhere else (the privileged test does this)
    python3 captures/record.py --only dead_client_idle3_int2_cnt3.pcap

Why a script: a capture in the repository is only evidence if anybody can make
it again and see the same thing. Every entry of the manifest carries the
server's GUCs, the client's libpq parameters, the sysctls and a small plan
(when the client vanishes, how long it holds the connection, which interface
is captured); this script turns that into Docker containers and a tcpdump, and
the tests judge the result with the same `must_show` assertions as the files
that are committed.

One recording, start to end (all bounded in time, all on this machine):
  1. an internal Docker network of our own (label kaobs.lab=capt-<random>,
     no route outside; IPv6 with a random ULA /64 when the entry asks for it);
  2. the server: kaobs/postgres:15-local with the GUCs as `-c name=value` and
     the server sysctls as `--sysctl`; trust authentication, so no password is
     ever on the wire;
  3. the client's network namespace: a container of the same image running
     `sleep`, with the client sysctls; the psycopg client runs on the host,
     inside that namespace, through nsenter (the image has no Python);
  4. tcpdump on the network's bridge (or `-i any -y LINUX_SLL2`), filtered on
     the server's address and port;
  5. faults: "the client vanishes" is an iptables DROP of everything to and
     from the server port inside the client's namespace, so its kernel neither
     answers nor sends anything and no FIN/RST is ever seen;
  6. the capture is cut to headers only (each record ends at the end of its
     TCP header; the original length is kept, so payload sizes stay right);
  7. everything labelled with this run's id is removed, whatever happened.

Docker is driven with the docker CLI; this file holds the minimal lab code it
needs because kaobs/labenv.py (the lab of `kaobs lab`) had not landed when the
captures were recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
IMAGE = os.environ.get("KAOBS_PG_IMAGE", "kaobs/postgres:15-local")
LAB_LABEL = "kaobs.lab"
RECORDER_LABEL = "kaobs.recorder=captures"
SNAPLEN = 128  # tcpdump's cut; record.py then cuts each record at the end of its TCP header
PG_PORT = 5432
CLIENT_MAX_SECONDS = 120  # the client process stops by itself after this, whatever happens
STEP_TIMEOUT = 30


class RecordError(RuntimeError):
    """A recording could not be made (Docker, tcpdump or the client failed)."""


# -- the manifest -----------------------------------------------------------------


def load_manifest(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["captures"]


def recordable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries this script can make again (the user's seed capture is not one)."""
    return [e for e in entries if e["how"].get("scenario")]


# -- small process helpers ---------------------------------------------------------


def sh(*argv: str, timeout: float = STEP_TIMEOUT, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RecordError(f"{' '.join(argv[:4])}...: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout.strip()


def docker(*args: str, timeout: float = STEP_TIMEOUT, check: bool = True) -> str:
    return sh("docker", *args, timeout=timeout, check=check)


def remove_lab(lab_id: str) -> None:
    """Remove the containers and the network labelled with this lab id, and nothing else."""
    label = f"label={LAB_LABEL}={lab_id}"
    ids = docker("ps", "-aq", "--filter", label, check=False).split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    nets = docker("network", "ls", "-q", "--filter", label, check=False).split()
    if nets:
        docker("network", "rm", *nets, check=False)


# -- the lab of one recording --------------------------------------------------------


@dataclass
class Lab:
    """One network, one server, one client namespace; removed by `close`."""

    lab_id: str
    family: int
    network: str = ""
    bridge: str = ""
    server_ip: str = ""
    client_pid: int = 0
    ula_prefix: str = ""

    @classmethod
    def start(cls, family: int, server_gucs: dict[str, Any], server_sysctls: dict[str, Any],
              client_sysctls: dict[str, Any]) -> "Lab":
        lab = cls(lab_id=f"capt-{secrets.token_hex(4)}", family=family)
        try:
            lab._network()
            lab._server(server_gucs, server_sysctls)
            lab._client(client_sysctls)
        except BaseException:
            lab.close()
            raise
        return lab

    def labels(self) -> list[str]:
        return ["--label", f"{LAB_LABEL}={self.lab_id}", "--label", RECORDER_LABEL]

    def _network(self) -> None:
        args = ["network", "create", *self.labels(), "--internal"]
        if self.family == 6:
            # A random ULA /64 (RFC 4193): unique enough not to meet another lab's subnet.
            groups = secrets.token_hex(5)
            self.ula_prefix = f"fd{groups[:2]}:{groups[2:6]}:{groups[6:10]}:1"
            args += ["--ipv6", "--subnet", f"{self.ula_prefix}::/64"]
        self.network = f"kaobs-{self.lab_id}"
        net_id = docker(*args, self.network)
        self.bridge = f"br-{net_id[:12]}"

    def _server(self, gucs: dict[str, Any], sysctls: dict[str, Any]) -> None:
        name = f"{self.network}-server"
        argv = ["run", "-d", "--name", name, *self.labels(), "--network", self.network,
                "-e", "POSTGRES_HOST_AUTH_METHOD=trust"]
        for key, value in sysctls.items():
            argv += ["--sysctl", f"{key}={value}"]
        argv += [IMAGE, "postgres"]
        for key, value in gucs.items():
            argv += ["-c", f"{key}={value}"]
        docker(*argv)
        deadline = time.monotonic() + STEP_TIMEOUT
        while subprocess.run(["docker", "exec", name, "pg_isready", "-q", "-h", "127.0.0.1", "-U", "postgres"],
                             capture_output=True, timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise RecordError(f"the server did not become ready: {docker('logs', '--tail', '5', name, check=False)}")
            time.sleep(0.2)
        fmt = "{{range .NetworkSettings.Networks}}" + ("{{.GlobalIPv6Address}}" if self.family == 6 else "{{.IPAddress}}") + "{{end}}"
        self.server_ip = docker("inspect", "-f", fmt, name)
        if not self.server_ip:
            raise RecordError(f"the server has no IPv{self.family} address on {self.network}")

    def _client(self, sysctls: dict[str, Any]) -> None:
        name = f"{self.network}-client"
        argv = ["run", "-d", "--name", name, *self.labels(), "--network", self.network]
        for key, value in sysctls.items():
            argv += ["--sysctl", f"{key}={value}"]
        docker(*argv, "--entrypoint", "sleep", IMAGE, str(CLIENT_MAX_SECONDS + 60))
        self.client_pid = int(docker("inspect", "-f", "{{.State.Pid}}", name))

    def in_client_netns(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.client_pid}/ns/net", "--", *argv]

    def cut_client_off(self) -> None:
        """The client vanishes: nothing to or from the server port passes its namespace any more."""
        tool = "ip6tables" if self.family == 6 else "iptables"
        for chain, direction in (("INPUT", "--sport"), ("OUTPUT", "--dport")):
            sh(*self.in_client_netns(tool, "-I", chain, "-p", "tcp", direction, str(PG_PORT), "-j", "DROP"))

    def close(self) -> None:
        remove_lab(self.lab_id)


# -- tcpdump -----------------------------------------------------------------------------


class Tcpdump:
    """tcpdump on one interface, filtered on the server; started before the client connects."""

    def __init__(self, interface: str, server_ip: str, path: Path) -> None:
        argv = ["tcpdump", "-i", interface, "-s", str(SNAPLEN), "-U", "-n", "-w", str(path)]
        if interface == "any":
            argv += ["-y", "LINUX_SLL2"]
        argv += [f"host {server_ip} and tcp port {PG_PORT}"]
        self.argv = argv
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        seen = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stderr], [], [], 0.2)
            if ready:
                line = self.process.stderr.readline()
                seen += line
                if "listening on" in line:
                    return
                if not line:
                    break
        self.stop()
        raise RecordError(f"tcpdump did not start: {seen.strip()}")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.stderr.read() if self.process.stderr else ""


# -- headers only ------------------------------------------------------------------------


def cut_to_headers(src: Path, dst: Path) -> int:
    """Copy a tcpdump pcap keeping each record up to the end of its TCP header; returns the packet count.

    The record's original length stays, so a reader still knows each payload's
    size (kaobs takes it from the IP header anyway); no query text or message
    content is kept.
    """
    from sniffer.frames import frame_snap_end

    data = src.read_bytes()
    if len(data) < 24:
        raise RecordError(f"{src}: tcpdump wrote no capture")
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        raise RecordError(f"{src}: not a pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    record = struct.Struct(endian + "IIII")
    out = bytearray(data[:24])
    pos, packets = 24, 0
    while pos + 16 <= len(data):
        sec, frac, caplen, wirelen = record.unpack_from(data, pos)
        body = data[pos + 16:pos + 16 + caplen]
        if len(body) < caplen:
            break  # tcpdump stopped mid-record: drop the partial record
        keep = frame_snap_end(linktype, body)
        out += record.pack(sec, frac, keep, wirelen) + body[:keep]
        pos += 16 + caplen
        packets += 1
    dst.write_bytes(bytes(out))
    return packets


# -- the client (runs inside the client's namespace) ------------------------------------------


def client_main(plan_json: str) -> int:
    """Open the sessions of the plan, run their statements, report "ready", hold, close.

    Runs as `record.py client PLAN` under nsenter. Prints one line "ready" when
    every session is idle (the moment the scenario's clock starts), then holds
    the connections `hold` seconds (or until killed, at most CLIENT_MAX_SECONDS)
    and closes them cleanly (Terminate + FIN), printing "closed".
    """
    import psycopg

    plan = json.loads(plan_json)
    started = time.monotonic()
    sessions = []
    for session in plan["sessions"]:
        dsn = f"host={plan['host']} port={PG_PORT} user=postgres dbname=postgres connect_timeout=10 " + session.get("dsn", "")
        conn = psycopg.connect(dsn, autocommit=True)
        for statement in session.get("statements", ["SELECT 1"]):
            conn.execute(statement)
        if session.get("stop_reading"):
            # Ask for a large result and never read it: the client's receive
            # buffer fills, it advertises a zero window, and the server's
            # persist timer takes over (zero-window probes, not keepalives).
            conn.pgconn.send_query(session["stop_reading"].encode())
            conn.pgconn.flush()
        sessions.append(conn)
    print("ready", flush=True)
    hold = plan.get("hold")
    time.sleep(CLIENT_MAX_SECONDS if hold is None else min(hold, CLIENT_MAX_SECONDS))
    for conn, session in zip(sessions, plan["sessions"]):
        try:
            if session.get("stop_reading"):
                conn.pgconn.finish()  # unread data: the kernel answers the close with a RST
            else:
                conn.close()  # Terminate, then FIN
        except Exception:  # noqa: BLE001 - closing is best effort, the packets tell the story
            pass
    print("closed", flush=True)
    return 0


# -- one recording -------------------------------------------------------------------------------


@dataclass
class Recorded:
    file: str
    packets: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def record_entry(entry: dict[str, Any], out_dir: Path) -> Recorded:
    """Make one capture of the manifest again, into out_dir/entry["file"]."""
    how, settings = entry["how"], entry["settings"]
    began = time.monotonic()
    family = int(how.get("family", 4))
    sessions = [{k: v for k, v in s.items() if k in ("dsn", "statements", "stop_reading")}
                for s in settings["client"]["sessions"]]
    lab = Lab.start(family, settings["server"].get("gucs", {}), settings["server"].get("sysctls", {}),
                    settings["client"].get("sysctls", {}))
    client = None
    try:
        with tempfile.TemporaryDirectory(prefix="kaobs-rec-") as tmp:
            raw = Path(tmp) / "raw.pcap"
            interface = "any" if how.get("interface") == "any" else lab.bridge
            dump = Tcpdump(interface, lab.server_ip, raw)
            try:
                plan = {"host": lab.server_ip, "sessions": sessions, "hold": how.get("hold")}
                client = subprocess.Popen(
                    lab.in_client_netns(sys.executable, str(Path(__file__).resolve()), "client", json.dumps(plan)),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env={**os.environ, "PYTHONPATH": str(HERE.parent)})
                ready, _, _ = select.select([client.stdout], [], [], STEP_TIMEOUT)
                line = client.stdout.readline() if ready else ""
                if line.strip() != "ready":
                    client.kill()
                    raise RecordError(f"the client did not get ready: {line!r} {client.stderr.read()[-400:]}")
                t0 = time.monotonic()
                vanish = how.get("vanish_after")
                if vanish is not None:
                    time.sleep(max(0.0, t0 + vanish - time.monotonic()))
                    lab.cut_client_off()
                time.sleep(max(0.0, t0 + how["capture_seconds"] - time.monotonic()))
            finally:
                tail = dump.stop()
            if client is not None and client.poll() is None:
                client.kill()
                client.wait(timeout=10)
            out_dir.mkdir(parents=True, exist_ok=True)
            packets = cut_to_headers(raw, out_dir / entry["file"])
            notes = [line for line in tail.splitlines() if "dropped by kernel" in line and not line.startswith("0 ")]
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        lab.close()
    return Recorded(entry["file"], packets, time.monotonic() - began, notes)


def record_all(entries: list[dict[str, Any]], out_dir: Path, jobs: int = 1) -> list[Recorded]:
    """Record the given entries, `jobs` at a time (each in its own lab, so they do not meet)."""
    if shutil.which("tcpdump") is None or shutil.which("nsenter") is None:
        raise RecordError("tcpdump and nsenter are needed (bash scripts/setup.sh installs them)")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda e: record_entry(e, out_dir), entries))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the captures (default: captures/)")
    parser.add_argument("--only", action="append", default=[], metavar="FILE", help="record only this entry (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="recordings at a time (default 1)")
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
        entries = [e for e in entries if e["file"] in args.only]
    try:
        for done in record_all(entries, args.out, args.jobs):
            print(f"{done.file}: {done.packets} packets, recorded in {done.seconds:.1f} s", *done.notes)
    except (RecordError, subprocess.TimeoutExpired) as error:
        print(f"record.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
