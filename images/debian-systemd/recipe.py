"""Recipe for ``debian-systemd:bookworm`` (also ``debian-systemd:latest``): Debian bookworm
(debootstrap, minbase) with systemd as /sbin/init, dbus, openssh-server and procps, for OS
containers (``vmshim run --os``) — no registry needed, only a Debian mirror.

Made like the node image (images/node/recipe.py: same mirror choice, slimming, layer
writer and cache), with what an OS container wants on top:

- ``vmshim-hello.service`` (enabled): a small demo service that logs a line a minute;
- journald forwards the journal to the console (the container's log: ``vmshim logs``);
- sshd makes its host keys at its first start (none are baked into the image, so no two
  containers share them); /root/.ssh exists (0700) for an ``authorized_keys``;
- ``console-getty.service`` masked (the console is the container's log, not a login);
- an empty /etc/machine-id (systemd makes one at boot).

Config: ``Cmd ["/sbin/init"]``, ``StopSignal SIGRTMIN+3``, ``ExposedPorts 22/tcp``. The layer
tar is cached as ``$VMSHIM_ROOT/cache/debian-systemd/rootfs-bookworm-<arch>.tar``
(debootstrap: about 2 minutes here); ``VMSHIM_DEBIAN_SYSTEMD_REBUILD=1`` throws it away.

Run with ``vmshim image bootstrap debian-systemd``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shim import paths  # noqa: E402
from shim.images.store import Image, ImageStore, host_arch, load_recipe, recipe_config  # noqa: E402

REFERENCE = "docker.io/library/debian-systemd:bookworm"
ALIASES = ("docker.io/library/debian-systemd:latest",)
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "procps")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HELLO_UNIT = """[Unit]
Description=vmshim demo service (logs a line every minute)

[Service]
ExecStart=/bin/sh -c 'while :; do echo "hello from $(hostname)"; sleep 60; done'

[Install]
WantedBy=multi-user.target
"""
JOURNALD_CONSOLE = "[Journal]\nForwardToConsole=yes\nMaxLevelConsole=info\n"
SSH_HOSTKEYS = "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n"


def cache_path() -> Path:
    return paths.cache_dir() / "debian-systemd" / f"rootfs-{SUITE}-{host_arch()}.tar"


def debootstrap(node, rootfs: Path, log=print) -> None:
    """Install bookworm minbase + PACKAGES into ``rootfs`` (the node recipe's debootstrap)
    and configure it. Raises ImageError."""
    node.debootstrap(rootfs, log, packages=PACKAGES, recipe="debian-systemd")
    configure(rootfs)


def configure(rootfs: Path) -> None:
    """What an OS container wants (see the module doc); idempotent."""
    system = rootfs / "etc/systemd/system"
    (system / "vmshim-hello.service").write_text(HELLO_UNIT)
    wants = system / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "vmshim-hello.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/vmshim-hello.service")
    getty = system / "console-getty.service"
    if not getty.is_symlink():
        getty.symlink_to("/dev/null")
    (rootfs / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/systemd/journald.conf.d/vmshim-console.conf").write_text(JOURNALD_CONSOLE)
    (system / "ssh.service.d").mkdir(parents=True, exist_ok=True)
    (system / "ssh.service.d/vmshim-hostkeys.conf").write_text(SSH_HOSTKEYS)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    machine_id = rootfs / "etc/machine-id"
    machine_id.write_text("")
    machine_id.chmod(0o444)
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)  # the host's; the runtime mounts one


def build(store: ImageStore | None = None, log=print) -> Image:
    """Build ``debian-systemd:bookworm`` into ``store`` (default: the local store), tag the
    aliases, return it. Raises ImageError (debootstrap missing or failing, not root)."""
    node = load_recipe("node")
    store = store or ImageStore()
    tar_path = cache_path()
    meta_path = tar_path.with_suffix(".json")
    node.forget_when_asked("VMSHIM_DEBIAN_SYSTEMD_REBUILD", tar_path, meta_path)
    if not (tar_path.is_file() and meta_path.is_file()):

        def prepare(rootfs: Path):
            debootstrap(node, rootfs, log)
            return node.changelog_date(rootfs, "systemd"), {}

        node.write_rootfs_tar(store, "debian-systemd", tar_path, meta_path, prepare)
    meta = json.loads(meta_path.read_text())
    config = recipe_config(
        meta["created"],
        {"Env": [PATH_ENV], "Cmd": ["/sbin/init"], "StopSignal": "SIGRTMIN+3", "ExposedPorts": {"22/tcp": {}}},
        f"vmshim images/debian-systemd/recipe.py (debootstrap {SUITE} minbase + {' '.join(PACKAGES)})",
    )
    image = node.stored_or_imported(store, REFERENCE, tar_path, meta, config)
    for alias in ALIASES:
        store.tag(alias, image.manifest_digest)
    return image


if __name__ == "__main__":
    image = build()
    print(f"{image.reference.familiar} {image.id}")
