"""``vmshim exec``, ``attach`` and ``top``: processes in a running container.

Kept lean on imports: ``vmshim exec`` latency is measured (benchmarks/exec_latency.py)."""

from __future__ import annotations

import sys

import click

from shim.cli.table import print_table


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and forward it.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("-w", "--workdir", metavar="DIR", help="Working directory inside the container.")
@click.option("-u", "--user", metavar="USER", help="uid[:gid] or a user name from the image.")
@click.option(
    "--privileged",
    is_flag=True,
    help="Every capability for this process (docker's exec --privileged; the container's seccomp stays).",
)
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(detach, interactive, tty, env, workdir, user, privileged, container, command):
    """Run COMMAND in a running container."""
    from shim.containers import manage

    if tty and not detach and not sys.stdin.isatty():
        click.echo("Error: the input device is not a TTY (drop -t)", err=True)
        sys.exit(125)
    code = manage.exec_process(
        container,
        list(command),
        interactive=interactive,
        tty=tty,
        detach=detach,
        env=list(env),
        workdir=workdir,
        user=user,
        privileged=privileged,
    )
    sys.exit(code)


@click.command()
@click.option("--no-stdin", is_flag=True, help="Do not attach stdin.")
@click.option(
    "--detach-keys",
    default="ctrl-p,ctrl-q",
    show_default=True,
    metavar="KEYS",
    help="With a TTY: the keys that detach (the container goes on running).",
)
@click.argument("container")
def attach(no_stdin, detach_keys, container):
    """Attach to a running container's main process (its output, and its stdin if it
    was created with -i) until it exits, or until the detach keys are typed."""
    from shim.containers import manage
    from shim.containers.attach import parse_detach_keys

    keys = parse_detach_keys(detach_keys)
    sys.exit(manage.attach(container, stdin=not no_stdin, detach_keys=keys))


@click.command()
@click.argument("container")
def top(container):
    """Show the processes running in a container."""
    from shim.containers import manage

    table = manage.top(container)
    print_table([table["titles"]] + table["processes"])
