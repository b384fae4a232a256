"""The container verbs, as a library the CLI calls: start, stop, kill, restart, remove,
pause, unpause, wait, exec, attach, top, cp, rename, prune, inspect, list, stats.

Each verb finds the record, checks the lifecycle (shim.containers.state), and either
acts on the store directly (nothing runs) or asks the container's monitor over its
socket. :func:`monitor_client` is the one way to reach a monitor: when the recorded one
is dead but the container should be running, it spawns a new monitor that re-attaches
(recovery after a kill -9), so every verb recovers by itself.

Import cost matters here (``vmshim exec`` latency): heavy modules are imported inside the
functions that need them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

from guest import protocol
from shim.containers import monitor_api as api
from shim.containers import state as lifecycle
from shim.containers.options import exec_spec
from shim.containers.store import Container, ContainerStore, monitor_alive, run_dir_of
from shim.errors import AgentError, ContainerNotFound, ContainerStateError, VmshimError

MONITOR_EXIT_WAIT = 30.0
"""How long a verb waits for a monitor that is finishing (tearing its VM down)."""


def _store(store: ContainerStore | None) -> ContainerStore:
    return store if store is not None else ContainerStore()


def socket_path(container_id: str) -> str:
    return str(run_dir_of(container_id) / api.SOCKET_NAME)


# ---- reaching the monitor --------------------------------------------------------------


def monitor_client(store: ContainerStore, record: Container) -> api.MonitorClient | None:
    """A connection to *record*'s monitor, spawning a recovering one if the recorded
    monitor is dead while the container should be running. None when the container is
    not running and no monitor serves it."""
    try:
        return api.MonitorClient.connect(socket_path(record.id))
    except api.MonitorGone:
        pass
    with store.locked(record.id) as fresh:
        if monitor_alive(fresh):
            pass  # alive but not answering yet: it is just starting; connect below
        elif lifecycle.is_active(fresh.status):
            from shim.containers import monitor

            client, pid, start = monitor.spawn(store, fresh.id, recover=True)
            client.close()
            fresh.state.monitor_pid = pid
            fresh.state.monitor_start = start
            store.save(fresh)
        else:
            return None
    try:
        return api.MonitorClient.connect(socket_path(record.id), timeout=10)
    except api.MonitorGone:
        return None


def wait_monitor_gone(store: ContainerStore, record: Container, timeout: float = MONITOR_EXIT_WAIT) -> Container:
    """Wait while a monitor is finishing *record* (not running any more, tearing down);
    return the fresh record."""
    deadline = time.monotonic() + timeout
    while monitor_alive(record) and not lifecycle.is_active(record.status):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        record = store.load(record.id)
    return record


def _request(store: ContainerStore, record: Container, op: str, wait: float | None = None, /, **fields):
    """Send one request to the container's monitor; the reply (errors raised). Raises
    ContainerStateError when nothing runs the container."""
    client = monitor_client(store, record)
    if client is None:
        fresh = store.load(record.id)
        raise ContainerStateError(op, "running", fresh.status.value, fresh.name)
    with client:
        return api.raise_for_error(client.request(op, wait, **fields))


# ---- start ------------------------------------------------------------------------------


def start(
    ref: str,
    *,
    attach: bool = False,
    interactive: bool = False,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    store: ContainerStore | None = None,
    on_started=None,
    detach_keys: bytes = b"\x10\x11",
) -> int:
    """Start a created or exited container: spawn its monitor, which boots the VM (or
    host placement) and starts the main process. With *attach*, stream its stdio (stdin
    too with *interactive*) and return its exit code; otherwise return 0 once it runs.
    With a TTY, typing *detach_keys* returns 0 and leaves the container running.
    Raises ContainerStateError, CommandNotFound (127), CommandNotExecutable (126),
    HypervisorError, AgentError …"""
    from shim.containers import monitor

    store = _store(store)
    record = store.find(ref)
    record = wait_monitor_gone(store, record)
    with store.locked(record.id) as fresh:
        lifecycle.check("start", fresh.status, fresh.name)
        if monitor_alive(fresh):
            raise ContainerStateError("start", "created or exited", "starting", fresh.name)
        client, pid, start_time = monitor.spawn(store, fresh.id)
        fresh.state.monitor_pid = pid
        fresh.state.monitor_start = start_time
        store.save(fresh)
        record = fresh
    with client:
        if not attach:
            api.raise_for_error(client.request("start", attach=False, stdin=False))
            if on_started is not None:
                on_started(record)
            return 0
        return _start_attached(
            client,
            record,
            interactive=interactive and record.interactive,
            stdin_fd=stdin_fd,
            stdout_fd=stdout_fd,
            stderr_fd=stderr_fd,
            on_started=on_started,
            detach_keys=detach_keys,
        )


def _start_attached(
    client: api.MonitorClient,
    record: Container,
    *,
    interactive: bool,
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    on_started,
    detach_keys: bytes,
) -> int:
    """The foreground half of start: ask for the start with us attached, then pump.
    A SIGINT/SIGTERM before the process runs cancels the start (the monitor sees us
    hang up and tears everything down)."""
    from shim.containers.attach import FORWARDED_SIGNALS, StdioPump, caught_signals, terminal_size
    from shim.vm.agent_client import wait_readable

    rows, cols = terminal_size(stdin_fd) if record.tty else (24, 80)
    caught: list[int] = []
    with caught_signals(FORWARDED_SIGNALS, lambda signum, _f: caught.append(signum)) as wake_r:
        client.send(api.REQUEST, op="start", attach=True, stdin=interactive, rows=rows, cols=cols)
        while True:
            ready = wait_readable([client.sock, wake_r], None)
            if wake_r in ready:
                os.read(wake_r, 512)
            if caught:
                client.close()  # cancels the boot
                return 128 + caught[0]
            if client.sock in ready:
                client.push(client.read_available())
                if client.has_pending:
                    break
        reply = api.raise_for_error(client.recv(0))
    if on_started is not None:
        on_started(record)
    pump = StdioPump(
        client,
        reply.get("id", int, 1),
        stdin_fd=stdin_fd if interactive else None,
        stdout_fd=stdout_fd,
        stderr_fd=stderr_fd,
        tty=record.tty,
        detach_keys=detach_keys,
    )
    pump._pending_signals.extend(caught)
    code = pump.run()
    if pump.exit_error:
        # The container did not end by itself (the VM died, the agent broke the
        # protocol): say why in one line, like any other error.
        _write_line(stderr_fd, f"Error: {pump.exit_error}")
    return code


def _write_line(fd: int, text: str) -> None:
    try:
        os.write(fd, (text + "\n").encode(errors="replace"))
    except OSError:
        pass


# ---- stop, kill, restart, pause ----------------------------------------------------------


def stop(ref: str, timeout: float | None = None, store: ContainerStore | None = None) -> Container:
    """Stop signal (the image's StopSignal or SIGTERM), SIGKILL after *timeout* s (the
    container's default: 10). Returns once it exited. Stopping a container that does
    not run is not an error (docker's behaviour)."""
    store = _store(store)
    record = store.find(ref)
    fields = {} if timeout is None else {"timeout": timeout}
    wait = (timeout if timeout is not None else record.stop_timeout) + 60
    for _attempt in range(3):  # a monitor that re-listens (restart policy) may drop a request
        if not (lifecycle.is_active(record.status) or monitor_alive(record)):
            break
        client = monitor_client(store, record)
        if client is None:
            break
        with client:
            try:
                api.raise_for_error(client.request("stop", wait, **fields))
                break
            except api.MonitorGone:
                record = store.load(record.id)
    return wait_monitor_gone(store, store.load(record.id))


def kill(ref: str, sig: int = signal.SIGKILL, store: ContainerStore | None = None) -> Container:
    store = _store(store)
    record = store.find(ref)
    lifecycle.check("kill", record.status, record.name)
    _request(store, record, "kill", 30, signal=int(sig))
    if sig == signal.SIGKILL:
        record = _wait_not_running(store, record, 15)
    return record


def _wait_not_running(store: ContainerStore, record: Container, timeout: float) -> Container:
    deadline = time.monotonic() + timeout
    while lifecycle.is_active(record.status) and time.monotonic() < deadline:
        time.sleep(0.05)
        record = store.load(record.id)
    return record


def restart(ref: str, timeout: float | None = None, store: ContainerStore | None = None) -> None:
    store = _store(store)
    record = stop(ref, timeout, store)
    start(record.id, store=store)


def pause(ref: str, store: ContainerStore | None = None) -> None:
    store = _store(store)
    record = store.find(ref)
    lifecycle.check("pause", record.status, record.name)
    _request(store, record, "pause", 30)


def unpause(ref: str, store: ContainerStore | None = None) -> None:
    store = _store(store)
    record = store.find(ref)
    lifecycle.check("unpause", record.status, record.name)
    _request(store, record, "unpause", 30)


def wait(ref: str, store: ContainerStore | None = None) -> int:
    """Block until the container is not running; its exit code."""
    store = _store(store)
    record = store.find(ref)
    while True:
        if not lifecycle.is_active(record.status) and not monitor_alive(record):
            return record.state.exit_code
        client = monitor_client(store, record)
        if client is not None:
            with client:
                try:
                    reply = api.raise_for_error(client.request("wait"))
                    return reply.get("exit_code", int, 0)
                except api.MonitorGone:
                    pass
        time.sleep(0.05)
        try:
            record = store.load(record.id)
        except ContainerNotFound:
            return record.state.exit_code


# ---- remove ----------------------------------------------------------------------------


def remove(ref: str, *, force: bool = False, volumes: bool = False, store: ContainerStore | None = None) -> Container:
    """Remove a container: its record, log, writable layer and anything still on the
    host; with *volumes* (``rm -v``) also the anonymous volumes it made. A running one
    needs *force* (it is killed). Returns the removed record. Raises
    ContainerStateError, ContainerNotFound."""
    record = _remove_container(ref, force=force, store=store)
    if volumes:
        from shim.containers.mounts import remove_anonymous

        remove_anonymous(record.mounts)
    return record


def _remove_container(ref: str, *, force: bool, store: ContainerStore | None) -> Container:
    store = _store(store)
    record = store.find(ref)
    if lifecycle.is_active(record.status) and not force:
        raise ContainerStateError(
            "remove", "created or exited (stop it first, or use -f)", record.status.value, record.name
        )
    deadline = time.monotonic() + MONITOR_EXIT_WAIT + 30
    while monitor_alive(record) or lifecycle.is_active(record.status):
        client = monitor_client(store, record)
        if client is not None:
            with client:
                try:
                    reply = client.request("remove", 60, force=force)
                    if reply.type == api.REPLY:
                        return record
                    if reply.fields.get("state"):
                        api.raise_for_error(reply)
                except api.MonitorGone:
                    pass
        if time.monotonic() > deadline:
            raise VmshimError(
                f"cannot remove container {record.name}: its monitor (pid {record.state.monitor_pid}) does not answer"
            )
        time.sleep(0.05)
        try:
            record = store.load(record.id)
        except ContainerNotFound:
            return record
    with store.locked(record.id) as fresh:
        fresh.state.status = lifecycle.transition("remove", fresh.status, fresh.name).value
        store.save(fresh)
    _cleanup_leftovers(store, fresh)
    store.delete(fresh.id)
    return fresh


def _cleanup_leftovers(store: ContainerStore, record: Container) -> None:
    """Whatever a crashed monitor may have left on the host: the domain, mounts, the
    run directory."""
    if not run_dir_of(record.id).exists():
        return
    from shim.containers.monitor import make_placement

    placement = make_placement(record, store)
    try:
        placement.kill()
        placement.teardown(grace=0.0)
        placement.forget()
    except VmshimError:
        pass


def prune(store: ContainerStore | None = None) -> list[Container]:
    """Remove every container that is not running; the removed records."""
    store = _store(store)
    removed = []
    for record in store.list():
        if lifecycle.is_active(record.status):
            continue
        record = wait_monitor_gone(store, record)  # one that just exited: tearing down
        if lifecycle.is_active(record.status) or monitor_alive(record):
            continue
        try:
            removed.append(remove(record.id, store=store))
        except (ContainerNotFound, ContainerStateError):
            continue
    return removed


def rename(ref: str, new_name: str, store: ContainerStore | None = None) -> Container:
    return _store(store).rename(ref, new_name)


# ---- processes in the container ---------------------------------------------------------


def exec_process(
    ref: str,
    command: list[str],
    *,
    interactive: bool = False,
    tty: bool = False,
    detach: bool = False,
    env: Sequence[str] = (),
    workdir: str | None = None,
    user: str | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    store: ContainerStore | None = None,
    privileged: bool = False,
) -> int:
    """Run *command* in the running container; its exit code (0 once started with
    *detach*). Raises ContainerStateError, CommandNotFound (127) …"""
    from shim.containers.attach import StdioPump, terminal_size

    store = _store(store)
    record = store.find(ref)
    lifecycle.check("exec", record.status, record.name)
    spec = exec_spec(record, command, env=env, workdir=workdir, user=user, tty=tty, privileged=privileged)
    client = monitor_client(store, record)
    if client is None:
        raise ContainerStateError("exec", "running", store.load(record.id).status.value, record.name)
    with client:
        rows, cols = terminal_size(stdin_fd) if tty else (24, 80)
        reply = api.raise_for_error(
            client.request(
                "exec", None, process=spec.to_dict(), stdin=interactive, tty=tty, rows=rows, cols=cols, detach=detach
            )
        )
        if detach:
            return 0
        pump = StdioPump(
            client,
            reply.get("id", int),
            stdin_fd=stdin_fd if interactive else None,
            stdout_fd=stdout_fd,
            stderr_fd=stderr_fd,
            tty=tty,
        )
        return pump.run()


def attach(
    ref: str,
    *,
    stdin: bool = True,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    store: ContainerStore | None = None,
    detach_keys: bytes = b"\x10\x11",
) -> int:
    """Stream the running container's main process until it exits (its exit code) or,
    with a TTY, until *detach_keys* are typed (0; it goes on running)."""
    from shim.containers.attach import StdioPump

    store = _store(store)
    record = store.find(ref)
    lifecycle.check("attach", record.status, record.name)
    client = monitor_client(store, record)
    if client is None:
        raise ContainerStateError("attach", "running", "exited", record.name)
    with client:
        use_stdin = stdin and record.interactive
        reply = api.raise_for_error(client.request("attach", None, stdin=use_stdin))
        pump = StdioPump(
            client,
            reply.get("id", int, 1),
            stdin_fd=stdin_fd if use_stdin else None,
            stdout_fd=stdout_fd,
            stderr_fd=stderr_fd,
            tty=record.tty,
            detach_keys=detach_keys,
        )
        return pump.run()


MAX_HELPER_STDERR = 64 << 10  # what a builtin helper may say about its failure


def run_builtin(
    store: ContainerStore,
    record: Container,
    name: str,
    args: list[str],
    *,
    stdin_data=None,
    out=None,
    stopped_ok: bool = False,
) -> tuple[int, bytes]:
    """Run the agent's helper *name* in the container: (exit code, stderr). Its stdout
    goes to *out* (a writable binary file) if given; *stdin_data* (an iterable of bytes
    chunks) is fed to it. With *stopped_ok*, a created or exited container gets a
    short-lived VM (or host placement) of its own for it (see _builtin_while_stopped)."""
    if stopped_ok and not lifecycle.is_active(record.status):
        record = wait_monitor_gone(store, record)  # one that just ended may be tearing down
        if not lifecycle.is_active(record.status) and not monitor_alive(record):
            return _builtin_while_stopped(store, record, name, args, stdin_data=stdin_data, out=out)
    lifecycle.check("exec", record.status, record.name)
    client = monitor_client(store, record)
    if client is None:
        raise ContainerStateError("exec", "running", "exited", record.name)
    err = bytearray()
    with client:
        reply = api.raise_for_error(
            client.request("builtin", None, name=name, args=list(args), stdin=stdin_data is not None)
        )
        proc_id = reply.get("id", int)
        code = None
        if stdin_data is not None:
            for chunk in stdin_data:
                for start in range(0, len(chunk), protocol.CHUNK):
                    client.send(protocol.STDIN, chunk[start : start + protocol.CHUNK], id=proc_id)
                    code = _drain(client, proc_id, out, err)
                    if code is not None:
                        return code, bytes(err)  # it gave up early (its stderr says why)
            client.send(protocol.STDIN_CLOSE, id=proc_id)
        while code is None:
            code = _route(client.recv(), proc_id, out, err)
        return code, bytes(err)


STOPPED_BUILTIN_ID = 2
STOPPED_BUILTIN_TIMEOUT = 30.0
"""Seconds the agent may take to answer the helper's start (a TCG guest is slow)."""


def _builtin_while_stopped(
    store: ContainerStore, record: Container, name: str, args: list[str], *, stdin_data, out
) -> tuple[int, bytes]:
    """``cp`` with a container that does not run: boot its placement (the same layers,
    writable layer and volumes; no network) without starting its process, run the helper
    there beside nothing else, and shut it down cleanly (the guest syncs and unmounts, so
    what tar-in wrote is on the writable layer). The host never mounts anything the guest
    wrote. The container's lock is held throughout, so a start waits for it."""
    import dataclasses

    from shim.containers.monitor import make_placement

    err = bytearray()
    with store.locked(record.id) as fresh:
        if lifecycle.is_active(fresh.status) or monitor_alive(fresh):
            raise ContainerStateError(
                "cp", "stopped (it was started meanwhile: try again)", fresh.status.value, fresh.name
            )
        placement = make_placement(dataclasses.replace(fresh, network=None), store)
        try:
            client = placement.boot()
            try:
                client.send(
                    protocol.BUILTIN,
                    token=fresh.token,
                    id=STOPPED_BUILTIN_ID,
                    name=name,
                    args=list(args),
                    stdin=stdin_data is not None,
                )
                started = client.recv(STOPPED_BUILTIN_TIMEOUT)
                while started.type not in (protocol.STARTED, protocol.ERROR):
                    started = client.recv(STOPPED_BUILTIN_TIMEOUT)  # e.g. the agent's log
                if started.type == protocol.ERROR:
                    raise AgentError(started.get("message", str, "the agent refused the copy"))
                code = None
                if stdin_data is not None:
                    for chunk in stdin_data:
                        for start in range(0, len(chunk), protocol.CHUNK):
                            client.send(protocol.STDIN, chunk[start : start + protocol.CHUNK], id=STOPPED_BUILTIN_ID)
                            code = _drain(client, STOPPED_BUILTIN_ID, out, err)
                            if code is not None:
                                break
                        if code is not None:
                            break
                    if code is None:
                        client.send(protocol.STDIN_CLOSE, id=STOPPED_BUILTIN_ID)
                while code is None:
                    code = _route(client.recv(), STOPPED_BUILTIN_ID, out, err)
                client.send(protocol.SHUTDOWN)
            finally:
                client.close()
        finally:
            placement.teardown()  # waits for the guest's own power-off (it syncs first)
    return code, bytes(err)


def _drain(client, proc_id, out, err) -> int | None:
    """Take what already arrived (so a chatty helper never blocks us both); the exit
    code if it already exited."""
    import select

    while select.select([client.sock], [], [], 0)[0]:
        for msg in client.read_available():
            code = _route(msg, proc_id, out, err)
            if code is not None:
                return code
    return None


def _route(msg, proc_id, out, err) -> int | None:
    if msg.fields.get("id") != proc_id:
        return None
    if msg.type == protocol.STDOUT and out is not None:
        out.write(msg.payload)
    elif msg.type == protocol.STDERR:
        err.extend(msg.payload[: max(0, MAX_HELPER_STDERR - len(err))])  # the guest chooses
    elif msg.type == protocol.EXIT:
        return msg.get("code", int)
    elif msg.type == protocol.ERROR:
        raise VmshimError(msg.get("message", str, "the helper failed"))
    return None


def top(ref: str, store: ContainerStore | None = None) -> dict:
    """``{"titles": [...], "processes": [[...]]}`` of the container's processes."""
    import io
    import json

    store = _store(store)
    record = store.find(ref)
    lifecycle.check("top", record.status, record.name)
    out = io.BytesIO()
    code, err = run_builtin(store, record, "ps", [], out=out)
    if code != 0:
        raise VmshimError(
            f"cannot list the processes of {record.name}: {err.decode(errors='replace').strip() or f'exit {code}'}"
        )
    return json.loads(out.getvalue())


# ---- looking -----------------------------------------------------------------------------


def reconcile(store: ContainerStore, record: Container) -> Container:
    """A running record whose monitor is dead gets a recovering monitor, which finds
    out whether the container still runs; the record as it is then."""
    if not lifecycle.is_active(record.status) or monitor_alive(record):
        return record
    client = monitor_client(store, record)
    if client is not None:
        with client:
            try:
                client.request("status", 30)
            except VmshimError:
                pass
    try:
        return store.load(record.id)
    except ContainerNotFound:
        return record


def list_containers(*, all: bool = False, store: ContainerStore | None = None) -> list[Container]:
    store = _store(store)
    out = []
    for record in store.list():
        record = reconcile(store, record)
        restarting = record.state.restarting and monitor_alive(record)
        if all or lifecycle.is_active(record.status) or restarting:
            out.append(record)
    return out


def usage(record: Container) -> dict:
    """CPU time and memory of a running container, measured on the host: the VM's QEMU
    process, or the container's cgroup."""
    from shim.containers.monitor import make_placement

    placement = make_placement(record, ContainerStore())
    return placement.usage()


def placement_info(record: Container) -> dict:
    from shim.containers.monitor import make_placement

    try:
        return make_placement(record, ContainerStore()).info()
    except Exception:  # noqa: BLE001 - inspect shows what it can
        return {}
