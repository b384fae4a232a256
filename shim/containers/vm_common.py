"""What booting a container's VM shares between a cold boot (shim.containers.vm_placement),
the warm pool (shim.containers.pool) and snapshot templates (shim.containers.template):
the boot deadline, the console tail for errors, libvirt's disk names. Below all three, so
none of them imports another for these."""

from __future__ import annotations

import os
from pathlib import Path

BOOT_TIMEOUT = float(os.environ.get("VMSHIM_BOOT_TIMEOUT", "90"))
"""Seconds from domain creation to the agent's hello (TCG on a busy host can be slow)."""


def console_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of the serial console log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)


def disk_target(index: int) -> str:
    """vda, vdb, … vdz, vdaa, … (libvirt's naming)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "vd" + letters
