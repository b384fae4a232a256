"""guest.init.rehearse: a pooled VM runs a throwaway container while it waits (issue 15),
and leaves nothing of it: its process reaped, its cgroup removed, its mounts detached and
its directory gone, also when the start fails. Fakes stand in for the mounts, the cgroup
and the container; tests/e2e/test_pool.py runs it for real in every pooled VM."""

from __future__ import annotations

import os
import signal
import time

import pytest

from guest import init
from guest.runtime import cgroups, container, process, rootfs, syscalls


class FakeCgroup:
    def __init__(self, log):
        self.log = log

    def remove(self):
        self.log.append(("cgroup removed",))


class FakeSpawned:
    """A real child process stands in for the container's (the rehearsal waits on a pidfd):
    one that exits at once, or one that never ends on its own (only a signal ends it)."""

    def __init__(self, log, ends: bool = True):
        self.log = log
        self.pid = os.fork()
        if self.pid == 0:
            while not ends:
                signal.pause()
            os._exit(0)

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

    def reaped(pid):
        os.waitpid(pid, 0)
        log.append(("reaped", pid))
        return 0

    monkeypatch.setattr(process, "wait", reaped)

    class FakeContainer:
        fail = None
        ends = True

        def __init__(self, config, root, *, files_dir, cgroup, namespaces):
            log.append(("container", config.container_id, config.process.args, namespaces))

        def start(self, proc, *, stdin):
            if FakeContainer.fail is not None:
                raise FakeContainer.fail
            log.append(("started", stdin))
            spawned = FakeSpawned(log, FakeContainer.ends)
            log.append(("pid", spawned.pid))
            return spawned

    monkeypatch.setattr(container, "Container", FakeContainer)
    return log, FakeContainer, tmp_path / "rehearsal"


def test_a_rehearsal_runs_true_in_a_throwaway_container_and_takes_it_all_down(rehearsal):
    log, _, directory = rehearsal
    init.rehearse()
    overlay = next(entry for entry in log if entry[0] == "overlay")
    assert overlay[1] == ["/"], "without premounted layers the guest's own root is the lower layer"
    created = next(entry for entry in log if entry[0] == "container")
    assert created[1] == init.REHEARSAL_ID and created[2] == ["/bin/true"]
    # Its own network namespace: an image's /bin/true must not reach the VM's NIC, which
    # no anti-spoofing rule guards before a container's spec.
    assert set(created[3]) == {*container.GUEST_NAMESPACES, "net"}
    pid = next(entry[1] for entry in log if entry[0] == "pid")
    assert ("reaped", pid) in log and ("fds closed",) in log
    assert ("cgroup removed",) in log
    unmounted = [entry[1] for entry in log if entry[0] == "umount"]
    assert unmounted == [f"{directory}/root", f"{directory}/rw"]
    assert log.index(("cgroup removed",)) > log.index(("reaped", pid))
    assert not directory.exists()


def test_a_rehearsal_that_does_not_end_is_killed(rehearsal, monkeypatch):
    """An image's /bin/true that never ends (it is the image's own) is killed after
    REHEARSAL_TIMEOUT: the pooled VM still says hello."""
    log, fake, _ = rehearsal
    fake.ends = False
    monkeypatch.setattr(init, "REHEARSAL_TIMEOUT", 0.3)
    began = time.monotonic()
    init.rehearse()
    assert time.monotonic() - began < 10
    pid = next(entry[1] for entry in log if entry[0] == "pid")
    assert ("reaped", pid) in log and ("cgroup removed",) in log


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
