"""Images that went through a real registry (Debian's docker-registry on 127.0.0.1) run in
microVMs: busybox pushed, removed and pulled back; a multi-layer image whose upper layer
deletes a file, pulled into an emptied store, runs without that file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from shim.images.store import ImageStore
from tests.waiting import wait_until
from tests.e2e.conftest import vmshim
from tests.tarfiles import write_tar
from tests.integration.test_registry_interop import registry  # noqa: F401  (fixture)

vm = pytest.mark.vm


def out(proc) -> str:
    return proc.stdout.decode(errors="replace")


def _layer(path: Path, files: dict[str, bytes | None]) -> Path:
    """A layer tar: name → bytes (a file) or None (a directory)."""
    return write_tar(path, files.items())


@pytest.fixture
def restore_busybox():
    yield
    vmshim("image", "bootstrap", "busybox", check=True)


@contextlib.contextmanager
def empty_root():
    """Switch VMSHIM_ROOT to a fresh state root sharing only the built guest image.

    Not under pytest's tmp_path: QEMU runs as libvirt-qemu and must be able to reach the
    layer disks, so every directory above them has to be searchable."""
    from shim import paths

    outer = paths.root()
    root = Path(tempfile.mkdtemp(prefix="vmshim-empty-", dir=outer.parent))
    os.chmod(root, 0o755)
    for shared in ("guest", "cache"):
        (root / shared).symlink_to(outer / shared)
    os.environ["VMSHIM_ROOT"] = str(root)
    try:
        yield root
    finally:
        os.environ["VMSHIM_ROOT"] = str(outer)
        # Teardowns finish in the background (libvirt forgets a VM 1-2 s late, then the
        # reaper frees its network endpoint in this root): removing it first leaks a
        # networks/ directory that the reaper writes again.
        wait_until(lambda: not _processes_using(root), 60, "the root's background teardowns")
        shutil.rmtree(root, ignore_errors=True)


def _processes_using(root: Path) -> list[int]:
    """Pids of processes whose environment points VMSHIM_ROOT at *root*."""
    wanted = f"VMSHIM_ROOT={root}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:
            continue
    return out


@vm
def test_push_rmi_pull_and_run_busybox(registry, restore_busybox):  # noqa: F811
    host, _ = registry
    ref = f"{host}/library/busybox:latest"
    vmshim("tag", "busybox", ref, check=True)
    vmshim("push", "-q", ref, check=True)
    digest = ImageStore().resolve(ref).manifest_digest
    vmshim("rmi", "busybox", ref, check=True)
    assert vmshim("run", "--rm", "--pull", "never", ref, "true").returncode == 125  # gone locally

    vmshim("pull", "-q", ref, check=True)
    proc = vmshim("run", "--rm", ref, "echo", "pulled by tag")
    assert proc.returncode == 0 and out(proc) == "pulled by tag\n", proc.stderr
    vmshim("rmi", ref, check=True)
    by_digest = f"{host}/library/busybox@{digest}"
    vmshim("pull", "-q", by_digest, check=True)
    proc = vmshim("run", "--rm", by_digest, "echo", "pulled by digest")
    assert proc.returncode == 0 and out(proc) == "pulled by digest\n", proc.stderr
    vmshim("rmi", by_digest, check=True)


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=vm), "process"])
def test_file_deleted_in_upper_layer_is_absent_after_pull(
    registry,
    tmp_path,  # noqa: F811
    isolation,
):
    host, _ = registry
    store = ImageStore()
    busybox = store.resolve("busybox")
    base = tmp_path / "base.tar"
    shutil.copyfile(store.blob_path(busybox.layers[0].digest), base)
    middle = _layer(tmp_path / "middle.tar", {"etc": None, "etc/keep": b"kept\n", "etc/gone": b"deleted later\n"})
    upper = _layer(tmp_path / "upper.tar", {"etc": None, "etc/.wh.gone": b""})
    ref = f"{host}/test/deleted:1"
    store.import_image([base, middle, upper], busybox.config, ref)
    vmshim("push", "-q", ref, check=True)
    vmshim("rmi", ref, check=True)
    with empty_root():
        assert ImageStore().list_images() == []
        vmshim("pull", "-q", ref, check=True)
        proc = vmshim(
            "run",
            "--rm",
            "--isolation",
            isolation,
            ref,
            "sh",
            "-c",
            "cat /etc/keep; test -e /etc/gone && echo PRESENT || echo absent",
        )
        assert proc.returncode == 0, proc.stderr
        assert out(proc).splitlines() == ["kept", "absent"]
