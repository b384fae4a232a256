"""``network connect`` and ``network disconnect`` of a container, also while it runs: a
veth into a process container's namespace, or a NIC plugged into a running VM
(:func:`_plug`: libvirt attach-device, then the agent's ``netconf`` through the
container's monitor) and unplugged again (:func:`_unplug`).

These verbs ask the monitor (shim.containers.manage), so they sit above it; what the
isolations call when a container starts and stops is in shim.containers.networking."""

from __future__ import annotations

from typing import Sequence

from shim.containers import monitor_api as api
from shim.containers.manage import _request
from shim.containers.networking import (
    NetworkRequest,
    _container_record,
    _guest_interface,
    _host_ifname,
    disconnect,
    materialize,
    netns_dir,
)
from shim.containers.state import Status
from shim.containers.store import Container, ContainerStore, domain_name
from shim.errors import ContainerNotFound, ContainerStateError, HypervisorError, NetworkError, VmshimError
from shim.network import dns, firewall, host
from shim.network.store import Endpoint, Network, NetworkStore, mac_for, netns_key, valid_alias
from shim.vm.domain import HOTPLUG_PORTS, Interface


def connect_container(ref: str, network: str, *, aliases: Sequence[str] = (), ip: str | None = None) -> None:
    """``network connect``: add *network* to the container's networks. A stopped
    container gets it at its next start; a running process container at once (a veth);
    a running VM container too: a NIC is plugged into the VM (libvirt attach-device, a
    spare PCIe root port) and the agent configures it (``netconf``). Raises
    NetworkError, NetworkNotFound, ContainerNotFound, HypervisorError."""
    nets = NetworkStore()
    net = nets.get(network)
    for alias in aliases:
        if not valid_alias(alias):
            raise NetworkError(f"invalid --alias {alias!r}")
    if aliases and net.is_default:
        raise NetworkError("--alias needs a user-defined network")
    if ip is not None:
        net.free_ip(ip)  # validates
    cstore, record = _container_record(ref)
    request = record.network
    if request is None:
        raise NetworkError(f"container {record.name} was created without networking")
    if request.mode != "bridge":
        raise NetworkError(f"container {record.name} uses --network {request.mode}: it cannot join other networks")
    if net.name in request.networks:
        raise NetworkError(f"container {record.name} is already on network {net.name}")
    running = record.status in (Status.RUNNING, Status.PAUSED)
    if record.status == Status.PAUSED and record.isolation == "vm":
        raise NetworkError(f"container {record.name} is paused: its VM cannot take a NIC now; unpause it first")
    request.networks.append(net.name)
    config: dict[str, str | list[str]] = {}
    if aliases:
        config["aliases"] = list(aliases)
    if ip:
        config["ip"] = ip
    if config:
        request.endpoint_config[net.name] = config
    if running:
        _connect_live(record, net, request)

    def change(r: Container) -> None:
        r.network = request

    cstore.update(record.id, change)


MAX_NICS = 10
"""NICs per container (host interface names end in one digit: 15 characters at most)."""
UNPLUG_TIMEOUT = 20.0
"""How long ``network disconnect`` waits for a running VM to let go of a NIC (~5 s: the
guest's PCIe hotplug driver waits 5 s after the request before it removes the device)."""
NETCONF_TIMEOUT = 40.0
"""How long the CLI waits for the monitor's answer to ``netconf`` (the agent waits up to
20 s for the plugged NIC to appear; the monitor gives it REPLY_TIMEOUT)."""


def _free_index(existing: list[tuple[Network, Endpoint]], kind: str, container_id: str) -> int:
    """The lowest NIC index whose host interface name no endpoint of the container uses."""
    used = {ep.host_ifname for _net, ep in existing}
    for index in range(MAX_NICS):
        if _host_ifname(kind, container_id, index) not in used:
            return index
    raise NetworkError(f"a container can be on at most {MAX_NICS} networks")


def _connect_live(record, net: Network, request: NetworkRequest) -> None:
    """Add an endpoint on *net* to a running container: a veth into a process
    container's namespace, or a NIC plugged into a VM (:func:`_plug`)."""
    vm = record.isolation == "vm"
    store = NetworkStore()
    with store.locked():
        existing = store.endpoints_of(record.id)
        if not existing:
            raise NetworkError(f"container {record.name} has no live network to extend")
        materialize(store, net)
        net = store.get(net.name)
        kind = "vmt" if vm else "vmv"
        index = _free_index(existing, kind, record.id)
        ip = net.free_ip(request.ip_for(net.name))
        owner = existing[0][1]
        endpoint = Endpoint(
            container_id=record.id,
            container_name=record.name,
            ip=ip,
            mac=mac_for(ip),
            aliases=request.aliases_for(net.name),
            ip6=net.free_ip6(),
            isolation=record.isolation,
            host_ifname=_host_ifname(kind, record.id, index),
            netns=netns_key(),
            owner_pid=owner.owner_pid,
            owner_start=owner.owner_start,
        )
        store.add_endpoint(net, endpoint)
        try:
            firewall.guard_port(endpoint.host_ifname, endpoint.mac, ip, endpoint.ip6)
            if not vm:
                host.add_veth(
                    netns_dir() / record.id,
                    host_ifname=endpoint.host_ifname,
                    bridge=net.bridge,
                    mac=endpoint.mac,
                    address=ip,
                    prefixlen=net.prefixlen,
                    gateway=None,
                    ifname=f"eth{index}",
                    address6=_guest_interface(net, endpoint).get("address6", ""),
                )
        except BaseException:
            store.remove_endpoint(net.name, record.id)
            firewall.unguard_port(endpoint.host_ifname)
            raise
    if vm:  # outside the lock: the guest takes seconds
        try:
            _plug(record, net, endpoint)
        except BaseException:
            disconnect(record.id, networks=[net.name])
            raise
    if net.dns:
        dns.add(net, endpoint)


