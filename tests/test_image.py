"""The kaobs container image, run as users run it: `docker run ... kaobs/kaobs:local`.

scripts/setup.sh builds the image (scripts/build-kaobs-image.sh). These tests
start it on this machine's engine with the least it needs, as the README and
deploy/kubernetes say: `--network host`, `--cap-drop ALL --cap-add NET_RAW`,
the Docker socket read-only. When the suite itself runs in the test image
(scripts/test-in-container.sh), the engine is the host's, reached through its
socket: the same commands work, which is what a CI job with the socket does.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.test_discovery import IMAGE as PG_IMAGE, LABEL, docker, postgres_on_our_network  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
KAOBS_IMAGE = "kaobs/kaobs:local"
LEAST = ["--network", "host", "--cap-drop", "ALL", "--cap-add", "NET_RAW"]

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def kaobs_image() -> str:
    if docker("image", "inspect", KAOBS_IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {KAOBS_IMAGE} is missing: run bash scripts/setup.sh (it builds it)")
    return KAOBS_IMAGE


def run_kaobs(image: str, *args: str, options: list[str] = (), stdin: bytes | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    name = f"kaobs-test-image-{uuid.uuid4().hex[:10]}"
    try:
        return subprocess.run(["docker", "run", "--rm", "-i" if stdin is not None else "--init", "--name", name,
                               "--label", f"{LABEL}={name}", *options, image, *args],
                              input=stdin, capture_output=True, timeout=timeout)
    finally:
        docker("rm", "-f", name, check=False)


def test_image_analyzes_a_capture_on_stdin(kaobs_image):
    seed = (ROOT / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap").read_bytes()
    expect = ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=2",
              "--expect", "tcp_keepalives_count=3"]
    done = run_kaobs(kaobs_image, "analyze", "-", "--format", "json", *expect, options=["--network", "none"], stdin=seed)
    assert done.returncode == 0, done.stderr.decode()
    [conn] = json.loads(done.stdout)["connections"]
    assert conn["verdict"] == "match" and conn["end_reason"] == "keepalive_abort"
    # the same answer as kaobs outside the image
    here = subprocess.run(["python3", "-m", "kaobs", "analyze", "-", "--format", "json", *expect], input=seed,
                          capture_output=True, cwd=ROOT, timeout=60)
    assert json.loads(here.stdout)["connections"] == [conn]


class KeepaliveOnLoopback:
    """A listener and a client on 127.0.0.1 whose kernel probes every second (bounded: one connection, 15 s)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.client: socket.socket | None = None
        self.accepted: socket.socket | None = None

    def connect(self) -> None:
        self.client = socket.socket()
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        self.client.connect(("127.0.0.1", self.port))
        self.accepted, _ = self.server.accept()
        self.client.sendall(b"hello")
        self.accepted.recv(16)

    def close(self) -> None:
        for sock in (self.client, self.accepted, self.server):
            if sock is not None:
                sock.close()


def test_watch_any_in_the_image_with_only_net_raw_sees_keepalive_probes_on_the_host(kaobs_image):
    peers = KeepaliveOnLoopback()
    try:
        # the client's probes come from the client side: watch the listener's port as the "Postgres" port
        timer = threading.Timer(4.0, peers.connect)  # once the capture is open
        timer.start()
        done = run_kaobs(kaobs_image, "watch", "-i", "any", "--port", str(peers.port), "--duration", "9",
                         "--format", "json", options=LEAST, timeout=60)
        timer.join()
    finally:
        peers.close()
    assert done.returncode in (0, 1), done.stderr.decode()
    [conn] = json.loads(done.stdout)["connections"]
    probes = conn["sides"]["client"]["probes"]
    assert len(probes) >= 3, conn["sides"]["client"]
    gaps = [b["t"] - a["t"] for a, b in zip(probes, probes[1:])]
    assert all(0.9 <= gap <= 1.3 for gap in gaps), gaps  # TCP_KEEPIDLE=1, all answered: one a second


