"""``vmshim compose``: parse, load the project, call shim.compose.runner, print."""

from __future__ import annotations

import json
import sys

import click

from shim.cli.table import print_table
from shim.errors import UsageError


class _Ctx:
    def __init__(self, files, project_name, env_files, profiles, progress_mode):
        self.files, self.project_name = list(files), project_name
        self.env_files, self.profiles = list(env_files), list(profiles)
        self.progress_mode = progress_mode
        self._project = None

    def project(self):
        """The loaded project (warnings printed once). Raises ComposeError."""
        if self._project is None:
            from shim.compose.model import load_project

            self._project = load_project(
                self.files, project_name=self.project_name, env_files=self.env_files, profiles=self.profiles
            )
            for warning in self._project.warnings:
                click.echo(f"WARN[0000] {warning}", err=True)
        return self._project

    def name(self) -> str:
        """The project's name: -p, else the file's (down/ps/logs work without a file)."""
        if self.project_name and not self.files:
            from shim.compose.model import normalize_project_name

            try:
                return self.project().name
            except UsageError:
                return normalize_project_name(self.project_name)
        return self.project().name

    def progress(self, quiet: bool = False):
        from shim.compose.progress import Progress

        mode = self.progress_mode
        return Progress(quiet=quiet or mode == "quiet", tty=None if mode == "auto" else mode == "tty")


pass_ctx = click.make_pass_decorator(_Ctx)


@click.group("compose")
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    metavar="FILE",
    help="Compose file (repeat: later files override earlier ones).",
)
@click.option(
    "-p", "--project-name", metavar="NAME", help="Project name (default: the file's name:, else its directory's name)."
)
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    metavar="FILE",
    help="Variables for interpolation (default: .env next to the file).",
)
@click.option("--profile", "profiles", multiple=True, metavar="NAME", help="Enable services of this profile.")
@click.option(
    "--progress",
    "progress_mode",
    type=click.Choice(["auto", "tty", "plain", "quiet"]),
    default="auto",
    show_default=True,
    help="How to show progress.",
)
@click.pass_context
def compose(ctx, files, project_name, env_files, profiles, progress_mode):
    """Run multi-container applications from a compose file (each service's
    containers in microVMs, or with isolation: process as namespaces)."""
    ctx.obj = _Ctx(files, project_name, env_files, profiles, progress_mode)


@compose.command("up")
@click.option("-d", "--detach", is_flag=True, help="Start in the background.")
@click.option("--build", is_flag=True, help="Build images before starting.")
@click.option("--scale", multiple=True, metavar="SERVICE=N", help="Number of replicas.")
@click.option("--wait", is_flag=True, help="Wait until containers are running and healthy (implies -d).")
@click.option("--wait-timeout", type=int, default=300, show_default=True, metavar="SECONDS")
@click.option("--force-recreate", is_flag=True, help="Recreate containers even if unchanged.")
@click.option("--no-recreate", is_flag=True, help="Keep existing containers even if changed.")
@click.argument("services", nargs=-1)
@pass_ctx
def up_cmd(c, detach, build, scale, wait, wait_timeout, force_recreate, no_recreate, services):
    """Create and start the services' containers."""
    from shim.compose import planner, runner

    project = c.project()
    progress = c.progress()
    code = runner.up(
        project,
        list(services),
        build=build,
        scale=planner.parse_scale(scale),
        wait=wait,
        wait_timeout=wait_timeout,
        force_recreate=force_recreate,
        no_recreate=no_recreate,
        progress=progress,
    )
    if code or detach or wait:
        sys.exit(code)
    _foreground(project, list(services))


def _foreground(project, services):
    """``up`` without -d: follow the logs; Ctrl-C stops the containers (docker's way)."""
    import signal

    from shim.compose import runner

    names = [s.name for s in runner.with_dependencies(project, services)]

    def all_exited():
        records = runner.project_containers(project.name, services=names)
        return all(r.status.value == "exited" for r in records)

    old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        runner.logs(project.name, names, follow=True, stop_when=all_exited)
    except KeyboardInterrupt:
        click.echo("Gracefully stopping... (press Ctrl+C again to force)", err=True)
        runner.stop(project.name, names)
    finally:
        signal.signal(signal.SIGTERM, old)


@compose.command("down")
@click.option("-v", "--volumes", is_flag=True, help="Remove named volumes of the project.")
@click.option("--rmi", type=click.Choice(["local", "all"]), help="Remove images: local = the ones compose built.")
@click.option("-t", "--timeout", type=int, metavar="SECONDS", help="Stop timeout.")
@click.option("--remove-orphans", is_flag=True, help="Accepted: down removes every container of the project anyway.")
@pass_ctx
def down_cmd(c, volumes, rmi, timeout, remove_orphans):
    """Stop and remove the project's containers and networks (by label, so it works
    when the file changed)."""
    from shim.compose import runner

    project = None
    try:
        project = c.project()
        name = project.name
    except UsageError:
        if not c.project_name:
            raise
        name = c.name()
    runner.down(name, volumes=volumes, rmi=rmi, timeout=timeout, project=project, progress=c.progress())


