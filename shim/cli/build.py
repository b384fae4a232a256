"""``vmshim build``: parse flags, run shim.build, print docker's classic builder lines."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from shim.build.builder import BuildOptions, BuildOutput, build, short_id
from shim.build.mounts import parse_secret_flags
from shim.build.output import parse_output
from shim.build.output import write as write_output
from shim.containers.options import parse_labels
from shim.containers.resources import DEFAULT_VM_MIB
from shim.errors import UsageError
from shim.files import replaced

if TYPE_CHECKING:
    from rich.status import Status


class ConsoleOutput(BuildOutput):
    """``Step N/M : …``, `` ---> id`` on stdout, RUN output as it comes; a transient
    status line (booting the microVM, committing a layer…) on stderr when it is a
    terminal; ``-q``: nothing but the final ID (and a failed step's output)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.run_fd = None if quiet else 1
        self._status: Status | None = None
        self._console = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console

            self._console = Console(stderr=True)

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.status(None)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def step(self, number: int, total: int, text: str) -> None:
        self._print(f"Step {number}/{total} : {text}")

    def line(self, text: str) -> None:
        self._print(text)

    def status(self, text: str | None) -> None:
        if self._console is None:
            return
        if text is None:
            if self._status is not None:
                self._status.stop()
                self._status = None
            return
        if self._status is None:
            self._status = self._console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def warn(self, text: str) -> None:
        self.status(None)
        click.echo(f"[Warning] {text}", err=True)


def _build_args(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for entry in values:
        key, sep, value = entry.partition("=")
        if not key:
            raise UsageError(f"invalid --build-arg {entry!r}: expected KEY=VALUE")
        if sep:
            out[key] = value
        elif key in os.environ:  # docker: a bare name takes the value from the environment
            out[key] = os.environ[key]
    return out


def _write_iidfile(path: Path, image_id: str) -> None:
    """Write *image_id* to *path* whole or not at all (docker's --iidfile)."""
    try:
        with replaced(path, sync=False) as f:
            f.write(image_id.encode())
    except OSError as exc:
        raise UsageError(f"cannot write --iidfile {path}: {exc.strerror or exc}") from None


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds: the step's VM is destroyed on the way out


@click.command("build")
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME[:TAG]", help="Name the image (repeatable).")
@click.option(
    "-f", "--file", "dockerfile", metavar="PATH", help="The Dockerfile (default: CONTEXT/Dockerfile; '-' reads stdin)."
)
@click.option("--build-arg", "build_args", multiple=True, metavar="K=V", help="Set a build-time variable (repeatable).")
@click.option("--target", metavar="STAGE", help="Build up to this stage and name it.")
@click.option("--no-cache", is_flag=True, help="Run every step, ignoring the build cache.")
@click.option("--pull", is_flag=True, help="Pull FROM images even when they are stored.")
@click.option(
    "--isolation",
    type=click.Choice(["vm", "process"]),
    default="vm",
    show_default=True,
    help="Where RUN steps run: a microVM each, or namespaces.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID.")
@click.option(
    "-m",
    "--memory",
    "memory",
    metavar="MIB",
    type=click.IntRange(64, 65536),
    default=DEFAULT_VM_MIB,
    show_default=True,
    help="Memory of each RUN step's microVM.",
)
@click.option(
    "--network",
    metavar="default|none|host|NAME",
    help="The RUN steps' network (default: the default NAT network, as docker build).",
)
@click.option(
    "--add-host",
    "add_hosts",
    multiple=True,
    metavar="NAME:IP",
    help="Add a line to the RUN steps' /etc/hosts (IP may be host-gateway).",
)
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Set a label on the built image (repeatable)."
)
@click.option("--iidfile", metavar="FILE", help="Write the image ID to FILE.")
@click.option(
    "-o",
    "--output",
    "outputs",
    multiple=True,
    metavar="type=local|tar|oci,dest=PATH",
    help="Also write the result there (local: a directory; tar: its files; oci: an OCI image-layout tar).",
)
@click.option(
    "--secret",
    "secrets",
    multiple=True,
    metavar="id=ID,src=FILE",
    help="A secret for RUN --mount=type=secret (never in the image).",
)
@click.option(
    "--cache-from",
    "cache_from",
    multiple=True,
    metavar="IMAGE",
    help="Use this image's build history as a cache (repeatable).",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "plain", "tty"]),
    default="auto",
    show_default=True,
    help="tty: a collapsing step view; plain: every line (auto: tty on a terminal).",
)
@click.argument("context", type=click.Path(file_okay=False), metavar="CONTEXT")
def build_cmd(
    tags,
    dockerfile,
    build_args,
    target,
    no_cache,
    pull,
    isolation,
    quiet,
    memory,
    network,
    add_hosts,
    labels,
    iidfile,
    secrets,
    outputs,
    cache_from,
    progress,
    context,
):
    """Build an image from a Dockerfile and the files in CONTEXT."""
    if not Path(context).is_dir():
        raise UsageError(f"build context {context!r} is not a directory")
    wanted = [parse_output(spec) for spec in outputs]  # checked before any step runs
    options = BuildOptions(
        context=Path(context),
        dockerfile=Path(dockerfile) if dockerfile else None,
        tags=list(tags),
        build_args=_build_args(build_args),
        target=target,
        no_cache=no_cache,
        pull=pull,
        isolation=isolation,
        quiet=quiet,
        memory_mib=memory,
        network=network,
        add_hosts=list(add_hosts),
        labels=parse_labels(labels),
        secrets=parse_secret_flags(list(secrets)),
        cache_from=list(cache_from),
    )
    if progress == "auto":
        progress = "tty" if sys.stdout.isatty() else "plain"
    if progress == "tty" and not quiet:
        from shim.cli.build_progress import TtyOutput

        output = TtyOutput(sys.stdout)
    else:
        output = ConsoleOutput(quiet)
    old = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    failed = True
    try:
        result = build(options, output)
        failed = False
    finally:
        output.status(None)
        if hasattr(output, "close"):
            output.close(failed)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if iidfile:
        _write_iidfile(Path(iidfile), result.image_id)
    if wanted:
        from shim.images.store import ImageStore

        store = ImageStore()
        for output in wanted:
            write_output(store, result.image_id, output)
    if quiet:
        click.echo(result.image_id)
        return
    click.echo(f"Successfully built {short_id(result.image_id)}")
    for tag in result.tags:
        click.echo(f"Successfully tagged {tag}")
