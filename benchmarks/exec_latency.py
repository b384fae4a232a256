"""Exec latency: the median wall time of a whole `vmshim exec CONTAINER true` process into a
running container (vm isolation by default), as a user sees it.

Usage: python benchmarks/exec_latency.py [--runs N] [--isolation vm|process] [--json FILE]

It starts one detached busybox container, runs `exec true` N times (after two warm-up
runs), and removes the container. It also times the two parts that are not the guest:
`vmshim --version` (Python start-up plus the CLI's imports) and a bare `python -c pass`,
so the report says how much of the latency is the CLI process itself and how much is
the round trip CLI → monitor → agent → fork/exec in the guest → exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from common import VMSHIM, summary_ms as summary, timed, save_json

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--isolation", choices=["vm", "process"], default="vm")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    os.chdir(HERE.parent)
    name = f"exec-bench-{os.getpid()}"
    subprocess.run(
        VMSHIM + ["run", "-d", "--isolation", args.isolation, "--name", name, "busybox", "sleep", "1000000"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(2):
            timed(VMSHIM + ["exec", name, "true"])
        samples = {"exec": [], "cli": [], "python": []}
        for _ in range(args.runs):  # interleaved, so host noise hits all three alike
            samples["exec"].append(timed(VMSHIM + ["exec", name, "true"]))
            samples["cli"].append(timed(VMSHIM + ["--version"]))
            samples["python"].append(timed([sys.executable, "-c", "pass"]))
    finally:
        subprocess.run(VMSHIM + ["rm", "-f", name], stdout=subprocess.DEVNULL)
    results = {key: summary(vals) for key, vals in samples.items()}
    from shim.vm.accel import detect_accel

    accel = detect_accel()
    results["accel"] = {"kind": accel.kind, "reason": accel.reason}
    results["isolation"] = args.isolation
    exec_ms, cli_ms = results["exec"]["median_ms"], results["cli"]["median_ms"]
    print(
        f"accel: {accel.kind.upper()} ({accel.reason}); isolation {args.isolation}; {args.runs} runs, medians [min–max]"
    )
    for key, label in (
        ("exec", "vmshim exec CONTAINER true"),
        ("cli", "vmshim --version (python + CLI imports)"),
        ("python", "python -c pass (interpreter alone)"),
    ):
        r = results[key]
        print(f"  {label:44s} {r['median_ms']:7.1f} ms  [{r['min_ms']:.1f}–{r['max_ms']:.1f}]")
    print(f"  round trip beyond the CLI process (exec − --version): {exec_ms - cli_ms:.1f} ms")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
