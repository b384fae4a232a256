"""Networks and their endpoints on disk, and address management (IPAM).

Layout under ``paths.root()/networks``::

    .lock            flock(2) held for every read-modify-write (and by callers for the
                     whole of a container's setup, so bridges and rules are made once)
    <name>.json      one network: its config and its endpoints (one per attached
                     container: address, MAC, aliases, published ports)

Every write goes to a temporary file that is renamed over the old one, so a crash
leaves either the old or the new record, never half of one.

Subnets: the default network ``bridge`` is 10.88.0.0/16; user-defined networks get the
first free /24 of 10.89.0.0/16 (then 10.90…) that overlaps neither another network nor a
route of the host, unless ``--subnet`` says otherwise. Addresses are handed out lowest
first; the network address, the gateway (the first host address) and the broadcast are
never given out. MACs are ``02:42`` + the IPv4 address (docker's scheme: unique on a
bridge, stable across restarts) unless ``--mac-address`` says otherwise.

IPv6 (``network create --ipv6``): a network may also have an IPv6 subnet (``subnet6``,
a /64 to /120; ``--subnet fd00:…/64`` or a random unique-local /64), its gateway the
first host address; each endpoint then gets ``ip6`` as well, lowest free first.

Endpoints are runtime state: made when a container starts, dropped when it stops. Each
records the process that owns it (``owner_pid``) and the network namespace its kernel
objects live in (``netns``); an endpoint whose owner is gone is *stale* and can be
reclaimed (see :meth:`NetworkStore.stale_endpoints`).
"""

from __future__ import annotations

import builtins
import fcntl
import ipaddress
import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from shim import paths
from shim.errors import NetworkError, NetworkNotFound
from shim.network.names import DEFAULT_NETWORK, PSEUDO_NETWORKS
from shim.network.ports import PortMapping

DEFAULT_SUBNET = "10.88.0.0/16"
DEFAULT_BRIDGE = "vmshim0"
USER_POOLS = ("10.89.0.0/16", "10.90.0.0/16", "10.91.0.0/16")
USER_PREFIX = 24
BRIDGE_PREFIX = "vmsbr"
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_ALIAS = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,251}[a-zA-Z0-9])?$")


