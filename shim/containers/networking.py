"""A container's networking, from ``vmshim run`` flags to live endpoints and back.

:func:`parse_request` checks the flags (no side effects). :func:`connect` makes the
container's endpoints when it starts: for each network its bridge, NAT and resolver
(made on first use in this network namespace), an address and MAC from the store, the
published ports (DNAT to the first network's address), the DNS entry; for
``--isolation process`` also the container's network namespace with one veth per
network. :func:`disconnect` undoes all of it and is idempotent (safe after a crash).

What each placement does with the result (:class:`ContainerNetwork`):

- VM: one ``Interface`` per network in the domain (:meth:`domain_interfaces`); the
  guest configures them from the boot config (:meth:`guest_network`). ``network
  connect`` of a running VM plugs one more in, ``disconnect`` unplugs it
  (shim.containers.netconnect).
- process: the agent joins :attr:`netns_path` and the container does not make a network
  namespace of its own (``--network host``: neither; ``none``: its own, only ``lo``).

Both: :meth:`hosts_file` and :meth:`resolv_conf` for the container's /etc.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from shim import paths
from shim.containers.netrequest import NetworkRequest
from shim.containers.store import ContainerStore, domain_name
from shim.errors import ContainerNotFound, NetworkError
from shim.network import dns, firewall, host
from shim.network.ports import (
    PortMapping,
    assign_host_ports,
    parse_publish,
)
from shim.network.store import (
    DEFAULT_NETWORK,
    PSEUDO_NETWORKS,
    Endpoint,
    Network,
    NetworkStore,
    mac_for,
    netns_key,
    process_start,
    valid_alias,
)

MODES = ("bridge", "none", "host")
DEFAULT_NETWORK_ENV = "VMSHIM_DEFAULT_NETWORK"
DEFAULT_NETWORK_FILE = "default-network"
HOST_CONFIG_DIR = Path("/etc/vmshim")
"""The network of containers run without ``--network``: ``$VMSHIM_DEFAULT_NETWORK``, else
the one word in ``<state root>/networks/default-network``, else the one in
``/etc/vmshim/default-network`` (for every state root of the host), else ``bridge``.
``none`` is docker's ``dockerd --bridge=none``: no bridge or NAT is made unless asked."""


def default_network() -> str:
    value = os.environ.get(DEFAULT_NETWORK_ENV, "").strip()
    for path in (paths.root() / "networks" / DEFAULT_NETWORK_FILE, HOST_CONFIG_DIR / DEFAULT_NETWORK_FILE):
        if value:
            break
        try:
            value = path.read_text().strip()
        except OSError:
            value = ""
    return value or DEFAULT_NETWORK


HOST_GATEWAY = "host-gateway"
"""``--add-host name:host-gateway`` maps *name* to the first network's gateway (the host)."""
HOST_NAMES = ("host.vmshim.internal", "host.docker.internal")
"""With ``--network host`` these name the host's loopback as the container reaches it."""
SLIRP_MAC = "02:42:0a:00:02:0f"
SLIRP_ADDRESS = "10.0.2.15/24"
SLIRP_HOST = "10.0.2.2"
"""QEMU's user-mode network: the guest's address, and the host (its 127.0.0.1)."""
SLIRP_DNS = "10.0.2.3"
"""QEMU's DNS forwarder: it asks the host's resolvers (loopback ones too)."""


