"""``vmshim stats``: CPU and memory of running containers, measured on the host (a VM's
QEMU process; a process container's cgroup)."""

from __future__ import annotations

import json
import sys
import time

import click


def _size(n) -> str:
    if n is None:
        return "--"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024
    return str(n)


def sample(records) -> dict:
    from shim.containers import manage

    out = {}
    for record in records:
        try:
            out[record.id] = (time.monotonic(), manage.usage(record))
        except Exception:  # noqa: BLE001 - it stopped meanwhile
            continue
    return out


def rows(records, before: dict, after: dict) -> list[dict]:
    result = []
    for record in records:
        if record.id not in after:
            continue
        t1, u1 = after[record.id]
        cpu = 0.0
        if record.id in before:
            t0, u0 = before[record.id]
            if u0.get("cpu_ns") is not None and u1.get("cpu_ns") is not None and t1 > t0:
                cpu = (u1["cpu_ns"] - u0["cpu_ns"]) / ((t1 - t0) * 1e9) * 100
        mem, limit = u1.get("memory"), u1.get("memory_limit") or 0
        result.append({"ID": record.short_id, "Name": record.name, "CPUPerc": f"{cpu:.2f}%",
                       "MemUsage": f"{_size(mem)} / {_size(limit) if limit else '--'}",
                       "MemPerc": f"{(mem or 0) / limit * 100:.2f}%" if limit else "--",
                       "PIDs": str(u1.get("pids", 0)), "Memory": mem, "MemoryLimit": limit,
                       "Isolation": record.isolation})
    return result


def _print(table: list[dict], fmt: str | None) -> None:
    if fmt == "json":
        for row in table:
            click.echo(json.dumps(row))
        return
    cols = ("ID", "Name", "CPUPerc", "MemUsage", "MemPerc", "PIDs")
    head = ("CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS")
    lines = [head] + [tuple(r[c] for c in cols) for r in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    for line in lines:
        click.echo("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())


@click.command()
@click.option("--no-stream", is_flag=True, help="Print one sample and exit.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Include stopped containers.")
@click.option("--format", "fmt", metavar="json", help="json: one object per line.")
@click.argument("containers", nargs=-1)
def stats(no_stream, show_all, fmt, containers):
    """Live CPU and memory use of containers (all running ones by default)."""
    from shim.containers import manage
    from shim.containers import state as lifecycle
    from shim.containers.store import ContainerStore

    store = ContainerStore()

    def current():
        if containers:
            return [store.find(ref) for ref in containers]
        return [r for r in manage.list_containers(all=show_all)]

    records = [r for r in current() if lifecycle.is_active(r.status)]
    before = sample(records)
    time.sleep(0.5)
    while True:
        after = sample(records)
        table = rows(records, before, after)
        if not no_stream and sys.stdout.isatty():
            click.echo("\x1b[2J\x1b[H", nl=False)
        _print(table, fmt)
        if no_stream:
            return
        before = after
        time.sleep(1.0)
        records = [r for r in current() if lifecycle.is_active(r.status)]
