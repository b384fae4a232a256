"""The per-container monitor and the verbs around it, without VMs or root.

A fake isolation (shim.containers.fake_isolation) runs the real agent loop (guest.agent.Agent) in a separate host
process that listens on the container's agent.sock, like the host agent of process
isolation, with a runtime that starts plain processes (no namespaces, no mounts). So the
real monitor (forked by shim.containers.monitor.spawn, exactly as the CLI forks it), the
real store, the real state machine and the real socket API are exercised: start, attach,
exec, logs, stop, kill, restart policies, --rm, kill -9 of the monitor (re-attach) and
of the "VM" (the agent process).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from guest.runtime.process import spawn_container
from guest.spec import ProcessSpec
from shim.containers import manage
from shim.containers.fake_isolation import FakeIsolation, PlainRuntime
from shim.containers.logs import read_entries
from shim.containers.fake_isolation import fake_record
from shim.containers.store import Container, ContainerStore, monitor_alive, run_dir_of
from shim.errors import CommandNotFound, ContainerStateError, VmshimError


@pytest.fixture
def store(tmp_path, monkeypatch):
    run = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))  # short: unix socket paths
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path))
    monkeypatch.setenv("VMSHIM_RUN", str(run))
    store = ContainerStore()
    yield store
    for record in store.list():  # never leave processes behind
        try:
            manage.remove(record.id, force=True, store=store)
        except VmshimError:
            pass
    shutil.rmtree(run, ignore_errors=True)


def make(store, script: str, name: str = "c", **kw) -> Container:
    return store.create(fake_record(name, ["sh", "-c", script], **kw))


from tests.waiting import holds_for  # noqa: E402


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def logged(store, cid) -> bytes:
    entries, _ = read_entries(store.log_path(cid))
    return b"".join(e[2] for e in entries)


def attached(store, cid, **kw) -> tuple[int, bytes, bytes]:
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    code = manage.start(cid, attach=True, stdout_fd=out.fileno(), stderr_fd=err.fileno(), store=store, **kw)
    out.seek(0), err.seek(0)
    return code, out.read(), err.read()


def test_foreground_start_streams_records_and_logs(store):
    rec = make(store, "echo out; echo err >&2; exit 3")
    code, out, err = attached(store, rec.id)
    assert (code, out, err) == (3, b"out\n", b"err\n")
    wait_for(lambda: not monitor_alive(store.load(rec.id)))
    done = store.load(rec.id)
    assert done.state.status == "exited" and done.state.exit_code == 3
    assert done.state.started_at <= done.state.finished_at
    assert b"out\n" in logged(store, rec.id) and b"err\n" in logged(store, rec.id)
    assert not run_dir_of(rec.id).exists()


def test_detached_exec_logs_stop(store):
    rec = make(store, 'trap "echo bye; exit 7" TERM; echo up; while :; do sleep 0.05; done')
    assert manage.start(rec.id, store=store) == 0
    running = store.load(rec.id)
    assert running.state.status == "running" and monitor_alive(running)
    out = tempfile.TemporaryFile()
    code = manage.exec_process(rec.id, ["sh", "-c", "echo in-exec; exit 4"], stdout_fd=out.fileno(), store=store)
    out.seek(0)
    assert (code, out.read()) == (4, b"in-exec\n")
    with pytest.raises(CommandNotFound):
        manage.exec_process(rec.id, ["/nope"], store=store)
    with pytest.raises(ContainerStateError, match="it is running"):
        manage.remove(rec.id, store=store)
    stopped = manage.stop(rec.id, timeout=5, store=store)
    assert stopped.state.status == "exited" and stopped.state.exit_code == 7
    assert stopped.state.stopped_by_user
    assert logged(store, rec.id) == b"up\nbye\n"
    with pytest.raises(ContainerStateError, match="cannot exec container c: it is exited"):
        manage.exec_process(rec.id, ["true"], store=store)
    # Logs survive a stop and start; the new run appends.
    manage.start(rec.id, store=store)
    manage.stop(rec.id, timeout=5, store=store)
    assert logged(store, rec.id) == b"up\nbye\nup\nbye\n"


def test_stop_kills_after_the_timeout(store):
    rec = make(store, 'trap "" TERM; while :; do sleep 0.05; done')
    manage.start(rec.id, store=store)
    begin = time.monotonic()
    stopped = manage.stop(rec.id, timeout=0.5, store=store)
    assert stopped.state.exit_code == 137
    assert 0.4 < time.monotonic() - begin < 5


def test_kill_and_wait(store):
    rec = make(store, 'trap "exit 9" USR1; while :; do sleep 0.05; done')
    manage.start(rec.id, store=store)
    manage.kill(rec.id, signal.SIGUSR1, store=store)
    assert manage.wait(rec.id, store=store) == 9
    with pytest.raises(ContainerStateError, match="it is exited, must be running or paused"):
        manage.kill(rec.id, store=store)


def test_auto_remove(store):
    rec = make(store, "echo bye", auto_remove=True)
    code, out, _ = attached(store, rec.id)
    assert (code, out) == (0, b"bye\n")
    assert store.ids() == []  # gone before the exit code reached us


def test_failed_start_keeps_the_state_and_records_why(store):
    rec = make(store, "true")
    store.update(rec.id, lambda r: setattr(r, "process", r.process.replace(args=["/nope"])))
    with pytest.raises(CommandNotFound):
        manage.start(rec.id, store=store)
    failed = store.load(rec.id)
    assert failed.state.status == "created" and failed.state.exit_code == 127
    assert "/nope" in failed.state.error
    wait_for(lambda: not monitor_alive(store.load(rec.id)))


def test_restart_on_failure_with_a_limit(store):
    rec = make(store, "echo run; exit 1", restart_policy="on-failure", restart_max=2)
    manage.start(rec.id, store=store)
    wait_for(lambda: not monitor_alive(store.load(rec.id)), timeout=30)
    done = store.load(rec.id)
    assert done.state.status == "exited" and done.state.restart_count == 2
    assert logged(store, rec.id) == b"run\n" * 3


def test_monitor_killed_then_recovered(store):
    rec = make(store, "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.3; done")
    manage.start(rec.id, store=store)
    first = store.load(rec.id).state.monitor_pid
    # Killed between two ticks: what is in flight in the socket when a monitor dies is
    # lost with it (the kernel drops its receive buffer); what the agent holds is not.
    wait_for(lambda: b"tick 1" in logged(store, rec.id))
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not monitor_alive(store.load(rec.id)))
    # The container goes on with no monitor; its output waits in the agent.
    alive_agent = lambda: store.load(rec.id).state.monitor_pid == first  # noqa: E731
    holds_for(alive_agent, 0.3, "no monitor until a command needs one")
    out = tempfile.TemporaryFile()
    assert manage.exec_process(rec.id, ["echo", "again"], stdout_fd=out.fileno(), store=store) == 0
    out.seek(0)
    assert out.read() == b"again\n"
    second = store.load(rec.id).state.monitor_pid
    assert second != first and monitor_alive(store.load(rec.id))
    before = logged(store, rec.id).count(b"tick")
    wait_for(lambda: logged(store, rec.id).count(b"tick") > before + 3)
    ticks = [int(x.split()[1]) for x in logged(store, rec.id).splitlines()]
    assert ticks == list(range(len(ticks)))  # nothing lost across the monitor's death
    assert manage.stop(rec.id, timeout=0, store=store).state.status == "exited"


def test_agent_killed_marks_exited_and_cleans(store):
    rec = make(store, "while :; do sleep 0.1; done")
    manage.start(rec.id, store=store)
    placement = FakeIsolation(store.load(rec.id), store)
    placement.kill()  # like kill -9 of QEMU
    wait_for(lambda: not monitor_alive(store.load(rec.id)))
    dead = store.load(rec.id)
    assert dead.state.status == "exited" and dead.state.exit_code == 255
    assert "without reporting" in dead.state.error
    assert not run_dir_of(rec.id).exists()


def test_recovery_finds_a_dead_container(store):
    """Monitor and agent both gone: the next verb records the exit."""
    rec = make(store, "while :; do sleep 0.1; done")
    manage.start(rec.id, store=store)
    os.kill(store.load(rec.id).state.monitor_pid, signal.SIGKILL)
    FakeIsolation(store.load(rec.id), store).kill()
    wait_for(lambda: not monitor_alive(store.load(rec.id)))
    [listed] = manage.list_containers(all=True, store=store)
    assert listed.state.status == "exited" and listed.state.exit_code == 255


def test_rm_force_and_prune(store):
    a = make(store, "while :; do sleep 0.1; done", name="a")
    b = make(store, "true", name="b")
    manage.start(a.id, store=store)
    manage.start(b.id, store=store)
    assert manage.wait(b.id, store=store) == 0
    assert [r.name for r in manage.prune(store=store)] == ["b"]
    manage.remove(a.id, force=True, store=store)
    assert store.ids() == []
    assert not run_dir_of(a.id).exists()


def test_top_needs_a_runtime_with_builtins(store):
    rec = make(store, "while :; do sleep 0.1; done")
    manage.start(rec.id, store=store)
    with pytest.raises(VmshimError, match="no builtins"):
        manage.top(rec.id, store=store)
    manage.remove(rec.id, force=True, store=store)


def _plain_builtin(self, name, args, *, stdin):
    from guest.runtime import builtins

    spec = ProcessSpec(args=["vmshim-" + name], env=[], cwd="/", user=f"{os.getuid()}:{os.getgid()}")
    return spawn_container(None, spec, "", None, namespaces=(), stdin=stdin, builtin=builtins.prepare(name, args))


def test_cp_with_a_stopped_container_boots_its_placement_without_its_process(store, tmp_path, monkeypatch):
    monkeypatch.setattr(PlainRuntime, "builtin", _plain_builtin, raising=False)
    marker = tmp_path / "the-process-ran"
    record = make(store, f"touch {marker}")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.txt").write_text("copied\n")
    from shim.containers import copy

    copy.copy_out(record.id, str(tmp_path / "src" / "data.txt"), str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "copied\n"
    (tmp_path / "dest").mkdir()
    copy.copy_in(str(tmp_path / "src" / "data.txt"), record.id, str(tmp_path / "dest"))
    assert (tmp_path / "dest" / "data.txt").read_text() == "copied\n"
    fresh = store.load(record.id)
    assert fresh.status.value == "created" and not monitor_alive(fresh)
    assert not marker.exists(), "the container's own process must not run for a cp"
    assert not run_dir_of(record.id).exists(), "the short-lived placement is torn down"


def test_stop_while_a_restart_policy_waits(store):
    """The monitor stays reachable across restarts (the teardown removes the run directory
    its socket lives in), shows restarting meanwhile, and stop ends the waiting."""
    rec = make(store, "exit 3", restart_policy="always")
    manage.start(rec.id, store=store)
    wait_for(lambda: store.load(rec.id).state.restart_count >= 3 and store.load(rec.id).state.restarting)
    started = time.monotonic()
    stopped = manage.stop(rec.id, store=store)
    assert time.monotonic() - started < 5
    assert stopped.state.stopped_by_user and not stopped.state.restarting
    count = stopped.state.restart_count
    assert not monitor_alive(stopped)
    assert store.load(rec.id).state.restart_count == count


def _member_config(args) -> dict:
    from guest.spec import BootConfig

    return BootConfig(
        container_id="ab" * 32,
        token="t",
        hostname="pod",
        layer_count=0,
        process=ProcessSpec(args=list(args)),
        rootfs_share="vmshim-mab",
    ).to_dict()


def test_a_pod_member_runs_through_exec_and_dies_with_its_client(store):
    """The member's stand-in (shim.oci.standin.run_member) asks the sandbox's monitor for
    ``exec`` with ``member``: the agent gets ``member``, the streams are exec's; when the
    stand-in's connection goes (SIGKILL), the member is killed."""
    from guest import protocol
    from shim.containers import monitor_api as api

    rec = make(store, "sleep 30")
    assert manage.start(rec.id, store=store) == 0
    client = manage.monitor_client(store, store.load(rec.id))
    reply = api.raise_for_error(
        client.request("exec", 20, member=_member_config(["sh", "-c", "echo m; exit 5"]), stdin=False)
    )
    assert reply.type == protocol.STARTED
    seen = []
    while True:
        msg = client.recv(20)
        seen.append(msg)
        if msg.type == protocol.EXIT:
            break
    assert b"".join(m.payload for m in seen if m.type == protocol.STDOUT) == b"m\n"
    assert seen[-1].get("code", int) == 5
    client.close()

    client = manage.monitor_client(store, store.load(rec.id))
    reply = api.raise_for_error(client.request("exec", 20, member=_member_config(["sleep", "30"]), stdin=True))
    pid = reply.get("pid", int)
    os.kill(pid, 0)
    client.close()  # its stand-in is gone

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1].startswith("Z")
        except FileNotFoundError:
            return True

    wait_for(gone)
    assert store.load(rec.id).state.status == "running"  # the sandbox goes on


