"""``vmshim context``: named remote hosts (``ssh://user@host``) and which one commands go
to; and the hidden ``remote-build-context`` verb the remote side of ``build`` runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import click


@click.group("context")
def context_group():
    """Manage contexts: the remote vmshim hosts commands go to (see docs/remote.md)."""


@context_group.command("create")
@click.argument("name")
@click.option("--host", "-H", required=True, metavar="ssh://[USER@]HOST[:PORT]", help="The host to run commands on.")
@click.option("--description", default="", help="A note shown by `context ls`.")
@click.option(
    "--remote-vmshim", metavar="PATH", help="The vmshim command on the host [default: vmshim on the SSH user's PATH]."
)
def context_create(name, host, description, remote_vmshim):
    """Create context NAME for HOST."""
    from shim.remote.target import ContextStore

    ContextStore().create(name, host, description, remote_vmshim)
    click.echo(name)


@context_group.command("ls")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def context_ls(fmt):
    """List the contexts; the current one is marked with *."""
    from shim.remote.target import DEFAULT, ContextStore

    store = ContextStore()
    current = store.current()
    rows = [
        {
            "name": DEFAULT,
            "current": current == DEFAULT,
            "host": "(this machine)",
            "description": "vmshim on this machine",
        }
    ]
    for name, entry in sorted(store.list().items()):
        rows.append(
            {
                "name": name,
                "current": current == name,
                "host": entry["host"],
                "description": entry.get("description", ""),
            }
        )
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':20s} {'HOST':40s} DESCRIPTION")
    for row in rows:
        name = row["name"] + (" *" if row["current"] else "")
        click.echo(f"{name:20s} {row['host']:40s} {row['description']}")


@context_group.command("use")
@click.argument("name")
def context_use(name):
    """Send commands to context NAME from now on (``default``: this machine)."""
    from shim.remote.target import ContextStore

    ContextStore().use(name)
    click.echo(name)


@context_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove it even if it is the current one.")
def context_rm(names, force):
    """Remove contexts."""
    from shim.remote.target import ContextStore

    store = ContextStore()
    for name in names:
        store.remove(name, force)
        click.echo(name)


@context_group.command("inspect")
@click.argument("names", nargs=-1)
def context_inspect(names):
    """Show contexts as JSON (default: the current one)."""
    from shim.remote.target import DEFAULT, ContextStore

    store = ContextStore()
    out = []
    for name in names or [store.current()]:
        if name == DEFAULT:
            out.append({"name": DEFAULT, "host": None, "description": "vmshim on this machine"})
        else:
            entry = store.get(name)
            out.append(
                {
                    "name": name,
                    "host": entry["host"],
                    "description": entry.get("description", ""),
                    "remote_vmshim": entry.get("remote_vmshim", "vmshim"),
                }
            )
    click.echo(json.dumps(out, indent=2))


@click.command(
    "remote-build-context",
    hidden=True,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def remote_build_context(args):
    """(Run by a remote client.) Read a build context tar on stdin, then run ``vmshim
    ARGS`` with the context and Dockerfile placeholders pointing into it."""
    from shim.cli.main import cli
    from shim.errors import UsageError
    from shim.remote.verbs import CONTEXT_PLACEHOLDER, DOCKERFILE_PLACEHOLDER

    workdir = Path(tempfile.mkdtemp(prefix="vmshim-remote-build-"))
    try:
        try:
            _unpack(sys.stdin.buffer, workdir)
        except (tarfile.TarError, OSError) as exc:
            raise UsageError(f"the build context from the client is not a valid tar: {exc}") from None
        (workdir / "context").mkdir(exist_ok=True)
        replaced = [
            str(workdir / "context")
            if a == CONTEXT_PLACEHOLDER
            else a.replace(DOCKERFILE_PLACEHOLDER, str(workdir / "Dockerfile"))
            for a in args
        ]
        cli.main(args=replaced, prog_name="vmshim")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _unpack(stream, root: Path) -> None:
    """Unpack the client's context tar under *root*: no absolute names, no ``..``, nothing
    through a symlink that leads out, no device nodes (mode bits kept, owner not)."""
    from shim.errors import UsageError

    base = os.path.realpath(root)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if member.name.startswith("/") or ".." in parts or not parts:
                raise UsageError(f"refusing build context entry {member.name!r}")
            if member.isdev() or member.isfifo():
                continue
            if member.islnk() and (member.linkname.startswith("/") or ".." in member.linkname.split("/")):
                raise UsageError(f"refusing build context hard link {member.name!r}")
            parent = os.path.realpath(os.path.join(base, *parts[:-1]))
            if parent != base and not parent.startswith(base + os.sep):
                raise UsageError(f"refusing build context entry {member.name!r}: it leads outside")
            member.name = "/".join(parts)
            member.uid = member.gid = os.getuid()
            member.uname = member.gname = ""
            tar.extract(member, base, set_attrs=True)
