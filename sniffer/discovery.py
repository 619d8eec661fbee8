"""Where to capture: interfaces (and addresses) of Docker containers and networks.

Traffic between a container and the host or another container on the same
Docker bridge network crosses the Linux bridge (docker0 for the default
network, ``br-<first 12 hex of the network id>`` or the network's
``com.docker.network.bridge.name`` option otherwise), so capturing on the
bridge sees every such packet once (the bridge is put in promiscuous mode, so
container-to-container packets are seen too).

The mapping from Docker's inspect documents to interfaces is pure (functions
over plain dicts, tested with fakes); only `find_target` talks to the engine.
Every failure is a `DiscoveryError` with one line for the user.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
DEFAULT_BRIDGE = "docker0"
TCP_LISTEN = "0A"
ANY = "any"
"""The pseudo-interface for all interfaces of the network namespace, as in tcpdump (read by one packet ring)."""
CHOICES = "choose with --interface IF, --container NAME or --network NAME"


class DiscoveryError(Exception):
    """No capture target could be found; the message is one line for the user."""


@dataclass(slots=True)
class Target:
    """What to capture: interfaces, optionally narrowed to some addresses, and words for the user."""

    interfaces: list[str]
    hosts: list[str] = field(default_factory=list)
    description: str = ""


# -- pure mapping ----------------------------------------------------------------


def bridge_name(network: dict[str, Any]) -> str:
    """The Linux bridge of a Docker network, from its inspect document.

    Raises DiscoveryError for a network that has no bridge (host, none,
    macvlan, overlay ...).
    """
    name = network.get("Name") or "?"
    driver = network.get("Driver") or "?"
    if driver != "bridge":
        raise DiscoveryError(f"Docker network {name} uses the {driver} driver: there is no bridge to capture on; "
                             "use --interface")
    options = network.get("Options") or {}
    explicit = options.get(BRIDGE_NAME_OPTION)
    if explicit:
        return explicit
    if name == "bridge":
        return DEFAULT_BRIDGE
    return "br-" + (network.get("Id") or "")[:12]


def container_addresses(container: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(network name, network id, address) for every network a container is on, IPv4 and IPv6."""
    found: list[tuple[str, str, str]] = []
    networks = ((container.get("NetworkSettings") or {}).get("Networks") or {})
    for net_name, endpoint in networks.items():
        endpoint = endpoint or {}
        network_id = endpoint.get("NetworkID") or ""
        for key in ("IPAddress", "GlobalIPv6Address"):
            address = endpoint.get(key)
            if address:
                found.append((net_name, network_id, address))
        if not endpoint.get("IPAddress") and not endpoint.get("GlobalIPv6Address"):
            found.append((net_name, network_id, ""))
    return found


def container_target(container: dict[str, Any], networks_by_id: dict[str, dict[str, Any]]) -> Target:
    """The bridges a container is attached to, and its addresses on them (for the BPF filter)."""
    name = (container.get("Name") or "?").lstrip("/")
    state = container.get("State") or {}
    if state and not state.get("Running", False):
        raise DiscoveryError(f"container {name} is not running ({state.get('Status', 'stopped')})")
    mode = (container.get("HostConfig") or {}).get("NetworkMode") or ""
    if mode == "host":
        raise DiscoveryError(f"container {name} uses the host network: capture with --interface lo "
                             "(or the host interface the clients come through)")
    if mode.startswith("container:"):
        raise DiscoveryError(f"container {name} shares the network of {mode[len('container:'):]}: "
                             "use --container with that one")
    interfaces: list[str] = []
    hosts: list[str] = []
    problems: list[str] = []
    for net_name, network_id, address in container_addresses(container):
        network = networks_by_id.get(network_id) or networks_by_id.get(net_name)
        if network is None:
            problems.append(f"network {net_name} not found")
            continue
        try:
            bridge = bridge_name(network)
        except DiscoveryError as error:
            problems.append(str(error))
            continue
        if bridge not in interfaces:
            interfaces.append(bridge)
        if address and address not in hosts:
            hosts.append(address)
    if not interfaces:
        why = "; ".join(problems) if problems else "it is on no network"
        raise DiscoveryError(f"no bridge to capture on for container {name}: {why}")
    return Target(interfaces, hosts, f"container {name} ({', '.join(hosts) or 'no address'}) on {', '.join(interfaces)}")


