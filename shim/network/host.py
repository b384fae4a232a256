"""Kernel network objects on the host: bridges, veth pairs, network namespaces, sysctls.

Everything is made in the network namespace the calling process is in (which is how
the test suite keeps it all inside a namespace of its own). iproute2's ``ip`` does the
work (a few milliseconds per call); ``socket.if_nametoindex`` answers "does it exist?"
for the caller's namespace (``/sys/class/net`` may show another one).

Precondition for everything that changes something: root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from shim.errors import NetworkError

IP = "ip"
NSENTER = "nsenter"
UNSHARE = "unshare"


def run(args: list[str], *, input: str | None = None, what: str = "") -> str:
    """Run a command; return stdout. Raises NetworkError with its stderr."""
    if shutil.which(args[0]) is None:
        raise NetworkError(f"{args[0]} is not installed (needed for container networking); run scripts/setup")
    proc = subprocess.run(args, input=input, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetworkError(
            f"{what or 'cannot ' + ' '.join(args[:4])}: {detail[-1] if detail else f'exit status {proc.returncode}'}"
        )
    return proc.stdout


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def write_sysctl(key: str, value: str) -> None:
    """``key`` like ``net/ipv4/ip_forward``; /proc/sys/net is the caller's namespace's."""
    path = f"/proc/sys/{key}"
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise NetworkError(f"cannot set {key.replace('/', '.')}={value}: {exc.strerror}") from None


def ensure_bridge(name: str, gateway: str, prefixlen: int, mac: str, gateway6: str = "", prefixlen6: int = 0) -> bool:
    """Make the bridge *name* with *gateway*/*prefixlen* and a fixed *mac* (a bridge
    without one takes its lowest port's MAC, which changes as containers come and go
    and leaves stale ARP entries in the others), up, with forwarding on and
    route_localnet (so ports published on 127.0.0.1 can be DNATed out of it).
    With *gateway6*: that IPv6 address too (no duplicate address detection: our IPAM
    made it unique). Idempotent; returns whether it was created now."""
    created = False
    if not link_exists(name):
        try:
            run(
                [IP, "link", "add", "name", name, "address", mac, "type", "bridge"], what=f"cannot create bridge {name}"
            )
        except NetworkError:
            if not link_exists(name):  # somebody else made it meanwhile: fine
                raise
        created = True
    v6 = f"address replace {gateway6}/{prefixlen6} dev {name} nodad\n" if gateway6 else ""
    run(
        [IP, "-batch", "-"],
        input=(f"address replace {gateway}/{prefixlen} dev {name}\n{v6}link set dev {name} up\n"),
        what=f"cannot configure bridge {name}",
    )
    write_sysctl("net/ipv4/ip_forward", "1")
    write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
    return created


def delete_link(name: str) -> None:
    """Delete a link if it exists (a bridge, the host end of a veth)."""
    if link_exists(name):
        try:
            run([IP, "link", "delete", "dev", name], what=f"cannot delete {name}")
        except NetworkError:
            if link_exists(name):
                raise


def routes() -> list[str]:
    """CIDRs routed in this namespace (not the default route), to keep subnets apart."""
    try:
        out = run([IP, "-json", "-4", "route", "show", "table", "all"])
    except NetworkError:
        return []
    cidrs = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("type") in ("local", "broadcast"):
            continue
        try:
            net = ipaddress.IPv4Network(dst if "/" in dst else dst + "/32", strict=False)
        except ValueError:
            continue
        if not net.is_loopback:
            cidrs.append(str(net))
    return cidrs


# ---- network namespaces for --isolation process ------------------------------------------


def create_netns(path: Path) -> None:
    """A new network namespace kept alive by a bind mount on *path* (unshare --net=)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        run([UNSHARE, f"--net={path}", "true"], what="cannot create a network namespace")
    except NetworkError:
        path.unlink(missing_ok=True)
        raise


def delete_netns(path: Path) -> None:
    """Unmount and remove a namespace made by :func:`create_netns`. Idempotent. The
    namespace (and the veth inside) goes when nothing else holds it."""
    if not path.exists():
        return
    from guest.runtime import syscalls

    try:
        syscalls.umount2(str(path), syscalls.MNT_DETACH)
    except OSError:
        pass
    try:
        path.unlink()
    except OSError:
        pass


def add_veth(
    netns: Path,
    *,
    host_ifname: str,
    bridge: str,
    mac: str,
    address: str,
    prefixlen: int,
    gateway: str | None,
    ifname: str = "eth0",
    mtu: int | None = None,
    address6: str = "",
) -> None:
    """A veth pair: *host_ifname* enslaved to *bridge* here, *ifname* in the namespace at
    *netns* with *mac*, *address*/*prefixlen* (and *address6*, ``addr/prefix``, if
    given) and (if given) a default route via *gateway*; ``lo`` up there too."""
    delete_link(host_ifname)  # a leftover of a crashed run with the same id
    run(
        [IP, "link", "add", "name", host_ifname, "type", "veth", "peer", "name", ifname, "netns", str(netns)],
        what=f"cannot create veth {host_ifname}",
    )
    try:
        inside = [
            "link set dev lo up",
            f"link set dev {ifname} address {mac}" + (f" mtu {mtu}" if mtu else ""),
            f"address add {address}/{prefixlen} dev {ifname}",
            f"link set dev {ifname} up",
        ]
        if address6:
            inside.insert(-1, f"address add {address6} dev {ifname} nodad")
        if gateway:
            inside.append(f"route replace default via {gateway} dev {ifname}")
        run(
            [NSENTER, f"--net={netns}", IP, "-batch", "-"],
            input="\n".join(inside) + "\n",
            what=f"cannot configure {ifname} in the container's network namespace",
        )
        run(
            [IP, "link", "set", "dev", host_ifname, "master", bridge, "up"],
            what=f"cannot attach {host_ifname} to bridge {bridge}",
        )
    except BaseException:
        delete_link(host_ifname)
        raise


def netns_interfaces(netns: Path) -> list[str]:
    """Names of the links in the namespace at *netns* (tests and inspect)."""
    out = run([NSENTER, f"--net={netns}", IP, "-json", "link", "show"])
    return [link["ifname"] for link in json.loads(out or "[]")]


def is_root() -> bool:
    return os.geteuid() == 0
