"""Lifecycle verbs: start, stop, kill, restart, rm, pause, unpause, wait, rename, and the
``container`` group (prune). Thin: parse, call shim.containers.manage, print."""

from __future__ import annotations

import sys

import click

from shim.cli.each import each


@click.command()
@click.option("-a", "--attach", is_flag=True, help="Attach stdout/stderr and wait for the exit.")
@click.option("-i", "--interactive", is_flag=True, help="Attach stdin too.")
@click.argument("containers", nargs=-1, required=True)
def start(attach, interactive, containers):
    """Start one or more created or stopped containers."""
    from shim.containers import manage

    if attach or interactive:
        if len(containers) != 1:
            raise click.UsageError("you cannot attach to more than one container")
        sys.exit(manage.start(containers[0], attach=True, interactive=interactive))
    each(containers, lambda ref: manage.start(ref))


@click.command()
@click.option(
    "-t",
    "--time",
    "timeout",
    type=click.IntRange(0, 3600),
    default=None,
    help="Seconds to wait before SIGKILL (default: the container's, 10).",
)
@click.argument("containers", nargs=-1, required=True)
def stop(timeout, containers):
    """Stop running containers: stop signal, then SIGKILL after the timeout."""
    from shim.containers import manage

    each(containers, lambda ref: manage.stop(ref, timeout))


@click.command()
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, help="Signal to send (name or number).")
@click.argument("containers", nargs=-1, required=True)
def kill(sig, containers):
    """Send a signal to the main process of running containers."""
    from shim.containers import manage
    from shim.containers.options import parse_signal

    number = parse_signal(sig)
    each(containers, lambda ref: manage.kill(ref, number))


@click.command()
@click.option(
    "-t",
    "--time",
    "timeout",
    type=click.IntRange(0, 3600),
    default=None,
    help="Seconds to wait for the stop before SIGKILL.",
)
@click.argument("containers", nargs=-1, required=True)
def restart(timeout, containers):
    """Stop and start containers again."""
    from shim.containers import manage

    each(containers, lambda ref: manage.restart(ref, timeout))


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill and remove running containers.")
@click.option("-v", "--volumes", is_flag=True, help="Also remove the container's anonymous volumes (-v /path).")
@click.argument("containers", nargs=-1, required=True)
def rm(force, volumes, containers):
    """Remove containers (their writable layer and logs too)."""
    from shim.containers import manage

    each(containers, lambda ref: manage.remove(ref, force=force, volumes=volumes))


@click.command()
@click.argument("containers", nargs=-1, required=True)
def pause(containers):
    """Suspend every process of containers (the VM's vCPUs; the cgroup freezer)."""
    from shim.containers import manage

    each(containers, manage.pause)


@click.command()
@click.argument("containers", nargs=-1, required=True)
def unpause(containers):
    """Resume paused containers."""
    from shim.containers import manage

    each(containers, manage.unpause)


@click.command()
@click.argument("containers", nargs=-1, required=True)
def wait(containers):
    """Block until containers stop; print their exit codes."""
    from shim.containers import manage

    each(containers, manage.wait, show=lambda ref, code: str(code))


@click.command()
@click.argument("container")
@click.argument("new_name")
def rename(container, new_name):
    """Rename a container."""
    from shim.containers import manage

    manage.rename(container, new_name)


@click.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def prune(force):
    """Remove all stopped containers."""
    from shim.containers import manage

    if not force and sys.stdin.isatty():
        click.confirm("This will remove all stopped containers. Continue?", abort=True)
    removed = manage.prune()
    if removed:
        click.echo("Deleted Containers:")
        for record in removed:
            click.echo(record.id)
    click.echo(f"Total: {len(removed)} container(s) removed")


@click.group("container")
def container_group():
    """Manage containers (``container prune``; the other verbs also work here)."""


def _container_group_commands():
    from shim.cli import exec as exec_cli
    from shim.cli import ps as ps_cli
    from shim.cli import logs as logs_cli

    container_group.add_command(prune)
    for cmd in (start, stop, kill, restart, rm, pause, unpause, wait, rename):
        container_group.add_command(cmd)
    container_group.add_command(ps_cli.ps, "ls")
    container_group.add_command(ps_cli.inspect)
    container_group.add_command(logs_cli.logs)
    container_group.add_command(exec_cli.exec_cmd, "exec")
    container_group.add_command(exec_cli.attach)
    container_group.add_command(exec_cli.top)


_container_group_commands()
