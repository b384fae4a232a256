"""Checkpoint/restore without a VM: the lifecycle states, what may be checkpointed, the
sparse copy of the writable disk, and exported archives as untrusted input (every refusal
is one line, and nothing of a refused archive is left in the store or outside it)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from guest.spec import ProcessSpec
from shim.containers import checkpoint as ckpt
from shim.containers import state as lifecycle
from shim.containers.netrequest import NetworkRequest
from shim.containers.state import Status
from shim.containers.store import Container, ContainerStore
from shim.errors import CheckpointError, ContainerStateError
from shim.volumes.specs import MountRequest

CID = "c" * 64


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("VMSHIM_RUN", str(tmp_path / "run"))
    layers = tmp_path / "root" / "layers"
    layers.mkdir(parents=True)
    (layers / "sha256-aa.sqfs").write_bytes(b"layer")
    return tmp_path / "root"


@pytest.fixture
def store(root):
    return ContainerStore(root / "containers")


def record(root, **kw) -> Container:
    values = dict(
        id=CID,
        name="counter",
        image="busybox",
        image_id="sha256:abc",
        isolation="vm",
        process=ProcessSpec(args=["sh"]),
        hostname="counter",
        token="0123456789abcdef0123456789abcdef",
        layer_disks=[str(root / "layers" / "sha256-aa.sqfs")],
        network=NetworkRequest(networks=["none"]),
    )
    values.update(kw)
    rec = Container(**values)
    rec.state.status = Status.CHECKPOINTED.value
    return rec


# ---- the state machine -------------------------------------------------------------------------


def test_checkpoint_and_restore_transitions():
    assert lifecycle.transition("checkpoint", "running") == Status.CHECKPOINTED
    assert lifecycle.transition("checkpoint", "paused") == Status.CHECKPOINTED
    assert lifecycle.transition("restore", "checkpointed") == Status.RUNNING
    assert lifecycle.transition("remove", "checkpointed") == Status.REMOVING
    assert lifecycle.can("restore", "checkpointed") and not lifecycle.can("restore", "exited")
    assert not lifecycle.is_active("checkpointed")
    for op in ("start", "exec", "pause"):
        with pytest.raises(ContainerStateError, match="it is checkpointed"):
            lifecycle.transition(op, "checkpointed", "db")
    with pytest.raises(ContainerStateError, match="must be running or paused"):
        lifecycle.transition("checkpoint", "exited", "db")


# ---- what can be checkpointed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, text",
    [
        (
            {"mounts": [MountRequest(type="bind", source="/srv/data", target="/data")]},
            "bind mount /srv/data -> /data is a virtiofs share",
        ),
        ({"rootfs": "/bundle/rootfs"}, "rootfs /bundle/rootfs is a virtiofs share"),
        ({"isolation": "process"}, "only --isolation vm"),
        ({"network": NetworkRequest(networks=["bridge"])}, "on network bridge"),
        ({"auto_remove": True}, "--rm"),
    ],
)
def test_what_cannot_be_checkpointed_is_named(root, change, text):
    with pytest.raises(CheckpointError) as info:
        ckpt.check_checkpointable(record(root, **change))
    assert text in str(info.value) and "\n" not in str(info.value)


def test_volumes_tmpfs_and_no_network_can_be_checkpointed(root):
    ckpt.check_checkpointable(
        record(
            root,
            mounts=[
                MountRequest(type="volume", source="data", target="/data"),
                MountRequest(type="tmpfs", source="", target="/run"),
            ],
            network=None,
        )
    )


# ---- the writable disk ---------------------------------------------------------------------------


def sparse_file(path, size=64 << 20, chunks=((4096, b"head"), (40 << 20, b"middle" * 1000))):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)


def test_copy_sparse_keeps_data_and_holes(tmp_path):
    src, dst = tmp_path / "rw.img", tmp_path / "copy.img"
    sparse_file(src)
    ckpt.copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
    size, extents = ckpt.data_extents(dst)
    assert size == 64 << 20 and 1 <= len(extents) <= 4


# ---- export and import -----------------------------------------------------------------------------


def make_checkpoint(store, root, **meta_change):
    rec = record(root, mounts=[MountRequest(type="volume", source="data", target="/data")])
    store.create(rec)
    d = ckpt.checkpoint_dir(store, CID, "checkpoint")
    d.mkdir(parents=True)
    (d / ckpt.MEMORY_FILE).write_bytes(b"QEMU-save-image" * 100)
    sparse_file(d / ckpt.RW_FILE)
    meta = {
        "version": 1,
        "name": "checkpoint",
        "container_id": CID,
        "created": "x",
        "memory_mib": 256,
        "rw": True,
        "guest_image": "g1",
        "kernel_release": "6.1",
        "accel": "tcg",
        **meta_change,
    }
    (d / ckpt.META_FILE).write_text(json.dumps(meta))
    (d / ckpt.RECORD_FILE).write_text(json.dumps(ckpt._portable(rec)))
    return d


def test_export_import_round_trip(store, root, tmp_path):
    d = make_checkpoint(store, root)
    archive = tmp_path / "ckpt.tar"
    ckpt.export_checkpoint(store, CID, "checkpoint", archive)
    assert archive.stat().st_size < 1 << 20  # only the disk's data, not its 64 MiB
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    rw_before = (d / ckpt.RW_FILE).read_bytes()
    store.delete(CID)
    imported = ckpt.import_checkpoint(store, archive)
    assert imported.id == CID and imported.status == Status.CHECKPOINTED
    d2 = ckpt.checkpoint_dir(store, CID, "checkpoint")
    assert (d2 / ckpt.RW_FILE).read_bytes() == rw_before
    assert (d2 / ckpt.MEMORY_FILE).read_bytes() == b"QEMU-save-image" * 100
    assert json.loads((d2 / ckpt.META_FILE).read_text())["guest_image"] == "g1"
    assert store.load(CID).state.monitor_pid == 0


def test_import_with_another_name(store, root, tmp_path):
    make_checkpoint(store, root)
    archive = tmp_path / "ckpt.tar"
    ckpt.export_checkpoint(store, CID, "checkpoint", archive)
    with pytest.raises(CheckpointError, match="exists here already"):
        ckpt.import_checkpoint(store, archive, new_name="other")
    store.delete(CID)
    assert ckpt.import_checkpoint(store, archive, new_name="other").name == "other"


def tar_of(members) -> bytes:
    """members: (name, bytes, kind) with kind 'file', 'symlink', 'dir', 'hardlink'."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "dir": tarfile.DIRTYPE, "hardlink": tarfile.LNKTYPE}[kind]
                info.linkname = "/etc/passwd"
                tar.addfile(info)
    return buf.getvalue()


