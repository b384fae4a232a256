"""``vmshim info``: how this host will run containers (accel and why, guest image, store)."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def info(fmt):
    """Show the accelerator (KVM or TCG) and why, libvirt, the guest image and the store."""
    from shim import paths
    from shim.containers import pool
    from shim.guestimage import current_guest_image, kernel_choice
    from shim.vm import memory
    from shim.vm.accel import cpu_readback, detect_accel

    accel = detect_accel()
    guest = current_guest_image()
    kernel, kernel_reason = kernel_choice()
    data = {
        "context": _context(),
        "accel": accel.kind,
        "accel_reason": accel.reason,
        "libvirt_uri": paths.libvirt_uri(),
        "libvirt": _libvirt_version(),
        "cpu_readback": cpu_readback(),
        "root": str(paths.root()),
        "guest_kernel": kernel,
        "guest_kernel_reason": kernel_reason,
        "guest_image": None
        if guest is None
        else {
            "kernel": str(guest.kernel),
            "initramfs": str(guest.initramfs),
            "kernel_release": guest.kernel_release,
        },
        "memory": memory.status(),
        "pool": {**{k: v for k, v in vars(pool.load_config()).items()}, "keeper_pid": pool.keeper_alive()},
    }
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"Context:       {data['context']['name']} ({data['context']['host']})")
    click.echo(f"Accelerator:   {accel.kind.upper()} ({accel.reason})")
    click.echo(f"libvirt:       {data['libvirt']} at {data['libvirt_uri']}")
    click.echo(f"CPU readback:  {_READBACK_TEXT[data['cpu_readback']]}")
    click.echo(f"State root:    {data['root']}")
    if guest is None:
        click.echo("Guest image:   not built (run `vmshim guest build`)")
    else:
        click.echo(f"Guest image:   kernel {guest.kernel_release}, {guest.initramfs}")
    click.echo(f"Guest kernel:  {kernel} ({kernel_reason})")
    from shim.cli.memory import text as memory_text

    click.echo(f"Memory:        {memory_text(data['memory'])}")
    p = data["pool"]
    click.echo(
        "Warm pool:     "
        + (f"{p['size']} VM(s) of {p['memory_mib']} MiB, {p['vcpus']} vCPU(s)" if p["size"] else "off")
    )


_READBACK_TEXT = {
    "words": "2 reads of QEMU's feature words at each start (VMSHIM_CPU_READBACK=per-feature: libvirt's own)",
    "per-feature": "libvirt's own, one read per CPU property (VMSHIM_CPU_READBACK)",
}
"""How libvirt reads back the guest CPU: shim.vm.domain.CPU_READBACKS."""


def _context() -> dict:
    """The context this command came through: the client's when run remotely (the client
    passes VMSHIM_REMOTE_CONTEXT), else this machine's current one."""
    import os

    remote = os.environ.get("VMSHIM_REMOTE_CONTEXT")
    if remote:
        name, _, host = remote.partition(" ")
        return {"name": name if name != "-" else "(--host)", "host": host}
    from shim.remote.target import ContextStore

    return {"name": ContextStore().current(), "host": "this machine"}


def _libvirt_version() -> str:
    try:
        import libvirt

        conn = libvirt.openReadOnly(None)
        try:
            major, rest = divmod(conn.getLibVersion(), 1_000_000)
            return f"{major}.{rest // 1000}.{rest % 1000}"
        finally:
            conn.close()
    except Exception as exc:  # shown, not fatal: info must work without libvirtd
        return f"unreachable ({str(exc).splitlines()[0]})"