def test_exec_in_a_pod_member_names_it_to_the_agent(store):
    """``exec`` with ``in_member`` (the OCI runtime's exec into a pod member) runs the
    process in that member; an id that is not 16-64 hex digits, or one given with
    ``member``, is refused by the monitor, which goes on serving."""
    from guest import protocol
    from shim.containers import monitor_api as api

    rec = make(store, "sleep 30")
    assert manage.start(rec.id, store=store) == 0
    keeper = manage.monitor_client(store, store.load(rec.id))
    api.raise_for_error(keeper.request("exec", 20, member=_member_config(["sleep", "30"]), stdin=True))
    process = ProcessSpec(args=["sh", "-c", "echo in-member; exit 6"]).to_dict()
    for bad in ({"in_member": "../../run"}, {"in_member": "AB" * 32}, {"in_member": "ab" * 32, "member": {}}):
        client = manage.monitor_client(store, store.load(rec.id))
        with client, pytest.raises(VmshimError, match="in_member"):
            api.raise_for_error(client.request("exec", 20, process=process, stdin=False, **bad))
    client = manage.monitor_client(store, store.load(rec.id))
    with client:
        reply = api.raise_for_error(client.request("exec", 20, process=process, stdin=False, in_member="ab" * 32))
        assert reply.type == protocol.STARTED
        seen = []
        while True:
            msg = client.recv(20)
            seen.append(msg)
            if msg.type == protocol.EXIT:
                break
    assert b"".join(m.payload for m in seen if m.type == protocol.STDOUT) == b"in-member\n"
    assert seen[-1].get("code", int) == 6
    client = manage.monitor_client(store, store.load(rec.id))
    with client, pytest.raises(VmshimError, match="no pod member"):
        api.raise_for_error(client.request("exec", 20, process=process, stdin=False, in_member="cd" * 32))
    keeper.close()
    assert store.load(rec.id).state.status == "running"


