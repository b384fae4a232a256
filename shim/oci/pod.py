"""Which vmshim sandbox a new container joins (a pod's members share one VM, as Kata does).

A container joins a sandbox when the engine says so in its annotations (containerd's CRI
``io.kubernetes.cri.container-type: container`` with ``io.kubernetes.cri.sandbox-id``,
CRI-O's ``io.kubernetes.cri-o.ContainerType``/``SandboxID``), or when its ``network``
namespace ``path`` is the one a vmshim container's stand-in holds (podman ``--pod``,
``--network container:X``). The namespace is compared by device and inode, never by path.

Refusals: an annotation naming a sandbox this ``--root`` does not have, or one whose
stand-in has gone (the VM is dead). A path that no live vmshim stand-in holds is not a
join (the engine's own namespace, e.g. podman's default network).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol

from shim.errors import ContainerNotFound, VmshimError

from .state import OciInfo, alive

ANNOTATIONS = (
    # (type key, value meaning "member", sandbox id key)
    ("io.kubernetes.cri.container-type", "container", "io.kubernetes.cri.sandbox-id"),
    ("io.kubernetes.cri-o.ContainerType", "container", "io.kubernetes.cri-o.SandboxID"),
)
MAX_CANDIDATES = 4096
"""Bound on the containers scanned for the namespace's holder."""


class PodError(VmshimError):
    """The sandbox a container joins is missing or has stopped."""


class SandboxMissing(PodError):
    """An annotation names a sandbox this ``--root`` does not have."""


class _Store(Protocol):
    def ids(self) -> list[str]: ...
    def load(self, oci_id: str) -> tuple[object, OciInfo]: ...


@dataclass(frozen=True)
class Join:
    """The container joins the VM of *sandbox* (an OCI id in the same ``--root``)."""

    sandbox: str
    reason: str
    """"annotation" or "netns"."""


def netns_path(config: dict) -> str | None:
    """The ``path`` of the config's ``network`` namespace entry, if any."""
    linux = config.get("linux") if isinstance(config, dict) else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for entry in namespaces if isinstance(namespaces, list) else []:
        if isinstance(entry, dict) and entry.get("type") == "network":
            path = entry.get("path")
            return path if isinstance(path, str) and path else None
    return None


def annotated_sandbox(annotations: dict, own_id: str) -> str | None:
    """The sandbox id a CRI member container names (None: not a member)."""
    for type_key, member, id_key in ANNOTATIONS:
        if annotations.get(type_key) == member:
            sandbox = annotations.get(id_key)
            if not isinstance(sandbox, str) or not sandbox or len(sandbox) > 1024:
                raise PodError(f"annotation {id_key} is missing or invalid")
            return None if sandbox == own_id else sandbox
    return None


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _live_info(store: _Store, oci_id: str) -> OciInfo | None:
    try:
        _, info = store.load(oci_id)
    except ContainerNotFound:
        return None
    return info if alive(info.standin_pid, info.standin_start) else None


def find_join(store: _Store, oci_id: str, config: dict, annotations: dict) -> Join | None:
    """The sandbox *oci_id* joins, or None (it gets its own VM). Raises PodError."""
    sandbox = annotated_sandbox(annotations, oci_id)
    if sandbox is not None:
        try:
            _, info = store.load(sandbox)
        except ContainerNotFound:
            raise SandboxMissing(f"sandbox {sandbox} is not a vmshim-runtime container here") \
                from None
        if not alive(info.standin_pid, info.standin_start):
            raise PodError(f"sandbox {sandbox} has stopped; its members cannot start")
        return Join(sandbox, "annotation")
    path = netns_path(config)
    key = _ns_key(path) if path else None
    if key is None:
        return None
    candidates: Iterable[str] = store.ids()[:MAX_CANDIDATES]
    for other in candidates:
        if other == oci_id:
            continue
        held = _live_info(store, other)
        if held is not None and _ns_key(f"/proc/{held.standin_pid}/ns/net") == key:
            return Join(other, "netns")
    return None


def refuse_member(store: _Store, oci_id: str, network_ns: str | None,
                  annotations: dict) -> None:
    """In ``create``, before anything is kept: refuse a container that joins a vmshim
    sandbox's VM (not supported yet; without this it is refused later, at ``start``, when
    its VM would plug into a namespace the sandbox's VM holds). A sandbox of another runtime
    is not a join. Raises PodError."""
    config = {"linux": {"namespaces": [{"type": "network", "path": network_ns or ""}]}}
    try:
        join = find_join(store, oci_id, config, annotations)
    except SandboxMissing:
        return
    if join is not None:
        raise PodError(f"container {oci_id} joins the namespaces of vmshim container "
                       f"{join.sandbox} (a pod): members sharing the sandbox's VM are not "
                       "supported yet; give the pod one vmshim container")
