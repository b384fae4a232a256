"""Fixtures for end-to-end tests: the CLI run as a user runs it, as a subprocess.

The state root is whatever VMSHIM_ROOT says (scripts/test points it at a test root and
builds the guest image and the busybox image there first; the session fixture makes sure
of both). Tests that boot a VM carry the ``vm`` marker.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from shim import paths

CLI = [sys.executable, "-m", "shim.cli.main"]


def vmshim(*args, input=None, timeout=180, env=None, check=False):
    """Run the CLI; return the CompletedProcess (bytes stdout/stderr)."""
    merged = dict(os.environ, **(env or {}))
    proc = subprocess.run(CLI + list(args), input=input, capture_output=True, timeout=timeout, env=merged)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"vmshim {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def out(proc) -> str:
    """A finished vmshim call's stdout as text."""
    return proc.stdout.decode(errors="replace")


def err(proc) -> str:
    """Its stderr as text."""
    return proc.stderr.decode(errors="replace")


def ok(*args, **kw) -> str:
    """Run vmshim, insist it succeeded (the failure names the call and its stderr),
    return its stdout."""
    proc = vmshim(*args, **kw)
    assert proc.returncode == 0, f"vmshim {' '.join(args)}: {err(proc)}"
    return out(proc)


def http_get(url: str, timeout: float = 90.0) -> str:
    """GET *url* (on 127.0.0.1 or in the test's namespace), retrying until the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.read().decode()
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s: {exc}") from None
            time.sleep(0.2)


def blobs_hold(needle: bytes) -> bool:
    """Whether any blob in the image store (plain or gzip) holds *needle*."""
    for blob in (paths.images_dir() / "blobs" / "sha256").iterdir():
        data = blob.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if needle in data:
            return True
    return False


@contextlib.contextmanager
def server_in_own_netns(argv: list[str], veth: str, ip: str, peer_ip: str, **popen):
    """Run *argv* (a server) in a network namespace of its own, joined to this one by the
    veth pair *veth* (here, *peer_ip*/24) – eth0 (there, *ip*/24): a "remote host" inside
    the test run's namespace. Yields the process; kills it and removes the veth after."""
    from tests.waiting import wait_until

    proc = subprocess.Popen(["unshare", "--net", "--", *argv], **popen)
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        wait_until(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino != ours, 10, "unshare --net")
        subprocess.run(
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(proc.pid)], check=True
        )
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(proc.pid),
                "-n",
                "sh",
                "-c",
                (f"ip link set lo up && ip addr add {ip}/24 dev eth0 && ip link set eth0 up"),
            ],
            check=True,
        )
        subprocess.run(["ip", "addr", "add", f"{peer_ip}/24", "dev", veth], check=True)
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["ip", "link", "delete", veth], check=False, capture_output=True)


def vmshim_domains() -> set[str]:
    """Names of the libvirt domains vmshim made (running or not)."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(paths.libvirt_uri())
    try:
        return {d.name() for d in conn.listAllDomains() if d.name().startswith("vmshim-")}
    finally:
        conn.close()


def wait_no_new_domains(before: set[str], timeout: float = 15.0) -> set[str]:
    """Wait until no vmshim domain exists beyond *before*; return the leftovers (empty
    when all went away in time)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = vmshim_domains() - before
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.25)


@pytest.fixture(scope="session", autouse=True)
def base_images():
    """The guest image and busybox exist in the state root (cached: cheap when built)."""
    vmshim("guest", "build", check=True, timeout=600)
    vmshim("image", "bootstrap", "busybox", check=True)


@pytest.fixture
def domains_before():
    """The vmshim domains present before the test; the test checks none is added."""
    return vmshim_domains()


@pytest.fixture(scope="session")
def guest_kernel_release(base_images) -> str:
    from shim.guestimage import current_guest_image

    image = current_guest_image()
    assert image is not None
    return image.kernel_release


@pytest.fixture(scope="session")
def guest_kernel(guest_kernel_release) -> str:
    """The guest kernel's release, checked to differ from the host's: what a container
    prints as ``uname -r`` then proves that it ran in a VM."""
    assert guest_kernel_release and guest_kernel_release != os.uname().release
    return guest_kernel_release


@pytest.fixture(scope="module")
def busybox_archive(workdir):
    """busybox as a docker-archive, in the module's ``workdir`` (the engine test modules
    each define that fixture)."""
    from tests.e2e.oci_engines import image_archive

    return image_archive(workdir / "busybox.tar")
