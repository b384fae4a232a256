"""Volume benchmark: sequential read and write throughput (MiB/s, dd style) of a bind
mount and of a named volume, in vm and process isolation, against the host's own
filesystem (where the bind source and the volume images live).

Usage: python benchmarks/volumes.py [--runs N] [--mib SIZE] [--json FILE]

What each figure is (the same busybox dd everywhere; medians of N runs, min–max):

- write: ``dd if=/dev/zero of=FILE bs=1M count=SIZE conv=fsync``: through to the host's
  disk (a VM's flush reaches QEMU, which syncs the image or virtiofsd's file).
- read: ``dd if=FILE of=/dev/null bs=1M`` of a file the reader's kernel has not cached:
  written by the host (bind) or by the previous container (volume), so in a VM it comes
  through virtiofs / virtio-blk, from the host's page cache. The host baseline reads a
  file another process wrote, also from the page cache: the fair comparison.
  In process isolation a bind mount is the host's filesystem itself, and a volume is an
  ext4 image behind a loop device.

Every run is one container (one VM boot) doing the four transfers; runs are interleaved
(host, vm, process, host, …) so drift on a noisy host hits all alike.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import summary, save_json

HERE = Path(__file__).resolve().parent
VMSHIM = [sys.executable, "-m", "shim.cli.main"]
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
_STAMP = re.compile(r"^T (\S+) ([0-9.]+) ([0-9.]+)$", re.MULTILINE)
STAMP = (
    "stamp() { adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} "
    'END{printf "%d.%06d", s, u}\'; }; '
    'timed() { name=$1; shift; a=$(stamp); "$@" 2>/dev/null; b=$(stamp); '
    'echo "T $name $a $b"; }; '
)
"""Shell helpers for the container: busybox's dd prints no timing and its date has no
%N, but ``adjtimex`` shows the clock in µs. ``timed NAME CMD…`` prints
``T NAME START END``; the cost of taking the stamps is measured (``empty``) and taken off."""


def stamps(text: str) -> dict[str, float]:
    """NAME → seconds, from the ``T`` lines of :data:`STAMP`'s ``timed``."""
    return {name: float(b) - float(a) for name, a, b in _STAMP.findall(text)}


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def host_file(path: Path, mib: int) -> None:
    run([BUSYBOX, "dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"])


def container_round(isolation: str, bind_dir: Path, volume: str, index: int, mib: int) -> dict:
    """One container: write and read on the bind mount, then on the volume."""
    previous = f"/v/w-{isolation}-{index - 1}"
    script = STAMP + (
        "timed empty true; timed empty2 true; timed empty3 true; "
        f"timed bind_write dd if=/dev/zero of=/b/w-{isolation} bs=1M count={mib} conv=fsync; "
        f"timed bind_read dd if=/b/r-{isolation}-{index} of=/dev/null bs=1M; "
        f"timed volume_write dd if=/dev/zero of=/v/w-{isolation}-{index} bs=1M count={mib} "
        "conv=fsync; "
        f"timed volume_read dd if={previous} of=/dev/null bs=1M; rm -f {previous}"
    )
    out = run(
        VMSHIM
        + [
            "run",
            "--rm",
            "--isolation",
            isolation,
            "-v",
            f"{bind_dir}:/b",
            "-v",
            f"{volume}:/v",
            "busybox",
            "sh",
            "-c",
            script,
        ]
    )
    times = stamps(out)
    keys = ("bind_write", "bind_read", "volume_write", "volume_read")
    if not all(k in times for k in keys):
        raise SystemExit(f"unexpected output in {isolation} isolation:\n{out}")
    overhead = statistics.median([times["empty"], times["empty2"], times["empty3"]])
    return {k: mib / max(times[k] - overhead, 1e-6) for k in keys}


def _timed_host(argv: list[str]) -> float:
    start = time.perf_counter()
    run(argv)
    return time.perf_counter() - start


def host_round(work: Path, index: int, mib: int) -> dict:
    overhead = statistics.median(_timed_host([BUSYBOX, "true"]) for _ in range(3))
    write = (
        _timed_host([BUSYBOX, "dd", "if=/dev/zero", f"of={work}/w", "bs=1M", f"count={mib}", "conv=fsync"]) - overhead
    )
    read = _timed_host([BUSYBOX, "dd", f"if={work}/r-host-{index}", "of=/dev/null", "bs=1M"]) - overhead
    return {"write": mib / write, "read": mib / read}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64, help="size of each transfer (MiB)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--isolation", choices=["vm", "process"], action="append", help="only these (default: both)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from shim import paths
    from shim.vm.accel import detect_accel

    isolations = args.isolation or ["vm", "process"]
    accel = detect_accel()
    paths.root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vmshim-volbench-", dir=paths.root()))
    os.chmod(work, 0o755)
    volume = f"volbench-{os.getpid()}"
    samples: dict[str, list[float]] = {}

    def add(prefix: str, figures: dict) -> None:
        for key, value in figures.items():
            samples.setdefault(f"{prefix}{key}", []).append(value)

    try:
        run(VMSHIM + ["volume", "create", volume])
        for isolation in isolations:  # the file the first round's volume read finds
            run(
                VMSHIM
                + [
                    "run",
                    "--rm",
                    "--isolation",
                    isolation,
                    "-v",
                    f"{volume}:/v",
                    "busybox",
                    "dd",
                    "if=/dev/zero",
                    f"of=/v/w-{isolation}--1",
                    "bs=1M",
                    f"count={args.mib}",
                    "conv=fsync",
                ]
            )
        for index in range(args.runs):
            for who in ["host"] + isolations:
                host_file(work / f"r-{who}-{index}", args.mib)
        time.sleep(1)
        for index in range(args.runs):
            add("host_", host_round(work, index, args.mib))
            for isolation in isolations:
                add(f"{isolation}_", container_round(isolation, work, volume, index, args.mib))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for _ in range(30):  # the last container's monitor may still hold the volume
            if subprocess.run(VMSHIM + ["volume", "rm", volume], capture_output=True).returncode == 0:
                break
            time.sleep(1)

    results = {key: summary(vals) for key, vals in sorted(samples.items())}
    host = {"read": results["host_read"]["median"], "write": results["host_write"]["median"]}
    results["ratios_to_host"] = {
        key: results[key]["median"] / host["read" if key.endswith("read") else "write"]
        for key in results
        if not key.startswith("host_") and key in samples
    }
    results["accel"] = {"kind": accel.kind, "reason": accel.reason}
    results["config"] = {"runs": args.runs, "mib": args.mib, "cpus": os.cpu_count(), "kernel": os.uname().release}
    print(
        f"accel: {accel.kind.upper()}; {args.runs} runs of {args.mib} MiB, MiB/s medians [min–max], ratio to the host's"
    )
    rows = [("host", "host filesystem", "host_")]
    for isolation in isolations:
        rows += [
            (isolation, f"{isolation}: bind mount", f"{isolation}_bind_"),
            (isolation, f"{isolation}: named volume", f"{isolation}_volume_"),
        ]
    for _, label, prefix in rows:
        parts = []
        for op in ("write", "read"):
            r = results[f"{prefix}{op}"]
            ratio = results["ratios_to_host"].get(f"{prefix}{op}")
            shown = f" ({ratio:.2f}x)" if ratio is not None else ""
            parts.append(f"{op} {r['median']:7.1f} [{r['min']:.0f}–{r['max']:.0f}]{shown}")
        print(f"  {label:24s} " + "   ".join(parts))
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
