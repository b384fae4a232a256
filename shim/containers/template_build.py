"""Making a snapshot template (``vmshim template create``): boot a VM for a container's
shape to agent-ready and save it. Above shim.containers.vm_placement, which starts
containers from what this saves (through shim.containers.template)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import uuid
from pathlib import Path

from guest import protocol
from shim import paths
from shim.containers.checkpoint_vm import guest_identity
from shim.containers.options import boot_config_of
from shim.containers.store import Container
from shim.containers.template import (
    IDENTITY_ID,
    MEMORY,
    META,
    READY_TIMEOUT,
    key_of,
    locked_key,
    shape_of,
    templates_dir,
)
from shim.containers.vm_placement import VmPlacement
from shim.errors import VmshimError


def create(record: Container, *, memory_mib: int | None = None, backend=None) -> dict:
    """Boot, ready and save the template for *record*'s shape (replacing one there), its VM
    of *memory_mib* (None: the record's VM size). Returns its meta. Raises VmshimError
    (nothing is left of a failed one)."""
    shape = shape_of(record)
    if shape is None:
        raise VmshimError("only --rm containers with --network none, no mounts and no limits can start from a template")
    if memory_mib is not None:
        shape["memory_mib"] = memory_mib
    memory_mib = shape["memory_mib"]
    guest = guest_identity()
    key = key_of(shape, guest)
    tid = secrets.token_hex(32)
    token = secrets.token_hex(16)
    boot = boot_config_of(record).replace(
        container_id=tid,
        token=token,
        hostname="template",
        # The image's own command: never run (the identity brings the container's), but
        # its program is read ahead into the page cache the template saves.
        process=record.process.replace(tty=False),
    )
    directory = templates_dir() / key
    with locked_key(key):
        work = templates_dir() / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        placement = VmPlacement(
            boot,
            [Path(d) for d in record.layer_disks],
            paths.run_dir() / tid[:12],
            name="template",
            memory_mib=memory_mib,
            vcpus=record.vm_vcpus,
            backend=backend,
        )
        try:
            # Its own domain, never a pooled VM's: the save image must name the template's
            # domain, which restore_into renames to each container's.
            placement.pool_ok = False
            client = placement.boot()
            try:
                client.send(protocol.STATS, token=token, id=IDENTITY_ID)
                reply = client.recv(READY_TIMEOUT)
                if reply.type != protocol.STATS:
                    raise VmshimError(f"the template's agent answered {reply.type!r} to stats")
                # The container's process made up to its execve, saved with the VM: a
                # restored copy's start then skips what an empty TCG cache makes slow.
                client.send(protocol.PREFORK, token=token, id=IDENTITY_ID)
                reply = client.recv(READY_TIMEOUT)
                if reply.type != protocol.UPDATED:
                    message = reply.fields.get("message") if reply.type == protocol.ERROR else reply.type
                    raise VmshimError(
                        "the template's agent could not hold its container's process: "
                        + protocol.printable(str(message))
                    )
            finally:
                client.close()
            time.sleep(0.5)  # the agent sees its host leave, and greets the next one
            placement.save(work / MEMORY)
            meta = {
                "id": tid,
                "token": token,
                "uuid": str(uuid.UUID(tid[:32])),
                "image": record.image,
                "memory_mib": memory_mib,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **guest,
            }
            (work / META).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(directory, ignore_errors=True)
            os.rename(work, directory)
        except BaseException:
            placement.kill()
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            placement.teardown(grace=0.0)
    meta["dir"] = str(directory)
    return meta
