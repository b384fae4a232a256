"""Limits benchmark: the guest's memory overhead that VM sizing adds to ``--memory``
(shim.containers.resources.GUEST_OVERHEAD_MIB), and how closely ``--cpus`` holds a busy
loop, in vm and process isolation.

Usage: python benchmarks/limits.py [--runs N] [--json FILE]

Memory (vm): for each limit L, a VM of L + overhead boots; the container prints the
guest's MemTotal and MemAvailable while idle, then fills its limit (a dd buffer of L-8
MiB) and must succeed (no OOM kill of any kind), then over-fills it (L+32 MiB) and must be
OOM-killed by its own cgroup (``memory.events``: oom). "overhead" = VM size − MemAvailable
when idle: what the kernel, the initramfs held in RAM and the agent use.

CPU (both): a detached ``--cpus C`` container spins; its cgroup's CPU time over 5 s of
wall time (through its monitor and agent: shim.containers.limits.stats), divided by C.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save_json

HERE = Path(__file__).resolve().parent
VMSHIM = [sys.executable, "-m", "shim.cli.main"]
LIMITS_MIB = (32, 64, 128)
CPUS = ("0.5", "1")


def vmshim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(VMSHIM + list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True)


def memory_round(limit: int) -> dict:
    script = (
        "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo; "
        f"dd if=/dev/zero of=/dev/null bs={limit - 8}M count=1 2>/dev/null && echo filled; "
        "grep -E '^(MemAvailable):' /proc/meminfo | sed 's/^/after /'; "
        f"(dd if=/dev/zero of=/dev/null bs={limit + 32}M count=1 2>/dev/null; echo over $?); "
        "grep -E '^(oom|oom_kill) ' /sys/fs/cgroup/memory.events"
    )
    proc = vmshim("run", "--rm", "-m", f"{limit}m", "busybox", "sh", "-c", script)
    text = proc.stdout
    kib = {k: int(v) for k, v in re.findall(r"^(MemTotal|MemAvailable):\s+(\d+) kB", text, re.M)}
    from shim.containers.resources import GUEST_OVERHEAD_MIB

    vm_mib = limit + GUEST_OVERHEAD_MIB
    events = dict(re.findall(r"^(oom|oom_kill) (\d+)$", text, re.M))
    return {
        "limit_mib": limit,
        "vm_mib": vm_mib,
        "mem_total_mib": kib.get("MemTotal", 0) / 1024,
        "mem_available_mib": kib.get("MemAvailable", 0) / 1024,
        "overhead_mib": vm_mib - kib.get("MemAvailable", 0) / 1024,
        "filled_ok": "filled" in text,
        "overfill_killed": "over 137" in text and int(events.get("oom", 0)) > 0,
    }


def cpu_round(isolation: str, cpus: str) -> float:
    from shim.containers.limits import stats
    from shim.containers.store import ContainerStore

    name = f"limbench-{os.getpid()}-{isolation}"
    proc = vmshim(
        "run",
        "-d",
        "--isolation",
        isolation,
        "--cpus",
        cpus,
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        "while :; do :; done",
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    try:
        store = ContainerStore()
        record = store.find(name)
        time.sleep(2)
        a, t0 = stats(record, store)["cpu_ns"], time.monotonic()
        time.sleep(5)
        b, t1 = stats(record, store)["cpu_ns"], time.monotonic()
        return (b - a) / ((t1 - t0) * 1e9) / float(cpus)
    finally:
        vmshim("rm", "-f", name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    results: dict = {"memory": {}, "cpu": {}}
    for limit in LIMITS_MIB:
        rounds = [memory_round(limit) for _ in range(args.runs)]
        results["memory"][str(limit)] = {
            "vm_mib": rounds[0]["vm_mib"],
            "mem_total_mib": statistics.median(r["mem_total_mib"] for r in rounds),
            "mem_available_mib": statistics.median(r["mem_available_mib"] for r in rounds),
            "overhead_mib": statistics.median(r["overhead_mib"] for r in rounds),
            "filled_ok": all(r["filled_ok"] for r in rounds),
            "overfill_killed": all(r["overfill_killed"] for r in rounds),
        }
    for isolation in ("vm", "process"):
        for cpus in CPUS:
            shares = [cpu_round(isolation, cpus) for _ in range(args.runs)]
            results["cpu"][f"{isolation} --cpus {cpus}"] = {
                "median": statistics.median(shares),
                "min": min(shares),
                "max": max(shares),
            }
    print(
        f"memory (vm; medians of {args.runs}): limit → VM size, guest MemTotal, "
        "MemAvailable idle, overhead, fill to limit−8 MiB ok, over-fill OOM-killed"
    )
    for limit, r in results["memory"].items():
        print(
            f"  --memory {limit:>4s}m  VM {r['vm_mib']:4d} MiB  total {r['mem_total_mib']:6.1f}"
            f"  available {r['mem_available_mib']:6.1f}  overhead {r['overhead_mib']:5.1f}"
            f"  fill {'ok' if r['filled_ok'] else 'FAILED'}"
            f"  over-fill {'killed' if r['overfill_killed'] else 'NOT KILLED'}"
        )
    print("cpu: the cgroup's CPU time / wall time / --cpus (1.00 = exactly the limit)")
    for key, r in results["cpu"].items():
        print(f"  {key:22s} {r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
