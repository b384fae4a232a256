"""Startup benchmark: `vmshim run --rm busybox true` in vm and process isolation, against
the floor — a bare qemu-system-x86_64 boot of the same kernel and initramfs until the
agent's first bytes (its hello) reach the host.

Usage: python benchmarks/startup.py [--runs N] [--json FILE]

Every figure is the median (with min and max) of N whole-process runs, interleaved
(floor, vm, process, floor, vm, …) so drift on a noisy host hits all three alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import VMSHIM, print_seconds, summary, timed as time_command, save_json

HERE = Path(__file__).resolve().parent


def time_floor(image, accel_kind: str) -> float:
    """Launch bare QEMU and wait for the first bytes on the agent socket."""
    from shim.guestimage import boot_floor_command

    from guest.spec import BootConfig, ProcessSpec
    from shim.vm.configdrive import build_config_drive

    tmp = Path(tempfile.mkdtemp(prefix="vmshim-floor-"))
    sock_path = str(tmp / "agent.sock")
    # The same config drive a container gets, so the guest boots exactly as it would.
    drive = build_config_drive(
        BootConfig(
            container_id="0" * 64, token="floor", hostname="floor", process=ProcessSpec(args=["true"]), layer_count=0
        ),
        tmp / "config.iso",
    )
    argv = boot_floor_command(
        image, sock_path, str(tmp / "console.log"), config_drive=str(drive), accel_kind=accel_kind
    )
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = None
        deadline = start + 120
        while sock is None:
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(sock_path)
            except OSError:
                sock.close()
                sock = None
                if time.perf_counter() > deadline or proc.poll() is not None:
                    raise SystemExit("the floor VM did not start")
                time.sleep(0.005)
        sock.settimeout(120)
        if not sock.recv(1):
            raise SystemExit("the floor VM closed its agent channel without a word")
        elapsed = time.perf_counter() - start
        sock.close()
        return elapsed
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from shim.guestimage import ensure_guest_image
    from shim.vm.accel import detect_accel

    image = ensure_guest_image()
    accel = detect_accel()
    samples: dict[str, list[float]] = {"floor": [], "vm": [], "process": []}
    commands = {
        "vm": VMSHIM + ["run", "--rm", "busybox", "true"],
        "process": VMSHIM + ["run", "--rm", "--isolation", "process", "busybox", "true"],
    }
    time_command(commands["vm"])  # warm caches (layer disk, accel probe, page cache)
    for _ in range(args.runs):
        samples["floor"].append(time_floor(image, accel.kind))
        for key, argv in commands.items():
            samples[key].append(time_command(argv))
    results = {key: summary(vals) for key, vals in samples.items()}
    floor = results["floor"]["median"]
    results["ratios"] = {
        "vm_to_floor": results["vm"]["median"] / floor,
        "vm_to_process": results["vm"]["median"] / results["process"]["median"],
    }
    results["accel"] = {"kind": accel.kind, "reason": accel.reason}
    results["host"] = {"cpus": os.cpu_count(), "kernel": os.uname().release, "guest_kernel": image.kernel_release}
    print(f"accel: {accel.kind.upper()} ({accel.reason}); {args.runs} runs, medians [min–max]")
    print_seconds(
        [
            ("bare QEMU boot to agent hello (floor)", results["floor"]),
            ("vmshim run --rm busybox true (vm)", results["vm"]),
            ("vmshim run --rm --isolation process busybox true", results["process"]),
        ],
        indent="  ",
    )
    print(
        f"  vm / floor = {results['ratios']['vm_to_floor']:.2f}x   "
        f"vm / process = {results['ratios']['vm_to_process']:.2f}x"
    )
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
