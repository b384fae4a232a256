"""The container's network namespace on the host, as runc has it.

config.json's ``linux.namespaces`` entry of type ``network``:

- without ``path``: the stand-in (the pid the engine is given, shim.oci.standin) unshares
  a new network namespace with ``lo`` up before ``create`` runs the hooks, so dockerd's
  libnetwork prestart hook and netavark/CNI configure ``/proc/<pid>/ns/net`` as they do
  for runc's container process;
- with ``path``: the stand-in joins that namespace (podman's, a pod's, a CRI sandbox's);
- no entry: the container would share the engine's own namespace, which a VM cannot: it
  gets only ``lo`` (noted in the runtime's log).

The VM is then plugged into whatever the engine put there (shim.containers.engine_network):
:func:`engine_netns` is what the container record keeps for that.
"""

from __future__ import annotations

import ctypes
import os

from shim.errors import VmshimError

CLONE_NEWNET = 0x40000000
NEW = ""
"""NetworkNamespace.path of a namespace the runtime makes."""


class NetnsError(VmshimError):
    """The container's network namespace could not be made or joined."""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def enter(path: str | None) -> None:
    """In the stand-in (single-threaded, before it reports ready): a new network namespace
    with ``lo`` up (*path* ``""``), or join *path*; None: stay. Raises NetnsError."""
    if path is None:
        return
    libc = _libc()
    if path == NEW:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot make a network namespace: {os.strerror(err)}")
        from guest.runtime.network import NetworkError, configure

        try:
            configure({"interfaces": []})  # lo up, as runc does
        except (NetworkError, OSError) as exc:
            raise NetnsError(f"cannot bring up lo in the new network namespace: {exc}") from None
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"cannot open the network namespace {path}: {exc.strerror}") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot join the network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


LIBVIRT_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock")
"""Where qemu:///system listens (monolithic libvirtd, or the modular QEMU daemon)."""


def libvirtd_netns() -> str:
    """The network namespace libvirtd runs in (where it opens the taps QEMU gets): that of
    the process listening on its socket (SO_PEERCRED); this process's own when there is no
    local libvirtd socket."""
    import socket
    import struct

    for path in LIBVIRT_SOCKETS:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                pid = struct.unpack(
                    "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                )[0]
        except OSError:
            continue
        if pid > 0 and os.path.exists(f"/proc/{pid}/ns/net"):
            return f"/proc/{pid}/ns/net"
    return "/proc/self/ns/net"


def open_host_netns() -> int:
    """An fd of libvirtd's network namespace (:func:`libvirtd_netns`), for the stand-in to
    keep open. Raises NetnsError."""
    path = libvirtd_netns()
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise NetnsError(f"cannot open libvirtd's network namespace {path}: {exc.strerror}") from None


def resolv_conf_source(mounts: list) -> str:
    """The host file the engine binds on /etc/resolv.conf ("" when none): its loopback
    nameservers (docker's 127.0.0.11, written by its prestart hook) are relayed from the
    guest into the container's namespace when the VM starts (shim.containers.engine_network)."""
    for mount in mounts:
        if mount.type == "bind" and mount.target == "/etc/resolv.conf":
            return str(mount.source)
    return ""


def engine_netns(path: str | None, standin_pid: int, host_fd: int, resolv_conf: str = "") -> dict | None:
    """Container.engine_netns for a stand-in *standin_pid* that entered *path* (see
    :func:`enter`) and holds *host_fd*; *resolv_conf*: see :func:`resolv_conf_source`.
    None when the VM gets no engine network."""
    if path is None:
        return None
    return {
        "netns": path or f"/proc/{standin_pid}/ns/net",
        "host_netns": f"/proc/{standin_pid}/fd/{host_fd}",
        "resolv_conf": resolv_conf,
    }
