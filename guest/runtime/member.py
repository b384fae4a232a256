"""A pod member: a second container in the sandbox's VM (the agent's ``member``), as Kata
runs a pod's containers. Stdlib only.

The host plugs the member's rootfs (its OCI bundle's ``root.path``) into the running VM as
a virtiofs share whose tag starts with guest.protocol.MEMBER_TAG_PREFIX. Here it is
mounted under MEMBERS_DIR, the member gets a cgroup of its own beside the container's and
its process runs in new mount, pid, uts, ipc and cgroup namespaces on that rootfs; the
network namespace is the VM's, which the sandbox's container shares (the pod's localhost
and interfaces). :meth:`Member.destroy` undoes it all once the process has exited.
"""

from __future__ import annotations

import os
import re
import shutil
import time

from guest.protocol import MEMBER_TAG_PREFIX

TYPE_CHECKING = False  # for the type checker only: importing typing costs boot time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    from guest.runtime.process import Spawned

    class Container(Protocol):
        """What a member needs of a guest.runtime.container.Container (named by its
        shape: that module imports this one)."""

        main: Spawned | None

        def start(self, process: Any, *, stdin: bool, rows: int = 24, cols: int = 80) -> Spawned: ...

        def destroy(self) -> None: ...

    MountFn = Callable[[str, str, bool], object]
    """guest.runtime.mounts.mount_virtiofs: ``(tag, target, readonly)``."""

MEMBERS_DIR = "/run/vmshim/members"
TAG_RE = re.compile("^" + re.escape(MEMBER_TAG_PREFIX) + "[0-9a-f]{1,16}$")
MOUNT_WAIT = 15.0
"""Seconds to wait for a just-plugged share to be mountable (the guest's PCIe hotplug
driver probes the device a moment after the host attached it)."""
MAX_MEMBERS = 64


class MemberError(Exception):
    """The member could not be set up; the text is for the user."""

    exit_code = 125


class Member:
    """A started member: its guest Container, the share's mount and its directory."""

    def __init__(self, container: Container | _Nothing, share_dir: str, base: str) -> None:
        self.container = container
        self.share_dir = share_dir
        self.base = base

    @property
    def spawned(self) -> Spawned | None:
        return self.container.main

    def destroy(self) -> None:
        """Once its process was reaped (or never started): remove its cgroup (what is
        left in it goes), unmount its rootfs share and remove its directory. Idempotent;
        raises nothing."""
        from guest.runtime import rootfs as rootfs_mod

        self.container.main = None  # reaped: its pid may be another process's by now
        try:
            self.container.destroy()
        except Exception:  # noqa: BLE001 - the cgroup may be busy a moment longer
            pass
        try:
            rootfs_mod.unmount(self.share_dir, detach=True)
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(self.base, ignore_errors=True)


def check_config(config: Any) -> None:
    """What a member's config must be on top of BootConfig's own checks. Raises
    MemberError."""
    if not TAG_RE.match(config.rootfs_share or ""):
        raise MemberError(
            f"a pod member's rootfs share must be named {MEMBER_TAG_PREFIX}<hex>, not {config.rootfs_share!r}"
        )
    if not re.fullmatch(r"[0-9a-f]{16,64}", config.container_id):
        raise MemberError("a pod member's container id must be 16-64 hex digits")
    if config.layer_count or config.mounts or config.network or config.os:
        raise MemberError("a pod member takes no layers, mounts, network or OS mode")


def start_member(
    config: Any,
    make_container: Callable[[Any, str, str], Container],
    *,
    stdin: bool,
    rows: int = 24,
    cols: int = 80,
    base_dir: str = MEMBERS_DIR,
    mount: MountFn | None = None,
    wait: float = MOUNT_WAIT,
) -> Member:
    """Mount the share of member *config* (a guest.spec.BootConfig), build its container
    with ``make_container(config, rootfs, files_dir)`` (a guest.runtime.container
    Container: start(), destroy(), main) and start its process. Raises MemberError, or
    the runtime's SpawnError/MountError/CgroupError (having undone what was done)."""
    check_config(config)
    if mount is None:
        from guest.runtime.mounts import mount_virtiofs

        mount = mount_virtiofs
    base = os.path.join(base_dir, config.container_id)
    try:
        count = len(os.listdir(base_dir))
    except OSError:
        count = 0
    if count >= MAX_MEMBERS:
        raise MemberError(f"this VM already runs {MAX_MEMBERS} pod members")
    try:
        os.makedirs(base, mode=0o700)
    except FileExistsError:
        raise MemberError(f"pod member {config.container_id} is already running") from None
    share_dir = os.path.join(base, "rootfs")
    files_dir = os.path.join(base, "files")
    os.makedirs(files_dir, mode=0o700)
    member = Member(_Nothing(), share_dir, base)
    try:
        _mount_when_ready(mount, config.rootfs_share, share_dir, wait)
        member.container = make_container(config, share_dir, files_dir)
        member.container.start(config.process, stdin=stdin, rows=rows, cols=cols)
    except BaseException:
        member.destroy()
        raise
    return member


def _mount_when_ready(mount: MountFn, tag: str, target: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            mount(tag, target, False)
            return
        except Exception as exc:  # noqa: BLE001 - MountError until the device is probed
            if time.monotonic() >= deadline:
                raise MemberError(
                    f"the pod member's rootfs share {tag!r} did not appear within {wait:g} s: {exc}"
                ) from None
            time.sleep(0.1)


class _Nothing:
    """Stands in for a container that was never made (destroy() after a failed mount)."""

    main: Spawned | None = None

    def destroy(self) -> None:
        pass