def test_watch_in_the_image_without_net_raw_is_one_clear_line(kaobs_image):
    done = run_kaobs(kaobs_image, "watch", "-i", "lo", "--duration", "2",
                     options=["--network", "host", "--cap-drop", "ALL"], timeout=60)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_RAW" in lines[0], lines


def test_watch_in_the_image_finds_a_container_through_the_read_only_socket(kaobs_image, postgres_on_our_network):
    env = postgres_on_our_network
    net, pg, run_id = env["network"], env["server"], env["run_id"]
    expect = ["--expect", "tcp_keepalives_idle=1", "--expect", "tcp_keepalives_interval=1",
              "--expect", "tcp_keepalives_count=2"]
    options = [*LEAST, "-v", "/var/run/docker.sock:/var/run/docker.sock:ro"]
    client = f"kaobs-test-client-{run_id}"

    def vanish_client() -> None:
        docker("run", "-d", "--name", client, "--network", net, "--label", f"{LABEL}={run_id}",
               "-e", "PGPASSWORD=x", PG_IMAGE, "bash", "-c", f"(echo 'select 1;'; sleep 40) | psql -h {pg} -U postgres -At")
        time.sleep(3.5)
        pid = docker("inspect", "-f", "{{.State.Pid}}", client).stdout.strip()
        for chain in ("INPUT", "OUTPUT"):
            subprocess.run(["nsenter", "-t", pid, "-n", "iptables", "-I", chain, "-j", "DROP"],
                           check=True, timeout=20, capture_output=True)

    timer = threading.Timer(5.0, vanish_client)
    timer.start()
    done = run_kaobs(kaobs_image, "watch", "--container", pg, "--duration", "16", "--format", "json", *expect,
                     options=options, timeout=90)
    timer.join()
    assert done.returncode == 0, done.stderr.decode()
    doc = json.loads(done.stdout)
    assert doc["input"]["sources"][0].startswith("live:br-"), doc["input"]
    [conn] = doc["connections"]
    assert conn["end_reason"] == "keepalive_abort" and conn["verdict"] == "match", conn["verdict"]


def test_the_daemonsets_command_runs_in_the_image_as_kubernetes_would_run_it(kaobs_image):
    """The manifest's arguments, securityContext and /tmp emptyDir, as `docker run` options; metrics scraped."""
    import urllib.request

    import yaml

    manifest = ROOT / "deploy" / "kubernetes" / "kaobs-daemonset.yaml"
    [daemonset] = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc["kind"] == "DaemonSet"]
    [container] = daemonset["spec"]["template"]["spec"]["containers"]
    security = container["securityContext"]
    options = ["--network", "host", "--user", str(security["runAsUser"]),
               *[arg for cap in security["capabilities"]["drop"] for arg in ("--cap-drop", cap)],
               *[arg for cap in security["capabilities"]["add"] for arg in ("--cap-add", cap)],
               "--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]
    if security["readOnlyRootFilesystem"]:
        options.append("--read-only")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    args = list(container["args"])
    args[args.index("--metrics") + 1] = f"127.0.0.1:{port}"  # the pod's 0.0.0.0:9432, on a free port here
    name = f"kaobs-test-image-{uuid.uuid4().hex[:10]}"
    docker("run", "-d", "--name", name, "--label", f"{LABEL}={name}", *options, kaobs_image, *args)
    try:
        deadline = time.time() + 30
        page = ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                    page = answer.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "kaobs_captured_packets_total" in page, docker("logs", name, check=False).stderr[-1000:]
        assert docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
        docker("kill", "--signal", "TERM", name)
        docker("wait", name, timeout=30)
        logs = docker("logs", name, check=False)
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() in ("0", "1"), logs.stderr
        assert "watching any" in logs.stdout and "Traceback" not in logs.stderr, (logs.stdout[-500:], logs.stderr[-500:])
    finally:
        docker("rm", "-f", name, check=False)
