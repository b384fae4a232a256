"""``vmshim pull``, ``push``, ``login``, ``logout``. Thin: parse, call shim.images, print."""

from __future__ import annotations

import sys

import click

from shim.cli.progress import progress_for
from shim.errors import UsageError
from shim.images import config as regconfig
from shim.images.distribution import pull, push
from shim.images.reference import parse_reference
from shim.images.registry import RegistryClient
from shim.images.store import ImageStore

_insecure = click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified HTTPS for this registry.")


def do_pull(ref: str, quiet: bool, platform: str | None, insecure: bool) -> None:
    parsed = parse_reference(ref)
    store = ImageStore()
    with progress_for("Waiting", quiet) as progress:
        result = pull(parsed, store=store, platform=platform, insecure=insecure, progress=progress)
    if quiet:
        click.echo(str(result.reference))
        return
    shown = result.reference.familiar
    click.echo(f"Digest: {result.digest}")
    if result.updated:
        click.echo(f"Status: Downloaded newer image for {shown}")
    else:
        click.echo(f"Status: Image is up to date for {shown}")
    click.echo(str(result.reference))


@click.command("pull")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print only the name.")
@click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    help="Which manifest of a multi-platform image (default linux/<host arch>).",
)
@_insecure
@click.argument("ref", metavar="IMAGE")
def pull_cmd(quiet: bool, platform: str | None, insecure: bool, ref: str) -> None:
    """Pull an image from a registry (NAME[:TAG] or NAME@DIGEST)."""
    do_pull(ref, quiet, platform, insecure)


def do_push(ref: str, quiet: bool, insecure: bool) -> None:
    parsed = parse_reference(ref)
    with progress_for("Preparing", quiet) as progress:
        result = push(parsed, store=ImageStore(), insecure=insecure, progress=progress)
    if quiet:
        click.echo(f"{result.reference.name}@{result.digest}")
        return
    label = parsed.tag or parsed.digest
    click.echo(f"{label}: digest: {result.digest} size: {result.size}")


@click.command("push")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print only name@digest.")
@_insecure
@click.argument("ref", metavar="IMAGE")
def push_cmd(quiet: bool, insecure: bool, ref: str) -> None:
    """Push a local image to the registry its name says."""
    do_push(ref, quiet, insecure)


@click.command("login")
@click.option("-u", "--username", help="User name.")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@_insecure
@click.argument("registry", required=False)
def login_cmd(
    username: str | None, password: str | None, password_stdin: bool, insecure: bool, registry: str | None
) -> None:
    """Log in to a registry (default: the default registry); credentials are kept in
    $VMSHIM_ROOT/auth.json (mode 0600)."""
    registry = regconfig.normalize_host(registry or regconfig.default_login_registry())
    if password is not None and password_stdin:
        raise UsageError("--password and --password-stdin are mutually exclusive")
    if password is not None:
        click.echo("WARNING! Using --password on the command line is insecure; use --password-stdin.", err=True)
    if password_stdin:
        if not username:
            raise UsageError("--password-stdin needs --username")
        password = sys.stdin.read().rstrip("\r\n")
    interactive = sys.stdin.isatty()
    if not username:
        if not interactive:
            raise UsageError("no username given: use -u USER (stdin is not a terminal)")
        username = click.prompt("Username")
    if password is None:
        if not interactive:
            raise UsageError("no password given: use --password-stdin (stdin is not a terminal)")
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise UsageError("username and password must not be empty")
    client = RegistryClient(registry, insecure=insecure, credentials=(username, password))
    client.login_check()
    regconfig.store_credentials(registry, username, password)
    click.echo("Login Succeeded")


@click.command("logout")
@click.argument("registry", required=False)
def logout_cmd(registry: str | None) -> None:
    """Forget the credentials of a registry (default: the default registry)."""
    registry = regconfig.normalize_host(registry or regconfig.default_login_registry())
    if regconfig.remove_credentials(registry):
        click.echo(f"Removing login credentials for {registry}")
    else:
        click.echo(f"Not logged in to {registry}")
