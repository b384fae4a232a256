"""Detached clean-up of a RUN step's finished microVM, so a build never waits for libvirt.

When a step's channel closes, QEMU has exited, but libvirt reports the domain gone only
1–2 s later here. The builder goes on (or ends) at once and leaves this process to wait
for the domain to go (destroying it if it lingers) and to remove its run directory.
With CONTAINER_ID it then gives the step's network endpoint back (address, DNS entry):
that and the rest is all of ``VmPlacement.teardown`` a build VM needs (it has no volumes).

Usage: ``python -m shim.build.reap DOMAIN RUN_DIR [CONTAINER_ID]``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

GRACE = 5.0
TIMEOUT = 20.0


def spawn(domain: str, run_dir: str, network_of: str | None = None) -> None:
    """Start the clean-up in its own session, detached from the caller's terminal;
    *network_of*: the container id whose network endpoint to disconnect afterwards."""
    extra = [network_of] if network_of else []
    subprocess.Popen(
        [sys.executable, "-m", "shim.build.reap", domain, run_dir, *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def reap(domain: str, run_dir: str, network_of: str | None = None) -> None:
    from shim.vm.libvirt_backend import LibvirtBackend

    backend = LibvirtBackend()
    try:
        if not backend.wait_gone(domain, GRACE):
            backend.destroy(domain)
            backend.wait_gone(domain, TIMEOUT)
    finally:
        backend.close()
        if network_of:
            from shim.containers.networking import stop

            stop(network_of)
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        reap(*argv)
    except Exception:  # noqa: BLE001 - nobody is listening; the next run sees the domain
        return 1
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))
