"""``vmshim guest build|info``: the guest kernel + initramfs every microVM boots."""

from __future__ import annotations

import json

import click
from rich.console import Console

from shim import guestimage
from shim.errors import GuestImageError


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@click.group("guest")
def guest():
    """Build and inspect the guest image (kernel + initramfs with the agent)."""


@guest.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date image exists.")
@click.option(
    "--kernel",
    type=click.Choice(["auto", *guestimage.KERNEL_CHOICES]),
    default=None,
    help="The kernel every VM boots from now on: minimal (built with `vmshim guest "
    "kernel build`), distro (Debian's cloud kernel) or auto (minimal if built, "
    "else distro; the default).",
)
def build(force: bool, kernel: str | None):
    """Build the guest image if it is missing or stale, and print where it is."""
    err = Console(stderr=True, highlight=False)
    if kernel is not None:
        requested = None if kernel == "auto" else kernel
        if requested:  # fail before saving: minimal must be built
            guestimage.collect_inputs(kernel_request=requested)
        guestimage.save_kernel_choice(requested)
    choice, why = guestimage.kernel_choice()
    err.print(f"[dim]-[/dim] kernel: {choice} ({why})")
    with err.status("checking the guest image inputs", spinner="dots") as status:

        def progress(msg: str) -> None:
            err.print(f"[dim]-[/dim] {msg}")
            status.update(msg)

        image = guestimage.ensure_guest_image(progress=progress, force=force, refresh_kernel=True)
    click.echo(image.kernel.parent)


@guest.group("kernel")
def kernel_group():
    """The minimal microVM kernel, built from Debian's linux-source (kernels/)."""


@kernel_group.command("build")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Parallel compile jobs (make runs niced).",
)
@click.option("--force", is_flag=True, help="Rebuild even if this source and config are cached.")
def kernel_build(jobs: int, force: bool):
    """Build the minimal kernel (minutes; cached by source version and config) and print its
    directory. The next `vmshim guest build` picks it up unless --kernel distro was chosen."""
    from shim import kernelbuild

    err = Console(stderr=True, highlight=False)
    with err.status("building the minimal kernel", spinner="dots") as status:

        def progress(msg: str) -> None:
            err.print(f"[dim]-[/dim] {msg}")
            status.update(msg)

        built = kernelbuild.build_kernel(jobs=jobs, force=force, progress=progress)
    click.echo(built.dir)


@kernel_group.command("check")
@click.argument("config", required=False, type=click.Path(dir_okay=False, exists=True))
def kernel_check(config: str | None):
    """Check that a kernel config (default: the built minimal kernel's) builds in every
    option the agent needs; name each missing one."""
    from pathlib import Path

    from shim import kernelbuild

    if config is None:
        built = kernelbuild.cached_kernel()
        if built is None:
            raise GuestImageError(
                "no minimal kernel is built; run vmshim guest kernel build, or name a .config to check"
            )
        path = built.config
    else:
        path = Path(config)
    missing = kernelbuild.check_config(kernelbuild.parse_config(path.read_text(errors="replace")))
    if missing:
        raise GuestImageError(f"{path} lacks what the agent needs: " + "; ".join(missing))
    click.echo(f"{path}: all {len(kernelbuild.REQUIRED_OPTIONS)} options the agent needs are built in")


@guest.command("info")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", help="json prints the whole manifest."
)
def info(fmt: str):
    """Show the current guest image: kernel release, paths, sizes and inputs."""
    image = guestimage.current_guest_image()
    if image is None:
        raise GuestImageError("the guest image is not built or is out of date; run vmshim guest build")
    m = image.manifest
    choice, why = guestimage.kernel_choice()
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "kernel_path": str(image.kernel),
                    "initramfs_path": str(image.initramfs),
                    "kernel_choice": choice,
                    "kernel_reason": why,
                    **m,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return
    inputs, ird, kernel = m.get("inputs", {}), m.get("initramfs", {}), m.get("kernel", {})
    if kernel.get("source") == "debian":
        ksrc = f"{kernel.get('package')} {kernel.get('version')}"
    elif kernel.get("source") == "minimal":
        ksrc = f"minimal, built from {kernel.get('source_package')} {kernel.get('source_version')}"
    else:
        ksrc = f"override {kernel.get('kernel')}"
    rows = [
        ("directory", str(image.kernel.parent)),
        ("kernel", f"{image.kernel_release} ({ksrc})"),
        ("kernel choice", f"{choice}: {why}"),
        ("kernel file", f"{image.kernel} ({_size(image.kernel.stat().st_size)})"),
        (
            "initramfs",
            f"{image.initramfs} ({_size(ird.get('size', 0))}, {ird.get('compression')}, "
            f"{_size(ird.get('uncompressed_size', 0))} unpacked)",
        ),
        ("cmdline", image.cmdline),
        (
            "python",
            f"{m.get('python', {}).get('version')} "
            f"({inputs.get('python', {}).get('python3.11-minimal', '?')}), "
            f"{m.get('python', {}).get('stdlib_files')} stdlib modules",
        ),
        ("busybox", inputs.get("busybox", {}).get("version", "?")),
        ("modules", ", ".join(p.rsplit("/", 1)[-1][:-3] for p in m.get("modules", [])) or "(none)"),
        ("guest files", str(len(inputs.get("guest", {})))),
        ("inputs hash", m.get("inputs_hash", "")),
        ("built", f"{m.get('built_at')} in {m.get('build_seconds')} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _main() -> None:
    """Standalone entry (scripts/build-guest before vmshim is installed): errors in one line."""
    import sys

    from shim.errors import VmshimError

    try:
        guest(prog_name="vmshim guest", standalone_mode=False)
    except VmshimError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    _main()
