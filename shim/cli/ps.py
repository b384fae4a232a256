"""``vmshim ps`` and ``vmshim inspect``. Thin: parse, call shim.containers.listing or
shim.containers.inspect, print."""

from __future__ import annotations

import json

import click

from shim.cli.each import TEMPLATE_FIELD, inspect_each, render_template
from shim.cli.table import print_table
from shim.containers import listing
from shim.containers.inspect import inspect_container

HEADERS = {
    "ID": "CONTAINER ID",
    "Image": "IMAGE",
    "Command": "COMMAND",
    "CreatedAt": "CREATED AT",
    "Status": "STATUS",
    "State": "STATE",
    "Names": "NAMES",
    "Isolation": "ISOLATION",
    "ExitCode": "EXIT CODE",
    "Ports": "PORTS",
    "Labels": "LABELS",
    "Health": "HEALTH",
}
"""Column titles of ``--format 'table {{.Field}}…'``, as docker prints them."""

DEFAULT_TABLE = "{{.ID}}\t{{.Image}}\t{{.Command}}\t{{.CreatedAt}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"


def print_template_table(template: str, entries: list[dict]) -> None:
    """``table TEMPLATE``: a header line from the field names, then one row per entry;
    ``\t`` in the template separates columns."""
    header = TEMPLATE_FIELD.sub(lambda m: HEADERS.get(m.group(2), m.group(2).upper()), template.replace("\\t", "\t"))
    rows = [header.split("\t")]
    rows += [render_template(template, entry).split("\t") for entry in entries]
    print_table(rows)


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers, not only running ones.")
@click.option("-q", "--quiet", is_flag=True, help="Only print container ids.")
@click.option(
    "-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE", help=f"Filter ({', '.join(listing.FILTER_KEYS)})."
)
@click.option(
    "--format",
    "fmt",
    metavar="json|[table] TEMPLATE",
    help="json: one JSON object per line; a Go-style template such as "
    "'{{.ID}} {{.Names}} {{.Ports}}' (fields: ID, Image, Command, CreatedAt, "
    "Status, State, Names, Ports, Labels); 'table …' adds a header.",
)
@click.option("--no-trunc", is_flag=True, help="Full ids and commands.")
def ps(show_all, quiet, filters, fmt, no_trunc):
    """List containers."""
    records = listing.list_filtered(show_all=show_all, filters=filters)
    if quiet:
        for record in records:
            click.echo(record.id if no_trunc else record.short_id)
        return
    if fmt == "json":
        for record in records:
            entry = listing.ps_entry(record)
            if no_trunc:
                entry["ID"] = record.id
            click.echo(json.dumps(entry))
        return
    if fmt and fmt.startswith("table"):
        print_template_table(
            fmt[len("table") :].strip() or DEFAULT_TABLE, [listing.ps_entry(record) for record in records]
        )
        return
    if fmt:
        for record in records:
            click.echo(render_template(fmt, listing.ps_entry(record)))
        return
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]]
    for record in records:
        command = listing.command_text(record)
        if not no_trunc and len(command) > 20:
            command = command[:19] + "…"
        rows.append(
            [
                record.id if no_trunc else record.short_id,
                record.image,
                json.dumps(command, ensure_ascii=False),
                listing.created_ago(record),
                listing.status_text(record),
                listing.ports_text(record),
                record.name,
            ]
        )
    print_table(rows)


@click.command()
@click.option("-f", "--format", "fmt", metavar="TEMPLATE", help="e.g. '{{.State.Status}}'.")
@click.argument("containers", nargs=-1, required=True)
def inspect(fmt, containers):
    """Show containers' configuration and state as JSON."""
    inspect_each(containers, inspect_container, fmt)
