"""``vmshim images``, ``rmi``, ``tag``, ``history``, ``save``, ``load`` and the ``vmshim
image`` group (inspect, ls, rm, tag, history, prune, save, load, pull, push, bootstrap).
Thin: parse, call shim.images, print. Errors are raised as VmshimError for the main entry
point to print as ``Error: <message>``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from shim.cli.progress import progress_for
from shim.cli.table import print_table
from shim.containers import housekeeping
from shim.errors import UsageError
from shim.images import archive
from shim.images.reference import parse_reference
from shim.images.store import ImageStore, bootstrap, digest_hex, format_created, format_size


def _list(quiet: bool, fmt: str | None) -> None:
    images = ImageStore().list_images()
    if quiet:
        seen = set()
        for s in images:
            short = digest_hex(s.id)[:12]
            if short not in seen:
                seen.add(short)
                click.echo(short)
        return
    if fmt == "json":
        for s in images:
            click.echo(
                json.dumps(
                    {
                        "Repository": s.reference.familiar_name,
                        "Tag": s.reference.tag or "<none>",
                        "Digest": s.manifest_digest,
                        "ID": digest_hex(s.id)[:12],
                        "CreatedAt": s.created,
                        "Size": s.size,
                        "Reference": str(s.reference),
                    }
                )
            )
        return
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    for s in images:
        rows.append(
            (
                s.reference.familiar_name,
                s.reference.tag or "<none>",
                digest_hex(s.id)[:12],
                format_created(s.created),
                format_size(s.size),
            )
        )
    print_table(rows)


@click.command("images")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default=None, help="json: one JSON object per line."
)
def images_cmd(quiet: bool, fmt: str | None) -> None:
    """List images in the local store."""
    _list(quiet, fmt)


def _remove(refs: tuple[str, ...]) -> None:
    store = ImageStore()
    for ref in refs:
        store.remove(ref)
        click.echo(f"Untagged: {ref}")


@click.command("rmi")
@click.argument("refs", nargs=-1, required=True, metavar="IMAGE...")
def rmi_cmd(refs: tuple[str, ...]) -> None:
    """Remove one or more images (names, name@digest, or IDs)."""
    _remove(refs)


@click.group("image")
def image_group() -> None:
    """Manage images."""


@image_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None)
def image_ls(quiet: bool, fmt: str | None) -> None:
    """List images in the local store."""
    _list(quiet, fmt)


@image_group.command("rm")
@click.argument("refs", nargs=-1, required=True, metavar="IMAGE...")
def image_rm(refs: tuple[str, ...]) -> None:
    """Remove one or more images."""
    _remove(refs)


@image_group.command("inspect")
@click.argument("refs", nargs=-1, required=True, metavar="IMAGE...")
def image_inspect(refs: tuple[str, ...]) -> None:
    """Show images' details as JSON (docker-inspect-like)."""
    store = ImageStore()
    out = []
    for ref in refs:
        image = store.resolve(ref)
        cfg = image.config
        out.append(
            {
                "Id": image.id,
                "RepoTags": [image.reference.familiar] if image.reference.tag else [],
                "RepoDigests": [f"{image.reference.familiar_name}@{image.manifest_digest}"],
                "Reference": str(image.reference),
                "ManifestDigest": image.manifest_digest,
                "Created": image.created,
                "Architecture": cfg.get("architecture"),
                "Os": cfg.get("os"),
                "Size": image.size,
                "Config": cfg.get("config") or {},
                "RootFS": cfg.get("rootfs") or {},
                "Layers": [
                    {"Digest": layer.digest, "MediaType": layer.media_type, "Size": layer.size, "DiffID": layer.diff_id}
                    for layer in image.layers
                ],
                "History": cfg.get("history") or [],
            }
        )
    click.echo(json.dumps(out, indent=4))


