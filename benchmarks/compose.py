"""Compose benchmark: `vmshim compose up -d --wait` of the three-service app in
examples/compose-app (api built from a Dockerfile, a key-value store, 3 workers), until
every health check passes, then `compose down -v`.

Usage: python benchmarks/compose.py [--runs N] [--json FILE] [--peer]

Variants (each the median, min and max of N whole-process runs of the CLI, interleaved):

- ``vm``: as the file says (api a VM, store a process, 3 worker VMs: 4 microVMs).
- ``all-vm``: every service a VM (5 microVMs).
- ``process``: every service ``isolation: process`` (namespaces on the host).

``--peer`` also times ``podman-compose up -d`` of the same file with podman and runc,
when both are installed (no docker daemon is needed; without them the row says why).
The api image is built once before timing (its build is cached and not part of ``up``).
Needs root, libvirtd, the guest image and the busybox image (scripts/setup).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import print_seconds, summary, save_json

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "compose-app"
VMSHIM = [sys.executable, "-m", "shim.cli.main"]

OVERRIDES = {
    "vm": "",
    "all-vm": "services:\n  store:\n    isolation: vm\n",
    "process": "services:\n  api:\n    isolation: process\n  worker:\n    isolation: process\n",
}


def run(argv, env, cwd, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True)
    if check and proc.returncode != 0:
        raise SystemExit(
            f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def compose_argv(app: Path, variant: str) -> list[str]:
    argv = VMSHIM + ["compose", "-f", str(app / "compose.yaml")]
    if OVERRIDES[variant]:
        argv += ["-f", str(app / f"{variant}.yaml")]
    return argv + ["--progress", "quiet"]


def time_up(app: Path, variant: str, env: dict) -> float:
    base = compose_argv(app, variant)
    start = time.perf_counter()
    run(base + ["up", "-d", "--wait"], env, HERE.parent)
    elapsed = time.perf_counter() - start
    run(base + ["down", "-v"], env, HERE.parent)
    return elapsed


def peer_row(app: Path, runs: int) -> dict:
    """podman-compose with podman + runc, when it is installed."""
    tool = shutil.which("podman-compose")
    if tool is None or shutil.which("podman") is None:
        return {
            "skipped": "podman-compose is not installed (pip install podman-compose); "
            "docker-compose needs a docker daemon"
        }
    peer = app.parent / "peer"
    shutil.copytree(app, peer, dirs_exist_ok=True)
    text = (peer / "compose.yaml").read_text()
    for key in ("isolation: process\n", "    isolation: process\n"):
        text = text.replace(key, "")
    (peer / "compose.yaml").write_text(text)
    env = dict(os.environ, PROJECT="benchpeer", API_PORT="18391")
    base = [tool, "--podman-args=--runtime=runc", "-f", str(peer / "compose.yaml")]
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = run(base + ["up", "-d"], env, peer, check=False)
        elapsed = time.perf_counter() - start
        run(base + ["down", "-v"], env, peer, check=False)
        if proc.returncode != 0:
            return {"skipped": "podman-compose up failed: " + proc.stderr.decode(errors="replace").strip()[-300:]}
        samples.append(elapsed)
    return summary(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--variants", default="vm,all-vm,process")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "app"
        shutil.copytree(EXAMPLE, app)
        for variant in variants:
            if OVERRIDES[variant]:
                (app / f"{variant}.yaml").write_text(OVERRIDES[variant])
        env = dict(os.environ, PROJECT="bench", API_PORT="18390", PYTHONPATH=str(HERE.parent))
        run(compose_argv(app, "vm") + ["build"], env, HERE.parent)
        samples = {v: [] for v in variants}
        for _ in range(args.runs):
            for variant in variants:
                samples[variant].append(time_up(app, variant, env))
        results = {f"compose up --wait ({v})": summary(s) for v, s in samples.items()}
        if args.peer:
            results["podman-compose up -d (runc)"] = peer_row(app, args.runs)
    print_seconds(list(results.items()), note=lambda row: f"n={row['runs']}")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
