"""``vmshim bench``: VM and namespace isolation measured side by side (see shim.bench)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click


@click.command()
@click.option(
    "--runs",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="Samples per figure and subject (medians with min and max).",
)
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="NAME[,NAME…]",
    help="Take only these benchmarks (repeat or comma-separate): cold_start, start, "
    "first_output, exec, memory, density, cpu, syscall, io, io_volume, kernels.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for results.json and the PNG charts [default: ./vmshim-bench-<date>-<time>].",
)
@click.option(
    "--max",
    "max_density",
    type=click.IntRange(1, 512),
    default=None,
    help="Density: start at most this many idle containers per isolation [default: 8; 512 with --budget].",
)
@click.option(
    "--budget",
    "budget",
    default=None,
    metavar="SIZE",
    help="Density: start idle containers until their summed host PSS reaches "
    "this (e.g. 16g); PSS per container at 20 and at the maximum.",
)
@click.option(
    "--subjects",
    "subjects",
    default=None,
    metavar="NAME[,NAME…]",
    help="Measure only these subjects: vm, process, runc, oci, floor "
    "[default: all] (e.g. a long --budget density run of vm alone).",
)
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
def bench(runs, only, output, max_density, budget, subjects, list_only):
    """Measure VM isolation against process isolation, runc and the bare QEMU floor.

    Everything is measured through the CLI as a user runs it: cold start, first output,
    exec latency, host memory per idle container (PSS) and the guest's view, density,
    CPU- and syscall-bound workloads, and file I/O in the writable layer and a volume.
    Writes results.json and PNG charts to --output and prints a table. Every container
    it starts is removed before it returns.
    """
    from rich.console import Console

    from shim.bench import report
    from shim.bench.suite import BENCHMARKS, run_suite, select

    if list_only:
        for name, (_, what) in BENCHMARKS.items():
            click.echo(f"{name:14s} {what}")
        return
    names = select(list(only))
    chosen = None
    if subjects:
        from shim.bench.stats import SUBJECTS
        from shim.errors import UsageError

        chosen = [x.strip() for x in subjects.split(",") if x.strip()]
        unknown = sorted(set(chosen) - set(SUBJECTS))
        if unknown or not chosen:
            raise UsageError(
                f"--subjects: unknown subject {unknown[0] if unknown else '(none)'!r};"
                f" choose from {', '.join(SUBJECTS)}"
            )
    budget_mib = 0
    if budget:
        from shim.units import parse_bytes

        budget_mib = parse_bytes(budget, "--budget") >> 20
    if max_density is None:
        max_density = 512 if budget_mib else 8
    out = output or Path(f"vmshim-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    err = Console(stderr=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        elapsed = int(time.monotonic() - t0)
        err.print(f"{elapsed // 60:02d}:{elapsed % 60:02d} {msg}", markup=False, highlight=False)

    def on_term(signum, frame):  # let the runner's cleanup run, as for Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        results = run_suite(names, runs, max_density, log=log, density_budget_mib=budget_mib, subjects=chosen)
    finally:
        signal.signal(signal.SIGTERM, previous)
    json_path = report.write_json(results, out / "results.json")
    charts = report.write_charts(results, out)
    import sys

    report.print_table(results, Console() if sys.stdout.isatty() else Console(width=130))
    click.echo(
        f"Results: {json_path}; charts: {', '.join(p.name for p in charts) or 'none'}; "
        f"took {results.meta.get('duration_s', 0):.0f} s"
    )
    if results.meta.get("leftovers"):
        click.echo("Warning: left behind: " + "; ".join(results.meta["leftovers"]), err=True)