def good_members(root, *, meta=None, rec=None, rw_data=b"x" * 4096):
    meta = (
        meta
        if meta is not None
        else {
            "version": 1,
            "name": "checkpoint",
            "container_id": CID,
            "guest_image": "g1",
            "kernel_release": "6.1",
            "accel": "tcg",
            "memory_mib": 256,
            "rw": {"size": 1 << 20, "extents": [[0, 4096]]},
        }
    )
    rec = rec if rec is not None else ckpt._portable(record(root))
    return [
        (ckpt.META_FILE, json.dumps(meta).encode(), "file"),
        (ckpt.RECORD_FILE, json.dumps(rec).encode(), "file"),
        (ckpt.MEMORY_FILE, b"memory", "file"),
        (ckpt.RW_DATA, rw_data, "file"),
    ]


def assert_refused(store, tmp_path, data: bytes, text: str):
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        ckpt.import_checkpoint(store, archive)
    message = str(info.value)
    assert text in message and "\n" not in message, message
    assert store.list() == []
    assert [p.name for p in store.root.iterdir()] == [] if store.root.exists() else True
    assert not (tmp_path / "escaped").exists()


def test_the_good_members_import(store, root, tmp_path):
    archive = tmp_path / "ok.tar"
    archive.write_bytes(tar_of(good_members(root)))
    assert ckpt.import_checkpoint(store, archive).id == CID


def _meta(**change):
    meta = {
        "version": 1,
        "name": "checkpoint",
        "container_id": CID,
        "guest_image": "g1",
        "kernel_release": "6.1",
        "accel": "tcg",
        "memory_mib": 256,
        "rw": {"size": 1 << 20, "extents": [[0, 4096]]},
    }
    meta.update(change)
    return meta


