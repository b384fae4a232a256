"""The container store: records, lookups, names, atomic writes and locks across processes."""

import json
import multiprocessing
import os
import time

import pytest

from guest.spec import ProcessSpec
from shim.containers.store import Container, ContainerStore, monitor_alive, process_start_time
from shim.errors import ContainerNotFound, UsageError


def record(cid: str, name: str) -> Container:
    return Container(
        id=cid,
        name=name,
        image="busybox",
        image_id="sha256:abc",
        isolation="vm",
        process=ProcessSpec(args=["true"]),
        hostname=cid[:12],
        token="t",
        layer_disks=["/l0.sqfs"],
    )


@pytest.fixture
def store(tmp_path):
    return ContainerStore(tmp_path / "containers")


def test_create_load_and_layout(store):
    store.create(record("a" * 64, "web"))
    d = store.dir("a" * 64)
    assert sorted(p.name for p in d.iterdir()) == ["lock", "state.json"]
    assert d.stat().st_mode & 0o777 == 0o711
    assert (d / "state.json").stat().st_mode & 0o777 == 0o600
    loaded = store.load("a" * 64)
    assert (loaded.name, loaded.process, loaded.token) == ("web", ProcessSpec(args=["true"]), "t")
    assert loaded.status.value == "created"
    assert json.loads((d / "state.json").read_text())["state"]["status"] == "created"


def test_find_by_id_name_and_unique_prefix(store):
    store.create(record("abc1" + "0" * 60, "one"))
    store.create(record("abc2" + "0" * 60, "two"))
    assert store.find("one").id.startswith("abc1")
    assert store.find("abc2").name == "two"
    assert store.find("abc1" + "0" * 60).name == "one"
    with pytest.raises(ContainerNotFound, match="ambiguous"):
        store.find("abc")
    with pytest.raises(ContainerNotFound, match="no such container: zzz"):
        store.find("zzz")


def test_names_are_unique(store):
    store.create(record("a" * 64, "web"))
    with pytest.raises(UsageError, match='"web" is already in use'):
        store.create(record("b" * 64, "web"))
    assert store.ids() == ["a" * 64]


def test_rename(store):
    store.create(record("a" * 64, "web"))
    store.create(record("b" * 64, "db"))
    with pytest.raises(UsageError, match="already in use"):
        store.rename("web", "db")
    with pytest.raises(UsageError, match="invalid container name"):
        store.rename("web", "bad name")
    assert store.rename("web", "front").name == "front"
    assert store.find("front").id == "a" * 64


def test_update_and_delete(store):
    store.create(record("a" * 64, "web"))
    store.update("a" * 64, lambda r: setattr(r.state, "exit_code", 7))
    assert store.load("a" * 64).state.exit_code == 7
    store.delete("a" * 64)
    store.delete("a" * 64)  # idempotent
    with pytest.raises(ContainerNotFound):
        store.load("a" * 64)
    with pytest.raises(ContainerNotFound):
        with store.locked("a" * 64):
            pass
    assert list(store.root.iterdir()) == [store.root / ".lock"]


def test_unknown_fields_are_ignored(store):
    """A newer vmshim may add fields; an older one reads what it knows."""
    store.create(record("a" * 64, "web"))
    path = store.dir("a" * 64) / "state.json"
    data = json.loads(path.read_text())
    data["future"] = 1
    data["state"]["future"] = 2
    path.write_text(json.dumps(data))
    assert store.load("a" * 64).name == "web"


def _increment(root, cid, times):
    store = ContainerStore(root)
    for _ in range(times):
        store.update(cid, lambda r: setattr(r.state, "restart_count", r.state.restart_count + 1))


def test_parallel_updates_lose_nothing(store):
    cid = "a" * 64
    store.create(record(cid, "web"))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_increment, args=(store.root, cid, 50)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert store.load(cid).state.restart_count == 200
    assert sorted(p.name for p in store.dir(cid).iterdir()) == ["lock", "state.json"]


def _reader(root, cid, stop_at, bad):
    store = ContainerStore(root)
    while time.monotonic() < stop_at:
        try:
            store.load(cid)
        except Exception as exc:  # noqa: BLE001
            bad.put(repr(exc))
            return


def test_readers_never_see_a_half_written_record(store):
    cid = "a" * 64
    store.create(record(cid, "web"))
    ctx = multiprocessing.get_context("fork")
    bad = ctx.Queue()
    reader = ctx.Process(target=_reader, args=(store.root, cid, time.monotonic() + 2, bad))
    reader.start()
    _increment(store.root, cid, 300)
    reader.join(30)
    assert bad.empty()


def _create_named(root, cid, results):
    try:
        ContainerStore(root).create(record(cid, "same"))
        results.put("ok")
    except UsageError:
        results.put("taken")


def test_parallel_creates_of_one_name_let_exactly_one_win(store):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_create_named, args=(store.root, f"{i:064x}", results)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get() for _ in procs)
    assert outcomes == ["ok"] + ["taken"] * 5
    assert len(store.list()) == 1


def test_monitor_alive_checks_pid_and_start_time(store):
    rec = record("a" * 64, "web")
    assert not monitor_alive(rec)
    rec.state.monitor_pid = os.getpid()
    rec.state.monitor_start = process_start_time(os.getpid())
    assert monitor_alive(rec)
    rec.state.monitor_start += 1  # a reused pid
    assert not monitor_alive(rec)
    assert process_start_time(2**22 + 1) is None
