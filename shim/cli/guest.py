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
def build(force: bool):
    """Build the guest image if it is missing or stale, and print where it is."""
    err = Console(stderr=True, highlight=False)
    with err.status("checking the guest image inputs", spinner="dots") as status:
        def progress(msg: str) -> None:
            err.print(f"[dim]-[/dim] {msg}")
            status.update(msg)

        image = guestimage.ensure_guest_image(progress=progress, force=force,
                                                 refresh_kernel=True)
    click.echo(image.kernel.parent)


@guest.command("info")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              help="json prints the whole manifest.")
def info(fmt: str):
    """Show the current guest image: kernel release, paths, sizes and inputs."""
    image = guestimage.current_guest_image()
    if image is None:
        raise GuestImageError("the guest image is not built or is out of date; run vmshim guest build")
    m = image.manifest
    if fmt == "json":
        click.echo(json.dumps({"kernel_path": str(image.kernel), "initramfs_path": str(image.initramfs),
                               **m}, indent=2, sort_keys=True))
        return
    inputs, ird, kernel = m.get("inputs", {}), m.get("initramfs", {}), m.get("kernel", {})
    if kernel.get("source") == "debian":
        ksrc = f"{kernel.get('package')} {kernel.get('version')}"
    else:
        ksrc = f"override {kernel.get('kernel')}"
    rows = [
        ("directory", str(image.kernel.parent)),
        ("kernel", f"{image.kernel_release} ({ksrc})"),
        ("kernel file", f"{image.kernel} ({_size(image.kernel.stat().st_size)})"),
        ("initramfs", f"{image.initramfs} ({_size(ird.get('size', 0))}, {ird.get('compression')}, "
                      f"{_size(ird.get('uncompressed_size', 0))} unpacked)"),
        ("cmdline", image.cmdline),
        ("python", f"{m.get('python', {}).get('version')} "
                   f"({inputs.get('python', {}).get('python3.11-minimal', '?')}), "
                   f"{m.get('python', {}).get('stdlib_files')} stdlib modules"),
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