@compose.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped containers too.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--services", is_flag=True, help="Only the service names.")
@click.argument("services_", nargs=-1, metavar="[SERVICE]...")
@pass_ctx
def ps_cmd(c, show_all, quiet, fmt, services, services_):
    """List the project's containers, with health."""
    from shim.containers.listing import health_status, status_text
    from shim.compose import runner
    from shim.containers.networking import published_ports

    records = runner.project_containers(c.name(), services=list(services_) or None)
    if not show_all:
        records = [r for r in records if r.status.value != "exited"]
    if services:
        for name in sorted({runner.service_of(r) for r in records}):
            click.echo(name)
        return
    if quiet:
        for r in records:
            click.echo(r.id)
        return
    rows = []
    for r in records:
        try:
            ports = (
                ", ".join(f"{p.host_ip}:{p.host_port}->{p.container_port}/{p.protocol}" for p in published_ports(r.id))
                if r.status.value == "running"
                else ""
            )
        except Exception:  # noqa: BLE001 - the network store is not ours to repair here
            ports = ""
        rows.append(
            {
                "ID": r.id,
                "Name": r.name,
                "Image": r.image,
                "Command": " ".join(r.process.args),
                "Service": runner.service_of(r),
                "State": r.status.value,
                "Health": "" if health_status(r) == "none" else health_status(r),
                "Status": status_text(r),
                "ExitCode": r.state.exit_code,
                "Publishers": ports,
                "Isolation": r.isolation,
                "Labels": r.labels,
            }
        )
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(row))
        return
    table = [("NAME", "IMAGE", "SERVICE", "ISOLATION", "STATUS", "PORTS")]
    table += [(r["Name"], r["Image"], r["Service"], r["Isolation"], r["Status"], r["Publishers"]) for r in rows]
    print_table(table)


@compose.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Follow the output.")
@click.option("-n", "--tail", type=int, metavar="N", help="Lines from the end of each log.")
@click.option("-t", "--timestamps", is_flag=True)
@click.option("--no-color", is_flag=True)
@click.argument("services", nargs=-1)
@pass_ctx
def logs_cmd(c, follow, tail, timestamps, no_color, services):
    """Show the output of the services' containers (``name | line``)."""
    from shim.compose import runner

    try:
        runner.logs(c.name(), list(services), follow=follow, tail=tail, timestamps=timestamps, no_color=no_color)
    except KeyboardInterrupt:
        pass


@compose.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-T", "--no-TTY", "no_tty", is_flag=True, help="No pseudo-terminal.")
@click.option("-d", "--detach", is_flag=True)
@click.option("-e", "--env", multiple=True, metavar="K=V")
@click.option("-w", "--workdir", metavar="DIR")
@click.option("-u", "--user", metavar="USER")
@click.option("--index", type=int, default=1, show_default=True, help="Which replica.")
@click.argument("service")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def exec_cmd(c, no_tty, detach, env, workdir, user, index, service, command):
    """Run COMMAND in a running container of SERVICE."""
    from shim.compose import runner
    from shim.containers import manage

    record = runner.container_of(c.name(), service, index)
    tty = not no_tty and not detach and sys.stdin.isatty() and sys.stdout.isatty()
    sys.exit(
        manage.exec_process(
            record.id,
            list(command),
            interactive=not detach and not no_tty,
            tty=tty,
            detach=detach,
            env=list(env),
            workdir=workdir,
            user=user,
        )
    )


@compose.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--rm", "remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-d", "--detach", is_flag=True)
@click.option("--no-deps", is_flag=True, help="Do not start the dependencies.")
@click.argument("service")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def run_cmd(c, remove, detach, no_deps, service, command):
    """Run a one-off COMMAND in a new container of SERVICE."""
    from shim.compose import runner

    sys.exit(
        runner.run_oneoff(
            c.project(), service, list(command), remove=remove, detach=detach, no_deps=no_deps, progress=c.progress()
        )
    )


@compose.command("build")
@click.option("--no-cache", is_flag=True)
@click.argument("services", nargs=-1)
@pass_ctx
def build_cmd(c, no_cache, services):
    """Build the images of services with a build section."""
    from shim.compose import runner

    _each_service(
        c,
        services,
        lambda s: s.build is not None,
        lambda project, s, progress: runner.build_service(project, s, progress, no_cache=no_cache),
    )


@compose.command("pull")
@click.argument("services", nargs=-1)
@pass_ctx
def pull_cmd(c, services):
    """Pull the images of services with an image."""
    from shim.compose import runner

    _each_service(c, services, lambda s: s.image, lambda _project, s, progress: runner.pull_image(s.image, progress))