def netns_key(pid: int | str = "self") -> str:
    """Identity of a network namespace (device:inode of its nsfs file)."""
    st = os.stat(f"/proc/{pid}/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def process_start(pid: int) -> str:
    """Start time of *pid* in clock ticks ("" if it does not exist): with the pid, it
    names one process even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def valid_alias(name: str) -> bool:
    return bool(_ALIAS.match(name or ""))


@dataclass
class Endpoint:
    """One container's attachment to one network."""

    container_id: str
    container_name: str
    ip: str
    mac: str
    aliases: list[str] = field(default_factory=list)
    ports: list[PortMapping] = field(default_factory=list)
    isolation: str = "vm"
    host_ifname: str = ""
    """The tap (VM) or veth (process) on the bridge."""
    ip6: str = ""
    """Its IPv6 address on a dual-stack network ("" otherwise)."""
    netns: str = ""
    """:func:`netns_key` of the namespace where the bridge, rules and DNS entry are."""
    owner_pid: int = 0
    owner_start: str = ""

    def to_dict(self) -> dict:
        return {
            "container_id": self.container_id,
            "container_name": self.container_name,
            "ip": self.ip,
            "mac": self.mac,
            "aliases": list(self.aliases),
            "ports": [p.to_dict() for p in self.ports],
            "isolation": self.isolation,
            "host_ifname": self.host_ifname,
            "netns": self.netns,
            "ip6": self.ip6,
            "owner_pid": self.owner_pid,
            "owner_start": self.owner_start,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Endpoint:
        return cls(
            container_id=data["container_id"],
            container_name=data["container_name"],
            ip=data["ip"],
            mac=data["mac"],
            aliases=list(data.get("aliases", [])),
            ports=[PortMapping.from_dict(p) for p in data.get("ports", [])],
            isolation=data.get("isolation", "vm"),
            host_ifname=data.get("host_ifname", ""),
            netns=data.get("netns", ""),
            ip6=data.get("ip6", ""),
            owner_pid=int(data.get("owner_pid", 0)),
            owner_start=data.get("owner_start", ""),
        )

    def owner_alive(self) -> bool:
        return bool(self.owner_pid) and process_start(self.owner_pid) == self.owner_start

    def names(self) -> list[str]:
        """What peers resolve to this endpoint: the name, the aliases, the short id."""
        out = []
        for name in [self.container_name, *self.aliases, self.container_id[:12]]:
            if name and name not in out:
                out.append(name)
        return out


@dataclass
class Network:
    """A bridge network. ``dns``: containers on it resolve each other by name (user
    networks; the default network does not, as in docker). ``internal``: no NAT out."""

    name: str
    id: str
    subnet: str
    gateway: str
    bridge: str
    driver: str = "bridge"
    internal: bool = False
    dns: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    created: str = ""
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    subnet6: str = ""
    """Dual stack: the IPv6 subnet ("" : IPv4 only)."""
    gateway6: str = ""

    @property
    def ipv6(self) -> bool:
        return bool(self.subnet6)

    @property
    def prefixlen6(self) -> int:
        return ipaddress.IPv6Network(self.subnet6).prefixlen if self.subnet6 else 0

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_NETWORK

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "id": self.id,
            "driver": self.driver,
            "subnet": self.subnet,
            "gateway": self.gateway,
            "bridge": self.bridge,
            "internal": self.internal,
            "dns": self.dns,
            "labels": dict(self.labels),
            "created": self.created,
            "subnet6": self.subnet6,
            "gateway6": self.gateway6,
            "endpoints": {k: e.to_dict() for k, e in sorted(self.endpoints.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Network:
        return cls(
            name=data["name"],
            id=data["id"],
            driver=data.get("driver", "bridge"),
            subnet=data["subnet"],
            gateway=data["gateway"],
            bridge=data["bridge"],
            internal=bool(data.get("internal", False)),
            dns=bool(data.get("dns", True)),
            labels=dict(data.get("labels", {})),
            created=data.get("created", ""),
            subnet6=data.get("subnet6", ""),
            gateway6=data.get("gateway6", ""),
            endpoints={k: Endpoint.from_dict(e) for k, e in (data.get("endpoints") or {}).items()},
        )

    def free_ip(self, requested: str | None = None) -> str:
        """The lowest free host address (or *requested*, if free and in the subnet).
        Raises NetworkError."""
        net = ipaddress.IPv4Network(self.subnet)
        used = {e.ip for e in self.endpoints.values()} | {self.gateway}
        if requested is not None:
            addr = _host_address(
                requested, net, "--ip", f"network {self.name} ({self.subnet})", ": not an IPv4 address"
            )
            if str(addr) in used:
                raise NetworkError(f"--ip {requested} is in use on network {self.name}")
            return str(addr)
        for addr in net.hosts():
            if str(addr) not in used:
                return str(addr)
        raise NetworkError(f"network {self.name} ({self.subnet}) has no free address left")

    def free_ip6(self) -> str:
        """The lowest free IPv6 host address ("" on an IPv4-only network). Raises
        NetworkError when none is left."""
        if not self.subnet6:
            return ""
        used = {e.ip6 for e in self.endpoints.values()} | {self.gateway6}
        net = ipaddress.IPv6Network(self.subnet6)
        for offset in range(1, min(net.num_addresses - 1, MAX_IP6_SCAN)):
            addr = str(net.network_address + offset)
            if addr not in used:
                return addr
        raise NetworkError(f"network {self.name} ({self.subnet6}) has no free IPv6 address left")


MAX_IP6_SCAN = 1 << 16
"""IPv6 addresses are handed out from the bottom of the subnet; a search stops here."""


def mac_for(ip: str) -> str:
    """``02:42`` + the four bytes of *ip*: locally administered, unicast."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class NetworkStore:
    """The networks under *root* (default ``paths.root()/networks``)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.root() / "networks"
        self._lock_fd: int | None = None
        self._depth = 0

    # ---- locking and files ---------------------------------------------------------------

    @contextmanager
    def locked(self):
        """Hold the store's exclusive lock (re-entrant within this object)."""
        if self._depth == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    @contextmanager
    def unlocked(self):
        """Let go of the lock for a while (waiting for another process), then take it
        back at the same depth."""
        depth, fd = self._depth, self._lock_fd
        if fd is None:
            yield self
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert self._depth == depth

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def save(self, net: Network) -> None:
        """Write *net* atomically. Precondition: the lock is held."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{net.name}.json.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(net.to_dict(), f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(net.name))

    def _read(self, path: Path) -> Network:
        try:
            return Network.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NetworkError(f"network record {path} is unreadable: {exc}") from None

    # ---- queries -------------------------------------------------------------------------

    def list(self) -> list[Network]:
        """Every network, the default one included (created on first use), by name."""
        self.default()
        out = []
        for path in sorted(self.root.glob("*.json")):
            try:
                out.append(self._read(path))
            except NetworkError:
                continue
        return out

    def get(self, ref: str) -> Network:
        """The network named *ref*, or whose id starts with *ref*. Raises NetworkNotFound
        (or NetworkError for an ambiguous id prefix)."""
        if ref == DEFAULT_NETWORK:
            return self.default()
        if _NAME.match(ref or "") and self._path(ref).exists():
            return self._read(self._path(ref))
        if ref and re.fullmatch(r"[0-9a-f]{1,64}", ref):
            hits = [n for n in self.list() if n.id.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise NetworkError(f"network id prefix {ref!r} is ambiguous: {', '.join(n.name for n in hits)}")
        raise NetworkNotFound(f"network {ref!r} not found (see 'vmshim network ls')")

    def endpoints_of(self, container_id: str) -> builtins.list[tuple[Network, Endpoint]]:
        return [(n, n.endpoints[container_id]) for n in self.list() if container_id in n.endpoints]

    def find_container(self, ref: str) -> str | None:
        """The id of the container named *ref* (or whose id starts with it) that has an
        endpoint on some network, or None."""
        for net in self.list():
            for cid, ep in net.endpoints.items():
                if ref in (ep.container_name, cid) or (len(ref) >= 4 and cid.startswith(ref)):
                    return cid
        return None

    # ---- networks ------------------------------------------------------------------------

    def default(self) -> Network:
        """The default network ``bridge``, created on first use."""
        path = self._path(DEFAULT_NETWORK)
        if path.exists():
            return self._read(path)
        with self.locked():
            if path.exists():
                return self._read(path)
            net = Network(
                name=DEFAULT_NETWORK,
                id=secrets.token_hex(32),
                subnet=DEFAULT_SUBNET,
                gateway=_first_host(DEFAULT_SUBNET),
                bridge=DEFAULT_BRIDGE,
                dns=False,
                created=_now(),
            )
            self.save(net)
            return net

    def create(
        self,
        name: str,
        *,
        subnet: str | None = None,
        gateway: str | None = None,
        internal: bool = False,
        labels: dict[str, str] | None = None,
        host_routes: Sequence[str] = (),
        ipv6: bool = False,
        subnet6: str | None = None,
    ) -> Network:
        """Record a new bridge network. *host_routes* (CIDRs) are avoided when picking a
        subnet. *ipv6*: dual stack, with *subnet6* or a random unique-local /64. Raises
        NetworkError (bad or taken name, overlapping subnet, bad gateway)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise NetworkError(
                f"invalid network name {name!r}: use letters, digits, "
                "'_', '.', '-' (at most 63, starting with a letter or digit)"
            )
        if name in PSEUDO_NETWORKS or name == DEFAULT_NETWORK:
            raise NetworkError(f"network name {name!r} is reserved")
        with self.locked():
            if self._path(name).exists():
                raise NetworkError(f"network {name} already exists")
            others = self.list()
            taken = [ipaddress.IPv4Network(n.subnet) for n in others]
            if subnet is not None:
                try:
                    chosen = ipaddress.IPv4Network(subnet, strict=False)
                except ValueError:
                    raise NetworkError(
                        f"invalid --subnet {subnet!r}: expected an IPv4 CIDR like 10.89.7.0/24"
                    ) from None
                if chosen.prefixlen > 30:
                    raise NetworkError(f"--subnet {subnet} is too small (at most /30)")
                for other, net in zip(taken, others):
                    if chosen.overlaps(other):
                        raise NetworkError(f"--subnet {chosen} overlaps network {net.name} ({net.subnet})")
            else:
                chosen = _pick_subnet(taken + [_as_net(r) for r in host_routes])
            if gateway is not None:
                gateway = str(_host_address(gateway, chosen, "--gateway", str(chosen)))
            chosen6 = _check_subnet6(subnet6, others) if ipv6 or subnet6 else None
            if chosen6 is not None and not ipv6:
                raise NetworkError(f"--subnet {subnet6} is IPv6: add --ipv6 for a dual-stack network")
            net_id = secrets.token_hex(32)
            net = Network(
                name=name,
                id=net_id,
                subnet=str(chosen),
                subnet6=str(chosen6) if chosen6 else "",
                gateway6=str(chosen6.network_address + 1) if chosen6 else "",
                gateway=gateway or _first_host(str(chosen)),
                bridge=BRIDGE_PREFIX + net_id[:10],
                internal=internal,
                labels=dict(labels or {}),
                created=_now(),
            )
            self.save(net)
            return net

    def delete(self, name: str) -> None:
        """Remove the record. Precondition: the caller checked it has no endpoints."""
        with self.locked():
            try:
                self._path(name).unlink()
            except FileNotFoundError:
                pass

    # ---- endpoints -----------------------------------------------------------------------

    def add_endpoint(self, net: Network, endpoint: Endpoint) -> None:
        with self.locked():
            fresh = self.get(net.name)
            fresh.endpoints[endpoint.container_id] = endpoint
            self.save(fresh)
            net.endpoints = fresh.endpoints

    def remove_endpoint(self, network: str, container_id: str) -> Endpoint | None:
        with self.locked():
            try:
                fresh = self.get(network)
            except NetworkNotFound:
                return None
            endpoint = fresh.endpoints.pop(container_id, None)
            if endpoint is not None:
                self.save(fresh)
            return endpoint

    def published_ports(self, netns: str) -> builtins.list[PortMapping]:
        """Every port published in network namespace *netns* (where they would clash)."""
        return [p for n in self.list() for e in n.endpoints.values() if e.netns == netns for p in e.ports]

    def stale_endpoints(self) -> builtins.list[tuple[Network, Endpoint]]:
        """Endpoints whose owning process is gone (a crashed ``run``, a killed monitor)."""
        return [(n, e) for n in self.list() for e in n.endpoints.values() if not e.owner_alive()]


def _check_subnet6(subnet6: str | None, others: list[Network]) -> ipaddress.IPv6Network:
    """The IPv6 subnet of a new network: *subnet6* checked (unicast, /64../120, not
    overlapping another network's), or a random unique-local /64 (RFC 4193)."""
    if subnet6 is None:
        return ipaddress.IPv6Network((b"\xfd" + secrets.token_bytes(7) + bytes(8), 64))
    try:
        chosen = ipaddress.IPv6Network(subnet6, strict=False)
    except ValueError:
        raise NetworkError(f"invalid --subnet {subnet6!r}: expected an IPv6 CIDR like fd00:89::/64") from None
    if not 64 <= chosen.prefixlen <= 120:
        raise NetworkError(f"--subnet {subnet6}: an IPv6 subnet must be /64 to /120")
    if (
        chosen.is_multicast
        or chosen.is_link_local
        or chosen.is_loopback
        or chosen.is_unspecified
        or chosen.network_address.ipv4_mapped
    ):
        raise NetworkError(f"--subnet {subnet6} is not a unicast IPv6 subnet")
    for net in others:
        if net.subnet6 and chosen.overlaps(ipaddress.IPv6Network(net.subnet6)):
            raise NetworkError(f"--subnet {chosen} overlaps network {net.name} ({net.subnet6})")
    return chosen


def _first_host(subnet: str) -> str:
    return str(next(ipaddress.IPv4Network(subnet).hosts()))


def _as_net(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr, strict=False)


def _host_address(text: str, net: ipaddress.IPv4Network, flag: str, where: str, why: str = "") -> ipaddress.IPv4Address:
    """*text* (given as *flag*) as a host address of *net* (named *where* in the error: not
    its network or broadcast address). Raises NetworkError (*why* explains a bad text)."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise NetworkError(f"invalid {flag} {text!r}{why}") from None
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise NetworkError(f"{flag} {text} is not a host address of {where}")
    return addr


def _pick_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    for pool in USER_POOLS:
        for candidate in ipaddress.IPv4Network(pool).subnets(new_prefix=USER_PREFIX):
            if not any(candidate.overlaps(t) for t in taken):
                return candidate
    raise NetworkError("no free /24 left in " + ", ".join(USER_POOLS) + ": remove unused networks or give --subnet")
