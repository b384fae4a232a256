"""``vmshim-runtime``: the OCI runtime command line (runc's verbs and global flags), for
podman (``--runtime``), containerd (runc shim v2 ``BinaryName``, ``ctr --runc-binary``)
and Kubernetes (a RuntimeClass). The operations are in shim.oci.runtime; this module
parses flags, prints and turns errors into one log line and a non-zero exit."""

from __future__ import annotations

import json
import sys

import click

from shim.errors import VmshimError

VERSION = "0.1.0"


class RuntimeGroup(click.Group):
    """Errors become one line in ``--log`` and on stderr (exit 1, as runc); ``--debug``
    shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VmshimError as exc:
            self._fail(ctx, str(exc))
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # a bug: one line unless asked for more
            if ctx.obj and ctx.obj["log"].debug_enabled:
                raise
            self._fail(ctx, f"internal error: {type(exc).__name__}: {exc}")

    @staticmethod
    def _fail(ctx, message: str) -> None:
        log = ctx.obj["log"] if ctx.obj else None
        if log is not None and log.path:
            log.write("error", message)
        click.echo(f"vmshim-runtime: {message}", err=True)
        sys.exit(1)


@click.group(cls=RuntimeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    VERSION,
    "-v",
    "--version",
    prog_name="vmshim-runtime",
    message="%(prog)s version %(version)s\nspec: 1.1.0\nisolation: one microVM per container",
)
@click.option("--root", default=None, help="State directory [/run/vmshim-runtime].")
@click.option("--log", "log_path", default=None, help="Log file (warnings and errors).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
@click.option("--systemd-cgroup", is_flag=True, help="cgroupsPath is slice:prefix:name, a systemd scope (as runc's).")
@click.option("--rootless", default=None, help="Accepted for runc compatibility.")
@click.option("--criu", default=None, hidden=True)
@click.pass_context
def cli(ctx, root, log_path, log_format, debug, systemd_cgroup, rootless, criu):
    """Run OCI bundles, each in its own microVM (vmshim)."""
    from shim.oci.runtime import RuntimeLog
    from shim.oci.state import DEFAULT_ROOT, RuntimeStore

    ctx.obj = {
        "log": RuntimeLog(log_path, log_format, debug),
        "store": RuntimeStore(root or DEFAULT_ROOT),
        "systemd_cgroup": systemd_cgroup,
    }


def _obj(ctx):
    return ctx.obj["store"], ctx.obj["log"]


_bundle = click.option(
    "-b", "--bundle", default=".", show_default=True, help="The bundle directory (config.json, rootfs)."
)
_pid_file = click.option("--pid-file", default=None, help="Write the process's pid here.")
_console = click.option(
    "--console-socket", default=None, help="Unix socket that receives the pty master (terminal: true)."
)


def _compat(func):
    """runc flags engines pass that mean nothing for a VM."""
    for name in ("--no-pivot", "--no-new-keyring", "--no-subreaper"):
        func = click.option(name, is_flag=True, hidden=True)(func)
    func = click.option("--preserve-fds", type=int, default=0, hidden=True)(func)
    return func


@cli.command()
@click.argument("container_id")
@_bundle
@_pid_file
@_console
@_compat
@click.pass_context
def create(ctx, container_id, bundle, pid_file, console_socket, **_):
    """Create a container (its process waits for start)."""
    from shim.oci import runtime

    store, log = _obj(ctx)
    runtime.create(
        store,
        container_id,
        bundle,
        pid_file=pid_file,
        console_socket=console_socket,
        log=log,
        systemd_cgroup=ctx.obj["systemd_cgroup"],
    )


@cli.command()
@click.argument("container_id")
@click.pass_context
def start(ctx, container_id):
    """Start a created container's process."""
    from shim.oci import runtime

    store, log = _obj(ctx)
    runtime.start(store, container_id, log)


@cli.command()
@click.argument("container_id")
@_bundle
@_pid_file
@_console
@click.option("-d", "--detach", is_flag=True, help="Return once the process runs.")
@click.option("--keep", is_flag=True, hidden=True)
@_compat
@click.pass_context
def run(ctx, container_id, bundle, pid_file, console_socket, detach, keep, **_):
    """create + start (+ wait and delete without --detach)."""
    from shim.oci import runtime

    store, log = _obj(ctx)
    sys.exit(
        runtime.run(
            store,
            container_id,
            bundle,
            pid_file=pid_file,
            console_socket=console_socket,
            detach=detach,
            log=log,
            systemd_cgroup=ctx.obj["systemd_cgroup"],
        )
    )


@cli.command()
@click.argument("container_id")
@click.pass_context
def state(ctx, container_id):
    """Print the container's state (JSON)."""
    from shim.oci import runtime

    store, _ = _obj(ctx)
    click.echo(json.dumps(runtime.state(store, container_id), indent=2))