@compose.command("push")
@click.argument("services", nargs=-1)
@pass_ctx
def push_cmd(c, services):
    """Push the images of services that have both build and image."""
    from shim.images.distribution import push
    from shim.images.reference import parse_reference
    from shim.images.store import ImageStore

    def push_one(_project, service, progress) -> None:
        line = progress.line(f"Image {service.image}", "Pushing")
        push(parse_reference(service.image), store=ImageStore())
        line.done("Pushed")

    _each_service(c, services, lambda s: s.build is not None and s.image, push_one)


def _each_service(c, services, wanted, act) -> None:
    """``act(project, service, progress)`` for each of the chosen *services* (all when
    none is named) that is *wanted*, in the project's order."""
    project = c.project()
    progress = c.progress()
    for service in project.chosen(services):
        if wanted(service):
            act(project, service, progress)
    progress.close()


def _each(c, services, verb, func):
    from shim.compose import runner

    progress = c.progress()
    for record in runner.project_containers(c.name(), services=list(services) or None):
        line = progress.line(f"Container {record.name}", verb)
        func(record)
        line.done(verb.replace("ing", "ed").replace("Stoped", "Stopped"))
    progress.close()


@compose.command("stop")
@click.option("-t", "--timeout", type=int, metavar="SECONDS")
@click.argument("services", nargs=-1)
@pass_ctx
def stop_cmd(c, timeout, services):
    """Stop the services' containers."""
    from shim.compose import runner

    runner.stop(c.name(), list(services), timeout=timeout, progress=c.progress())


@compose.command("start")
@click.argument("services", nargs=-1)
@pass_ctx
def start_cmd(c, services):
    """Start the services' existing containers."""
    from shim.compose import runner

    progress = c.progress()
    starting = [
        runner.begin_start(r, progress.line(f"Container {r.name}", "Starting"))
        for r in runner.project_containers(c.name(), services=list(services) or None)
        if r.status.value in ("created", "exited")
    ]
    errors = runner.finish_starts(starting)
    progress.close()
    for error in errors:
        click.echo(f"Error: {error}", err=True)
    sys.exit(1 if errors else 0)


@compose.command("restart")
@click.option("-t", "--timeout", type=int, metavar="SECONDS")
@click.argument("services", nargs=-1)
@pass_ctx
def restart_cmd(c, timeout, services):
    """Restart the services' containers."""
    from shim.containers import manage

    _each(c, services, "Restarting", lambda r: manage.restart(r.id, timeout))


@compose.command("kill")
@click.option("-s", "--signal", "sig", default="SIGKILL", show_default=True)
@click.argument("services", nargs=-1)
@pass_ctx
def kill_cmd(c, sig, services):
    """Send a signal to the services' running containers."""
    from shim.compose import runner
    from shim.containers import manage
    from shim.containers.options import parse_signal

    number = parse_signal(sig)
    progress = c.progress()
    for record in runner.project_containers(c.name(), services=list(services) or None):
        if record.status.value == "running":
            line = progress.line(f"Container {record.name}", "Killing")
            manage.kill(record.id, number)
            line.done("Killed")
    progress.close()


@compose.command("config")
@click.option("--services", is_flag=True, help="Only the service names.")
@click.option("-q", "--quiet", is_flag=True, help="Only validate.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")
@pass_ctx
def config_cmd(c, services, quiet, fmt):
    """Validate the files and print the merged, interpolated result."""
    import yaml

    project = c.project()
    if quiet:
        return
    if services:
        for name in project.services:
            click.echo(name)
        return
    document = dict(project.document)
    document["name"] = project.name
    if fmt == "json":
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(yaml.safe_dump(document, sort_keys=False).rstrip())


@compose.command("top")
@click.argument("services", nargs=-1)
@pass_ctx
def top_cmd(c, services):
    """The processes of the services' running containers."""
    from shim.compose import runner
    from shim.containers import manage

    for record in runner.project_containers(c.name(), services=list(services) or None):
        if record.status.value != "running":
            continue
        data = manage.top(record.id)
        click.echo(record.name)
        print_table([data["titles"]] + data["processes"])
        click.echo("")


@compose.command("port")
@click.option("--index", type=int, default=1, show_default=True)
@click.option("--protocol", default="tcp", show_default=True)
@click.argument("service")
@click.argument("private_port", type=int)
@pass_ctx
def port_cmd(c, index, protocol, service, private_port):
    """The host address a service's PRIVATE_PORT is published on."""
    from shim.compose import planner, runner
    from shim.errors import NetworkError
    from shim.containers.networking import published_ports

    project = c.project()
    svc = project.service(service)
    count = len(runner.project_containers(project.name, services=[service])) or 1
    for mapping in planner.balanced_ports(svc, count):
        if mapping.container_port == private_port and mapping.protocol == protocol:
            click.echo(f"{mapping.host_ip}:{mapping.host_port}")
            return
    record = runner.container_of(project.name, service, index)
    for p in published_ports(record.id):
        if p.container_port == private_port and p.protocol == protocol:
            click.echo(f"{p.host_ip}:{p.host_port}")
            return
    raise NetworkError(f"no port {private_port}/{protocol} published for {service}")
