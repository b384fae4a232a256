"""Build benchmark: `vmshim build` of an unchanged Dockerfile (every step from the cache)
and of a one-RUN Dockerfile (one microVM boot, its diff committed as a layer).

Usage: python benchmarks/build.py [--runs N] [--isolation vm|process] [--json FILE]

Every figure is the median (with min and max) of N whole-process runs of the CLI. The
one-RUN build uses ``--no-cache`` so that each run really boots a VM; the unchanged rebuild
builds a small multi-step Dockerfile (FROM, ENV, WORKDIR, COPY, RUN, COPY, EXPOSE, CMD)
once to fill the cache and then times rebuilding it. The baseline, interleaved with both,
is ``vmshim run --rm busybox true`` in the same isolation (one container start): a one-RUN
build should cost that plus the diff. Needs libvirtd, the guest image and the busybox
image (scripts/setup).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import VMSHIM, print_seconds, summary, timed as time_command, save_json

HERE = Path(__file__).resolve().parent

MULTI_STEP = """\
FROM busybox
ENV APP=/srv/app
WORKDIR $APP
COPY package.json .
RUN echo installed > deps.txt
COPY . .
EXPOSE 8080
CMD ["cat", "deps.txt"]
"""
ONE_RUN = "FROM busybox\nRUN echo built > /built\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--isolation", choices=["vm", "process"], default="vm")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from shim.vm.accel import detect_accel

    accel = detect_accel()
    with tempfile.TemporaryDirectory(prefix="vmshim-build-bench-") as tmp:
        multi = Path(tmp) / "multi"
        multi.mkdir()
        (multi / "Dockerfile").write_text(MULTI_STEP)
        (multi / "package.json").write_text('{"name": "bench", "dependencies": {}}\n')
        (multi / "server.js").write_text("console.log('hi')\n")
        one = Path(tmp) / "one"
        one.mkdir()
        (one / "Dockerfile").write_text(ONE_RUN)
        iso = ["--isolation", args.isolation]
        # warm-up: fills the cache for the rebuild, converts busybox's layer disk
        time_command(VMSHIM + ["build", "-q", *iso, "-t", "vmshim-bench/multi", str(multi)])
        rebuild, one_run, baseline = [], [], []
        for _ in range(args.runs):  # interleaved, so load on a shared host hits all alike
            rebuild.append(time_command(VMSHIM + ["build", "-q", *iso, "-t", "vmshim-bench/multi", str(multi)]))
            one_run.append(
                time_command(VMSHIM + ["build", "-q", "--no-cache", *iso, "-t", "vmshim-bench/one", str(one)])
            )
            baseline.append(time_command(VMSHIM + ["run", "--rm", *iso, "busybox", "true"]))
    time.sleep(3)  # let the detached clean-up of the last step's VM finish
    for name in ("vmshim-bench/multi", "vmshim-bench/one"):
        subprocess.run(VMSHIM + ["rmi", name], capture_output=True)
    result = {
        "accel": accel.kind,
        "isolation": args.isolation,
        "unchanged_rebuild": summary(rebuild),
        "one_run_build": summary(one_run),
        "run_baseline": summary(baseline),
    }
    print(f"accel: {accel.kind}, isolation: {args.isolation}, runs: {args.runs}")
    base = result["run_baseline"]["median"]
    print_seconds(
        [
            ("unchanged rebuild (8 steps, all cached)", result["unchanged_rebuild"]),
            ("one-RUN build (--no-cache)", result["one_run_build"]),
            ("baseline: vmshim run --rm busybox true", result["run_baseline"]),
        ],
        note=lambda s: f"{s['median'] / base:.2f}x the baseline",
    )
    save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
