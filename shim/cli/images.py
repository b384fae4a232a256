"""``vmshim images``, ``vmshim rmi`` and the ``vmshim image`` group (inspect, ls, rm,
bootstrap). Thin: parse, call shim.images, print. Errors are raised as VmshimError for the
main entry point to print as ``Error: <message>``."""

from __future__ import annotations

import json

import click

from shim.images.store import (ImageStore, bootstrap, digest_hex, format_created,
                               format_size)


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
            click.echo(json.dumps({
                "Repository": s.reference.familiar_name,
                "Tag": s.reference.tag or "<none>",
                "Digest": s.manifest_digest,
                "ID": digest_hex(s.id)[:12],
                "CreatedAt": s.created,
                "Size": s.size,
                "Reference": str(s.reference),
            }))
        return
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    for s in images:
        rows.append((s.reference.familiar_name, s.reference.tag or "<none>",
                     digest_hex(s.id)[:12], format_created(s.created), format_size(s.size)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths)) + "   " + r[-1])


@click.command("images")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None,
              help="json: one JSON object per line.")
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
        out.append({
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
            "Layers": [{"Digest": layer.digest, "MediaType": layer.media_type,
                        "Size": layer.size, "DiffID": layer.diff_id}
                       for layer in image.layers],
            "History": cfg.get("history") or [],
        })
    click.echo(json.dumps(out, indent=4))


@image_group.command("bootstrap")
@click.argument("name")
def image_bootstrap(name: str) -> None:
    """Build a base image from its recipe, images/NAME/recipe.py (e.g. busybox)."""
    image = bootstrap(name, ImageStore())
    click.echo(f"{image.reference.familiar} {image.id}")
