"""-v/--mount/--tmpfs/--volumes-from parsing, the named-volume store (mkfs on a sparse
file, leases, repair, removal) and how a VM gets its mounts (no VM booted here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guest.runtime import mounts as runtime_mounts
from shim.errors import UsageError, VolumeError, VolumeInUse, VolumeNotFound
from shim.volumes import specs
from shim.containers.mounts import Attachments, prepare_mounts, remove_anonymous, resolve_volumes
from shim.volumes.specs import MountRequest
from shim.volumes.store import VolumeStore, needs_recovery, user_of_image

needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")


# ---- flags ---------------------------------------------------------------------------------


def test_dash_v_forms():
    assert specs.parse_volume("/data") == MountRequest(type="volume", target="/data", anonymous=True)
    assert specs.parse_volume("/srv/x/:/data:ro") == MountRequest(
        type="bind", source="/srv/x", target="/data", readonly=True
    )
    assert specs.parse_volume("cache:/var/cache:nocopy,rw,z") == MountRequest(
        type="volume", source="cache", target="/var/cache", nocopy=True
    )
    for bad in ("a:b:c:d", "x:relative", "vol:/d:bogus", "./here:/d", "v:/"):
        with pytest.raises(UsageError):
            specs.parse_volume(bad)


def test_mount_forms(tmp_path):
    assert specs.parse_mount(f"type=bind,src={tmp_path},dst=/d,readonly") == MountRequest(
        type="bind", source=str(tmp_path), target="/d", readonly=True
    )
    assert specs.parse_mount("type=volume,source=v1,target=/d,volume-nocopy,volume-opt=size=1g") == MountRequest(
        type="volume", source="v1", target="/d", nocopy=True, volume_size=1 << 30
    )
    assert specs.parse_mount("target=/d").anonymous  # type defaults to volume
    assert specs.parse_mount("type=tmpfs,target=/t,tmpfs-size=64m,tmpfs-mode=1770") == MountRequest(
        type="tmpfs", target="/t", options="size=67108864,mode=1770"
    )
    for bad in (
        "type=nfs,target=/d",
        "type=bind,source=rel,target=/d",
        f"type=bind,source={tmp_path}/missing,target=/d",
        "type=volume",
        "type=tmpfs,source=x,target=/t",
        "type=volume,target=/d,color=red",
        "type=tmpfs,target=/t,tmpfs-mode=rwx",
        "type=bind,source=/,target=/d,ro=maybe",
    ):
        with pytest.raises(UsageError):
            specs.parse_mount(bad)


def test_tmpfs_forms():
    assert specs.parse_tmpfs("/run") == MountRequest(type="tmpfs", target="/run")
    assert specs.parse_tmpfs("/run:size=64m,exec,mode=1777,ro") == MountRequest(
        type="tmpfs", target="/run", options="size=67108864,exec,mode=1777", readonly=True
    )
    with pytest.raises(UsageError):
        specs.parse_tmpfs("/run:color=red")
    # The runtime turns the options into flags and data.
    flags, data = runtime_mounts.tmpfs_options("size=67108864,exec,mode=1777")
    assert not flags & runtime_mounts.MS_NOEXEC and flags & runtime_mounts.MS_NOSUID
    assert data == "size=67108864,mode=1777"
    with pytest.raises(runtime_mounts.MountError):
        runtime_mounts.tmpfs_options("uid=$(x)")


def test_duplicate_destinations_are_refused():
    with pytest.raises(UsageError, match="duplicate mount point: /d"):
        specs.parse_all(volumes=["aa:/d"], tmpfs=["/d/"])


def test_volumes_from_copies_binds_and_volumes():
    stored = [
        MountRequest(type="volume", source="v", target="/v", anonymous=True),
        MountRequest(type="bind", source="/h", target="/b"),
        MountRequest(type="tmpfs", target="/t"),
    ]
    copied = specs.volumes_from([stored], ["other:ro"])
    assert [(m.type, m.target, m.readonly, m.anonymous) for m in copied] == [
        ("volume", "/v", True, False),
        ("bind", "/b", True, False),
    ]
    with pytest.raises(UsageError):
        specs.volumes_from([stored], ["other:rx"])


def test_binds_in_a_vm_must_be_directories(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    specs.prepare_binds([MountRequest(type="bind", source=str(file), target="/f")], "process")
    with pytest.raises(UsageError, match="only directories"):
        specs.prepare_binds([MountRequest(type="bind", source=str(file), target="/f")], "vm")
    made = tmp_path / "made" / "by" / "v"
    specs.prepare_binds([MountRequest(type="bind", source=str(made), target="/m")], "vm")
    assert made.is_dir()  # docker's -v makes a missing host directory


# ---- the store -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    return VolumeStore(tmp_path / "volumes")


@needs_mkfs
def test_create_list_inspect_remove(store):
    volume = store.create("data1", size=64 << 20, labels={"a": "b"})
    assert volume.image.stat().st_size == 64 << 20
    assert volume.image.stat().st_blocks * 512 < 8 << 20  # sparse
    assert not needs_recovery(volume.image) and user_of_image(volume.image) == ""
    assert store.create("data1").created == volume.created  # idempotent, like docker
    with pytest.raises(VolumeError, match="another size"):
        store.create("data1", size=32 << 20, options={"size": "32m"})
    anonymous = store.create(None, size=32 << 20, anonymous=True)
    assert len(anonymous.name) == 64
    assert [v.name for v in store.list()] == sorted(["data1", anonymous.name])
    info = store.get("data1").inspect(["web"])
    assert info["Name"] == "data1" and info["Labels"] == {"a": "b"}
    assert info["Status"]["InUse"] == ["web"] and info["Driver"] == "local"
    with pytest.raises(VolumeInUse, match="web"):
        store.remove("data1", referenced_by=["web"])
    store.remove("data1", referenced_by=["web"], force=True)
    with pytest.raises(VolumeNotFound):
        store.get("data1")
    assert store.prune(referenced=set()) == [anonymous.name]
    assert store.list() == []
    assert sorted(os.listdir(store.root)) == [".lock"]


@needs_mkfs
def test_the_filesystem_has_a_data_directory(store, tmp_path):
    volume = store.create("fs", size=32 << 20)
    out = subprocess.run(["debugfs", "-R", "ls -l /", str(volume.image)], capture_output=True, text=True).stdout
    assert " data" in out and "lost+found" in out


def test_names(store):
    for bad in ("a", "-x", "has space", "x/y", "é", "a" * 200):
        with pytest.raises(UsageError):
            store.create(bad)


@needs_mkfs
def test_leases(store):
    store.create("vv", size=32 << 20)
    rw = store.acquire("vv", readonly=False)
    with pytest.raises(VolumeInUse, match="read-write by one container"):
        store.acquire("vv", readonly=False, timeout=0.2)
    with pytest.raises(VolumeInUse):
        store.acquire("vv", readonly=True, timeout=0.2)
    with pytest.raises(VolumeInUse):
        store.remove("vv", wait=0.2)
    rw.release()
    ro1 = store.acquire("vv", readonly=True)
    ro2 = store.acquire("vv", readonly=True)
    with pytest.raises(VolumeInUse):
        store.acquire("vv", readonly=False, timeout=0.2)
    ro1.release()
    ro2.release()
    store.acquire("vv", readonly=False).release()
    with pytest.raises(VolumeNotFound):
        store.acquire("missing", readonly=True)


@needs_mkfs
def test_an_ofd_lock_like_qemus_marks_the_image_in_use(store):
    import fcntl
    import struct

    volume = store.create("qq", size=32 << 20)
    fd = os.open(volume.image, os.O_RDWR)
    try:
        # QEMU takes OFD read locks on byte ranges of the images it opened.
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hh4xqqi4x", fcntl.F_RDLCK, 0, 100, 1, 0))
        assert "VM" in user_of_image(volume.image)
        with pytest.raises(VolumeInUse, match="VM"):
            store.acquire("qq", readonly=False, timeout=0.2)
    finally:
        os.close(fd)
    store.acquire("qq", readonly=False).release()


@needs_mkfs
def test_an_unclean_volume_is_repaired_before_use(store):
    volume = store.create("dirty", size=32 << 20)
    # Mark it "not cleanly unmounted", the way a killed VM leaves it.
    subprocess.run(["debugfs", "-w", "-R", "ssv state 0", str(volume.image)], check=True, capture_output=True)
    assert needs_recovery(volume.image)
    store.acquire("dirty", readonly=True).release()
    assert not needs_recovery(volume.image)


def test_not_ext4_is_reported(tmp_path):
    bogus = tmp_path / "x.img"
    bogus.write_bytes(b"\0" * 4096)
    with pytest.raises(VolumeError, match="no ext4"):
        needs_recovery(bogus)


# ---- a VM's mounts -----------------------------------------------------------------------


@needs_mkfs
def test_for_vm_describes_disks_shares_and_specs(store, tmp_path):
    store.create("v1", size=32 << 20)
    requests = [
        MountRequest(type="bind", source=str(tmp_path), target="/b"),
        MountRequest(type="volume", source="v1", target="/a"),
        MountRequest(type="volume", source="v1", target="/b2", readonly=True),
        MountRequest(type="tmpfs", target="/t", options="size=1024"),
    ]
    att = Attachments(requests, store=store)
    mount_specs, disks, shares = att.for_vm(5, lambda i: f"vd{chr(97 + i)}")
    try:
        assert [(s.type, s.source, s.target) for s in mount_specs] == [
            ("bind", "vmshim-b0", "/b"),
            ("volume", "vmshim-v0", "/a"),
            ("volume", "vmshim-v0", "/b2"),
            ("tmpfs", "", "/t"),
        ]
        assert mount_specs[2].readonly and mount_specs[1].copy_up
        # One disk per volume, read-write because one of its mounts is.
        assert [(d.serial, d.target, d.readonly) for d in disks] == [("vmshim-v0", "vdf", False)]
        assert shares[0].source_dir == str(tmp_path) and shares[0].tag == "vmshim-b0"
        with pytest.raises(VolumeInUse):
            store.acquire("v1", readonly=True, timeout=0.1)
    finally:
        att.release()
    store.acquire("v1", readonly=False).release()


@needs_mkfs
def test_a_volume_a_vm_wrote_is_refused_in_process_isolation(store, tmp_path):
    """Process isolation never mounts a file system a guest wrote in the host kernel."""
    assert store.create("clean", size=32 << 20).written_by_vm is False
    store.create("used", size=32 << 20)
    ro = Attachments([MountRequest(type="volume", source="used", target="/a", readonly=True)], store=store)
    ro.for_vm(1, lambda i: "vdb")
    ro.release()
    assert store.get("used").written_by_vm is False  # a read-only disk: the guest wrote nothing
    rw = Attachments([MountRequest(type="volume", source="used", target="/a")], store=store)
    rw.for_vm(1, lambda i: "vdb")
    rw.release()
    assert store.get("used").written_by_vm is True
    for readonly in (False, True):
        att = Attachments([MountRequest(type="volume", source="used", target="/a", readonly=readonly)], store=store)
        with pytest.raises(VolumeError) as info:
            att.for_process(tmp_path / "stage")
        assert "was written by a VM" in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / "stage").exists() or not any((tmp_path / "stage").iterdir())
    store.acquire("used", readonly=False).release()  # the refusal kept no lease


@needs_mkfs
def test_a_volume_record_from_before_the_flag_counts_as_vm_written(store, tmp_path):
    import json

    volume = store.create("old", size=32 << 20)
    record = Path(volume.directory) / "volume.json"
    data = json.loads(record.read_text())
    del data["written_by_vm"]
    record.write_text(json.dumps(data))
    att = Attachments([MountRequest(type="volume", source="old", target="/a")], store=store)
    with pytest.raises(VolumeError, match="was written by a VM"):
        att.for_process(tmp_path / "stage")


def test_domain_with_shares_and_pinned_vcpus():
    from shim.vm.domain import Domain, Filesystem, KernelBoot

    dom = Domain(
        name="vmshim-x",
        uuid="11111111-2222-3333-4444-555555555555",
        memory_mib=160,
        vcpus=2,
        domain_type="qemu",
        cpuset="0-1",
        boot=KernelBoot(kernel="/k", initrd="/i"),
        filesystems=[Filesystem(source_dir="/srv", tag="vmshim-b0")],
    )
    xml = dom.to_xml()
    assert '<vcpu placement="static" cpuset="0-1">2</vcpu>' in xml
    assert '<source type="memfd" />' in xml and "virtiofs" in xml
    with pytest.raises(ValueError):
        Domain(
            name="vmshim-x",
            uuid="11111111-2222-3333-4444-555555555555",
            memory_mib=1,
            vcpus=1,
            domain_type="qemu",
            cpuset="0;1",
            boot=KernelBoot(kernel="/k", initrd="/i"),
        )


@needs_mkfs
def test_prepare_mounts_resolves_volumes_and_volumes_from(store, tmp_path):
    class Records:
        def find(self, ref):
            assert ref == "web"

            class R:
                mounts = [
                    MountRequest(type="volume", source="shared", target="/s"),
                    MountRequest(type="bind", source=str(tmp_path), target="/h"),
                ]

            return R()

    requests = [
        MountRequest(type="volume", target="/anon", anonymous=True),
        MountRequest(type="volume", source="named", target="/n"),
        MountRequest(type="tmpfs", target="/h"),
    ]  # wins over the copied /h
    merged = prepare_mounts(requests, ["web"], "vm", containers=Records(), store=store)
    assert [m.target for m in merged] == ["/s", "/anon", "/n", "/h"]
    assert merged[3].type == "tmpfs"
    assert store.exists("named") and len(merged[1].source) == 64
    store.create("shared", size=32 << 20)
    remove_anonymous(merged, store)
    assert not store.exists(merged[1].source) and store.exists("named")


@needs_mkfs
def test_resolve_volumes_makes_missing_named_volumes(store):
    requests = [MountRequest(type="volume", source="auto", target="/a", volume_size=32 << 20)]
    resolve_volumes(requests, store)
    assert store.get("auto").size == 32 << 20


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@needs_root
@pytest.mark.parametrize("readonly", [False, True])
def test_a_single_file_bind_shares_only_that_file(store, tmp_path, readonly):
    """Hostile input: docker binds /var/lib/docker/containers/<id>/hosts as a single file;
    its directory also holds config.v2.json (the environment's secrets). The share the
    guest gets must hold that file alone, never its siblings."""
    container_dir = tmp_path / "containers" / "c0ffee"
    container_dir.mkdir(parents=True)
    (container_dir / "hosts").write_text("127.0.0.1 localhost\n")
    (container_dir / "config.v2.json").write_text('{"Env": ["PASSWORD=hunter2"]}')
    att = Attachments(
        [MountRequest(type="bind", source=str(container_dir / "hosts"), target="/etc/hosts", readonly=readonly)],
        store=store,
    )
    specs, _disks, shares = att.for_vm(1, lambda i: "vdb", share_dir=tmp_path / "shares")
    try:
        shared = Path(shares[0].source_dir)
        assert container_dir not in (shared, *shared.parents)
        assert os.listdir(shared) == [specs[0].subpath]  # no config.v2.json next to it
        assert (shared / specs[0].subpath).read_text() == "127.0.0.1 localhost\n"
        with pytest.raises(OSError):  # the guest cannot add entries beside it
            (shared / "config.v2.json").write_text("x")
        if readonly:
            with pytest.raises(OSError):
                (shared / specs[0].subpath).write_text("changed\n")
        else:  # writes reach the engine's file, as with runc
            (shared / specs[0].subpath).write_text("10.0.0.2 web\n")
            assert (container_dir / "hosts").read_text() == "10.0.0.2 web\n"
    finally:
        att.release()
    assert not (tmp_path / "shares" / "0").exists()
    assert (container_dir / "config.v2.json").exists()


def test_a_single_file_bind_without_a_private_directory_is_refused(store, tmp_path):
    (tmp_path / "hosts").write_text("")
    att = Attachments([MountRequest(type="bind", source=str(tmp_path / "hosts"), target="/etc/hosts")], store=store)
    with pytest.raises(VolumeError, match="single file"):
        att.for_vm(1, lambda i: "vdb")