def parse_request(
    *,
    network: list[str] | str | None = None,
    aliases=(),
    publish=(),
    publish_all: bool = False,
    expose=(),
    ip: str | None = None,
    mac: str | None = None,
    dns_servers=(),
    dns_search=(),
    dns_options=(),
    add_hosts=(),
) -> NetworkRequest:
    """Check ``--network``, ``--network-alias``, ``-p``, ``-P``, ``--expose``, ``--ip``,
    ``--mac-address``, ``--dns*``, ``--add-host``. Raises NetworkError naming the flag."""
    nets = [network] if isinstance(network, str) else list(network or [])
    nets = [n for n in nets if n] or [default_network()]
    if any(n in PSEUDO_NETWORKS for n in nets) and len(nets) > 1:
        raise NetworkError(f"--network {', '.join(nets)}: none and host cannot be combined with other networks")
    if len(set(nets)) != len(nets):
        raise NetworkError(f"--network {', '.join(nets)}: a network is named twice")
    if any(n.startswith("container:") for n in nets):
        raise NetworkError(
            "--network container:NAME is not supported: each container is its own VM with its own network stack"
        )
    req = NetworkRequest(
        networks=nets,
        publish_all=publish_all,
        expose=list(expose),
        dns_search=list(dns_search),
        dns_options=list(dns_options),
    )
    alias_list = []
    for spec in publish:
        req.publish += parse_publish(spec)
    if req.mode != "bridge" and (req.publish or publish_all):
        raise NetworkError(
            f"-p/-P have no effect with --network {req.mode}: "
            + (
                "nothing can reach the container"
                if req.mode == "none"
                else "the container uses the host's ports directly"
            )
        )
    for alias in aliases:
        if not valid_alias(alias):
            raise NetworkError(f"invalid --network-alias {alias!r}")
        alias_list.append(alias)
    user_networks = [n for n in nets if n not in PSEUDO_NETWORKS and n != DEFAULT_NETWORK]
    if alias_list and not user_networks:
        raise NetworkError(
            "--network-alias needs a user-defined network (vmshim network "
            "create NAME; --network NAME): the default network has no "
            "name resolution"
        )
    if ip is not None:
        if not user_networks:
            raise NetworkError("--ip needs a user-defined network (the default network assigns addresses itself)")
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise NetworkError(f"invalid --ip {ip!r}: an IPv4 address is needed") from None
    for index, net in enumerate(user_networks):
        config: dict[str, list[str] | str] = {}
        if alias_list:
            config["aliases"] = list(alias_list)
        if ip is not None and index == 0:
            config["ip"] = ip
        if config:
            req.endpoint_config[net] = config
    if mac is not None:
        from guest.spec import is_mac

        if req.mode != "bridge":
            raise NetworkError(f"--mac-address has no effect with --network {req.mode}")
        if not is_mac(mac):
            raise NetworkError(
                f"invalid --mac-address {mac!r}: six hex octets like 02:42:ac:11:00:02, unicast (first octet even)"
            )
        req.mac = mac.lower()
    for server in dns_servers:
        try:
            req.dns.append(str(ipaddress.ip_address(server)))
        except ValueError:
            raise NetworkError(f"invalid --dns {server!r}: an IP address is needed") from None
    for entry in add_hosts:
        req.add_hosts.append(_parse_add_host(entry))
    for option in list(dns_search) + list(dns_options):
        if not option or any(c.isspace() for c in option):
            raise NetworkError(f"invalid --dns-search/--dns-option {option!r}")
    return req


def check_networks_exist(request: NetworkRequest) -> None:
    """Raise NetworkNotFound unless every network *request* names exists."""
    if request.mode != "bridge":
        return
    store = NetworkStore()
    for ref in request.networks:
        store.get(ref)


def _parse_add_host(entry: str) -> tuple[str, str]:
    sep = "=" if "=" in entry else ":"
    name, _, addr = entry.partition(sep)
    if not name or not addr or not valid_alias(name):
        raise NetworkError(f"invalid --add-host {entry!r}: expected NAME:IP (or NAME:{HOST_GATEWAY})")
    if addr != HOST_GATEWAY:
        try:
            addr = str(ipaddress.ip_address(addr.strip("[]")))
        except ValueError:
            raise NetworkError(f"invalid --add-host {entry!r}: {addr!r} is not an IP address") from None
    return name, addr


# ---- the live result ---------------------------------------------------------------------


