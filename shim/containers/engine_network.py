"""A VM container's NICs in a network namespace an engine prepared (vmshim-runtime).

The container record's ``engine_netns`` names two namespaces: ``netns``, the container's
(held by vmshim-runtime's stand-in, or the ``path`` of config.json), and ``host_netns``,
where libvirtd opens taps (the namespace vmshim-runtime was called in). The VM placement
drives one :class:`EngineNetwork` through the VM's life (shim.network.engine_netns does
each step):

- :meth:`prepare` before the domain exists: open both namespaces (so they stay reachable
  whatever happens to the processes that named them), read the engine's interfaces, make
  one tap per interface; returns the guest's network config (same MACs, addresses, MTU,
  default route);
- :meth:`interfaces` for the domain XML;
- :meth:`wire` once the domain runs: taps into the container's namespace, tc redirects;
- :meth:`close` when the VM is gone: taps deleted, namespaces let go of.

Later changes follow (``docker network connect`` / ``disconnect``): :meth:`watch_socket`
is a netlink socket in the container's namespace that wakes the monitor on link and address
changes; :meth:`changes` finds interfaces not plugged in yet and those that went away;
:meth:`plug` gives a new one a tap and a NIC hot-plugged into the running VM (the agent's
``netconf`` then configures it), :meth:`unplug` takes a gone one's NIC out and deletes its tap.

DNS: ``engine_netns["resolv_conf"]`` is the host file bound on the container's
/etc/resolv.conf; its loopback nameservers, read when the VM starts (docker's prestart
hook writes 127.0.0.11 there), are relayed: docker's embedded resolver answers only inside
the namespace. The guest
agent listens on those addresses in the VM and passes each query up the agent channel
(``dnsq``); :class:`DnsRelay` sends it from a UDP socket made inside the container's
namespace and hands the answer back (``dnsa``). The guest is hostile: only the configured
addresses are asked, at most MAX_DNS_PENDING queries at once, at most DNS_RATE a second
(burst DNS_BURST), each waits DNS_TIMEOUT s, queries and answers are size-bounded.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time

from shim.errors import NetworkError
from shim.network import engine_netns as ens


MAX_DNS_PENDING = 32
DNS_RATE = 50.0
DNS_BURST = 100
DNS_TIMEOUT = 5.0
MAX_DNS_ANSWER = 8192
MAX_RESOLV_CONF = 64 * 1024
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10


def dns_servers(resolv_conf: str) -> list[str]:
    """The loopback IPv4 nameservers of *resolv_conf* (at most 3, as the resolver reads):
    those only the container's network namespace can reach."""
    import ipaddress

    out = []
    for line in resolv_conf.splitlines()[:1000]:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.IPv4Address(words[1])
            except ValueError:
                continue
            if address.is_loopback and str(address) not in out:
                out.append(str(address))
    return out[:3]


class DnsRelay:
    """The host's end of the guest's DNS relay (see the module doc). *make_socket()*
    returns a UDP socket in the container's network namespace."""

    def __init__(self, servers: list[str], make_socket, now=time.monotonic, port: int = 53):
        self.servers = list(servers)
        self.port = port
        self.make_socket = make_socket
        self.now = now
        self.pending: dict[int, tuple[int, socket.socket, float]] = {}
        """fd → (the guest's query id, socket, deadline)."""
        self.tokens = float(DNS_BURST)
        self.refilled = now()
        self.dropped = 0

    def query(self, qid: int, server: str, payload: bytes) -> bool:
        """Send the guest's query *qid* to *server*; False when it is dropped (not a
        relayed server, too many waiting, over the rate, too big, or the send failed)."""
        now = self.now()
        self.tokens = min(float(DNS_BURST), self.tokens + (now - self.refilled) * DNS_RATE)
        self.refilled = now
        if (
            server not in self.servers
            or len(self.pending) >= MAX_DNS_PENDING
            or self.tokens < 1
            or not 12 <= len(payload) <= 4096
        ):
            self.dropped += 1
            return False
        self.tokens -= 1
        try:
            sock = self.make_socket()
        except OSError:
            self.dropped += 1
            return False
        try:
            sock.setblocking(False)
            sock.connect((server, self.port))
            sock.send(payload)
        except OSError:
            sock.close()
            self.dropped += 1
            return False
        self.pending[sock.fileno()] = (qid, sock, now + DNS_TIMEOUT)
        return True

    def fds(self) -> list[int]:
        return list(self.pending)

    def answer(self, fd: int) -> tuple[int, bytes] | None:
        """The answer waiting on *fd*: (the guest's query id, payload), or None."""
        entry = self.pending.pop(fd, None)
        if entry is None:
            return None
        qid, sock, _ = entry
        try:
            data = sock.recv(MAX_DNS_ANSWER + 1)
        except OSError:
            return None
        finally:
            sock.close()
        return (qid, data) if 12 <= len(data) <= MAX_DNS_ANSWER else None

    def expire(self) -> None:
        now = self.now()
        for fd, (_qid, sock, deadline) in list(self.pending.items()):
            if deadline <= now:
                sock.close()
                del self.pending[fd]

    def close(self) -> None:
        for _qid, sock, _ in self.pending.values():
            sock.close()
        self.pending = {}