@pytest.mark.parametrize(
    "case, text",
    [
        ("traversal", "unexpected entry '../escaped'"),
        ("absolute", "unexpected entry '/tmp/escaped'"),
        ("symlink", "is not a regular file"),
        ("hardlink", "is not a regular file"),
        ("duplicate", "appears twice"),
        ("too_many", "unexpected entry"),
        ("big_json", "larger than"),
        ("no_memory", "has no memory.img"),
        ("overlap", "extents are malformed"),
        ("past_end", "extents are malformed"),
        ("huge_disk", "size is out of bounds"),
        ("data_mismatch", "does not match its extents"),
        ("rw_first", "comes before"),
        ("version", "unknown checkpoint format"),
        ("bind_mount", "a mount other than a volume or tmpfs"),
        ("foreign_layer", "is not in this host's layer store"),
        ("layer_escape", "is not in this host's layer store"),
        ("id_mismatch", "container id is malformed"),
        ("bad_name", "invalid container name"),
        ("network", "on network bridge"),
        ("bad_token", "agent token is malformed"),
        ("record_not_object", "is not an object"),
        ("bad_volume", "invalid volume name"),
    ],
)
def test_hostile_archives_are_refused(store, root, tmp_path, case, text):
    m = good_members(root)
    rec = ckpt._portable(record(root))
    if case == "traversal":
        m.append(("../escaped", b"x", "file"))
    elif case == "absolute":
        m.insert(0, ("/tmp/escaped", b"x", "file"))
    elif case == "symlink":
        m[2] = (ckpt.MEMORY_FILE, b"", "symlink")
    elif case == "hardlink":
        m[2] = (ckpt.MEMORY_FILE, b"", "hardlink")
    elif case == "duplicate":
        m.insert(2, m[1])
    elif case == "too_many":
        m += [(f"extra{i}", b"", "file") for i in range(10)]
    elif case == "big_json":
        m[1] = (ckpt.RECORD_FILE, b" " * (ckpt.MAX_JSON + 1), "file")
    elif case == "no_memory":
        del m[2]
    elif case == "overlap":
        m = good_members(root, meta=_meta(rw={"size": 1 << 20, "extents": [[0, 4096], [2048, 4096]]}))
    elif case == "past_end":
        m = good_members(root, meta=_meta(rw={"size": 8192, "extents": [[4096, 8192]]}))
    elif case == "huge_disk":
        m = good_members(root, meta=_meta(rw={"size": 1 << 60, "extents": []}))
    elif case == "data_mismatch":
        m = good_members(root, rw_data=b"x" * 100)
    elif case == "rw_first":
        m = [m[3]] + m[:3]
    elif case == "version":
        m = good_members(root, meta=_meta(version=99))
    else:
        if case == "bind_mount":
            rec["mounts"] = [{"type": "bind", "source": "/etc", "target": "/etc"}]
        elif case == "foreign_layer":
            rec["layer_disks"] = ["/etc/passwd"]
        elif case == "layer_escape":
            rec["layer_disks"] = [str(root / "layers" / ".." / "containers")]
        elif case == "id_mismatch":
            rec["id"] = "d" * 64
        elif case == "bad_name":
            rec["name"] = "../../x"
        elif case == "network":
            rec["network"] = {"networks": ["bridge"]}
        elif case == "bad_token":
            rec["token"] = "x"
        elif case == "record_not_object":
            rec = ["not", "a", "record"]
        elif case == "bad_volume":
            rec["mounts"] = [{"type": "volume", "source": "../../etc", "target": "/d"}]
        m = good_members(root, rec=rec)
    assert_refused(store, tmp_path, tar_of(m), text)


def test_truncated_garbage_and_missing_archives_are_refused(store, root, tmp_path):
    whole = tar_of(good_members(root, rw_data=b"y" * 4096))
    assert_refused(store, tmp_path, whole[:1500], "cannot import")
    assert_refused(store, tmp_path, os.urandom(4096), "cannot import")
    assert_refused(store, tmp_path, b"", "cannot import")
    with pytest.raises(CheckpointError, match="No such file"):
        ckpt.import_checkpoint(store, tmp_path / "missing.tar")
    assert store.list() == []


def test_restore_refuses_another_guest_image(store, root, tmp_path, monkeypatch):
    make_checkpoint(store, root, guest_image="old-guest", kernel_release="5.10")
    monkeypatch.setattr(
        ckpt, "guest_identity", lambda: {"guest_image": "new-guest", "kernel_release": "6.1", "accel": "tcg"}
    )
    with pytest.raises(CheckpointError, match="made with guest image old-guest .kernel 5.10."):
        ckpt.restore("counter", store=store)
    assert store.load(CID).status == Status.CHECKPOINTED  # its own record stays
    archive = tmp_path / "a.tar"
    ckpt.export_checkpoint(store, CID, "checkpoint", archive)
    store.delete(CID)
    with pytest.raises(CheckpointError, match="made with guest image old-guest"):
        ckpt.restore(import_file=str(archive), store=store)
    assert store.list() == []  # an imported container that cannot come back is not kept


def test_restore_without_a_checkpoint(store, root):
    store.create(record(root))
    with pytest.raises(CheckpointError, match="has no checkpoint other"):
        ckpt.restore("counter", name="other", store=store)
    with pytest.raises(Exception, match="invalid checkpoint name"):
        ckpt.restore("counter", name="../x", store=store)


def test_migrate_refuses_bad_uris_and_shares_before_asking_the_monitor(store, root):
    rec = record(root, mounts=[MountRequest(type="bind", source="/srv", target="/srv")])
    rec.state.status = Status.RUNNING.value
    store.create(rec)
    with pytest.raises(
        CheckpointError, match="cannot migrate container counter: its bind mount /srv -> /srv is a virtiofs share"
    ):
        ckpt.migrate("counter", "qemu+tcp://10.0.0.2/system", store=store)
    store.update(CID, lambda r: setattr(r, "mounts", []))
    with pytest.raises(Exception, match="invalid libvirt URI"):
        ckpt.migrate("counter", "http://10.0.0.2/", store=store)


def test_a_migrated_vm_has_an_agent_socket_of_its_own(tmp_path):
    from shim.containers.vm_placement import agent_socket_for

    assert agent_socket_for(tmp_path) == tmp_path / "agent.sock"
    a = agent_socket_for(tmp_path, "qemu+tcp://a/system")
    assert a != agent_socket_for(tmp_path, "qemu+tcp://b/system") and a.parent == tmp_path
    assert a == agent_socket_for(tmp_path, "qemu+tcp://a/system")
