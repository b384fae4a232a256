"""``vmshim``: the top-level click group. Commands live in one module per verb family and
only parse, call the library and print; errors become one line on stderr."""

from __future__ import annotations

import sys

import click

from shim.errors import VmshimError


class VmshimGroup(click.Group):
    """Turns VmshimError into ``Error: <message>`` and its exit code; ``--debug`` (or
    VMSHIM_DEBUG=1) re-raises so the traceback shows."""

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
            click.echo(f"Error: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
            sys.exit(125)


@click.group(cls=VmshimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="VMSHIM_DEBUG", help="Show tracebacks of errors.")
@click.version_option(package_name="vmshim")
@click.pass_context
def cli(ctx, debug):
    """Containers with the isolation of a virtual machine."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from shim.cli import guest, images, info, registry, run, system

    cli.add_command(run.run)
    cli.add_command(info.info)
    cli.add_command(guest.guest)
    cli.add_command(images.images_cmd, "images")
    cli.add_command(images.rmi_cmd, "rmi")
    cli.add_command(images.image_group, "image")
    cli.add_command(images.tag_cmd, "tag")
    cli.add_command(images.history_cmd, "history")
    cli.add_command(images.save_cmd, "save")
    cli.add_command(images.load_cmd, "load")
    cli.add_command(registry.pull_cmd, "pull")
    cli.add_command(registry.push_cmd, "push")
    cli.add_command(registry.login_cmd, "login")
    cli.add_command(registry.logout_cmd, "logout")
    cli.add_command(system.system_group, "system")


_register()


def main() -> None:
    cli(prog_name="vmshim")


if __name__ == "__main__":
    main()
