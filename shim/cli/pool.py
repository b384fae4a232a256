"""``vmshim pool set|ls|rm``: the warm pool of pre-booted VMs (shim.containers.pool)."""

from __future__ import annotations

import json

import click


def _memory_mib(text: str) -> int:
    """``--memory``: MiB as a plain number, or a size (``512m``, ``1g``)."""
    from shim.units import parse_bytes

    if text.isdigit():
        return int(text)
    return parse_bytes(text, "--memory") >> 20


def _primed(config) -> str:
    """``, primed for IMAGE, NIC on NETWORK`` (the parts set), for a pool's one-line summary."""
    parts = (("primed for", config.image), ("NIC on", config.network))
    return "".join(f", {what} {value}" for what, value in parts if value)


@click.group("pool")
def pool_group():
    """Keep pre-booted VMs ready so that `run` starts in a fraction of the boot time."""


@pool_group.command("set")
@click.option("--size", type=int, required=True, help="VMs to keep ready (0: drain, off).")
@click.option(
    "--memory",
    "memory",
    default=None,
    help="Memory of each pooled VM (MiB or 512m); only containers whose VM has "
    "this size use the pool. Default: a container's default (no --memory).",
)
@click.option("--cpus", type=int, default=1, show_default=True, help="vCPUs of each pooled VM.")
@click.option(
    "--image",
    default="",
    help="Prime the VMs for this image: its layer disks are plugged in at boot and mounted "
    "while the VM waits; only containers of this image take them.",
)
@click.option(
    "--network",
    default="",
    help="Boot the VMs with a NIC on this network (e.g. the default one, bridge); only "
    "containers whose first network it is (and without --mac-address) take them.",
)
def set_cmd(size, memory, cpus, image, network):
    """Turn the pool on (or resize it, or drain it with --size 0)."""
    from shim.containers import pool
    from shim.containers.resources import DEFAULT_VM_MIB

    config = pool.PoolConfig(
        size=size,
        memory_mib=_memory_mib(memory) if memory else DEFAULT_VM_MIB,
        vcpus=cpus,
        image=image,
        network=network,
    )
    pid = pool.set_pool(config)
    if size:
        click.echo(
            f"pool: {size} VM(s) of {config.memory_mib} MiB, {cpus} vCPU(s){_primed(config)}; "
            f"keeper pid {pid or 'starting'}"
        )
    else:
        click.echo("pool: off (drained)")


@pool_group.command("rm")
def rm_cmd():
    """Drain the pool and stop its keeper (same as `pool set --size 0`)."""
    from shim.containers import pool

    current = pool.load_config()
    pool.set_pool(pool.PoolConfig(size=0, memory_mib=current.memory_mib, vcpus=current.vcpus))
    click.echo("pool: off (drained)")


@pool_group.command("ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def ls_cmd(fmt):
    """Show the setting, the keeper and each pooled VM (booting, ready, dead)."""
    from shim.containers import pool
    from shim.vm.libvirt_backend import LibvirtBackend

    config = pool.load_config()
    data = {
        "size": config.size,
        "memory_mib": config.memory_mib,
        "vcpus": config.vcpus,
        "image": config.image,
        "network": config.network,
        "keeper_pid": pool.keeper_alive(),
        "vms": pool.listing(LibvirtBackend()),
    }
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    keeper = f"keeper pid {data['keeper_pid']}" if data["keeper_pid"] else "no keeper running"
    click.echo(f"pool size {config.size}, {config.memory_mib} MiB, {config.vcpus} vCPU(s){_primed(config)}; {keeper}")
    click.echo(f"{'ID':<14}{'STATE':<10}{'MEMORY':<10}{'AGE':<8}DOMAIN")
    for vm in data["vms"]:
        click.echo(
            f"{vm['id']:<14}{vm['state']:<10}{str(vm['memory_mib']) + 'MiB':<10}"
            f"{str(vm['age_s']) + 's':<8}{vm['domain']}"
        )
