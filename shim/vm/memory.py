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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from shim import paths
from shim.errors import VmshimError

KSM_DIR = Path("/sys/kernel/mm/ksm")
KSM_PAGES_TO_SCAN = 1000
KSM_SLEEP_MS = 20
"""What DESIGN.md measured: 8 idle 256 MiB guests merged in about 2 minutes. ksmd's own
defaults (100 pages every 20 ms) are ten times slower; 1000 pages per 20 ms costs ksmd
about a tenth of one core while it scans (bounded: it sleeps between batches). vmshim
sets these when it turns KSM on and puts the host's previous values back when it turns
it off (saved in ``$VMSHIM_ROOT/ksm-previous.json``)."""
KSM_TUNED = ("pages_to_scan", "sleep_millisecs")


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

    return MemorySettings(
        ksm=flag("ksm", default.ksm), free_page_reporting=flag("free_page_reporting", default.free_page_reporting)
    )


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
    previous = paths.root() / "ksm-previous.json"
    try:
        if on:
            if not previous.exists():
                previous.parent.mkdir(parents=True, exist_ok=True)
                previous.write_text(json.dumps({n: (ksm_dir / n).read_text().strip() for n in KSM_TUNED}))
            (ksm_dir / "pages_to_scan").write_text(str(KSM_PAGES_TO_SCAN))
            (ksm_dir / "sleep_millisecs").write_text(str(KSM_SLEEP_MS))
        (ksm_dir / "run").write_text("1" if on else "2")
        if not on and previous.exists():
            _restore_tuning(previous, ksm_dir)
    except OSError as exc:
        raise VmshimError(
            f"cannot {'start' if on else 'stop'} KSM ({ksm_dir}/run): {exc.strerror}; it needs root"
        ) from None


def _restore_tuning(previous: Path, ksm_dir: Path) -> None:
    """Put back the scan rate saved when vmshim turned KSM on (only positive integers)."""
    try:
        saved = json.loads(previous.read_text())
    except (OSError, ValueError):
        saved = {}
    if isinstance(saved, dict):
        for name in KSM_TUNED:
            value = saved.get(name)
            if isinstance(value, str) and value.isdigit() and 0 < int(value) < 10**7:
                (ksm_dir / name).write_text(value)
    previous.unlink()


KSM_SETTLE_TIMEOUT = 120.0
"""The longest the density bench waits (untimed) for ksmd to settle before reading PSS."""


@dataclass(frozen=True)
class Settle:
    waited_s: float
    settled: bool
    """False when the timeout came first (PSS is then read anyway)."""
    full_scans: int
    pages_sharing: int


def ksm_settle(
    ksm_dir: Path = KSM_DIR,
    timeout: float = KSM_SETTLE_TIMEOUT,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Settle:
    """Wait until ksmd has settled since now: ``full_scans`` advanced by at least 2 and
    ``pages_sharing`` changed by at most 1% (or 16 pages) across the last full scan;
    at most *timeout* seconds. Precondition: KSM is running."""

    def read(name: str) -> int:
        try:
            return int((ksm_dir / name).read_text().strip())
        except (OSError, ValueError):
            return 0

    start = clock()
    base = scan = read("full_scans")
    sharing = read("pages_sharing")
    while True:
        now_scan, now_sharing = read("full_scans"), read("pages_sharing")
        if now_scan != scan:
            stable = abs(now_sharing - sharing) <= max(16, sharing // 100)
            if now_scan >= base + 2 and stable:
                return Settle(round(clock() - start, 1), True, now_scan, now_sharing)
            scan, sharing = now_scan, now_sharing
        waited = clock() - start
        if waited >= timeout:
            return Settle(round(waited, 1), False, now_scan, now_sharing)
        sleep(poll)


def ksm_host(ksm_dir: Path = KSM_DIR) -> dict:
    """The host's KSM now: available, running, pages shared and sharing (4 KiB each)."""

    def read(name: str) -> int:
        try:
            return int((ksm_dir / name).read_text().strip())
        except (OSError, ValueError):
            return 0

    if not (ksm_dir / "run").exists():
        return {"available": False, "running": False, "pages_shared": 0, "pages_sharing": 0}
    return {
        "available": True,
        "running": read("run") == 1,
        "pages_shared": read("pages_shared"),
        "pages_sharing": read("pages_sharing"),
    }


def status(ksm_dir: Path = KSM_DIR) -> dict:
    """What ``vmshim info`` shows: the setting and the host's KSM state."""
    settings = load()
    return {"ksm": settings.ksm, "free_page_reporting": settings.free_page_reporting, "ksm_host": ksm_host(ksm_dir)}
