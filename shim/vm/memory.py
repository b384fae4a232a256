"""Host memory sharing and reclaim for vmshim's VMs, both opt-in (``vmshim memory set``):

- **KSM** (kernel samepage merging): the host kernel merges identical pages of QEMU's
  guest RAM (same guest kernel, same initramfs, zeroed pages), measured here at ~45%
  less PSS per idle VM after ~2 min. It is a host-wide switch (``/sys/kernel/mm/ksm/run``)
  and a side channel between VMs (merged pages are shared copy-on-write, so write timing
  tells whether another VM holds the same page): off unless asked for. When it is off,
  vmshim's domains also carry libvirt's ``<nosharepages/>``, so a KSM that someone else
  turned on for the host does not merge them either.
- **Free page reporting** (virtio-balloon, ``freePageReporting='on'``): the guest tells
  the host which pages it freed, and QEMU gives them back to the host (the guest kernel
  needs CONFIG_PAGE_REPORTING and virtio_balloon, both in kernels/microvm-x86_64.config).
  **On by default** (issue 15): an idle busybox VM's touched guest RAM 65 MiB instead of
  71 (the initramfs the guest unpacked and freed goes back), a guest that freed 128 MiB
  gives it back, and neither cold start nor exec got slower (README, "Memory and
  density"). ``vmshim memory set --free-page-reporting off`` turns it off.

The setting lives in ``$VMSHIM_ROOT/memory.json``; :func:`status` is what ``vmshim info``
shows. A setting missing from the file (or not a boolean there) is its default.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shim import paths
from shim.errors import VmshimError

KSM_DIR = Path("/sys/kernel/mm/ksm")
KSM_PAGES_TO_SCAN = 1000
KSM_SLEEP_MS = 20
"""What DESIGN.md measured: 8 idle 256 MiB guests merged in about 2 minutes."""


@dataclass(frozen=True)
class MemorySettings:
    ksm: bool = False
    """Off by default: host-wide, and a side channel between VMs."""
    free_page_reporting: bool = True
    """On by default: gives freed guest pages back at no measured cost."""


def settings_path() -> Path:
    return paths.root() / "memory.json"


def load() -> MemorySettings:
    """The saved setting; the defaults where there is none, it is unreadable, or a value
    is not a boolean."""
    default = MemorySettings()
    try:
        data = json.loads(settings_path().read_text())
        if not isinstance(data, dict):
            return default
    except (OSError, ValueError):
        return default

    def flag(key: str, fallback: bool) -> bool:
        value = data.get(key)
        return value if isinstance(value, bool) else fallback

    return MemorySettings(ksm=flag("ksm", default.ksm),
                          free_page_reporting=flag("free_page_reporting",
                                                   default.free_page_reporting))


def save(settings: MemorySettings, ksm_dir: Path = KSM_DIR) -> None:
    """Save *settings* and apply the KSM part to the host now. Raises VmshimError when
    the host has no KSM and it was asked for."""
    if settings.ksm:
        set_ksm(True, ksm_dir)
    elif load().ksm:
        set_ksm(False, ksm_dir)  # we turned it on: we turn it off (unmerging)
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(settings), f)
    os.replace(tmp, path)


def set_ksm(on: bool, ksm_dir: Path = KSM_DIR) -> None:
    """Start KSM with the measured scan rate, or stop it and unmerge (``run=2``)."""
    if not (ksm_dir / "run").exists():
        if on:
            raise VmshimError(f"this host kernel has no KSM ({ksm_dir} is missing)")
        return
    try:
        if on:
            (ksm_dir / "pages_to_scan").write_text(str(KSM_PAGES_TO_SCAN))
            (ksm_dir / "sleep_millisecs").write_text(str(KSM_SLEEP_MS))
        (ksm_dir / "run").write_text("1" if on else "2")
    except OSError as exc:
        raise VmshimError(f"cannot {'start' if on else 'stop'} KSM ({ksm_dir}/run): "
                          f"{exc.strerror}; it needs root") from None


def ksm_host(ksm_dir: Path = KSM_DIR) -> dict:
    """The host's KSM now: available, running, pages shared and sharing (4 KiB each)."""
    def read(name: str) -> int:
        try:
            return int((ksm_dir / name).read_text().strip())
        except (OSError, ValueError):
            return 0

    if not (ksm_dir / "run").exists():
        return {"available": False, "running": False, "pages_shared": 0, "pages_sharing": 0}
    return {"available": True, "running": read("run") == 1,
            "pages_shared": read("pages_shared"), "pages_sharing": read("pages_sharing")}


def status(ksm_dir: Path = KSM_DIR) -> dict:
    """What ``vmshim info`` shows: the setting and the host's KSM state."""
    settings = load()
    return {"ksm": settings.ksm, "free_page_reporting": settings.free_page_reporting,
            "ksm_host": ksm_host(ksm_dir)}
