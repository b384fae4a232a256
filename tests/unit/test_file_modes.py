"""Local users cannot read container or image data: $VMSHIM_ROOT is 0711, every image
file a VM attaches (rw.img, volume.img, layer disks, the config drive) and every blob is
0600, and a root an older vmshim left readable is tightened once. (That VMs still boot
with 0600 files, libvirt's DAC driver chowning them to QEMU's user, is the real test in
tests/e2e/test_hostile_files.py.)"""

from __future__ import annotations

import os
import stat

import pytest

from guest.spec import BootConfig, ProcessSpec
from shim import paths
from shim.containers.vm_placement import make_rw_disk
from shim.images.store import ImageStore
from shim.vm.configdrive import build_config_drive
from shim.volumes.store import VolumeStore


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "root"
    monkeypatch.setenv("VMSHIM_ROOT", str(r))
    monkeypatch.delenv("VMSHIM_RUN", raising=False)
    return r


def test_a_new_root_is_0711_with_unlistable_subdirectories(root):
    paths.secure_root()
    assert mode(root) == 0o711
    for sub in ("containers", "volumes", "layers", "run"):
        assert mode(root / sub) == 0o711


def test_an_older_readable_root_is_tightened_once(root):
    files = {
        "images/blobs/sha256/" + "a" * 64: 0o644,
        "layers/x.sqfs": 0o644,
        "containers/c1/rw.img": 0o644,
        "containers/c1/container.log": 0o640,
        "volumes/v/volume.img": 0o644,
        "run/c1/config.iso": 0o644,
    }
    for rel, m in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"data")
        os.chmod(p, m)
    inner = root / "containers/c1/rw/upper/etc/passwd"  # the container's own file
    inner.parent.mkdir(parents=True)
    inner.write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(inner, 0o644)
    for d in ("", "images", "layers", "containers", "containers/c1", "volumes/v", "run/c1"):
        os.chmod(root / d, 0o755)
    paths.secure_root()
    assert mode(root) == 0o711
    for rel in files:
        assert mode(root / rel) == 0o600, rel
    for d in ("images", "layers", "containers", "containers/c1", "volumes/v", "run/c1"):
        assert mode(root / d) == 0o711, d
    assert mode(inner) == 0o644


def test_a_root_owned_by_someone_else_is_left_alone(root, monkeypatch):
    root.mkdir()
    os.chmod(root, 0o755)
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    paths.secure_root()
    assert mode(root) == 0o755


def test_blobs_and_their_directory_are_private(root):
    store = ImageStore()
    digest = store.put_blob(b"layer bytes")
    assert mode(store.blob_path(digest)) == 0o600
    assert mode(store.blobs_dir) == 0o700


def test_rw_disk_is_0600(tmp_path):
    os.umask(0o022)
    make_rw_disk(tmp_path / "rw.img", size=256 << 20)
    assert mode(tmp_path / "rw.img") == 0o600


def test_volume_image_is_0600(root):
    os.umask(0o022)
    volume = VolumeStore().create("secrets", size=16 << 20)
    assert mode(os.path.join(volume.directory, "volume.img")) == 0o600
    assert mode(os.path.join(volume.directory, "volume.json")) == 0o600


def test_config_drive_is_0600(tmp_path):
    config = BootConfig(
        container_id="x",
        token="agent-token",
        hostname="h",
        process=ProcessSpec(args=["true"], env=["PASSWORD=hunter2"]),
        layer_count=1,
    )
    assert mode(build_config_drive(config, tmp_path / "config.iso")) == 0o600
