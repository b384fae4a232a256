"""``vmshim checkpoint`` and ``vmshim restore``: save a running VM container (memory,
writable layer) and bring it back. Thin: parse, call shim.containers.checkpoint, print."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--name",
    "checkpoint_name",
    default="checkpoint",
    show_default=True,
    help="Name of the checkpoint (an older one of that name is replaced).",
)
@click.option("--leave-running", is_flag=True, help="Keep the container running after it.")
@click.option(
    "--export",
    "export",
    metavar="FILE",
    default=None,
    help="Also write the checkpoint (memory, writable layer, record) as one archive.",
)
@click.argument("container")
def checkpoint(checkpoint_name, leave_running, export, container):
    """Save a running VM container's memory and writable layer; it stops unless
    --leave-running. Volumes are synced first and are not part of the checkpoint."""
    from shim.containers import checkpoint as ckpt

    ckpt.checkpoint(container, name=checkpoint_name, leave_running=leave_running, export=export)
    click.echo(container)


@click.command()
@click.option("--name", "checkpoint_name", default="checkpoint", show_default=True, help="Which checkpoint to restore.")
@click.option(
    "--import",
    "import_file",
    metavar="FILE",
    default=None,
    help="Restore the container an exported checkpoint archive holds.",
)
@click.option("--container-name", "new_name", default=None, help="With --import: the name to give the container.")
@click.argument("container", required=False)
def restore(checkpoint_name, import_file, new_name, container):
    """Bring a checkpointed container back where its checkpoint left it."""
    from shim.containers import checkpoint as ckpt

    if (container is None) == (import_file is None):
        raise click.UsageError("give a CONTAINER or --import FILE")
    if new_name is not None and import_file is None:
        raise click.UsageError("--container-name goes with --import")
    record = ckpt.restore(container, name=checkpoint_name, import_file=import_file, new_name=new_name)
    click.echo(record.name if import_file else container)


@click.command()
@click.argument("container")
@click.argument("uri")
def migrate(container, uri):
    """Move a running VM container live to the libvirt at URI
    (qemu+tcp://HOST/system); its disks must be at the same paths there."""
    from shim.containers import checkpoint as ckpt

    ckpt.migrate(container, uri)
    click.echo(container)