def listening_ports(proc_net_tcp: Iterable[str]) -> set[int]:
    """Ports in LISTEN state in the text of /proc/<pid>/net/tcp or tcp6."""
    ports: set[int] = set()
    for line in proc_net_tcp:
        fields = line.split()
        if len(fields) < 4 or fields[0] == "sl":
            continue
        local, state = fields[1], fields[3]
        if state == TCP_LISTEN and ":" in local:
            try:
                ports.add(int(local.rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return ports


def container_serves(container: dict[str, Any], ports: Sequence[int], listening: set[int] | None) -> bool:
    """Does a container expose or listen on one of the Postgres ports?

    `listening` is what its network namespace listens on (None when it could
    not be read); exposed/published ports count too, so an image declaring
    ``EXPOSE 5432`` is found before Postgres is up.
    """
    wanted = set(ports)
    if listening and wanted & listening:
        return True
    config = container.get("Config") or {}
    declared = set((config.get("ExposedPorts") or {}).keys())
    declared |= set(((container.get("NetworkSettings") or {}).get("Ports") or {}).keys())
    for spec in declared:
        number, _, proto = spec.partition("/")
        if (proto or "tcp") == "tcp" and number.isdigit() and int(number) in wanted:
            return True
    return False


def default_target(containers: Sequence[dict[str, Any]], networks_by_id: dict[str, dict[str, Any]],
                   ports: Sequence[int], listening_of, bridges_found: Sequence[str]) -> Target:
    """The bridges of the running containers that listen on / expose a Postgres port.

    `listening_of(container)` gives the container's listening ports or None.
    Raises DiscoveryError naming the choices when there is none.
    """
    interfaces: list[str] = []
    names: list[str] = []
    for container in containers:
        state = container.get("State") or {}
        if state and not state.get("Running", False):
            continue
        if not container_serves(container, ports, listening_of(container)):
            continue
        try:
            target = container_target(container, networks_by_id)
        except DiscoveryError:
            continue
        names.append((container.get("Name") or "?").lstrip("/"))
        for interface in target.interfaces:
            if interface not in interfaces:
                interfaces.append(interface)
    if not interfaces:
        port_words = "/".join(str(p) for p in ports)
        bridges = ", ".join(bridges_found) if bridges_found else "none"
        raise DiscoveryError(f"no running Docker container listens on port {port_words}; {CHOICES} "
                             f"(bridges found: {bridges})")
    return Target(interfaces, [], f"containers {', '.join(names)} on {', '.join(interfaces)}")


# -- the host and the engine -------------------------------------------------------


def host_bridges(sys_class_net: str = "/sys/class/net") -> list[str]:
    """Linux bridges on this host (any, not only Docker's), for error messages."""
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        return []
    return [n for n in names if os.path.isdir(os.path.join(sys_class_net, n, "bridge"))]


def _proc_listening(container: dict[str, Any]) -> set[int] | None:
    """Ports the container's network namespace listens on, via its init process's /proc."""
    pid = (container.get("State") or {}).get("Pid")
    if not pid:
        return None
    ports: set[int] = set()
    readable = False
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii", errors="replace") as f:
                ports |= listening_ports(f)
                readable = True
        except OSError:
            continue
    return ports if readable else None


def docker_client():
    """A docker SDK client that answers, or DiscoveryError saying why not, in one line."""
    try:
        import docker  # noqa: PLC0415 - only needed for --container/--network/default discovery
        from docker.errors import DockerException
    except ImportError:
        raise DiscoveryError("the docker Python SDK is not installed (pip install docker); use --interface") from None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except DockerException as error:
        text = str(error)
        if "Permission denied" in text or "PermissionError" in text:
            why = "permission denied on the Docker socket (run as root)"
        elif "No such file" in text or "FileNotFoundError" in text or "Connection refused" in text:
            why = "the Docker engine is not running"
        else:
            why = text.splitlines()[0][:160] if text else type(error).__name__
        raise DiscoveryError(f"cannot talk to Docker: {why}; use --interface IF to capture without Docker") from None
    return client


def find_target(*, interfaces: Sequence[str] = (), container: str | None = None, network: str | None = None,
                ports: Sequence[int] = (5432,), client=None) -> Target:
    """Resolve the command line's choice of target into interfaces and addresses."""
    chosen = [flag for flag, value in (("--interface", interfaces), ("--container", container), ("--network", network))
              if value]
    if len(chosen) > 1:
        raise DiscoveryError(f"give only one of --interface, --container, --network (got {' and '.join(chosen)})")
    if interfaces:
        missing = [name for name in interfaces if not interface_exists(name)]
        if missing:
            raise DiscoveryError(f"no such network interface: {', '.join(missing)} (interfaces here: "
                                 f"{', '.join(interface_names())})")
        if ANY in interfaces:  # all of them, as tcpdump -i any: the others named add nothing
            return Target([ANY], [], "any (all interfaces)")
        return Target(list(dict.fromkeys(interfaces)), [], ", ".join(interfaces))
    if client is None:
        client = docker_client()
    from docker.errors import DockerException, NotFound

    try:
        if container:
            try:
                attrs = client.api.inspect_container(container)
            except NotFound:
                raise DiscoveryError(f"no such Docker container: {container}") from None
            return _checked(container_target(attrs, _networks_by_id(client)))
        if network:
            try:
                attrs = client.api.inspect_network(network)
            except NotFound:
                raise DiscoveryError(f"no such Docker network: {network}") from None
            bridge = bridge_name(attrs)
            return _checked(Target([bridge], [], f"network {attrs.get('Name', network)} on {bridge}"))
        containers = [client.api.inspect_container(c["Id"]) for c in client.api.containers(filters={"status": "running"})]
        return _checked(default_target(containers, _networks_by_id(client), ports, _proc_listening, host_bridges()))
    except DockerException as error:
        raise DiscoveryError(f"Docker error: {str(error).splitlines()[0][:200]}") from None


def _networks_by_id(client) -> dict[str, dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    for network in client.api.networks():
        by_id[network["Id"]] = network
        by_id.setdefault(network["Name"], network)
    return by_id


def _checked(target: Target) -> Target:
    missing = [name for name in target.interfaces if not interface_exists(name)]
    if missing:
        raise DiscoveryError(f"bridge {', '.join(missing)} of {target.description} does not exist on this host "
                             "(is Docker running in another network namespace?); use --interface")
    return target


def interface_exists(name: str) -> bool:
    """Does this network namespace have an interface of that name? (`ANY`, all of them, always.)"""
    if name == ANY:
        return True
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def interface_names() -> list[str]:
    """Network interfaces of this namespace, for error messages."""
    return [name for _, name in socket.if_nameindex()]