def _vm_backend():
    from shim.vm.libvirt_backend import LibvirtBackend

    return LibvirtBackend()


def _plug(record, net: Network, endpoint: Endpoint, backend=None) -> None:
    """Plug *endpoint*'s NIC into the container's running VM and have the agent bring
    it up (``netconf``: address, IPv6 address, the subnet's route; the default route
    and resolv.conf stay those of the first network, as at boot). Unplugs it again on
    failure. Raises HypervisorError, NetworkError, ContainerStateError."""
    backend = backend or _vm_backend()
    domain = domain_name(record.id)
    try:
        backend.attach_interface(domain, Interface(bridge=net.bridge, mac=endpoint.mac, tap=endpoint.host_ifname))
    except HypervisorError as exc:
        raise NetworkError(
            f"{exc} (a VM takes at most {HOTPLUG_PORTS} NICs while it runs, "
            "and only if it was started on a bridge network: stop it and "
            "start it again to get them all)"
        ) from None
    try:
        netconf(record, [_guest_interface(net, endpoint)])
    except BaseException:
        try:
            backend.detach_interface(domain, endpoint.mac, UNPLUG_TIMEOUT)
        except Exception:  # noqa: BLE001 - the VM keeps an unconfigured NIC at worst
            pass
        raise


def netconf(record, interfaces: list[dict]) -> None:
    """Ask the container's monitor to have the agent configure *interfaces* (entries as
    in BootConfig.network). Raises NetworkError with the agent's (bounded) reason."""
    try:
        reply = _request(ContainerStore(), record, "netconf", NETCONF_TIMEOUT, interfaces=interfaces)
    except api.MonitorGone as exc:
        raise NetworkError(f"container {record.name}: {exc}") from None
    except (NetworkError, ContainerStateError):
        raise
    except VmshimError as exc:  # the agent's refusal (bounded by the monitor): one line
        raise NetworkError(f"container {record.name} could not configure the new interface: {exc}") from None
    if reply.type != api.REPLY:
        raise NetworkError(f"container {record.name}: unexpected answer {reply.type!r} to netconf")


def _unplug(record, net: Network, endpoint: Endpoint, backend=None) -> None:
    """Unplug *endpoint*'s NIC from the container's running VM and wait (bounded,
    UNPLUG_TIMEOUT) until the guest let go of it: its address and routes go with it."""
    backend = backend or _vm_backend()
    backend.detach_interface(domain_name(record.id), endpoint.mac, UNPLUG_TIMEOUT)


def disconnect_container(ref: str, network: str, *, force: bool = False) -> None:
    """``network disconnect``: take *network* off the container's networks (and its
    endpoint there, if running; for a running VM container at its next start).
    With *force*, also when the container record is gone (only the endpoint goes)."""
    nets = NetworkStore()
    net = nets.get(network)
    try:
        cstore, record = _container_record(ref)
    except ContainerNotFound:
        if not force:
            raise
        cid = nets.find_container(ref)
        if cid is None:
            raise
        disconnect(cid, networks=[net.name])
        return
    request = record.network if record.network is not None else NetworkRequest()
    if net.name not in request.networks:
        raise NetworkError(f"container {record.name} is not on network {net.name}")
    running = record.status in (Status.RUNNING, Status.PAUSED)
    if record.status == Status.PAUSED and record.isolation == "vm":
        raise NetworkError(f"container {record.name} is paused: its VM cannot let go of a NIC now; unpause it first")
    if running and request.networks[0] == net.name:
        raise NetworkError(
            f"network {net.name} is the first network of running container "
            f"{record.name} (its ports and default route): stop it first"
        )
    if running and record.isolation == "vm":
        live = dict((n.name, ep) for n, ep in nets.endpoints_of(record.id))
        if net.name in live:
            _unplug(record, net, live[net.name])
    if running:
        disconnect(record.id, networks=[net.name])
    request.networks.remove(net.name)
    request.endpoint_config.pop(net.name, None)
    if not request.networks:
        request.networks = ["none"]

    def change(r: Container) -> None:
        r.network = request

    cstore.update(record.id, change)
