"""``vmshim template``: snapshot templates that matching ``run --rm --network none``
containers start from (shim.containers.template). Thin: parse, call, print."""

from __future__ import annotations

import click

from shim.containers.resources import DEFAULT_VM_MIB


@click.group("template")
def template_group():
    """Snapshot templates: a VM booted once and saved, restored per container."""


@template_group.command("create")
@click.option(
    "--memory-mib",
    type=click.IntRange(64, 65536),
    default=DEFAULT_VM_MIB,
    show_default=True,
    help="Guest memory of the containers that will use it.",
)
@click.argument("image")
def create(memory_mib, image):
    """Boot IMAGE's VM once, save it; matching containers start from copies of it."""
    from shim.containers import template_build
    from shim.containers.networking import parse_request
    from shim.containers.options import RunOptions
    from shim.containers.run import prepare

    record = prepare(RunOptions(image=image, command=["true"], remove=True, network=parse_request(network="none")))
    meta = template_build.create(record, memory_mib=memory_mib)
    click.echo(meta["dir"].rsplit("/", 1)[-1])


@template_group.command("ls")
def ls():
    """List the templates."""
    from shim.containers import template

    click.echo(f"{'KEY':<18}{'IMAGE':<28}{'MEMORY':<8}CREATED")
    for meta in template.list_templates():
        click.echo(
            f"{meta['key']:<18}{str(meta.get('image', ''))[:27]:<28}"
            f"{meta.get('memory_mib', '')!s:<8}{meta.get('created', '')}"
        )


@template_group.command("rm")
@click.option("-a", "--all", "everything", is_flag=True, help="Remove every template.")
@click.argument("key", required=False)
def rm(everything, key):
    """Remove a template (by KEY) or all of them."""
    from shim.containers import template

    if everything == (key is not None):
        raise click.UsageError("give a KEY or --all")
    for gone in template.remove(None if everything else key):
        click.echo(gone)
