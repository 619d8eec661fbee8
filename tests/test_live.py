"""Live capture: the BPF filter (pure), and real capture on a veth pair to a network namespace (privileged).

The privileged scenario: a server socket on the host with keepalive 1/1/2, a
client in a namespace of our own behind a veth pair; once a few probes were
answered, iptables in the namespace drops everything from the server, so the
client vanishes and the server's kernel probes twice and aborts with RST.
Everything is bounded: timeouts on every subprocess and socket.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from analysis.model import KeepaliveModel
from sniffer.capture import LiveCapture, bpf_filter
from sniffer.records import SYN, CaptureError, segment_of

# -- pure ---------------------------------------------------------------------------


def test_bpf_filter_one_port():
    assert bpf_filter([5432]) == "tcp port 5432"


def test_bpf_filter_ports_and_hosts_deduplicated():
    assert bpf_filter([5432, 5433, 5432], ["172.18.0.2", "fd00::2", "172.18.0.2"]) == (
        "(tcp port 5432 or tcp port 5433) and (host 172.18.0.2 or host fd00::2)")


@pytest.mark.parametrize("ports, hosts", [([], []), ([0], []), ([70000], []), ([5432], ["db.example"]),
                                          ([5432], ["1.2.3.4 or 1=1"])])
def test_bpf_filter_rejects_bad_input(ports, hosts):
    with pytest.raises(ValueError):
        bpf_filter(ports, hosts)


def test_no_interface_is_an_error():
    with pytest.raises(CaptureError):
        LiveCapture([], [5432])


@pytest.mark.skipif(os.geteuid() != 0, reason="opening a packet socket needs root")
def test_missing_interface_is_a_one_line_capture_error():
    with pytest.raises(CaptureError, match="no such network interface: kaobs-none0"):
        LiveCapture(["kaobs-none0"], [5432]).open()


# -- a namespace of our own ------------------------------------------------------------


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class NetnsPeer:
    """A network namespace behind a veth pair: the host side is `host_if`, addresses /30."""

    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    bridge_if: str = ""

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *args, **kwargs)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **kwargs)

    def vanish(self) -> None:
        """Drop everything to and from the host inside the namespace: the peer is gone, as after a power loss.

        Dropping output too keeps the client's FIN (when it is killed at the
        end) off the wire, as it would be for a peer that really vanished.
        """
        self.run("iptables", "-I", "INPUT", "-s", self.host_ip, "-j", "DROP")
        self.run("iptables", "-I", "OUTPUT", "-d", self.host_ip, "-j", "DROP")


@contextlib.contextmanager
def netns_peer(bridge: bool = False):
    """A namespace of our own behind a veth pair; with `bridge`, the host side is a port of a bridge of our own.

    With the bridge, the host's address sits on the bridge, so every packet
    crosses two host interfaces (the veth and the bridge), like a container's
    traffic on a Docker network, without going through the FORWARD chain.
    """
    tag = f"{os.getpid() % 10000:04d}{random.randrange(1000):03d}"
    subnet = random.randrange(0, 250)
    peer = NetnsPeer(ns=f"kaobs-test-{tag}", host_if=f"kth{tag}", ns_if=f"ktn{tag}",
                     host_ip=f"10.213.{subnet}.1", ns_ip=f"10.213.{subnet}.2")
    bridge_if = f"ktb{tag}"
    try:
        sh("ip", "netns", "add", peer.ns)
        sh("ip", "link", "add", peer.host_if, "type", "veth", "peer", "name", peer.ns_if)
        sh("ip", "link", "set", peer.ns_if, "netns", peer.ns)
        if bridge:
            sh("ip", "link", "add", bridge_if, "type", "bridge")
            sh("ip", "link", "set", peer.host_if, "master", bridge_if)
            sh("ip", "addr", "add", f"{peer.host_ip}/30", "dev", bridge_if)
            sh("ip", "link", "set", bridge_if, "up")
            peer.bridge_if = bridge_if
        else:
            sh("ip", "addr", "add", f"{peer.host_ip}/30", "dev", peer.host_if)
        sh("ip", "link", "set", peer.host_if, "up")
        peer.run("ip", "addr", "add", f"{peer.ns_ip}/30", "dev", peer.ns_if)
        peer.run("ip", "link", "set", peer.ns_if, "up")
        peer.run("ip", "link", "set", "lo", "up")
        yield peer
    finally:
        sh("ip", "link", "del", peer.host_if, check=False)
        if bridge:
            sh("ip", "link", "del", bridge_if, check=False)
        sh("ip", "netns", "del", peer.ns, check=False)


CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello")
s.recv(16)
time.sleep(float(sys.argv[3]))
"""


