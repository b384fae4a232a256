"""Bring up the VM's network before the container starts. Stdlib only.

The host decides everything (addresses come from its IPAM, see shim.network) and writes
it into the boot config's ``network`` (see :class:`guest.spec.BootConfig`); here each NIC
is found by its MAC, given its address, brought up, and the one with a gateway gets the
default route. In the VM the container shares this network namespace, so this *is* the
container's network.

Plain ioctls on an AF_INET socket (what busybox ``ifconfig``/``route`` do), not netlink
and not a fork of busybox ``ip``: a few syscalls, no process, no new imports (socket,
struct and fcntl are loaded already), well under a millisecond. An ``address6`` (a
dual-stack network) is added the same way on an AF_INET6 socket, with duplicate address
detection off for that NIC (the host's IPAM made it unique; DAD would hold it back ~1 s).
No IPv6 default route: IPv6 reaches the network's own subnet.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from typing import Any

SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2
SYS_NET = "/sys/class/net"
NIC_TIMEOUT = 5.0
"""Seconds to wait for a NIC with the configured MAC (virtio_net probes it at load)."""
HOTPLUG_TIMEOUT = 20.0
"""The same for a NIC plugged into the running VM (PCIe hotplug, then the probe)."""


class NetworkError(Exception):
    """A NIC is missing or refused its configuration; the text says which."""


def configure(network: dict[str, Any], *, timeout: float = NIC_TIMEOUT) -> list[str]:
    """Bring up ``lo`` and every interface of *network* (validated by
    ``guest.spec.check_network``); return the interface names configured, in order.
    Raises NetworkError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        _set_up(fd, "lo")
        names = []
        gateway = None
        for iface in network.get("interfaces", []):
            name = find_interface(iface["mac"], timeout)
            address, _, prefix = iface["address"].partition("/")
            try:
                if "mtu" in iface:
                    fcntl.ioctl(fd, SIOCSIFMTU, struct.pack("16si12x", name.encode(), iface["mtu"]))
                fcntl.ioctl(fd, SIOCSIFADDR, _ifreq_addr(name, address))
                fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq_addr(name, prefix_to_netmask(int(prefix))))
                _set_up(fd, name)
            except OSError as exc:
                raise NetworkError(
                    f"cannot configure {name} ({iface['mac']}) with {iface['address']}: {exc.strerror}"
                ) from None
            if iface.get("address6"):
                add_address6(name, iface["address6"])
            if iface.get("gateway"):
                gateway = (iface["gateway"], name)
            names.append(name)
        if gateway is not None:
            try:
                fcntl.ioctl(fd, SIOCADDRT, _rtentry_default(gateway[0]))
            except OSError as exc:
                if exc.errno != 17:  # EEXIST: there already
                    raise NetworkError(
                        f"cannot add the default route via {gateway[0]} ({gateway[1]}): {exc.strerror}"
                    ) from None
    return names


def add_address6(name: str, cidr: str) -> None:
    """Give NIC *name* the IPv6 ``address/prefix`` *cidr* (no DAD). Raises NetworkError."""
    address, _, prefix = cidr.partition("/")
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_dad", "w") as f:
            f.write("0")
    except OSError:
        pass  # no such knob: DAD then just delays the address
    try:
        index = socket.if_nametoindex(name)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock6:
            fcntl.ioctl(
                sock6.fileno(),
                SIOCSIFADDR,
                struct.pack("16sIi", socket.inet_pton(socket.AF_INET6, address), int(prefix), index),
            )
    except OSError as exc:
        if exc.errno != 17:  # EEXIST: there already
            raise NetworkError(f"cannot give {name} the IPv6 address {cidr}: {exc.strerror}") from None


def find_interface(mac: str, timeout: float = NIC_TIMEOUT) -> str:
    """The name of the NIC whose address is *mac*, waiting up to *timeout* seconds for
    it to appear. Raises NetworkError naming the NICs that are there."""
    mac = mac.lower()
    deadline = time.monotonic() + timeout
    while True:
        seen = {}
        try:
            names = os.listdir(SYS_NET)
        except OSError:
            names = []
        for name in names:
            try:
                with open(f"{SYS_NET}/{name}/address") as f:
                    seen[name] = f.read().strip().lower()
            except OSError:
                continue
            if seen[name] == mac:
                return name
        if time.monotonic() > deadline:
            found = ", ".join(f"{n} {m}" for n, m in sorted(seen.items()) if n != "lo")
            raise NetworkError(
                f"no network interface with MAC {mac} appeared within {timeout:.0f} s (found: {found or 'none'})"
            )
        time.sleep(0.005)


def prefix_to_netmask(prefix: int) -> str:
    bits = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
    return socket.inet_ntoa(struct.pack("!I", bits))


def _set_up(fd: int, name: str) -> None:
    ifreq = struct.pack("16sH14x", name.encode(), 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(fd, SIOCGIFFLAGS, ifreq))[1]
    if not flags & IFF_UP:
        fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))


def _sockaddr_in(address: str) -> bytes:
    """struct sockaddr_in (16 bytes): family, port 0, address, zero padding."""
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(address))


def _ifreq_addr(name: str, address: str) -> bytes:
    """struct ifreq with ifr_addr set (40 bytes on 64-bit Linux)."""
    return struct.pack("16s16s8x", name.encode(), _sockaddr_in(address))


_RTENTRY = "@L16s16s16sHhLPhPLLH"


def _rtentry_default(gateway: str) -> bytes:
    """struct rtentry for ``default via gateway`` (the kernel picks the device)."""
    raw = struct.pack(
        _RTENTRY,
        0,
        _sockaddr_in("0.0.0.0"),
        _sockaddr_in(gateway),
        _sockaddr_in("0.0.0.0"),
        RTF_UP | RTF_GATEWAY,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    pad = -len(raw) % struct.calcsize("@P")
    return raw + b"\0" * pad