@dataclass
class ContainerNetwork:
    """A container's endpoints once :func:`connect` made them (primary network first)."""

    container_id: str
    name: str
    isolation: str
    request: NetworkRequest
    endpoints: list[tuple[Network, Endpoint]] = field(default_factory=list)
    netns_path: Path | None = None
    """--isolation process with networks: the namespace the agent must join."""

    @property
    def mode(self) -> str:
        return self.request.mode

    @property
    def ports(self) -> list[PortMapping]:
        """The published ports (they DNAT to the first network's address)."""
        return list(self.endpoints[0][1].ports) if self.endpoints else []

    @property
    def primary_ip(self) -> str | None:
        return self.endpoints[0][1].ip if self.endpoints else None

    @property
    def vm_host_mode(self) -> bool:
        return self.mode == "host" and self.isolation == "vm"

    def host_address(self) -> str | None:
        """How the container reaches the host: the first network's gateway; with
        ``--network host`` the host's loopback (VM: QEMU's alias for it)."""
        if self.mode == "host":
            return SLIRP_HOST if self.isolation == "vm" else "127.0.0.1"
        if self.endpoints:
            return self.gateway() or self.endpoints[0][0].gateway
        return None

    def gateway(self) -> str | None:
        """The gateway of the first network that leads out (not --internal)."""
        for net, _ in self.endpoints:
            if not net.internal:
                return net.gateway
        return None

    def guest_network(self) -> dict:
        """BootConfig.network for the VM (``{}``: only lo)."""
        if self.vm_host_mode:
            return {"interfaces": [{"mac": SLIRP_MAC, "address": SLIRP_ADDRESS, "gateway": SLIRP_HOST}]}
        gateway = self.gateway()
        interfaces = []
        for net, ep in self.endpoints:
            iface = _guest_interface(net, ep)
            if gateway is not None and net.gateway == gateway and not net.internal:
                iface["gateway"] = gateway
                gateway = None
            interfaces.append(iface)
        return {"interfaces": interfaces} if interfaces else {}

    def domain_interfaces(self) -> list:
        from shim.vm.domain import Interface

        if self.vm_host_mode:
            return [Interface(type="user", mac=SLIRP_MAC)]
        return [Interface(bridge=net.bridge, mac=ep.mac, tap=ep.host_ifname) for net, ep in self.endpoints]

    def hosts_file(self, hostname: str) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if self.mode == "bridge" and self.primary_ip:
            lines.append(f"{self.primary_ip}\t{hostname}")
        else:
            lines.append(f"127.0.1.1\t{hostname}")
        if self.mode == "host":
            lines.append(f"{self.host_address()}\t{' '.join(HOST_NAMES)}")
        for name, addr in self.request.add_hosts:
            if addr == HOST_GATEWAY:
                addr = self.host_address() or "127.0.0.1"
            lines.append(f"{addr}\t{name}")
        return "\n".join(lines) + "\n"

    def resolv_conf(self, host_resolv: str) -> str:
        """The container's resolv.conf. *host_resolv*: the host's (with ``--network
        host`` in process isolation as it is, else without loopback servers, see
        shim.network.dns.host_resolv_conf)."""
        req = self.request
        if self.mode == "bridge" and self.endpoints and self.endpoints[0][0].dns:
            return dns.resolv_conf(
                self.endpoints[0][0], servers=req.dns, search=req.dns_search, options=req.dns_options
            )
        if self.vm_host_mode:
            host_resolv = (
                "\n".join(
                    [ln for ln in host_resolv.splitlines() if not ln.startswith("nameserver")]
                    + [f"nameserver {SLIRP_DNS}"]
                )
                + "\n"
            )
        if not (req.dns or req.dns_search or req.dns_options):
            return host_resolv
        kept = [
            ln
            for ln in host_resolv.splitlines()
            if not (req.dns and ln.startswith("nameserver"))
            and not (req.dns_search and ln.startswith(("search", "domain")))
            and not (req.dns_options and ln.startswith("options"))
        ]
        kept += [f"nameserver {s}" for s in req.dns]
        if req.dns_search:
            kept.append("search " + " ".join(req.dns_search))
        if req.dns_options:
            kept.append("options " + " ".join(req.dns_options))
        return "\n".join(kept) + "\n"


def _guest_interface(net: Network, ep: Endpoint) -> dict:
    """One entry of BootConfig.network (or of a ``netconf`` request), without gateway."""
    iface = {"mac": ep.mac, "address": f"{ep.ip}/{net.prefixlen}"}
    if ep.ip6:
        iface["address6"] = f"{ep.ip6}/{net.prefixlen6}"
    return iface


def netns_dir() -> Path:
    return paths.run_dir() / "netns"


def _host_ifname(kind: str, container_id: str, index: int) -> str:
    """``vmt``/``vmv`` + 11 hex digits of the id + the NIC's index: 15 characters."""
    return f"{kind}{container_id[:11]}{index}"


# ---- connect / disconnect ----------------------------------------------------------------


def materialize(store: NetworkStore, net: Network) -> None:
    """Make *net* live in this network namespace: bridge, NAT rules, resolver.
    Idempotent. Precondition: the store's lock is held."""
    if not host.is_root():
        raise NetworkError("container networking needs root (bridges and NAT); use --network none or run as root")
    mac = mac_for(net.gateway)
    host.ensure_bridge(net.bridge, net.gateway, net.prefixlen, mac, net.gateway6, net.prefixlen6)
    firewall.ensure_table()
    firewall.ensure_network(net.name, net.bridge, net.subnet, net.internal, net.ipv6)
    if net.dns:
        dns.ensure(net)