@image_group.command("bootstrap")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing.")
@click.argument("name")
def image_bootstrap(quiet: bool, name: str) -> None:
    """Build a base image from its recipe, images/NAME/recipe.py (e.g. busybox)."""
    image = bootstrap(name, ImageStore())
    if not quiet:
        click.echo(f"{image.reference.familiar} {image.id}")


# tag ----------------------------------------------------------------------------------------
def _tag(source: str, target: str) -> None:
    store = ImageStore()
    image = store.resolve(source)
    ref = parse_reference(target)
    if ref.digest is not None:
        raise UsageError(f"cannot tag with a digest ({target}): give NAME[:TAG]")
    store.tag(ref, image.manifest_digest)


@click.command("tag")
@click.argument("source", metavar="SOURCE_IMAGE")
@click.argument("target", metavar="TARGET_IMAGE")
def tag_cmd(source: str, target: str) -> None:
    """Give an image another name (TARGET_IMAGE is NAME[:TAG])."""
    _tag(source, target)


@image_group.command("tag")
@click.argument("source", metavar="SOURCE_IMAGE")
@click.argument("target", metavar="TARGET_IMAGE")
def image_tag(source: str, target: str) -> None:
    """Give an image another name (TARGET_IMAGE is NAME[:TAG])."""
    _tag(source, target)


# history ------------------------------------------------------------------------------------
def history_rows(image) -> list[dict]:
    """One row per history entry, newest first; layers are matched to the entries that
    are not ``empty_layer``. Without history, one row per layer."""
    layers = list(image.layers)
    history = [h for h in (image.config.get("history") or []) if isinstance(h, dict)]
    if not history:
        history = [{} for _ in layers]
    rows = []
    i = 0
    for h in history:
        size = 0
        if not h.get("empty_layer") and i < len(layers):
            size = layers[i].size
            i += 1
        rows.append(
            {
                "CreatedAt": h.get("created"),
                "CreatedBy": h.get("created_by", ""),
                "Size": size,
                "Comment": h.get("comment", ""),
            }
        )
    rows.reverse()
    for n, row in enumerate(rows):
        row["ID"] = image.id if n == 0 else "<missing>"
    return rows


def _history(ref: str, quiet: bool, no_trunc: bool, fmt: str | None) -> None:
    image = ImageStore().resolve(ref)
    rows = history_rows(image)
    if quiet:
        for row in rows:
            click.echo(row["ID"] if no_trunc or row["ID"] == "<missing>" else digest_hex(row["ID"])[:12])
        return
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps({**row, "CreatedSince": format_created(row["CreatedAt"])}))
        return
    table = [("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT")]
    for row in rows:
        ident = row["ID"] if no_trunc or row["ID"] == "<missing>" else digest_hex(row["ID"])[:12]
        by = " ".join(str(row["CreatedBy"]).split()) if not no_trunc else row["CreatedBy"]
        if not no_trunc and len(by) > 45:
            by = by[:44] + "…"
        table.append((ident, format_created(row["CreatedAt"]), by, format_size(row["Size"]), row["Comment"]))
    print_table(table)


_history_opts = [
    click.option("-q", "--quiet", is_flag=True, help="Only show image IDs."),
    click.option("--no-trunc", is_flag=True, help="Do not truncate output."),
    click.option(
        "--format", "fmt", type=click.Choice(["table", "json"]), default=None, help="json: one JSON object per line."
    ),
    click.argument("ref", metavar="IMAGE"),
]


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@click.command("history")
@_with(_history_opts)
def history_cmd(quiet: bool, no_trunc: bool, fmt: str | None, ref: str) -> None:
    """Show the history of an image (newest first)."""
    _history(ref, quiet, no_trunc, fmt)


@image_group.command("history")
@_with(_history_opts)
def image_history(quiet: bool, no_trunc: bool, fmt: str | None, ref: str) -> None:
    """Show the history of an image (newest first)."""
    _history(ref, quiet, no_trunc, fmt)


