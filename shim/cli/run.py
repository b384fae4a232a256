"""``vmshim run`` and ``vmshim create``: parse flags, hand them to shim.containers.run."""

from __future__ import annotations

import sys

import click


def container_options(func):
    """The flags run and create share (docker's names)."""
    options = [
        click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and forward it."),
        click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal."),
        click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable."),
        click.option("--env-file", multiple=True, metavar="FILE", help="Read K=V lines from a file."),
        click.option("-w", "--workdir", metavar="DIR", help="Working directory inside the container."),
        click.option("-u", "--user", metavar="USER", help="uid[:gid] or a user name from the image."),
        click.option("--name", metavar="NAME", help="Name of the container."),
        click.option("-h", "--hostname", metavar="NAME", help="Hostname inside the container."),
        click.option("--entrypoint", metavar="CMD", help="Override the image's ENTRYPOINT."),
        click.option(
            "--isolation",
            type=click.Choice(["vm", "process"]),
            default="vm",
            show_default=True,
            help="vm: a microVM per container; process: namespaces on the host.",
        ),
        click.option(
            "--os",
            "os_container",
            is_flag=True,
            help="An OS container: run the image's init (systemd) as PID 1; stop "
            "shuts it down (SIGRTMIN+3, 30 s timeout).",
        ),
        click.option("--init", metavar="PATH", help="With --os: the init to run (default /sbin/init)."),
        click.option(
            "--restart",
            default="no",
            show_default=True,
            metavar="POLICY",
            help="no, on-failure[:N], always or unless-stopped.",
        ),
        click.option(
            "--stop-signal",
            metavar="SIGNAL",
            help="Signal that stops the container (default: the image's StopSignal, else SIGTERM).",
        ),
        click.option(
            "--stop-timeout",
            type=click.IntRange(0, 3600),
            metavar="SECONDS",
            help="Seconds stop waits before SIGKILL (default 10).",
        ),
        click.option("--rm", "remove", is_flag=True, help="Remove the container when it exits."),
        click.option(
            "--log-opt",
            "log_opts",
            multiple=True,
            metavar="KEY=VALUE",
            help="Log rotation (docker's json-file options): max-size=SIZE (default 10m), max-file=N (default 3).",
        ),
        click.option(
            "--pull",
            type=click.Choice(["missing", "always", "never"]),
            default="missing",
            show_default=True,
            help="Pull the image before creating the container.",
        ),
        click.option(
            "-l",
            "--label",
            "labels",
            multiple=True,
            metavar="K=V",
            help="Set metadata on the container (ps --format '{{.Labels}}').",
        ),
        # Volumes (shim.volumes.specs).
        click.option(
            "-v",
            "--volume",
            "volumes",
            multiple=True,
            metavar="SRC:DST[:ro]",
            help="Bind-mount a host directory (/abs/path) or a named volume; DST alone: a new anonymous volume.",
        ),
        click.option(
            "--mount",
            "mounts",
            multiple=True,
            metavar="type=…,source=…,target=…",
            help="Attach a bind, volume or tmpfs mount (docker's syntax).",
        ),
        click.option("--tmpfs", multiple=True, metavar="DST[:OPTS]", help="Mount a tmpfs (e.g. /run:size=64m)."),
        click.option("--read-only", is_flag=True, help="Mount the root filesystem read-only."),
        click.option(
            "--volumes-from",
            multiple=True,
            metavar="CONTAINER[:ro|rw]",
            help="Mount the volumes and bind mounts of another container.",
        ),
        # Security (shim.containers.security).
        click.option("--privileged", is_flag=True, help="Every capability, no seccomp, every device, no masked paths."),
        click.option(
            "--cap-add", multiple=True, metavar="CAP", help="Add a capability to docker's default set (ALL: every one)."
        ),
        click.option(
            "--cap-drop", multiple=True, metavar="CAP", help="Drop a capability from the default set (ALL: every one)."
        ),
        click.option(
            "--security-opt",
            multiple=True,
            metavar="OPT",
            help="no-new-privileges, seccomp=PROFILE.json or seccomp=unconfined.",
        ),
        click.option(
            "--device", multiple=True, metavar="HOST[:CONTAINER][:rwm]", help="Give the container a device node."
        ),
        # Health checks (shim.containers.health).
        click.option("--health-cmd", metavar="CMD", help="Command that checks health (sh -c)."),
        click.option("--health-interval", metavar="DURATION", help="Time between checks (30s)."),
        click.option("--health-timeout", metavar="DURATION", help="Longest check (30s)."),
        click.option("--health-retries", type=int, metavar="N", help="Failures in a row that make it unhealthy (3)."),
        click.option(
            "--health-start-period", metavar="DURATION", help="Failures in this time after start do not count (0s)."
        ),
        click.option("--no-healthcheck", is_flag=True, help="Disable the image's HEALTHCHECK."),
    ]
    for option in reversed(options):
        func = option(func)
    from shim.cli.network import network_options
    from shim.containers.resources import resource_options

    return network_options(resource_options(func))


