"""What the figures were measured on: accel (KVM or TCG, and why), CPU model and count,
memory, the host and guest kernels, and the versions of the tools compared."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first ``model name`` of /proc/cpuinfo (the machine type when there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.machine() or "unknown"


def _first_line(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def accel() -> dict:
    """``{"kind": "kvm"|"tcg", "reason": …}``, as ``vmshim info`` decides it."""
    try:
        from shim.vm.accel import detect_accel

        info = detect_accel()
        return {"kind": info.kind, "reason": info.reason}
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        return {"kind": "unknown", "reason": f"accel detection failed: {exc}"}


def guest_kernel() -> str | None:
    try:
        from shim.guestimage import current_guest_image

        image = current_guest_image()
        return image.kernel_release if image else None
    except Exception:  # noqa: BLE001
        return None


def guest_kernel_choice() -> dict | None:
    """Which guest kernel vmshim boots (minimal, distro or override) and why."""
    try:
        from shim.guestimage import kernel_choice

        choice, reason = kernel_choice()
        return {"choice": choice, "reason": reason}
    except Exception:  # noqa: BLE001
        return None


def describe() -> dict:
    """Everything :mod:`shim.bench.report` records about this host."""
    try:
        from importlib.metadata import version

        vmshim_version = version("vmshim")
    except Exception:  # noqa: BLE001
        vmshim_version = None
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "accel": accel(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "host_kernel": os.uname().release,
        "guest_kernel": guest_kernel(),
        "guest_kernel_choice": guest_kernel_choice(),
        "load_average_at_start": list(load) if load else None,
        "versions": {
            "vmshim": vmshim_version,
            "qemu": _first_line(["qemu-system-x86_64", "--version"]),
            "runc": _first_line(["runc", "--version"]),
            "libvirt": _first_line(["virsh", "--version"]),
            "python": platform.python_version(),
        },
    }
