"""``vmshim stats``: CPU, memory, pids, network and block I/O of running containers, from
each container's own cgroup (inside the guest for a VM, asked of its agent), and for a
VM what its QEMU process costs the host, shown separately (QEMU CPU %, QEMU MEM)."""

from __future__ import annotations

import json
import sys
import time

import click

from shim.cli.table import print_table


def _size(n) -> str:
    if n is None:
        return "--"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024
    return str(n)


def sample(records) -> dict:
    """record id → (monotonic time, shim.containers.limits.sample)."""
    from shim.containers import limits

    return {record.id: (time.monotonic(), limits.sample(record)) for record in records}


def _cpu_percent(before, after, source: str) -> float | None:
    """CPU use between two samples, in percent of one CPU, from the *source* figures."""
    if before is None:
        return None
    (t0, s0), (t1, s1) = before, after
    u0, u1 = s0.get(source) or {}, s1.get(source) or {}
    if u0.get("cpu_ns") is None or u1.get("cpu_ns") is None or t1 <= t0:
        return None
    return max(0.0, (u1["cpu_ns"] - u0["cpu_ns"]) / ((t1 - t0) * 1e9) * 100)


def _pair(a, b) -> str:
    return f"{_size(a)} / {_size(b)}"


def rows(records, before: dict, after: dict) -> list[dict]:
    """docker's columns from the container's own cgroup (in the guest for a VM); for a
    VM also what QEMU costs the host (``Host``)."""
    result = []
    for record in records:
        if record.id not in after:
            continue
        figures = after[record.id][1]
        guest, host = figures["guest"] or {}, figures["host"] or {}
        own = guest if guest else host  # paused: the agent does not answer
        cpu = _cpu_percent(before.get(record.id), after[record.id], "guest" if guest else "host")
        mem = own.get("memory")
        limit = own.get("memory_limit") or (
            record.vm_memory_mib << 20 if record.isolation == "vm" else host.get("memory_limit") or 0
        )
        row = {
            "ID": record.short_id,
            "Name": record.name,
            "Container": record.short_id,
            "CPUPerc": f"{cpu:.2f}%" if cpu is not None else "--",
            "MemUsage": f"{_size(mem)} / {_size(limit) if limit else '--'}",
            "MemPerc": f"{(mem or 0) / limit * 100:.2f}%" if limit else "--",
            "NetIO": _pair(guest.get("net_rx_bytes"), guest.get("net_tx_bytes")),
            "BlockIO": _pair(guest.get("block_read_bytes"), guest.get("block_write_bytes")),
            "PIDs": str(own.get("pids", 0)),
            "Memory": mem,
            "MemoryLimit": limit,
            "Isolation": record.isolation,
            "Cgroup": guest,
        }
        if record.isolation == "vm":
            host_cpu = _cpu_percent(before.get(record.id), after[record.id], "host")
            row["Host"] = {
                "CPUPerc": f"{host_cpu:.2f}%" if host_cpu is not None else "--",
                "Memory": host.get("memory"),
                "MemUsage": _size(host.get("memory")),
            }
        result.append(row)
    return result


def _print(table: list[dict], fmt: str | None) -> None:
    if fmt == "json":
        for row in table:
            click.echo(json.dumps(row))
        return
    cols = ("ID", "Name", "CPUPerc", "MemUsage", "MemPerc", "NetIO", "BlockIO", "PIDs")
    head = (
        "CONTAINER ID",
        "NAME",
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "NET I/O",
        "BLOCK I/O",
        "PIDS",
        "QEMU CPU %",
        "QEMU MEM",
    )
    lines = [head] + [
        tuple(r[c] for c in cols) + ((r["Host"]["CPUPerc"], r["Host"]["MemUsage"]) if "Host" in r else ("", ""))
        for r in table
    ]
    print_table(lines)


@click.command()
@click.option("--no-stream", is_flag=True, help="Print one sample and exit.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Include stopped containers.")
@click.option("--format", "fmt", metavar="json", help="json: one object per line.")
@click.argument("containers", nargs=-1)
def stats(no_stream, show_all, fmt, containers):
    """Live resource use of containers (all running ones by default): the container's
    own cgroup, and for a VM its QEMU process on the host."""
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