def _in_store(image: str) -> bool:
    """Whether *image* is in the local store now (any failure: let the pull decide)."""
    try:
        from shim.images.store import ImageStore

        ImageStore().resolve(image)
        return True
    except Exception:  # noqa: BLE001 - ImageNotFound, InvalidReference, a broken store
        return False


def _pull(image: str, policy: str) -> None:
    """``--pull``: fetch the image first if the policy says so, with docker's messages
    and the pull's progress on stderr (stdout stays the container's)."""
    if policy == "missing" and _in_store(image):
        return  # the common case: no registry client to import (~0.1 s of every run)
    from shim.cli.progress import progress_for
    from shim.images.distribution import pull_for_run

    def missing() -> None:  # on a terminal only: a failure stays one line in scripts
        if sys.stderr.isatty():
            click.echo(f"Unable to find image '{image}' locally", err=True)

    with progress_for("Waiting", False) as progress:
        result = pull_for_run(image, policy, progress=progress, on_missing=missing)
    if result is not None:
        click.echo(f"Digest: {result.digest}", err=True)
        verdict = "Downloaded newer image" if result.updated else "Image is up to date"
        click.echo(f"Status: {verdict} for {result.reference.familiar}", err=True)


def _options(image, command, **flags):
    from shim.cli.network import network_request
    from shim.containers.options import RunOptions
    from shim.containers.resources import from_flags
    from shim.containers.security import SecurityOptions
    from shim.volumes.specs import parse_all

    return RunOptions(
        security=SecurityOptions(
            privileged=flags["privileged"],
            cap_add=list(flags["cap_add"]),
            cap_drop=list(flags["cap_drop"]),
            security_opt=list(flags["security_opt"]),
            devices=list(flags["device"]),
        ),
        network=network_request(flags),
        resources=from_flags(**flags),
        mounts=parse_all(flags["volumes"], flags["mounts"], flags["tmpfs"]),
        read_only=flags["read_only"],
        volumes_from=list(flags["volumes_from"]),
        image=image,
        command=list(command),
        entrypoint=flags["entrypoint"],
        env=list(flags["env"]),
        env_files=list(flags["env_file"]),
        workdir=flags["workdir"],
        user=flags["user"],
        name=flags["name"],
        hostname=flags["hostname"],
        interactive=flags["interactive"],
        tty=flags["tty"],
        remove=flags["remove"],
        isolation=flags["isolation"],
        detach=flags.get("detach", False),
        restart=flags["restart"],
        stop_signal=flags["stop_signal"],
        stop_timeout=flags["stop_timeout"],
        log_opts=list(flags["log_opts"]),
        labels=parse_labels(flags["labels"]),
        healthcheck=health_from_flags(**flags),
        os_container=flags["os_container"],
        init=flags["init"],
    )


def parse_labels(values) -> dict[str, str]:
    from shim.containers.options import parse_labels as parse

    return parse(list(values))


def health_from_flags(**flags):
    from shim.containers.health import from_flags

    return from_flags(**flags)


@click.command(context_settings={"allow_interspersed_args": False})
@container_options
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the id.")
@click.option(
    "--detach-keys",
    default="ctrl-p,ctrl-q",
    show_default=True,
    metavar="KEYS",
    help="With -it: the keys that detach (the container goes on running).",
)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image, command, **flags):
    """Run COMMAND in a new container from IMAGE (in the foreground unless -d)."""
    from shim.containers.run import run as run_container

    if flags["tty"] and not flags["detach"] and not sys.stdin.isatty():
        click.echo("Error: the input device is not a TTY (drop -t)", err=True)
        sys.exit(125)
    from shim.containers.attach import parse_detach_keys

    options = _options(image, command, **flags)
    parse_detach_keys(flags["detach_keys"])  # bad keys fail before anything is made
    options.detach_keys = flags["detach_keys"]
    _pull(image, flags["pull"])
    started = []
    code = run_container(options, on_started=started.append)
    if options.detach and started:
        click.echo(started[0].id)
    from shim.cli.finish import exit_now

    exit_now(code)


@click.command(context_settings={"allow_interspersed_args": False})
@container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(image, command, **flags):
    """Create a container from IMAGE without starting it; print its id."""
    from shim.containers.run import create as create_container

    options = _options(image, command, **flags)
    _pull(image, flags["pull"])
    record = create_container(options)
    click.echo(record.id)
