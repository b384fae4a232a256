"""A VM plugged into a network namespace that a container engine prepared.

dockerd's libnetwork hook, netavark and CNI plugins configure a network namespace on the
host for each container (a veth, its addresses, routes, MTU) as they do for runc. For
vmshim-runtime that namespace is held by the stand-in (or given by ``path``), and the
VM is connected to every interface the engine put in it, as Kata does:

1. :func:`read_links` reads the interfaces of the namespace (after the engine's hooks
   ran, before the VM starts): name, MAC, MTU, IPv4 address, global IPv6 address, and
   which one holds the default route. The guest gets exactly these (same MAC too).
2. :func:`create_tap` makes a persistent tap where libvirtd runs (QEMU opens it there:
   ``<interface type='ethernet'>`` with ``managed='no'``, shim.vm.domain.Interface).
3. Once the domain exists, :func:`wire` moves the tap into the container's namespace (a
   tun device keeps working across namespaces while QEMU holds it) and redirects every
   frame both ways between the engine's interface and the tap with tc ingress filters
   (``u32 match u32 0 0`` + ``mirred egress redirect``: cls_matchall is not in every
   kernel). The namespace's own stack no longer sees the interface's traffic: the
   guest owns the address.
4. :func:`remove_tap` deletes the tap (wherever it is) when the VM is gone.

Every step is ``ip``/``tc`` run through ``nsenter --net=PATH`` (not ``ip netns exec``:
that remounts /sys). What is read from the namespace is bounded (:data:`MAX_LINKS`).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass

from shim.errors import NetworkError

MAX_LINKS = 8
"""Interfaces of one namespace the VM is plugged into (more: refused)."""
MAX_OUTPUT = 1 << 20
"""Bytes of ``ip -j`` output read from a namespace."""
TAP_PREFIX = "vmn"
COMMAND_TIMEOUT = 20.0
SKIPPED_KINDS = ("tun", "tap", "ifb", "dummy")
"""Link kinds that are not an engine's interface (a tap of ours, a leftover)."""


@dataclass(frozen=True)
class EngineLink:
    """One interface an engine configured in a container's namespace."""

    name: str
    mac: str
    mtu: int
    address: str
    """IPv4 ``address/prefix``."""
    address6: str = ""
    """A global IPv6 ``address/prefix`` ("" when none)."""
    gateway: str = ""
    """The IPv4 default route's gateway when it goes out through this interface."""

    def guest_interface(self) -> dict:
        """The entry of guest.spec.BootConfig.network for this interface."""
        out: dict = {"mac": self.mac, "address": self.address, "mtu": self.mtu}
        if self.address6:
            out["address6"] = self.address6
        if self.gateway:
            out["gateway"] = self.gateway
        return out


def tap_name(container_id: str, index: int) -> str:
    """``vmn`` + 11 hex digits of the container id + the link's index: 15 characters."""
    return f"{TAP_PREFIX}{container_id[:11]}{index}"


