"""What the scripts in benchmarks/ share: running vmshim, timing a command, summarising.

Each script runs as ``python benchmarks/NAME.py`` (this folder is then first on sys.path),
so they import this module as ``common``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VMSHIM = [sys.executable, "-m", "shim.cli.main"]


def timed(argv: list[str], env: dict | None = None) -> float:
    """Seconds *argv* took, run from the repository with its output discarded; exits the
    benchmark with the command's stderr when it fails (a failed run is not a figure)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.decode(errors='replace')}"
        )
    return elapsed


def summary(values: list[float]) -> dict:
    """Median, min and max in seconds, and how many runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def summary_ms(values: list[float]) -> dict:
    """The same in milliseconds, for figures far below a second."""
    return {
        "median_ms": statistics.median(values) * 1000,
        "min_ms": min(values) * 1000,
        "max_ms": max(values) * 1000,
        "runs": len(values),
    }


def save_json(path: str | Path | None, results: dict) -> None:
    """Write *results* to *path* (the scripts' ``--json PATH``) as indented JSON; nothing
    without a path."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


def print_seconds(rows: list[tuple[str, dict]], indent: str = "", note=None) -> None:
    """One line per (label, summary): the median and the range in seconds, labels aligned;
    a row with ``skipped`` says why instead. *note*, given a summary, adds to its line."""
    width = max(len(label) for label, _ in rows)
    for label, s in rows:
        if "skipped" in s:
            print(f"{indent}{label.ljust(width)}  skipped: {s['skipped']}")
            continue
        extra = f"  {note(s)}" if note else ""
        print(f"{indent}{label.ljust(width)}  {s['median']:6.2f} s  [{s['min']:.2f}–{s['max']:.2f}]{extra}")
