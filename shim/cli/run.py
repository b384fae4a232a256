"""``vmshim run``: parse flags, hand them to shim.containers.run, exit with the code."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--rm", "remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and forward it.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("--env-file", multiple=True, metavar="FILE", help="Read K=V lines from a file.")
@click.option("-w", "--workdir", metavar="DIR", help="Working directory inside the container.")
@click.option("-u", "--user", metavar="USER", help="uid[:gid] or a user name from the image.")
@click.option("--name", metavar="NAME", help="Name of the container.")
@click.option("-h", "--hostname", metavar="NAME", help="Hostname inside the container.")
@click.option("--entrypoint", metavar="CMD", help="Override the image's ENTRYPOINT.")
@click.option("--isolation", type=click.Choice(["vm", "process"]), default="vm", show_default=True,
              help="vm: a microVM per container; process: namespaces on the host.")
@click.option("-m", "--memory", "memory", metavar="MIB", type=click.IntRange(64, 65536),
              default=256, show_default=True, help="Memory of the microVM in MiB.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(remove, interactive, tty, env, env_file, workdir, user, name, hostname, entrypoint,
        isolation, memory, image, command):
    """Run COMMAND in a new container from IMAGE, in the foreground."""
    from shim.containers.options import RunOptions
    from shim.containers.run import run_foreground

    if tty and not sys.stdin.isatty():
        click.echo("Error: the input device is not a TTY (drop -t)", err=True)
        sys.exit(125)
    options = RunOptions(
        image=image, command=list(command), entrypoint=entrypoint, env=list(env),
        env_files=list(env_file), workdir=workdir, user=user, name=name, hostname=hostname,
        interactive=interactive, tty=tty, remove=remove, isolation=isolation, memory_mib=memory,
    )
    sys.exit(run_foreground(options))