def _run(argv: list[str], what: str, input: str | None = None) -> str:
    try:
        res = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise NetworkError(f"{what}: {argv[0]} did not finish in {COMMAND_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise NetworkError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if res.returncode != 0:
        raise NetworkError(f"{what}: {(res.stderr or res.stdout).strip()[:300]}")
    return res.stdout[:MAX_OUTPUT]


def _in(netns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={netns}", "--", *argv]


def read_links(netns: str) -> list[EngineLink]:
    """The interfaces an engine configured in *netns* (a path such as /proc/PID/ns/net),
    in index order; interfaces without an IPv4 address, loopback and our own taps are
    left out. Raises NetworkError (unreadable namespace, more than MAX_LINKS)."""
    links = _json(_run(_in(netns, "ip", "-j", "-d", "address", "show"), "reading the container's network namespace"))
    routes = _json(_run(_in(netns, "ip", "-j", "-4", "route", "show", "default"), "reading the container's routes"))
    return parse_links(links, routes)


def _json(text: str) -> list:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        raise NetworkError("ip printed something that is not JSON") from None
    if not isinstance(value, list):
        raise NetworkError("ip printed something that is not a JSON list")
    return value


def parse_links(links: list, routes: list) -> list[EngineLink]:
    """:func:`read_links` on ``ip -j -d address`` and ``ip -j -4 route show default``
    output (pure). Raises NetworkError."""
    gateways: dict[str, str] = {}
    for route in routes:
        if (
            isinstance(route, dict)
            and route.get("dst") == "default"
            and isinstance(route.get("gateway"), str)
            and isinstance(route.get("dev"), str)
        ):
            gateways.setdefault(route["dev"], route["gateway"])
    out = []
    have_gateway = False
    for link in links:
        if not isinstance(link, dict):
            continue
        name = link.get("ifname")
        if not isinstance(name, str) or name == "lo" or link.get("link_type") != "ether":
            continue
        kind = (link.get("linkinfo") or {}).get("info_kind") if isinstance(link.get("linkinfo"), dict) else None
        if kind in SKIPPED_KINDS or name.startswith(TAP_PREFIX):
            continue
        v4 = v6 = ""
        for info in link.get("addr_info") or []:
            if not isinstance(info, dict):
                continue
            cidr = f"{info.get('local')}/{info.get('prefixlen')}"
            try:
                iface = ipaddress.ip_interface(cidr)
            except ValueError:
                continue
            if iface.version == 4 and not v4:
                v4 = cidr
            elif iface.version == 6 and not v6 and info.get("scope") == "global":
                v6 = cidr
        if not v4:
            continue
        mac = str(link.get("address", "")).lower()
        mtu = link.get("mtu")
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
            raise NetworkError(f"interface {name}: unusable MTU {mtu!r}")
        gateway = gateways.get(name, "") if not have_gateway else ""
        have_gateway = have_gateway or bool(gateway)
        out.append(EngineLink(name=name, mac=mac, mtu=mtu, address=v4, address6=v6, gateway=gateway))
        if len(out) > MAX_LINKS:
            raise NetworkError(f"the container's network namespace has more than {MAX_LINKS} interfaces")
    from guest.spec import check_network

    try:
        check_network({"interfaces": [link.guest_interface() for link in out]})
    except ValueError as exc:
        raise NetworkError(f"the container's network namespace: {exc}") from None
    return out


def create_tap(host_netns: str, tap: str) -> None:
    """Make the persistent tap *tap* in *host_netns* (where libvirtd opens it). A
    leftover of the same name is replaced. Raises NetworkError."""
    remove_tap(host_netns, tap)
    _run(_in(host_netns, "ip", "tuntap", "add", "dev", tap, "mode", "tap"), f"creating the tap {tap}")


def wire(host_netns: str, netns: str, link: EngineLink, tap: str) -> None:
    """Move *tap* (held by the running VM) from *host_netns* into *netns* and redirect
    all traffic both ways between it and *link*. Raises NetworkError."""
    _run(
        _in(host_netns, "ip", "link", "set", "dev", tap, "netns", netns),
        f"moving the tap {tap} into the container's network namespace",
    )
    _run(_in(netns, "ip", "-batch", "-"), f"bringing up the tap {tap}", input=f"link set dev {tap} mtu {link.mtu} up\n")
    batch = "".join(
        f"qdisc add dev {src} ingress\n"
        f"filter add dev {src} parent ffff: protocol all prio 1 u32 match u32 0 0 "
        f"action mirred egress redirect dev {dst}\n"
        for src, dst in ((link.name, tap), (tap, link.name))
    )
    try:
        _run(_in(netns, "tc", "-batch", "-"), f"redirecting {link.name} to the tap {tap}", input=batch)
    except NetworkError as exc:
        if "xclusivity" in str(exc) or "File exists" in str(exc):
            raise NetworkError(
                f"{link.name} of the container's network namespace is "
                "plugged into another VM already: containers that share a "
                "network namespace (pods, --network container:) are not "
                "supported yet"
            ) from None
        raise


def remove_tap(netns: str, tap: str) -> None:
    """Delete *tap* in *netns* if it is there. Never raises."""
    try:
        subprocess.run(
            _in(netns, "ip", "link", "delete", "dev", tap),
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