def connect(
    container_id: str,
    name: str,
    request: NetworkRequest,
    *,
    isolation: str,
    image_config: dict | None = None,
    store: NetworkStore | None = None,
    owner_pid: int | None = None,
    first_nic: tuple[str, str] | None = None,
) -> ContainerNetwork:
    """Make the container's endpoints (see the module's docstring). *first_nic*: ``(tap,
    mac)`` of a NIC the container's VM already has on its first network (a pooled VM's,
    shim.containers.pool): the first endpoint takes that tap and MAC. On failure nothing
    is left behind. Raises NetworkError / NetworkNotFound."""
    store = store or NetworkStore()
    result = ContainerNetwork(container_id=container_id, name=name, isolation=isolation, request=request)
    if request.mode != "bridge":
        return result
    owner = owner_pid or os.getpid()
    with store.locked():
        nets = [store.get(ref) for ref in request.networks]
        reclaim_stale(store)
        try:
            _connect_locked(store, result, nets, image_config or {}, owner, first_nic)
        except BaseException:
            disconnect(container_id, store=store)
            raise
    return result


def _connect_locked(
    store: NetworkStore,
    result: ContainerNetwork,
    nets: list[Network],
    image_config: dict,
    owner: int,
    first_nic: tuple[str, str] | None = None,
) -> None:
    request, cid = result.request, result.container_id
    netns = netns_key()
    netns_path = None  # process isolation: the container's own network namespace
    if result.isolation == "process":
        netns_path = result.netns_path = netns_dir() / cid
        host.delete_netns(netns_path)  # a leftover of a crashed run
        host.create_netns(netns_path)
    for index, (ref, net) in enumerate(zip(request.networks, nets, strict=True)):
        materialize(store, net)
        ip = net.free_ip(request.ip_for(ref))
        mac = request.mac if (index == 0 and request.mac) else mac_for(ip)
        kind = "vmt" if result.isolation == "vm" else "vmv"
        ifname = _host_ifname(kind, cid, index)
        if index == 0 and first_nic is not None:
            ifname, mac = first_nic
        endpoint = Endpoint(
            container_id=cid,
            container_name=result.name,
            ip=ip,
            mac=mac,
            aliases=request.aliases_for(ref),
            ip6=net.free_ip6(),
            isolation=result.isolation,
            host_ifname=ifname,
            netns=netns,
            owner_pid=owner,
            owner_start=process_start(owner),
        )
        if index == 0:
            wanted = request.resolve_exposed(image_config).publish
            endpoint.ports = assign_host_ports(wanted, store.published_ports(netns))
        store.add_endpoint(net, endpoint)
        result.endpoints.append((net, endpoint))
        # no spoofing other containers
        firewall.guard_port(endpoint.host_ifname, mac, ip, endpoint.ip6)
        if netns_path is not None:
            gateway = result.gateway()
            host.add_veth(
                netns_path,
                host_ifname=endpoint.host_ifname,
                bridge=net.bridge,
                mac=mac,
                address=ip,
                prefixlen=net.prefixlen,
                gateway=gateway if gateway == net.gateway else None,
                ifname=f"eth{index}",
                address6=_guest_interface(net, endpoint).get("address6", ""),
            )
        if endpoint.ports:
            firewall.publish(cid, ip, endpoint.ports)
        if net.dns:
            dns.add(net, endpoint)


def disconnect(container_id: str, *, store: NetworkStore | None = None, networks: list[str] | None = None) -> int:
    """Remove the container's endpoints (on *networks*, default all): DNAT rules, DNS
    entries, veths, addresses, and (when all go) its network namespace. Idempotent;
    returns how many endpoints were removed. Errors of single steps are collected and
    raised together as NetworkError after everything else was done."""
    store = store or NetworkStore()
    errors: list[str] = []
    removed = 0
    with store.locked():
        for net, ep in store.endpoints_of(container_id):
            if networks is not None and net.name not in networks:
                continue
            here = _in_this_netns(ep)
            if ep.ports and here:
                _collect(errors, firewall.unpublish, container_id)
            if net.dns:
                dns.remove(net, container_id)
            if ep.isolation == "process" and here:
                _collect(errors, host.delete_link, ep.host_ifname)
            if here:
                _collect(errors, firewall.unguard_port, ep.host_ifname)
            store.remove_endpoint(net.name, container_id)
            removed += 1
        if networks is None or not store.endpoints_of(container_id):
            host.delete_netns(netns_dir() / container_id)
    if errors:
        raise NetworkError("; ".join(errors))
    return removed


