"""Docker target discovery: inspect documents -> bridges and addresses.

The mapping is tested on inspect documents shaped like the engine's (fakes);
the privileged test creates a real network and container of our own.
"""
from __future__ import annotations

import pytest

from sniffer.discovery import (
    DiscoveryError,
    Target,
    bridge_name,
    container_serves,
    container_target,
    default_target,
    find_target,
    listening_ports,
)

DEFAULT_NET = {
    "Name": "bridge", "Id": "d09d1d51de5e53a5038c7bf2d83fe10fe3328468739adc1a84e2e6bff48ef5e2", "Driver": "bridge",
    "Options": {"com.docker.network.bridge.default_bridge": "true", "com.docker.network.bridge.name": "docker0"},
}
USER_NET = {"Name": "pgnet", "Id": "90f148a71f86e1c0ffee00000000000000000000000000000000000000000000", "Driver": "bridge",
            "Options": {}}
NAMED_NET = {"Name": "custom", "Id": "abcdef0123456789" + "0" * 48, "Driver": "bridge",
             "Options": {"com.docker.network.bridge.name": "pgbr0"}}
MACVLAN_NET = {"Name": "mv", "Id": "ffff" * 16, "Driver": "macvlan", "Options": {"parent": "eth0"}}
NETWORKS = {n["Id"]: n for n in (DEFAULT_NET, USER_NET, NAMED_NET, MACVLAN_NET)}


def container(name="/pg", networks=None, running=True, exposed=("5432/tcp",), mode="default", pid=0, published=None):
    nets = networks if networks is not None else {"pgnet": {"NetworkID": USER_NET["Id"], "IPAddress": "172.18.0.2"}}
    return {
        "Name": name,
        "State": {"Running": running, "Status": "running" if running else "exited", "Pid": pid},
        "HostConfig": {"NetworkMode": mode},
        "Config": {"ExposedPorts": {p: {} for p in exposed}},
        "NetworkSettings": {"Networks": nets, "Ports": published or {}},
    }


def test_bridge_names_of_default_user_and_named_networks():
    assert bridge_name(DEFAULT_NET) == "docker0"
    assert bridge_name(USER_NET) == "br-90f148a71f86"
    assert bridge_name(NAMED_NET) == "pgbr0"
    # the default network without the option (older engines) is still docker0
    assert bridge_name({"Name": "bridge", "Id": "x" * 64, "Driver": "bridge", "Options": {}}) == "docker0"


def test_network_without_a_bridge_is_a_clear_error():
    with pytest.raises(DiscoveryError, match="macvlan driver"):
        bridge_name(MACVLAN_NET)


def test_container_on_two_networks_gives_both_bridges_and_addresses():
    c = container(networks={
        "bridge": {"NetworkID": DEFAULT_NET["Id"], "IPAddress": "172.17.0.3"},
        "pgnet": {"NetworkID": USER_NET["Id"], "IPAddress": "172.18.0.2", "GlobalIPv6Address": "fd00::2"},
    })
    target = container_target(c, NETWORKS)
    assert target.interfaces == ["docker0", "br-90f148a71f86"]
    assert target.hosts == ["172.17.0.3", "172.18.0.2", "fd00::2"]
    assert "pg" in target.description


def test_container_errors():
    with pytest.raises(DiscoveryError, match="not running"):
        container_target(container(running=False), NETWORKS)
    with pytest.raises(DiscoveryError, match="host network"):
        container_target(container(mode="host", networks={}), NETWORKS)
    with pytest.raises(DiscoveryError, match="shares the network of db"):
        container_target(container(mode="container:db", networks={}), NETWORKS)
    with pytest.raises(DiscoveryError, match="macvlan"):
        container_target(container(networks={"mv": {"NetworkID": MACVLAN_NET["Id"], "IPAddress": "10.0.0.5"}}), NETWORKS)


def test_listening_ports_from_proc_net_tcp():
    text = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1539 0100007F:D3C2 01 00000000:00000000 00:00000000 00000000   101        0 2 1 0000000000000000 20 4 30 10 -1
