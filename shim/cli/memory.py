"""``vmshim memory set|show``: opt-in KSM and free page reporting (shim.vm.memory)."""

from __future__ import annotations

import json

import click

ON_OFF = click.Choice(["on", "off"])


@click.group("memory")
def memory_group():
    """Share identical guest pages (KSM) and give freed guest pages back (free page
    reporting). Both off unless set; new VMs pick the setting up."""


@memory_group.command("set")
@click.option(
    "--ksm",
    type=ON_OFF,
    default=None,
    help="Start the host's KSM and let it merge vmshim's guest RAM (host-wide; a "
    "side channel between VMs: see docs/warm-pool.md). off: stop and unmerge.",
)
@click.option(
    "--free-page-reporting",
    "fpr",
    type=ON_OFF,
    default=None,
    help="A virtio-balloon with free page reporting in each new VM.",
)
def set_cmd(ksm, fpr):
    """Change one or both settings."""
    from shim.vm import memory

    current = memory.load()
    memory.save(
        memory.MemorySettings(
            ksm=current.ksm if ksm is None else ksm == "on",
            free_page_reporting=current.free_page_reporting if fpr is None else fpr == "on",
        )
    )
    _show(memory.status(), "text")


@memory_group.command("show")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def show_cmd(fmt):
    """The settings and the host's KSM figures."""
    from shim.vm import memory

    _show(memory.status(), fmt)


def _show(status: dict, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(text(status))


def text(status: dict) -> str:
    """One line, as ``vmshim info`` prints it too."""
    host = status["ksm_host"]
    if not host["available"]:
        ksm_host = "host has no KSM"
    else:
        ksm_host = (
            f"host KSM {'running' if host['running'] else 'stopped'}, {host['pages_sharing'] * 4 // 1024} MiB saved"
        )
    return (
        f"KSM {'on' if status['ksm'] else 'off'} ({ksm_host}); free page reporting "
        f"{'on' if status['free_page_reporting'] else 'off'}"
    )
