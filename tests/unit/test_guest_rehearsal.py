"""guest.init.rehearse: a pooled VM runs a throwaway container while it waits (issue 15),
and leaves nothing of it: its process reaped, its cgroup removed, its mounts detached and
its directory gone, also when the start fails. Fakes stand in for the mounts, the cgroup
and the container; tests/e2e/test_pool.py runs it for real in every pooled VM."""

from __future__ import annotations

import pytest

from guest import init
from guest.runtime import cgroups, container, process, rootfs, syscalls


class FakeCgroup:
    def __init__(self, log):
        self.log = log

    def remove(self):
        self.log.append(("cgroup removed",))


class FakeSpawned:
    def __init__(self, log):
        self.pid, self.log = 4242, log

    def close(self):
        self.log.append(("fds closed",))


@pytest.fixture
def rehearsal(monkeypatch, tmp_path):
    log: list[tuple] = []
    monkeypatch.setattr(init, "REHEARSAL_DIR", str(tmp_path / "rehearsal"))
    monkeypatch.setattr(init, "LAYERS_DIR", "/run/vmshim/layers")
    monkeypatch.setattr(init, "PREMOUNTED", {})
    monkeypatch.setattr(syscalls, "mount", lambda *a: log.append(("mount", a[1], a[2])))
    monkeypatch.setattr(syscalls, "umount2", lambda target, flags: log.append(("umount", target, flags)))
    monkeypatch.setattr(rootfs, "mount_overlay", lambda lower, up, work, target: log.append(("overlay", lower, target)))
    monkeypatch.setattr(cgroups.Cgroup, "create", classmethod(lambda cls, name, limits=None: FakeCgroup(log)))
    monkeypatch.setattr(process, "wait", lambda pid: log.append(("reaped", pid)) or 0)

    class FakeContainer:
        fail = None

        def __init__(self, config, root, *, files_dir, cgroup, namespaces):
            log.append(("container", config.container_id, config.process.args, namespaces))

        def start(self, proc, *, stdin):
            if FakeContainer.fail is not None:
                raise FakeContainer.fail
            log.append(("started", stdin))
            return FakeSpawned(log)

    monkeypatch.setattr(container, "Container", FakeContainer)
    return log, FakeContainer, tmp_path / "rehearsal"


def test_a_rehearsal_runs_true_in_a_throwaway_container_and_takes_it_all_down(rehearsal):
    log, _, directory = rehearsal
    init.rehearse()
    overlay = next(entry for entry in log if entry[0] == "overlay")
    assert overlay[1] == ["/"], "without premounted layers the guest's own root is the lower layer"
    created = next(entry for entry in log if entry[0] == "container")
    assert created[1] == init.REHEARSAL_ID and created[2] == ["/bin/true"]
    assert "net" not in created[3]
    assert ("reaped", 4242) in log and ("fds closed",) in log
    assert ("cgroup removed",) in log
    unmounted = [entry[1] for entry in log if entry[0] == "umount"]
    assert unmounted == [f"{directory}/root", f"{directory}/rw"]
    assert log.index(("cgroup removed",)) > log.index(("reaped", 4242))
    assert not directory.exists()


def test_the_rehearsal_stacks_the_premounted_layers_topmost_first(rehearsal, monkeypatch):
    log, _, _ = rehearsal
    monkeypatch.setattr(init, "PREMOUNTED", {0: "/dev/vdb", 1: "/dev/vdc"})
    init.rehearse()
    overlay = next(entry for entry in log if entry[0] == "overlay")
    assert overlay[1] == ["/run/vmshim/layers/1", "/run/vmshim/layers/0"]


@pytest.mark.parametrize("failure", [process.SpawnError("no /bin/true", 127), RuntimeError("boom")])
def test_a_failed_rehearsal_still_leaves_nothing_and_never_raises(rehearsal, failure):
    log, fake, directory = rehearsal
    fake.fail = failure
    init.rehearse()  # only reported: the container does all of it again
    assert ("cgroup removed",) in log
    assert [entry[1] for entry in log if entry[0] == "umount"] == [f"{directory}/root", f"{directory}/rw"]
    assert not directory.exists()
    assert not any(entry[0] == "started" for entry in log)
