"""``vmshim``: the top-level click group. Commands live in one module per verb family and
only parse, call the library and print; errors become one line on stderr."""

from __future__ import annotations

import sys

import click

from shim.errors import VmshimError


class VmshimGroup(click.Group):
    """Turns VmshimError into ``Error: <message>`` and its exit code; ``--debug`` (or
    VMSHIM_DEBUG=1) re-raises so the traceback shows.

    Commands registered with :meth:`add_lazy` are imported only when used, so a verb
    whose latency matters (``vmshim exec``) does not pay for every other verb's imports.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = {}

    def add_lazy(self, name: str, target: str) -> None:
        """Register ``module:attribute`` as command *name*, imported on first use."""
        self.lazy[name] = target

    def list_commands(self, ctx):
        return sorted(set(self.commands) | set(self.lazy))

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            import importlib

            module, _, attr = self.lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return self.commands.get(name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VmshimError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: say so in one line unless asked for more
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(
                f"Error: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True
            )
            sys.exit(125)


@click.group(cls=VmshimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="VMSHIM_DEBUG", help="Show tracebacks of errors.")
@click.option(
    "-H",
    "--host",
    metavar="ssh://[USER@]HOST[:PORT]",
    help="Run the command on this remote host [env: VMSHIM_HOST] (docs/remote.md).",
)
@click.option(
    "-c",
    "--context",
    "context_name",
    metavar="NAME",
    help="Run the command on this context's host [env: VMSHIM_CONTEXT].",
)
@click.option("--remote-vmshim", metavar="PATH", help="The vmshim command on the remote host.")
@click.version_option(package_name="vmshim")
@click.pass_context
def cli(ctx, debug, host, context_name, remote_vmshim):
    """Containers with the isolation of a virtual machine."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _secure_root()


def _secure_root() -> None:
    """$VMSHIM_ROOT is 0711 (shim.paths.secure_root); a user without the right to change
    it (a read-only command as another user) is not stopped here."""
    from shim import paths

    try:
        paths.secure_root()
    except OSError:
        pass


def _register() -> None:
    """Every command, as ``name → module:attribute``, imported only when used (see
    VmshimGroup.add_lazy): `vmshim exec` must not pay for the registry client's imports."""
    for name, target in (
        ("run", "shim.cli.run:run"),
        ("create", "shim.cli.run:create"),
        # Container lifecycle (issue 3).
        ("start", "shim.cli.lifecycle:start"),
        ("stop", "shim.cli.lifecycle:stop"),
        ("kill", "shim.cli.lifecycle:kill"),
        ("restart", "shim.cli.lifecycle:restart"),
        ("rm", "shim.cli.lifecycle:rm"),
        ("pause", "shim.cli.lifecycle:pause"),
        ("unpause", "shim.cli.lifecycle:unpause"),
        ("wait", "shim.cli.lifecycle:wait"),
        ("rename", "shim.cli.lifecycle:rename"),
        ("container", "shim.cli.lifecycle:container_group"),
        ("ps", "shim.cli.ps:ps"),
        ("inspect", "shim.cli.ps:inspect"),
        ("logs", "shim.cli.logs:logs"),
        ("exec", "shim.cli.exec:exec_cmd"),
        ("attach", "shim.cli.exec:attach"),
        ("top", "shim.cli.exec:top"),
        ("stats", "shim.cli.stats:stats"),
        ("cp", "shim.cli.cp:cp"),
        ("checkpoint", "shim.cli.checkpoint:checkpoint"),  # issue 15
        ("restore", "shim.cli.checkpoint:restore"),
        ("template", "shim.cli.template:template_group"),
        ("migrate", "shim.cli.checkpoint:migrate"),
        # Images, registries, the guest, the system.
        ("info", "shim.cli.info:info"),
        ("guest", "shim.cli.guest:guest"),
        ("build", "shim.cli.build:build_cmd"),  # Dockerfile builds (issue 5)
        ("images", "shim.cli.images:images_cmd"),
        ("rmi", "shim.cli.images:rmi_cmd"),
        ("image", "shim.cli.images:image_group"),
        ("tag", "shim.cli.images:tag_cmd"),
        ("history", "shim.cli.images:history_cmd"),
        ("save", "shim.cli.images:save_cmd"),
        ("load", "shim.cli.images:load_cmd"),
        ("pull", "shim.cli.registry:pull_cmd"),
        ("push", "shim.cli.registry:push_cmd"),
        ("login", "shim.cli.registry:login_cmd"),
        ("logout", "shim.cli.registry:logout_cmd"),
        ("system", "shim.cli.system:system_group"),
        ("volume", "shim.cli.volume:volume_group"),
        ("update", "shim.cli.update:update"),
        ("network", "shim.cli.network:network_group"),  # networking (issue 6)
        ("port", "shim.cli.network:port_cmd"),
        ("bench", "shim.cli.bench:bench"),
        ("pool", "shim.cli.pool:pool_group"),  # warm pool of pre-booted VMs (issue 15)
        ("memory", "shim.cli.memory:memory_group"),  # KSM, free page reporting (issue 15)
        ("compose", "shim.cli.compose:compose"),  # multi-container apps (issue 14)
        ("context", "shim.cli.context:context_group"),  # remote hosts (issue 18)
        ("remote-build-context", "shim.cli.context:remote_build_context"),
    ):
        cli.add_lazy(name, target)


_register()


def main() -> None:
    from shim.remote.hook import maybe_run_remote  # --host / contexts (issue 18)

    code = maybe_run_remote(sys.argv[1:], cli)
    if code is not None:
        sys.exit(code)
    cli(prog_name="vmshim")


if __name__ == "__main__":
    main()
