"""An in-tree fake of :class:`shim.containers.isolation.Isolation` for unit tests.

It runs the real agent loop (:class:`guest.agent.Agent`) in a separate host process that
listens on the container's agent.sock, as process isolation's host agent does, with a
runtime that starts plain processes of the current user (no namespaces, mounts or
cgroups). So the real monitor, store, state machine and socket API can be exercised
without VMs or root. A record says so itself: ``isolation="fake"`` (the CLI never writes
that), and :func:`shim.containers.monitor.make_placement` then makes this fake.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time

from guest.runtime.process import spawn_container
from guest.spec import ProcessSpec
from shim.containers.options import boot_config_of
from shim.containers.store import Container, ContainerStore, run_dir_of
from shim.errors import VmshimError
from shim.vm.agent_client import AgentClient


def fake_record(name: str, args: list[str], **fields) -> Container:
    """A new record (not yet stored) of a container the fake runs: ``isolation="fake"``, a
    tmpfs writable layer, no layers, *args* as its main process; *fields* set the rest."""
    cid = os.urandom(32).hex()
    return Container(
        id=cid,
        name=name,
        image="busybox",
        image_id="sha256:x",
        isolation="fake",
        process=ProcessSpec(args=args),
        hostname=cid[:12],
        token="tok",
        layer_disks=[],
        writable="tmpfs",
        **fields,
    )


class PlainRuntime:
    """Starts the container's processes as plain host processes of the current user."""

    def __init__(self):
        self.main = None

    def _spawn(self, process, stdin, rows, cols):
        spec = process.replace(user=f"{os.getuid()}:{os.getgid()}")
        return spawn_container(None, spec, "", None, namespaces=(), stdin=stdin, rows=rows, cols=cols)

    def start(self, process, *, stdin, rows=24, cols=80):
        self.main = self._spawn(process, stdin, rows, cols)
        return self.main

    def exec(self, process, *, stdin, rows=24, cols=80):
        return self._spawn(process, stdin, rows, cols)

    def start_member(self, config, *, stdin, rows=24, cols=80):
        """A pod member (guest.runtime.member) as a plain process: no share to mount,
        no namespaces, no cgroup."""
        return _PlainMember(self._spawn(config.process, stdin, rows, cols), config, self)

    def oom_killed(self):
        return False


class _PlainMember:
    """A member whose ``container`` (the agent's exec into it) is the runtime itself."""

    def __init__(self, spawned, config, runtime: PlainRuntime):
        self.spawned = spawned
        self.container = _PlainMemberContainer(config, runtime)

    def destroy(self) -> None:
        pass


class _PlainMemberContainer:
    def __init__(self, config, runtime: PlainRuntime):
        self.config = config
        self.exec = runtime.exec


class FakeIsolation:
    """Process isolation without mounts, namespaces or cgroups: the real agent loop in a
    host process of the current user, listening on the container's agent.sock."""

    kind = "fake"

    def __init__(self, record: Container, store: ContainerStore):
        from shim.containers.process_placement import ProcessPlacement

        self._inner = ProcessPlacement(boot_config_of(record), [], run_dir_of(record.id), name=record.name)
        self.run_dir = self._inner.run_dir

    def boot(self, alive=None) -> AgentClient:
        from shim.containers.process_placement import _fork_agent, _start_time

        inner = self._inner
        self.run_dir.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(inner.agent_socket))
        listener.listen(4)
        inner.agent_pid = _fork_agent(listener, inner.boot_config, PlainRuntime(), self.run_dir / "agent.log")
        listener.close()
        inner.pid_file.write_text(f"{inner.agent_pid} {_start_time(inner.agent_pid)}\n")
        client = AgentClient.connect_unix(str(inner.agent_socket), timeout=5)
        client.handshake(10, alive=alive)
        return client

    def reattach(self):
        return self._inner.reattach()

    def running(self) -> bool:
        return self._inner.running()

    def agent_pid(self) -> int | None:
        return self._inner._recorded_agent()

    def pause(self):
        raise VmshimError("the fake isolation cannot pause")

    resume = pause

    def kill(self) -> None:
        pid = self._inner._recorded_agent()
        if pid is None:
            return
        for child in _children(pid):
            _kill(child)
        _kill(pid)

    def forget(self, timeout: float = 10.0) -> None:
        pass

    def teardown(self, grace: float = 3.0, timeout: float = 15.0) -> None:
        from shim.containers.process_placement import _reap_child

        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            _reap_child(self._inner.agent_pid)
            time.sleep(0.02)
        if self.running():
            self.kill()
        end = time.monotonic() + timeout
        while _reap_child(self._inner.agent_pid) is None and time.monotonic() < end:
            time.sleep(0.02)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def info(self):
        return {"AgentPid": self._inner._recorded_agent() or 0}

    def usage(self):
        return {"cpu_ns": 0, "memory": 0, "memory_limit": 0, "pids": 1}


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