def _in_this_netns(ep: Endpoint) -> bool:
    try:
        return not ep.netns or ep.netns == netns_key()
    except OSError:
        return False


def _collect(errors: list[str], func, *args) -> None:
    try:
        func(*args)
    except NetworkError as exc:
        errors.append(str(exc))


def reclaim_stale(store: NetworkStore) -> list[str]:
    """Disconnect containers whose endpoints' owner is gone (a killed ``run``); return
    their ids. Endpoints of live VMs are kept: a VM outlives a killed monitor."""
    ids = []
    for _net, ep in store.stale_endpoints():
        if ep.container_id in ids:
            continue
        if ep.isolation == "vm" and _domain_alive(ep.container_id):
            continue
        try:
            disconnect(ep.container_id, store=store)
        except NetworkError:
            pass
        ids.append(ep.container_id)
    return ids


def claim(container_id: str, pid: int, *, store: NetworkStore | None = None) -> None:
    """Make *pid* (a monitor) the owner of the container's endpoints."""
    store = store or NetworkStore()
    with store.locked():
        for net, ep in store.endpoints_of(container_id):
            ep.owner_pid, ep.owner_start = pid, process_start(pid)
            store.add_endpoint(net, ep)


def _domain_alive(container_id: str) -> bool:
    """Whether libvirt still runs the container's VM (unknown → assume it does)."""
    try:
        from shim.vm.libvirt_backend import LibvirtBackend

        return LibvirtBackend().is_running(domain_name(container_id))
    except Exception:  # noqa: BLE001 - libvirtd away: keep the endpoint
        return True


# ---- networks ----------------------------------------------------------------------------


def remove_network(ref: str, *, store: NetworkStore | None = None) -> Network:
    """Remove a user network: its resolver, NAT rules and bridge here, and its record.
    Raises NetworkError if containers are attached or it is the default network."""
    store = store or NetworkStore()
    with store.locked():
        net = store.get(ref)
        if net.is_default:
            raise NetworkError(f"the default network {net.name} cannot be removed")
        reclaim_stale(store)
        net = _wait_for_leavers(store, store.get(net.name))
        if net.endpoints:
            names = ", ".join(sorted(e.container_name for e in net.endpoints.values()))
            raise NetworkError(f"network {net.name} has containers attached: {names}")
        dns.stop(net)
        firewall.remove_network(net.name, net.bridge)
        host.delete_link(net.bridge)
        dns.remove_state(net)
        store.delete(net.name)
        return net


LEAVE_TIMEOUT = 20.0
"""How long ``network rm`` waits for containers that ended but whose monitor is still
taking their VM down (``run --rm`` returns with the exit code, before that)."""


def _wait_for_leavers(store: NetworkStore, net: Network) -> Network:
    """Wait (lock released meanwhile) while every endpoint left on *net* belongs to a
    container that is no longer running; return the network as it is then."""
    import time

    deadline = time.monotonic() + LEAVE_TIMEOUT
    while net.endpoints and all(not _container_running(cid) for cid in net.endpoints):
        if time.monotonic() > deadline:
            break
        with store.unlocked():
            time.sleep(0.1)
        net = store.get(net.name)
    return net


def _container_running(container_id: str) -> bool:
    """Whether the container's record says it runs (no record: it is being removed)."""
    try:
        try:
            record = ContainerStore().load(container_id)
        except ContainerNotFound:
            return False
        return record.state.status in ("running", "paused")
    except Exception:  # noqa: BLE001 - no readable record: assume it runs
        return True


def create_network(
    name: str,
    *,
    subnet: str | None = None,
    gateway: str | None = None,
    internal: bool = False,
    labels: dict[str, str] | None = None,
    store: NetworkStore | None = None,
    ipv6: bool = False,
    subnet6: str | None = None,
) -> Network:
    """Record a network and make it live here (bridge, NAT, resolver). *ipv6*: dual
    stack (*subnet6* or a random unique-local /64). Raises NetworkError."""
    store = store or NetworkStore()
    with store.locked():
        ours = {n.subnet for n in store.list()}
        routes = [r for r in (host.routes() if host.is_root() else []) if r not in ours]
        net = store.create(
            name,
            subnet=subnet,
            gateway=gateway,
            internal=internal,
            labels=labels,
            host_routes=routes,
            ipv6=ipv6,
            subnet6=subnet6,
        )
        try:
            materialize(store, net)
        except BaseException:
            store.delete(net.name)
            try:
                host.delete_link(net.bridge)
            except NetworkError:
                pass
            raise
        return net


