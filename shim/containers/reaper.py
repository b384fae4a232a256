"""Detached teardown of a finished container, so the user's command never waits for it.

QEMU exits within ~60 ms of the guest's reboot, but libvirt reports the domain gone only
1–2 s later here; ``vmshim run`` returns at once and leaves this process to make sure the
domain is gone (destroying it after a grace period) and to remove the run directory.

Usage: ``python -m shim.containers.reaper DOMAIN RUN_DIR [GRACE_SECONDS]``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time


def spawn(domain: str, run_dir: str, grace: float = 5.0) -> None:
    """Start the reaper in its own session, detached from the caller's terminal."""
    subprocess.Popen(
        [sys.executable, "-m", "shim.containers.reaper", domain, run_dir, str(grace)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def reap(domain: str, run_dir: str, grace: float) -> None:
    from shim.vm.libvirt_backend import LibvirtBackend

    # Give the guest's own reboot time to end QEMU; poll gently, libvirtd is shared with
    # the next container the user is starting right now.
    time.sleep(0.5)
    backend = LibvirtBackend()
    deadline = time.monotonic() + grace
    while backend.is_running(domain) and time.monotonic() < deadline:
        time.sleep(0.5)
    backend.destroy(domain)
    shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    domain, run_dir = argv[0], argv[1]
    grace = float(argv[2]) if len(argv) > 2 else 5.0
    try:
        reap(domain, run_dir, grace)
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))
