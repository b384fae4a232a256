"""``vmshim volume create|ls|inspect|rm|prune``: thin, over shim.volumes.store."""

from __future__ import annotations

import json

import click

from shim.cli.table import print_table
from shim.containers.options import parse_labels
from shim.errors import UsageError, VmshimError


def _store():
    from shim.volumes.store import VolumeStore

    return VolumeStore()


def references() -> dict[str, list[str]]:
    """Volume name → names of the containers whose records mount it (any state)."""
    from shim.containers.store import ContainerStore

    out: dict[str, list[str]] = {}
    for record in ContainerStore().list():
        for mount in record.mounts:
            if mount.type == "volume" and mount.source:
                out.setdefault(mount.source, []).append(record.name)
    return out


def _size(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return f"{n}B"


@click.group("volume")
def volume_group():
    """Manage named volumes (ext4 disk images that outlive containers)."""


@volume_group.command("create")
@click.option("--label", multiple=True, metavar="K=V", help="Set metadata on the volume.")
@click.option(
    "-o", "--opt", multiple=True, metavar="size=SIZE", help="Driver options; size=SIZE (default 16g, sparse)."
)
@click.option("-d", "--driver", default="local", show_default=True, help="Only local is supported.")
@click.argument("name", required=False)
def create(label, opt, driver, name):
    """Create a volume (a random name when NAME is left out); print its name."""
    from shim.units import parse_bytes

    if driver != "local":
        raise UsageError(f"unknown volume driver {driver!r}: only local is supported")
    labels = parse_labels(label)
    options, size = {}, None
    for item in opt:
        key, sep, value = item.partition("=")
        if key != "size" or not sep:
            raise UsageError(f"invalid --opt {item!r}: the only option is size=SIZE")
        size = parse_bytes(value, "--opt size")
        options[key] = value
    volume = _store().create(name, size=size, labels=labels, options=options)
    click.echo(volume.name)


@volume_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only show names.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default=None, help="json: one JSON object per line."
)
@click.option(
    "-f",
    "--filter",
    "filters",
    multiple=True,
    metavar="dangling=true|label=K",
    help="dangling=true: only volumes no container references; label=K[=V].",
)
def ls(quiet, fmt, filters):
    """List volumes."""
    volumes = _store().list()
    refs = references()
    for item in filters:
        key, _, value = item.partition("=")
        if key == "dangling":
            want = value.lower() in ("1", "true")
            volumes = [v for v in volumes if (v.name not in refs) == want]
        elif key == "label":
            k, sep, val = value.partition("=")
            volumes = [v for v in volumes if k in v.labels and (not sep or v.labels[k] == val)]
        elif key == "name":
            volumes = [v for v in volumes if value in v.name]
        else:
            raise UsageError(f"invalid --filter {item!r}")
    if quiet:
        for v in volumes:
            click.echo(v.name)
        return
    if fmt == "json":
        for v in volumes:
            click.echo(
                json.dumps(
                    {
                        "Driver": "local",
                        "Name": v.name,
                        "Size": v.size,
                        "Labels": v.labels,
                        "Anonymous": v.anonymous,
                        "Containers": refs.get(v.name, []),
                    }
                )
            )
        return
    rows = [("DRIVER", "VOLUME NAME", "SIZE", "USED")]
    for v in volumes:
        status = v.inspect()["Status"]
        rows.append(("local", v.name, _size(v.size), _size(status["DiskUsage"])))
    print_table(rows)


@volume_group.command("inspect")
@click.argument("names", nargs=-1, required=True)
def inspect(names):
    """Show volumes as JSON."""
    store = _store()
    refs = references()
    out, failed = [], []
    for name in names:
        try:
            out.append(store.get(name).inspect(refs.get(name, [])))
        except VmshimError as exc:
            failed.append(str(exc))
    click.echo(json.dumps(out, indent=4))
    if failed:
        raise VmshimError("; ".join(failed))


@volume_group.command("rm")
@click.option(
    "-f", "--force", is_flag=True, help="Also remove volumes stopped containers reference (never one in use)."
)
@click.argument("names", nargs=-1, required=True)
def rm(force, names):
    """Remove volumes."""
    store = _store()
    refs = references()
    failed = []
    for name in names:
        try:
            store.remove(name, referenced_by=refs.get(name), force=force)
            click.echo(name)
        except VmshimError as exc:
            failed.append(str(exc))
    if failed:
        raise VmshimError("; ".join(failed))


@volume_group.command("prune")
@click.option("-a", "--all", "all_volumes", is_flag=True, help="Remove all unused volumes, not just anonymous ones.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def prune(all_volumes, force):
    """Remove volumes no container references."""
    if not force:
        what = "all volumes" if all_volumes else "all anonymous volumes"
        click.confirm(f"This will remove {what} not used by at least one container. Continue?", abort=True)
    removed = _store().prune(referenced=set(references()), all_volumes=all_volumes)
    if removed:
        click.echo("Deleted Volumes:")
        for name in removed:
            click.echo(name)
    click.echo(f"Total: {len(removed)} volume(s)")