# prune --------------------------------------------------------------------------------------
def do_prune(all_images: bool, force: bool) -> None:
    """``image prune`` and ``system prune``: ask (unless *force* or not a terminal), prune,
    print what went and the space freed."""
    if not force and sys.stdin.isatty():
        what = (
            "all images without at least one container" if all_images else "all dangling images and unreferenced blobs"
        )
        click.confirm(f"WARNING! This will remove {what}. Are you sure you want to continue?", abort=True)
    report = housekeeping.prune_images(all_images)
    if report.untagged:
        click.echo("Deleted Images:")
        for name in report.untagged:
            try:
                shown = parse_reference(name).familiar
            except Exception:  # noqa: BLE001 - a foreign name: show it as it is
                shown = name
            click.echo(f"untagged: {shown}")
        click.echo("")
    click.echo(f"Total reclaimed space: {format_size(report.space_reclaimed)}")


@image_group.command("prune")
@click.option(
    "-a", "--all", "all_images", is_flag=True, help="Remove all images no container uses, not only unreferenced blobs."
)
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def image_prune(all_images: bool, force: bool) -> None:
    """Remove unused data: blobs no image name reaches (images that lost their last name),
    interrupted downloads; with -a also every image that no container uses."""
    do_prune(all_images, force)


# save / load --------------------------------------------------------------------------------
def _save(output: str | None, fmt: str, refs: tuple[str, ...]) -> None:
    store = ImageStore()
    if output:
        archive.save_to_file(store, list(refs), Path(output), fmt)
        return
    if sys.stdout.isatty():
        raise UsageError("refusing to write an image archive to a terminal: use -o FILE or redirect stdout")
    out = sys.stdout.buffer
    archive.save(store, list(refs), out, fmt)
    out.flush()


_save_opts = [
    click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, writable=True),
        help="Write to FILE (atomically) instead of stdout.",
    ),
    click.option(
        "--format", "fmt", type=click.Choice(list(archive.FORMATS)), default="docker-archive", show_default=True
    ),
    click.argument("refs", nargs=-1, required=True, metavar="IMAGE..."),
]


@click.command("save")
@_with(_save_opts)
def save_cmd(output: str | None, fmt: str, refs: tuple[str, ...]) -> None:
    """Save images to a tar archive (docker-archive or oci-archive)."""
    _save(output, fmt, refs)


@image_group.command("save")
@_with(_save_opts)
def image_save(output: str | None, fmt: str, refs: tuple[str, ...]) -> None:
    """Save images to a tar archive (docker-archive or oci-archive)."""
    _save(output, fmt, refs)


def _load(input_: str | None, quiet: bool) -> None:
    store = ImageStore()
    if input_ is None and sys.stdin.isatty():
        raise UsageError("requested load from stdin, but stdin is a terminal: use -i FILE or pipe an archive in")
    stdin = sys.stdin.buffer if input_ is None else None
    with progress_for("Loading", quiet) as progress:
        loaded = archive.load(store, Path(input_) if input_ else None, stdin, progress)
    for item in loaded:
        for name in item.names:
            click.echo(f"Loaded image: {name.familiar}")
        if not item.names:
            click.echo(f"Loaded image ID: {item.image_id}")


_load_opts = [
    click.option(
        "-i",
        "--input",
        "input_",
        type=click.Path(exists=True),
        help="Read from FILE (a tar, compressed or not, or an OCI layout directory) instead of stdin.",
    ),
    click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
]


@click.command("load")
@_with(_load_opts)
def load_cmd(input_: str | None, quiet: bool) -> None:
    """Load images from a docker-archive, OCI archive or OCI layout directory."""
    _load(input_, quiet)


@image_group.command("load")
@_with(_load_opts)
def image_load(input_: str | None, quiet: bool) -> None:
    """Load images from a docker-archive, OCI archive or OCI layout directory."""
    _load(input_, quiet)


def _register_registry_verbs() -> None:
    from shim.cli.registry import pull_cmd, push_cmd

    image_group.add_command(pull_cmd, "pull")
    image_group.add_command(push_cmd, "push")


_register_registry_verbs()