def test_freeze_member_goes_to_the_agent_and_bad_ids_are_refused(store):
    """``freeze_member`` asks the agent to freeze a member (the plain test runtime's
    members have no cgroup: the agent's refusal comes back); an id that is not 16-64 hex
    digits never reaches it, and the monitor goes on serving."""
    from shim.containers import monitor_api as api

    rec = make(store, "sleep 30")
    assert manage.start(rec.id, store=store) == 0
    keeper = manage.monitor_client(store, store.load(rec.id))
    api.raise_for_error(keeper.request("exec", 20, member=_member_config(["sleep", "30"]), stdin=True))
    for member, why in (("../../x", "in_member"), ("ab" * 32, "no cgroup to freeze"), ("cd" * 32, "no pod member")):
        client = manage.monitor_client(store, store.load(rec.id))
        with client, pytest.raises(VmshimError, match=why):
            api.raise_for_error(client.request("freeze_member", 20, in_member=member, frozen=True))
    keeper.close()
    assert store.load(rec.id).state.status == "running"


def test_a_container_on_a_pooled_vm_has_the_pool_refilled_after_its_start(store, monkeypatch, tmp_path):
    """The monitor, not the claim, pokes the pool keeper (issue 15): at the exit of a short
    run, else POOL_REFILL_DELAY after the start, so that the keeper's boot of the next VM
    does not share the CPUs with the start it replaces. Once per container."""
    from shim.containers import monitor, pool

    pokes = tmp_path / "pokes"
    monkeypatch.setattr(FakeIsolation, "pooled", object(), raising=False)
    monkeypatch.setattr(pool, "poke", lambda spawn=None: pokes.open("a").write("poke\n") and 0)
    monkeypatch.setattr(monitor, "POOL_REFILL_DELAY", 1.0)
    short = make(store, "true", name="short")
    assert attached(store, short.id)[0] == 0
    wait_for(lambda: pokes.exists())
    long = make(store, "sleep 30", name="long")
    began = time.monotonic()
    manage.start(long.id, store=store)
    wait_for(lambda: pokes.read_text().count("poke") == 2)
    assert time.monotonic() - began >= 0.9, "poked before the delay"
    holds_for(lambda: pokes.read_text().count("poke") == 2, 1.5, "one poke for the long run")
    manage.stop(long.id, timeout=1, store=store)
    holds_for(lambda: pokes.read_text().count("poke") == 2, 1.0, "no second poke at its exit")
