"""Snapshot templates: boot one VM to agent-ready, save it, start containers by restoring
copies of it (issue 15).

A template is made for one *shape* of container (:func:`shape_of`): the guest image and
accelerator, the image's layer disks, memory and vCPUs, and a boot config that differs
only in what a container's identity is (id, token, hostname, process, /etc/hosts and
resolv.conf). Only ``--rm``-style containers qualify: writable layer in RAM, no mounts, no
network (``--network none``), no limits, devices, sysctls or OS mode. ``vmshim template
create IMAGE`` makes one; from then on every matching ``run`` starts from it, unless
``VMSHIM_TEMPLATES=off``.

Made once (:func:`create`): the template VM boots with the image's command (never run),
answers a ``stats`` request (its container is assembled and the agent serves), makes its
container's process up to its ``execve`` on ``prefork`` (cgroup, namespaces, mounts, root,
the user resolved and the program read into the page cache; guest.runtime.process
``hold_container``), is let go of (the agent sees its host leave) and saved
(shim.vm.libvirt_backend ``save``) to ``$VMSHIM_ROOT/templates/<key>/memory.img``. So a
restored copy's ``start`` only hands the held process its process, hostname and pipes
(one whose /etc files differ, or that the held process cannot take, is started anew).

Used per container (:func:`restore_into`): a copy of the save image under the container's
domain name and UUID (shim.vm.saveimage: libvirt restores an image only under the name and
UUID it was saved with) is restored with the container's own domain XML (its run
directory, agent socket, console, config drive); the agent says hello, and an
``identity`` message with the template's token hands it the container's token, hostname,
process and /etc files, and 64 bytes of host entropy, mixed into the guest kernel's RNG
with a forced reseed (and Python's). So no two containers of one template share a token or
RNG state; their writable layers, processes and hostnames are their own. There is no NIC
(and so no MAC) in a template's VM.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from guest import protocol
from shim import paths
from shim.containers.store import Container
from shim.errors import VmshimError

META = "template.json"
MEMORY = "memory.img"
IDENTITY_ID = 1 << 30
READY_TIMEOUT = 120.0


def enabled() -> bool:
    return os.environ.get("VMSHIM_TEMPLATES", "on").lower() not in ("off", "0", "no")


def templates_dir() -> Path:
    return paths.root() / "templates"


def shape_of(record: Container) -> dict | None:
    """What a template must match for *record* to start from it; None when *record* cannot
    start from a template at all."""
    from shim.containers.options import boot_config_of

    networks = record.network.networks if record.network is not None else []
    if (
        record.isolation != "vm"
        or record.writable != "tmpfs"
        or record.mounts
        or record.rootfs
        or (networks or ["none"])[0] != "none"
        or record.engine_netns
        or record.os_container
        or record.privileged
        or record.devices
        or record.sysctl
    ):
        return None
    if not record.resources.is_empty():
        return None
    boot = boot_config_of(record).to_dict()
    for personal in ("container_id", "token", "hostname", "process", "hosts", "resolv_conf"):
        boot.pop(personal, None)
    return {
        "version": 1,
        "boot": boot,
        "layers": list(record.layer_disks),
        "memory_mib": record.vm_memory_mib,
        "vcpus": record.vm_vcpus,
    }


def key_of(shape: dict, guest: dict) -> str:
    raw = json.dumps({"shape": shape, "guest": guest}, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def find(record) -> dict | None:
    """The ready template *record* can start from (its meta, with ``dir``), or None."""
    if not enabled():
        return None
    shape = shape_of(record)
    if shape is None:
        return None
    from shim.containers.checkpoint_vm import guest_identity

    directory = templates_dir() / key_of(shape, guest_identity())
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    if not (directory / MEMORY).is_file():
        return None
    meta["dir"] = str(directory)
    return meta


def list_templates() -> list[dict]:
    out = []
    for d in sorted(templates_dir().glob("*")):
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            continue
        meta["key"] = d.name
        out.append(meta)
    return out


def remove(key: str | None = None) -> list[str]:
    """Remove template *key* (all with None); the keys removed."""
    gone = []
    for d in sorted(templates_dir().glob("*")):
        if d.is_dir() and (key is None or d.name == key):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


@contextlib.contextmanager
def locked_key(key: str):
    templates_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(templates_dir() / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def restore_into(placement, template: dict, alive=None):
    """Start *placement*'s VM as a copy of *template* and give it the identity of its boot
    config; the agent's channel, ready for ``start``. Raises VmshimError (the VM is
    killed)."""
    from shim.containers.vm_common import BOOT_TIMEOUT
    from shim.vm import saveimage

    directory = Path(template["dir"])
    clone = placement.run_dir / "template.img"
    paths.private_dir(placement.run_dir)
    tid, cid = template["id"], placement.boot_config.container_id
    saveimage.clone(directory / MEMORY, clone, {tid[:12]: cid[:12], template["uuid"]: str(uuid.UUID(cid[:32]))})
    boot = placement.boot_config
    identity = {
        "token": template["token"],
        "id": IDENTITY_ID,
        "new_token": boot.token,
        "hostname": boot.hostname,
        "process": boot.process.to_dict(),
        "hosts": boot.hosts,
        "resolv_conf": boot.resolv_conf,
    }
    # Sent as soon as the socket connects: the agent takes it right behind its hello.
    placement.send_before_hello = [(protocol.IDENTITY, os.urandom(64), identity)]
    try:
        client = placement.restore(clone, alive=alive)
    finally:
        placement.send_before_hello = []  # never to a VM booted cold after a failure
        clone.unlink(missing_ok=True)
    try:
        reply = client.recv(BOOT_TIMEOUT, alive=alive)
        if reply.type != protocol.UPDATED:
            message = reply.fields.get("message") if reply.type == protocol.ERROR else reply.type
            raise VmshimError(
                f"the restored template did not take the container's identity: {protocol.printable(str(message))}"
            )
    except BaseException:
        client.close()
        placement.kill()
        raise
    return client