"""
    assert listening_ports(text.splitlines()) == {5432}  # 0x1538; 0x1539 is an established socket
    v6 = "   0: 00000000000000000000000000000000:1538 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   101 0 3 1"
    assert listening_ports([v6]) == {5432}


def test_container_serves_by_listening_exposing_or_publishing():
    assert container_serves(container(exposed=()), [5432], {5432})
    assert container_serves(container(exposed=("5432/tcp",)), [5432], None)
    assert container_serves(container(exposed=(), published={"5433/tcp": None}), [5433], set())
    assert not container_serves(container(exposed=("5432/udp", "80/tcp")), [5432], {80})


def test_default_target_collects_bridges_of_postgres_containers_only():
    pg1 = container("/pg1")
    pg2 = container("/pg2", networks={"bridge": {"NetworkID": DEFAULT_NET["Id"], "IPAddress": "172.17.0.2"}})
    web = container("/web", exposed=("80/tcp",), networks={"custom": {"NetworkID": NAMED_NET["Id"], "IPAddress": "10.1.0.2"}})
    stopped = container("/old", running=False, networks={"custom": {"NetworkID": NAMED_NET["Id"], "IPAddress": "10.1.0.3"}})
    target = default_target([pg1, web, pg2, stopped], NETWORKS, [5432], lambda c: None, ["docker0"])
    assert target.interfaces == ["br-90f148a71f86", "docker0"]
    assert target.hosts == []  # every address on those bridges
    assert "pg1" in target.description and "pg2" in target.description and "web" not in target.description


def test_default_target_error_names_the_choices_and_the_bridges():
    web = container("/web", exposed=("80/tcp",))
    with pytest.raises(DiscoveryError) as error:
        default_target([web], NETWORKS, [5432], lambda c: {80}, ["docker0", "br-90f148a71f86"])
    message = str(error.value)
    assert "\n" not in message
    for needle in ("port 5432", "--interface", "--container", "--network", "docker0, br-90f148a71f86"):
        assert needle in message


class FakeAPI:
    """The few docker.APIClient calls find_target makes, over fixed documents."""

    def __init__(self, containers, networks):
        self._containers = {c["Name"].lstrip("/"): dict(c, Id=c["Name"].lstrip("/")) for c in containers}
        self._networks = networks

    def inspect_container(self, name):
        from docker.errors import NotFound

        if name not in self._containers:
            raise NotFound(f"No such container: {name}")
        return self._containers[name]

    def inspect_network(self, name):
        from docker.errors import NotFound

        for network in self._networks:
            if name in (network["Name"], network["Id"]):
                return network
        raise NotFound(f"network {name} not found")

    def containers(self, filters=None):
        return [{"Id": k} for k, c in self._containers.items() if c["State"]["Running"]]

    def networks(self):
        return list(self._networks)


class FakeClient:
    def __init__(self, containers, networks):
        self.api = FakeAPI(containers, networks)


def test_find_target_through_a_fake_engine(monkeypatch):
    import sniffer.discovery as discovery

    monkeypatch.setattr(discovery, "interface_exists", lambda name: name in ("docker0", "br-90f148a71f86", "lo"))
    client = FakeClient([container("/pg")], [DEFAULT_NET, USER_NET, NAMED_NET])
    assert find_target(container="pg", client=client) == Target(
        ["br-90f148a71f86"], ["172.18.0.2"], "container pg (172.18.0.2) on br-90f148a71f86")
    assert find_target(network="bridge", client=client).interfaces == ["docker0"]
    assert find_target(client=client).interfaces == ["br-90f148a71f86"]
    assert find_target(interfaces=["lo"], client=client).interfaces == ["lo"]
    with pytest.raises(DiscoveryError, match="no such Docker container: nope"):
        find_target(container="nope", client=client)
    with pytest.raises(DiscoveryError, match="no such Docker network: nope"):
        find_target(network="nope", client=client)
    with pytest.raises(DiscoveryError, match="pgbr0 .*does not exist on this host"):
        find_target(network="custom", client=client)
    with pytest.raises(DiscoveryError, match="only one of"):
        find_target(interfaces=["lo"], network="bridge", client=client)



def test_engine_not_running_is_one_line(monkeypatch):
    from sniffer.discovery import docker_client

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kaobs-docker.sock")
    with pytest.raises(DiscoveryError) as error:
        docker_client()
    assert str(error.value) == ("cannot talk to Docker: the Docker engine is not running; "
                                "use --interface IF to capture without Docker")


def test_sdk_missing_is_one_line(monkeypatch):
    import sys as _sys

    from sniffer.discovery import docker_client

    monkeypatch.setitem(_sys.modules, "docker", None)  # import docker -> ImportError
    with pytest.raises(DiscoveryError, match="docker Python SDK is not installed"):
        docker_client()


# -- privileged: a real container on a network of our own ------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

IMAGE = os.environ.get("KAOBS_LAB_IMAGE", "kaobs/postgres:15-local")
LABEL = "kaobs.test"


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def remove_labelled(run_id: str) -> None:
    """Remove what this test created, found by its label (never anything else)."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={run_id}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    nets = docker("network", "ls", "-q", "--filter", f"label={LABEL}={run_id}", check=False).stdout.split()
    if nets:
        docker("network", "rm", *nets, check=False)


