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

    monkeypatch.setattr(discovery, "_interface_exists", lambda name: name in ("docker0", "br-90f148a71f86", "lo"))
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