@contextlib.contextmanager
def keepalive_server(host: str, port: int = 5432):
    """A listening socket on the host whose accepted connections probe after 1 s, every 1 s, 2 times."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(4)
    server.settimeout(10)
    try:
        yield server
    finally:
        server.close()


def serve_one(server: socket.socket, idle: int = 1, interval: int = 1, count: int = 2) -> tuple[socket.socket, float]:
    conn, _ = server.accept()
    conn.settimeout(10)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    assert conn.recv(16) == b"hello"
    conn.sendall(b"ok")
    return conn, time.time()


def wait_for_abort(conn: socket.socket, limit: float = 10.0) -> str:
    """Block until the kernel gives up on the connection; returns the error name."""
    conn.settimeout(limit)
    try:
        data = conn.recv(16)
        return f"data {data!r}"
    except OSError as error:  # ETIMEDOUT is a TimeoutError too: tell it from our own timeout by errno
        return os.strerror(error.errno) if error.errno else "no abort within the limit"


def vanishing_client_scenario(peer: NetnsPeer, answered_for: float = 2.6) -> dict:
    """Client connects from the namespace, stays; after `answered_for` s the namespace drops the host."""
    with keepalive_server(peer.host_ip) as server:
        client = peer.popen(sys.executable, "-c", CLIENT, peer.host_ip, "5432", "12",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            conn, t_data = serve_one(server)
            time.sleep(answered_for)
            peer.vanish()
            t_vanish = time.time()
            outcome = wait_for_abort(conn)
            t_abort = time.time()
            conn.close()
        finally:
            client.kill()
            client.wait(timeout=10)
    return {"t_data": t_data, "t_vanish": t_vanish, "t_abort": t_abort, "outcome": outcome}


def collect(capture: LiveCapture, into: list) -> threading.Thread:
    """Read the capture in a thread, into a list of TcpSegments."""
    def loop():
        for record in capture:
            into.append(segment_of(record))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.privileged
def test_live_capture_sees_the_probes_the_kernel_sends_and_the_abort():
    with netns_peer() as peer:
        segments: list = []
        with LiveCapture([peer.host_if], [5432]) as capture:
            thread = collect(capture, segments)
            scenario = vanishing_client_scenario(peer)
            time.sleep(0.3)
            t_stop = time.time()
            capture.stop()
            thread.join(2)
            stop_latency = time.time() - t_stop
            stats = capture.stats()
        assert not thread.is_alive()
    assert stop_latency < 0.6  # typically ~0.01 s (the wake-up pipe); slack for a loaded CI machine
    assert scenario["outcome"] == "Connection timed out"
    assert segments[0].flags & SYN and segments[0].dport == 5432
    assert [s.frame for s in segments] == list(range(1, len(segments) + 1))
    assert stats.segments == len(segments) and stats.drops == 0 and stats.duplicates == 0
    model = KeepaliveModel([5432]).feed_all(segments)
    model.finish()
    [conn] = model.connections
    probes = conn.server.keepalive_probes()
    answered = [p for p in probes if p.answer_t is not None]
    unanswered = [p for p in probes if p.answer_t is None]
    assert len(answered) >= 1  # while the client was there
    assert len(unanswered) == 2  # TCP_KEEPCNT=2 after it vanished
    assert all(p.t > scenario["t_vanish"] for p in unanswered)
    assert unanswered[1].t - unanswered[0].t == pytest.approx(1.0, abs=0.1)  # TCP_KEEPINTVL=1
    assert probes[0].t - probes[0].since_accepted == pytest.approx(1.0, abs=0.1)  # TCP_KEEPIDLE=1
    assert conn.end_reason == "keepalive_abort"
    assert conn.server.reset is not None and conn.server.reset.t <= scenario["t_abort"] + 0.05
    # kernel timestamps are wall-clock times
    assert abs(segments[0].t - scenario["t_data"]) < 0.5


@pytest.mark.privileged
def test_duration_ends_iteration_on_an_idle_interface():
    with netns_peer() as peer:
        t0 = time.time()
        with LiveCapture([peer.host_if], [5432], duration=0.5) as capture:
            assert list(capture) == []
        assert 0.45 < time.time() - t0 < 1.5


@pytest.mark.privileged
def test_bridge_and_its_port_count_each_packet_once():
    """Captured on a bridge and on its veth port at once, each packet is delivered once, as on the bridge alone."""
    with netns_peer(bridge=True) as peer:
        both: list = []
        bridge_only: list = []
        with LiveCapture([peer.bridge_if, peer.host_if], [5432]) as two, LiveCapture([peer.bridge_if], [5432]) as one:
            threads = [collect(two, both), collect(one, bridge_only)]
            vanishing_client_scenario(peer, answered_for=1.5)
            time.sleep(0.3)
            two.stop()
            one.stop()
            for thread in threads:
                thread.join(2)
            two_stats, one_stats = two.stats(), one.stats()
    def key(s):
        return (s.src, s.sport, s.dst, s.dport, s.seq, s.ack, s.flags, s.payload_len)

    assert len(bridge_only) >= 10  # handshake, data, probes, answers, abort
    assert one_stats.duplicates == 0  # a bridge in promiscuous mode shows a packet once
    assert len(both) == len(bridge_only)
    assert two_stats.duplicates == len(both)  # every packet crossed both interfaces
    assert two_stats.packets == 2 * len(both)
    assert [s.frame for s in both] == list(range(1, len(both) + 1))
    assert sorted(map(key, both)) == sorted(map(key, bridge_only))
    assert [s.t for s in both] == sorted(s.t for s in both)


@pytest.mark.privileged
def test_stop_from_another_thread_wakes_a_blocked_read():
    with netns_peer() as peer:
        with LiveCapture([peer.host_if], [5432]) as capture:
            timer = threading.Timer(0.2, capture.stop)
            timer.start()
            t0 = time.time()
            assert capture.read(5.0) == []
            assert time.time() - t0 < 0.8
            timer.join()