@cli.command()
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@click.option("-a", "--all", "all_processes", is_flag=True, help="Signal every process of the container.")
@click.pass_context
def kill(ctx, container_id, signal, all_processes):
    """Send SIGNAL (name or number, default SIGTERM) to the container's process."""
    from shim.oci import runtime

    store, _ = _obj(ctx)
    runtime.kill(store, container_id, parse_signal(signal), all_processes=all_processes)


@cli.command()
@click.argument("container_id")
@click.option("-f", "--force", is_flag=True, help="Kill it first if it still runs.")
@click.pass_context
def delete(ctx, container_id, force):
    """Delete a stopped container (and its VM)."""
    from shim.oci import runtime

    store, log = _obj(ctx)
    runtime.delete(store, container_id, force=force, log=log)


@cli.command(name="exec", context_settings={"ignore_unknown_options": False})
@click.argument("container_id")
@click.argument("command", nargs=-1)
@click.option("-p", "--process", "process_file", default=None, help="A JSON file with the OCI process to run.")
@click.option("-d", "--detach", is_flag=True)
@_pid_file
@_console
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("--cwd", default=None)
@click.option("-e", "--env", multiple=True)
@click.option("-u", "--user", default=None, help="UID[:GID].")
@click.option("--cap", "-c", multiple=True, hidden=True)
@click.option("--process-label", hidden=True, default=None)
@click.option("--apparmor", hidden=True, default=None)
@click.option("--no-new-privs", is_flag=True, hidden=True)
@click.option("--ignore-paused", is_flag=True, hidden=True)
@click.option("--cgroup", hidden=True, default=None)
@_compat
@click.pass_context
def exec_(ctx, container_id, command, process_file, detach, pid_file, console_socket, tty, cwd, env, user, **_):
    """Run a process in a running container."""
    from shim.oci import runtime

    store, log = _obj(ctx)
    if process_file:
        process = runtime.read_process_file(process_file)
    else:
        if not command:
            raise click.UsageError("give a COMMAND or --process")
        process = {"args": list(command), "env": list(env), "cwd": cwd or "/", "terminal": tty}
        if user:
            uid, _, gid = user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise click.BadParameter("expected UID[:GID]", param_hint="--user")
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    sys.exit(
        runtime.exec_process(
            store, container_id, process, detach=detach, pid_file=pid_file, console_socket=console_socket, log=log
        )
    )


@cli.command()
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def ps(ctx, container_id, ps_args, fmt):
    """Host pids standing for the container's processes."""
    from shim.oci import runtime

    store, _ = _obj(ctx)
    pids = runtime.processes(store, container_id)
    if fmt == "json":
        click.echo(json.dumps(pids))
    else:
        click.echo("PID")
        for pid in pids:
            click.echo(str(pid))


@cli.command(name="list")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def list_(ctx, fmt, quiet):
    """The containers of --root."""
    from shim.oci import runtime

    store, _ = _obj(ctx)
    states = runtime.list_states(store)
    if fmt == "json":
        click.echo(json.dumps(states))
    elif quiet:
        for s in states:
            click.echo(s["id"])
    else:
        click.echo(f"{'ID':<24} {'PID':<8} {'STATUS':<10} BUNDLE")
        for s in states:
            click.echo(f"{s['id']:<24} {s['pid']:<8} {s['status']:<10} {s['bundle']}")


@cli.command()
@click.argument("container_id")
@click.pass_context
def pause(ctx, container_id):
    """Pause the container (its VM's vCPUs stop)."""
    from shim.oci import runtime

    store, _ = _obj(ctx)
    runtime.pause(store, container_id)


@cli.command()
@click.argument("container_id")
@click.pass_context
def resume(ctx, container_id):
    """Resume a paused container."""
    from shim.oci import runtime

    store, _ = _obj(ctx)
    runtime.resume(store, container_id)


@cli.command()
@_bundle
def spec(bundle):
    """Write a starting config.json into the bundle directory (as runc spec)."""
    from pathlib import Path

    from shim.oci.bundle import default_config

    path = Path(bundle) / "config.json"
    if path.exists():
        raise VmshimError(f"{path} already exists; remove it first")
    path.write_text(json.dumps(default_config(), indent=2) + "\n")


@cli.command()
def features():
    """What this runtime supports (runtime-spec features.md JSON)."""
    from shim.oci.features import features as describe

    click.echo(json.dumps(describe(), indent=2))


def parse_signal(text: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL`` → 9. Raises click.BadParameter."""
    import signal as signal_mod

    value = text.strip().upper()
    if value.isdigit():
        number = int(value)
    else:
        name = value if value.startswith("SIG") else f"SIG{value}"
        if name not in signal_mod.Signals.__members__:
            raise click.BadParameter(f"unknown signal {text!r}", param_hint="SIGNAL")
        number = int(signal_mod.Signals[name])
    if not 0 < number < signal_mod.NSIG:
        raise click.BadParameter(f"signal {text!r} is out of range", param_hint="SIGNAL")
    return number


def main() -> None:
    cli(prog_name="vmshim-runtime")


if __name__ == "__main__":
    main()