class EngineNetwork:
    """The engine-prepared network of one container (see the module doc)."""

    def __init__(self, spec: dict, container_id: str):
        self.spec = spec
        self.container_id = container_id
        self.links: list[ens.EngineLink] = []
        self.taps: list[str] = []
        self._fds: dict[str, int] = {}
        self.wired = False
        self.dns: DnsRelay | None = None

    def path(self, which: str) -> str:
        """A path to namespace *which* (``netns`` or ``host_netns``) that stays valid while
        this object holds it open."""
        return f"/proc/{os.getpid()}/fd/{self._fds[which]}"

    def prepare(self) -> dict:
        """Open the namespaces, read the engine's interfaces and make the taps; return
        BootConfig.network for the guest. Raises NetworkError (nothing is left then)."""
        try:
            for which in ("netns", "host_netns"):
                source = self.spec.get(which)
                if not isinstance(source, str) or not source.startswith("/"):
                    raise NetworkError(f"engine network: {which} is not a path")
                try:
                    self._fds[which] = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise NetworkError(f"cannot open the network namespace {source}: {exc.strerror}") from None
            self.links = ens.read_links(self.path("netns"))
            for index, _link in enumerate(self.links):
                tap = ens.tap_name(self.container_id, index)
                ens.create_tap(self.path("host_netns"), tap)
                self.taps.append(tap)
        except BaseException:
            self.close()
            raise
        if not self.links:
            return {}
        network: dict = {"interfaces": [link.guest_interface() for link in self.links]}
        servers = self._relayed_servers()
        if servers:
            network["dns_relay"] = list(servers)
            self.dns = DnsRelay(list(servers), self.udp_socket)
        return network

    def _relayed_servers(self) -> list[str]:
        """The loopback nameservers of the engine's resolv.conf for the container."""
        path = self.spec.get("resolv_conf") or ""
        if not isinstance(path, str) or not path.startswith("/"):
            return []
        try:
            with open(path, "rb") as f:
                return dns_servers(f.read(MAX_RESOLV_CONF).decode(errors="replace"))
        except OSError:
            return []

    def udp_socket(self) -> socket.socket:
        """A UDP socket in the container's network namespace. Raises OSError."""
        return self._socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, 0)

    def watch_socket(self) -> socket.socket:
        """A non-blocking netlink socket in the container's namespace that turns readable
        when a link or an IPv4 address changes there. Raises OSError."""
        sock = self._socket_in_netns(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def new_links(self) -> list[ens.EngineLink]:
        """Interfaces with an IPv4 address that appeared since the VM was plugged in
        (by MAC). Raises NetworkError."""
        return self.changes()[0]

    def changes(self) -> tuple[list[ens.EngineLink], list[ens.EngineLink]]:
        """(interfaces not plugged in yet, plugged ones that are gone), by MAC. Raises
        NetworkError."""
        now = ens.read_links(self.path("netns"))
        known = {link.mac for link in self.links}
        present = {link.mac for link in now}
        return (
            [link for link in now if link.mac not in known],
            [link for link in self.links if link.mac not in present],
        )

    def unplug(self, link: ens.EngineLink, detach) -> None:
        """*link* went away: call *detach(mac)* (take the NIC out of the VM) and delete its
        tap. Raises HypervisorError from *detach* (the tap is deleted all the same)."""
        index = self.links.index(link)
        tap = self.taps.pop(index)
        self.links.pop(index)
        try:
            detach(link.mac)
        finally:
            ens.remove_tap(self.path("netns"), tap)

    def plug(self, link: ens.EngineLink, attach) -> dict:
        """Give *link* a tap, call *attach(Interface)* (hot-plug into the running VM),
        wire the tap in; return the ``netconf`` entry for the guest (no gateway: the
        default route stays the first interface's). Raises NetworkError, HypervisorError."""
        from shim.vm.domain import Interface

        used = set(self.taps)
        free = [ens.tap_name(self.container_id, i) for i in range(10) if ens.tap_name(self.container_id, i) not in used]
        if len(self.taps) >= ens.MAX_LINKS or not free:
            raise NetworkError(f"the container has {ens.MAX_LINKS} interfaces already")
        tap = free[0]
        ens.create_tap(self.path("host_netns"), tap)
        try:
            attach(Interface(type="ethernet", mac=link.mac, tap=tap, mtu=link.mtu))
        except BaseException:
            ens.remove_tap(self.path("host_netns"), tap)
            raise
        self.taps.append(tap)
        self.links.append(link)
        ens.wire(self.path("host_netns"), self.path("netns"), link, tap)
        entry = link.guest_interface()
        entry.pop("gateway", None)
        return entry

    def _socket_in_netns(self, family: int, kind: int, proto: int) -> socket.socket:
        """socket() in the container's network namespace (this thread enters it for the
        call only). Raises OSError."""
        libc = ctypes.CDLL(None, use_errno=True)
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(self._fds["netns"], CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the container's namespace")
            try:
                return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
            finally:
                if libc.setns(here, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen
                    os._exit(70)  # never run on in the wrong namespace
        finally:
            os.close(here)

    def interfaces(self) -> list:
        """The domain's NICs: one ethernet interface per tap, with the link's MAC and MTU."""
        from shim.vm.domain import Interface

        return [
            Interface(type="ethernet", mac=link.mac, tap=tap, mtu=link.mtu)
            for link, tap in zip(self.links, self.taps, strict=True)
        ]

    def wire(self) -> None:
        """After the domain was created: move each tap into the container's namespace and
        redirect its link's traffic to it. Raises NetworkError."""
        for link, tap in zip(self.links, self.taps, strict=True):
            ens.wire(self.path("host_netns"), self.path("netns"), link, tap)
        self.wired = True

    def close(self) -> None:
        """Delete the taps (in either namespace) and close the namespaces. Never raises."""
        if self.dns is not None:
            self.dns.close()
            self.dns = None
        for tap in self.taps:
            for which in ("netns", "host_netns"):
                if which in self._fds:
                    ens.remove_tap(self.path(which), tap)
        self.taps = []
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