def prune_networks(*, store: NetworkStore | None = None) -> list[str]:
    """Remove every user network without containers (after reclaiming endpoints of
    crashed containers); return their names."""
    store = store or NetworkStore()
    removed = []
    with store.locked():
        reclaim_stale(store)
        for net in store.list():
            if not net.is_default and not net.endpoints:
                remove_network(net.name, store=store)
                removed.append(net.name)
    return removed


# ---- what placements call ------------------------------------------------------------------


def start(
    container_id: str,
    name: str,
    isolation: str,
    request: NetworkRequest | None,
    boot,
    *,
    owner_pid: int | None = None,
    first_nic: tuple[str, str] | None = None,
):
    """Connect the container (see :func:`connect`, *first_nic* too) and return ``(network, boot)``: the
    :class:`ContainerNetwork` and *boot* (a guest.spec.BootConfig) with the container's
    hosts, resolv.conf and (VM) NIC configuration filled in. *request* None: no
    networking at all (a record made before networking existed): ``(None, boot)``."""
    if request is None:
        return None, boot
    cn = connect(container_id, name, request, isolation=isolation, owner_pid=owner_pid, first_nic=first_nic)
    try:
        if cn.mode == "host" and isolation == "process":
            host_resolv = _read("/etc/resolv.conf")  # the same network: loopback works
        else:
            host_resolv = dns.host_resolv_conf()
        boot = boot.replace(
            hosts=cn.hosts_file(boot.hostname),
            resolv_conf=cn.resolv_conf(host_resolv),
            network=cn.guest_network() if isolation == "vm" else {},
        )
    except BaseException:
        disconnect(container_id)
        raise
    return cn, boot


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def stop(container_id: str, log=None) -> None:
    """Disconnect the container after it ended. Never raises (*log* gets the error)."""
    try:
        disconnect(container_id)
    except Exception as exc:  # noqa: BLE001 - teardown goes on
        if log is not None:
            log(f"network teardown: {exc}")


# ---- network connect / disconnect / port -------------------------------------------------


def _container_record(ref: str):
    store = ContainerStore()
    return store, store.find(ref)


def published_ports(ref: str) -> list[PortMapping]:
    """The ports published for container *ref* (name or id) now. Raises
    ContainerNotFound."""
    store = NetworkStore()
    cid = None
    try:
        _cstore, record = _container_record(ref)
        cid = record.id
    except (ContainerNotFound, ImportError):
        cid = store.find_container(ref)
    if cid is None:
        raise ContainerNotFound(f"no such container: {ref}")
    return [p for _net, ep in store.endpoints_of(cid) for p in ep.ports]


def network_settings(container_id: str, request: NetworkRequest | None) -> dict:
    """docker inspect's ``NetworkSettings`` of a container: its networks (address, MAC,
    gateway, aliases while it runs) and published ports."""
    store = NetworkStore()
    live = {net.name: (net, ep) for net, ep in store.endpoints_of(container_id)}
    networks: dict[str, dict] = {}
    ports: dict[str, list[dict[str, str]]] = {}
    for name in request.networks if request is not None else []:
        net_ep = live.get(name)
        if net_ep is None:
            networks[name] = {
                "IPAddress": "",
                "IPPrefixLen": 0,
                "Gateway": "",
                "MacAddress": "",
                "Aliases": request.aliases_for(name) if request is not None else [],
            }
            continue
        net, ep = net_ep
        networks[name] = {
            "NetworkID": net.id,
            "IPAddress": ep.ip,
            "IPPrefixLen": net.prefixlen,
            "Gateway": net.gateway,
            "GlobalIPv6Address": ep.ip6,
            "GlobalIPv6PrefixLen": net.prefixlen6 if ep.ip6 else 0,
            "IPv6Gateway": net.gateway6 if ep.ip6 else "",
            "MacAddress": ep.mac,
            "Aliases": ep.aliases,
        }
        for p in ep.ports:
            ports.setdefault(f"{p.container_port}/{p.protocol}", []).append(
                {"HostIp": p.host_ip, "HostPort": str(p.host_port)}
            )
    first = next(iter(networks.values()), {})
    return {
        "Networks": networks,
        "Ports": ports,
        "IPAddress": first.get("IPAddress", ""),
        "GlobalIPv6Address": first.get("GlobalIPv6Address", ""),
        "Gateway": first.get("Gateway", ""),
        "MacAddress": first.get("MacAddress", ""),
    }