def wait_for_postgres(name: str, limit: float = 60) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        done = docker("exec", name, "bash", "-c",
                      "PGPASSWORD=x psql -h \"$(hostname -i | cut -d' ' -f1)\" -U postgres -Atc 'select 1'",
                      check=False)
        if done.returncode == 0 and done.stdout.strip() == "1":
            return
        time.sleep(0.5)
    logs = docker("logs", "--tail", "5", name, check=False)
    pytest.fail(f"postgres in {name} not ready in {limit} s: {logs.stderr[-500:]}")


@pytest.fixture
def postgres_on_our_network():
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: run bash scripts/setup.sh (it builds it)")
    run_id = uuid.uuid4().hex[:10]
    net, pg = f"kaobs-test-{run_id}", f"kaobs-test-pg-{run_id}"
    try:
        docker("network", "create", "--internal", "--label", f"{LABEL}={run_id}", net)
        docker("run", "-d", "--name", pg, "--network", net, "--label", f"{LABEL}={run_id}",
               "-e", "POSTGRES_PASSWORD=x", IMAGE, "postgres",
               "-c", "tcp_keepalives_idle=1", "-c", "tcp_keepalives_interval=1", "-c", "tcp_keepalives_count=2")
        wait_for_postgres(pg)
        yield {"run_id": run_id, "network": net, "server": pg}
    finally:
        remove_labelled(run_id)


@pytest.mark.privileged
def test_container_and_network_discovery_and_sigterm_on_a_real_postgres(postgres_on_our_network, tmp_path):
    env = postgres_on_our_network
    net, pg, run_id = env["network"], env["server"], env["run_id"]
    net_id = docker("network", "inspect", "-f", "{{.Id}}", net).stdout.strip()
    pg_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", pg).stdout.strip()
    bridge = f"br-{net_id[:12]}"

    by_container = find_target(container=pg)
    assert by_container.interfaces == [bridge] and by_container.hosts == [pg_ip]
    assert find_target(network=net).interfaces == [bridge]
    assert bridge in find_target().interfaces  # default: bridges of containers serving 5432

    expect = ["--expect", "tcp_keepalives_idle=1", "--expect", "tcp_keepalives_interval=1",
              "--expect", "tcp_keepalives_count=2"]
    pcap = str(tmp_path / "container.pcap")
    kaobs = [sys.executable, "-m", "kaobs", "watch"]
    by_name = subprocess.Popen([*kaobs, "--container", pg, "--write", pcap, *expect],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    by_network = subprocess.Popen([*kaobs, "--network", net, "--duration", "25", "--format", "json", *expect],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = f"kaobs-test-client-{run_id}"
    try:
        first = by_name.stdout.readline()  # printed once the capture is open
        assert "watching" in first and bridge in first and f"host {pg_ip}" in first, first
        time.sleep(1.0)  # the json one is silent: give it the same head start
        docker("run", "-d", "--name", client, "--network", net, "--label", f"{LABEL}={run_id}",
               "-e", "PGPASSWORD=x", IMAGE, "bash", "-c",
               f"(echo 'select 1;'; sleep 40) | psql -h {pg} -U postgres -At")
        time.sleep(3.5)  # connection up, a few answered server probes (idle 1 s)
        pid = docker("inspect", "-f", "{{.State.Pid}}", client).stdout.strip()
        for chain in ("INPUT", "OUTPUT"):  # the client vanishes: nothing in or out of its namespace
            subprocess.run(["nsenter", "-t", pid, "-n", "iptables", "-I", chain, "-j", "DROP"],
                           check=True, timeout=20, capture_output=True)
        time.sleep(4.0)  # two unanswered probes 1 s apart, then the server's RST
        by_name.send_signal(signal.SIGTERM)
        rest, err = by_name.communicate(timeout=20)
        doc_out, doc_err = by_network.communicate(timeout=40)
    finally:
        for process in (by_name, by_network):
            process.kill()
            process.wait(timeout=10)
    assert by_name.returncode == 0, err
    lines = rest.splitlines()
    assert any("server ABORT (RST) after 2 unanswered" in line for line in lines), rest
    assert "1 connection(s): 1 match" in rest
    # the pcap is complete and says the same
    again = subprocess.run([sys.executable, "-m", "kaobs", "analyze", pcap, "--format", "json", *expect],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    offline = json.loads(again.stdout)
    [conn] = offline["connections"]
    assert conn["server"] == f"{pg_ip}:5432" and conn["end_reason"] == "keepalive_abort" and conn["verdict"] == "match"
    # the network-wide watch saw the same connection
    assert by_network.returncode == 0, doc_err
    doc = json.loads(doc_out)
    [seen] = doc["connections"]
    assert seen["client"] == conn["client"] and seen["end_reason"] == "keepalive_abort"
    assert [p["t"] for p in seen["sides"]["server"]["probes"]] == pytest.approx(
        [p["t"] for p in conn["sides"]["server"]["probes"]], abs=0.001)
