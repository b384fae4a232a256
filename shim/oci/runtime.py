"""The OCI runtime operations, as ``vmshim-runtime`` (shim.cli.runtime) calls them.

Lifecycle (runtime spec), on top of the vmshim lifecycle (shim.containers.state)::

    create  validate the bundle (nothing is left behind when it is unusable), record the
            container, fork the stand-in (shim.oci.standin), write --pid-file, run the
            prestart/createRuntime/createContainer hooks            → created
    start   only from created: startContainer hooks, open exec.fifo; the stand-in boots
            the VM and starts the process; poststart hooks          → running
    kill    a signal to the process (created: to the stand-in); refused when stopped
    delete  only when stopped, unless --force (then the VM is killed); poststop hooks

Every operation raises VmshimError with a message for the engine's log.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import time
from pathlib import Path

from shim.containers.resources import host_cpus
from shim.containers.store import Container, now_rfc3339, process_start_time
from shim.errors import ContainerNotFound, ContainerStateError, VmshimError
from shim.oci import hooks as hooks_mod
from shim.oci import hostcgroup
from shim.oci import netns as netns_mod
from shim.oci import pod
from shim.oci import standin
from shim.oci.bundle import BundleError, check_id, load_bundle, read_json_object
from shim.oci.state import FIFO, OciInfo, RuntimeStore, alive, oci_status, record_id, state_of

START_WAIT = 240.0
"""Seconds ``start`` waits for the stand-in to report the process running (VM boot
under TCG on a busy host included)."""
STANDIN_EXIT_WAIT = 5.0


class RuntimeLog:
    """Where warnings and errors go: the engine's ``--log`` file (runc's text or json
    lines), else stderr."""

    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False):
        self.path = path
        self.fmt = fmt
        self.debug_enabled = debug

    def write(self, level: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": message, "time": stamp})
        else:
            line = f"time={json.dumps(stamp)} level={level} msg={json.dumps(message)}"
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
                return
            except OSError:
                pass
        os.write(2, (line + "\n").encode())

    def warn(self, message: str) -> None:
        self.write("warning", message)

    def debug(self, message: str) -> None:
        if self.debug_enabled:
            self.write("debug", message)


# ---- create / start / run -----------------------------------------------------------------


def create(
    rt: RuntimeStore,
    oci_id: str,
    bundle_dir: str,
    *,
    pid_file: str | None = None,
    console_socket: str | None = None,
    log: RuntimeLog | None = None,
    systemd_cgroup: bool = False,
) -> int:
    """Create *oci_id* from *bundle_dir*; the stand-in's pid. The stand-in is our child
    (``run`` waits for it) and is in the container's host cgroup (shim.oci.hostcgroup).
    Raises BundleError, VmshimError; nothing is kept then."""
    log = log or RuntimeLog()
    check_id(oci_id)
    if rt.exists(oci_id):
        raise VmshimError(f"container {oci_id} already exists")
    bundle = load_bundle(bundle_dir)
    if bundle.process.tty and not console_socket:
        raise BundleError("process.terminal is true: --console-socket is needed")
    if console_socket and not bundle.process.tty:
        raise BundleError("--console-socket was given but process.terminal is false")
    cgroup_target = hostcgroup.parse_path(bundle.cgroups_path, oci_id, systemd_cgroup, root=str(rt.root.absolute()))
    cgroup_limits = hostcgroup.host_limits(bundle.linux_resources)
    # The record derives the VM's size from guest_resources (size_vm's first value).
    _vm_mib, guest_resources = hostcgroup.size_vm(bundle.resources)
    for note in bundle.notes:
        log.warn(f"{oci_id}: {note}")
    for kind in ("createContainer", "startContainer"):
        if bundle.hooks.get(kind):
            log.warn(f"{oci_id}: {kind} hooks run on the host (the container's namespaces are inside its VM)")
    record = Container(
        id=record_id(oci_id),
        name=oci_id,
        image="",
        image_id="",
        isolation="vm",
        process=bundle.process,
        hostname=bundle.hostname or oci_id[:12],
        token=secrets.token_hex(16),
        layer_disks=[],
        interactive=True,
        tty=bundle.process.tty,
        writable="tmpfs",
        network=None,
        resources=guest_resources,
        mounts=list(bundle.mounts),
        read_only=bundle.read_only,
        rootfs=str(bundle.rootfs),
        masked_paths=bundle.masked_paths,
        readonly_paths=bundle.readonly_paths,
        sysctl=bundle.sysctl,
        os_container=bundle.os_container,
        devices=bundle.devices,
        **_os_stop(bundle.os_container),
    )
    info = OciInfo(
        id=oci_id,
        bundle=str(bundle.path),
        rootfs=str(bundle.rootfs),
        created=now_rfc3339(),
        annotations=bundle.annotations,
        hooks={k: [h.to_dict() for h in v] for k, v in bundle.hooks.items()},
        console_size=list(bundle.console_size) if bundle.console_size else None,
    )
    rt.root.mkdir(parents=True, exist_ok=True)
    join = pod.member_of(rt, oci_id, bundle.network_ns, bundle.annotations)
    if join is not None:
        _make_member(rt, record, info, join, bundle, log)
    else:
        _size_from_pod(record, bundle.annotations, cgroup_target, log)
    rt.containers.create(record)
    pid = 0
    host_fd = netns_mod.open_host_netns() if bundle.network_ns is not None and join is None else -1
    cgroup = None
    try:
        state_dir = rt.dir(oci_id)
        rt.save_info(info)
        os.mkfifo(state_dir / FIFO, 0o600)
        if join is not None:
            pid = _fork_member_standin(rt, record, info, state_dir, console_socket, bundle.console_size)
        else:
            pid = _fork_main_standin(rt, record.id, state_dir, console_socket, bundle.console_size, bundle.network_ns)
            engine_netns = netns_mod.engine_netns(
                bundle.network_ns, pid, host_fd, netns_mod.resolv_conf_source(bundle.mounts)
            )
            if engine_netns is not None:
                rt.containers.update(record.id, lambda r: setattr(r, "engine_netns", engine_netns))
        try:
            cgroup = hostcgroup.create(cgroup_target, cgroup_limits, pid=pid)
            info.cgroup = cgroup.to_dict()
        except hostcgroup.CgroupPathError as exc:
            if bundle.cgroups_path and os.geteuid() == 0:
                raise  # the engine named it: a container outside it would be a lie
            log.warn(f"{oci_id}: no host cgroup (none was named, or not root): {exc}")
        info.standin_pid = pid
        info.standin_start = process_start_time(pid) or 0
        rt.save_info(info)
        if pid_file:
            write_pid_file(pid_file, pid)
        for kind in ("prestart", "createRuntime", "createContainer"):
            hooks_mod.run_hooks(kind, info.hooks, state_of(record, info), warn=log.warn)
    except BaseException:
        if pid:
            _end_standin(pid, info.standin_start)
        if cgroup is not None:
            _remove_cgroup(cgroup, log, wait=0)
        rt.containers.delete(record.id)
        raise
    finally:
        if host_fd >= 0:
            os.close(host_fd)  # the stand-in keeps its copy
    return pid


def _size_from_pod(record: Container, annotations: dict, target: hostcgroup.Target, log: RuntimeLog) -> None:
    """Size a (possible) sandbox's VM from its pod's limits (shim.oci.pod.vm_size): the CRI
    sandbox annotations, else the parent of the container's host cgroup (podman's pod)."""
    limits = pod.parse_annotations(annotations)
    if not (limits.memory or limits.cpu_quota):
        try:
            found = hostcgroup.Hierarchies.detect()
        except hostcgroup.CgroupPathError:
            return
        parents = [
            (found.mounts[mountpoint], os.path.dirname(directory))
            for mountpoint, directory in found.directories(target).items()
            if os.path.dirname(directory) != mountpoint.rstrip("/")
        ]
        limits = pod.cgroup_limits(found.version, parents)
    mib, vcpus = pod.vm_size(limits, record.vm_memory_mib, record.vm_vcpus, len(host_cpus()))
    if mib or vcpus:
        record.pod_vm_mib, record.pod_vcpus = mib, vcpus
        log.debug(
            f"{record.name}: the pod's limits ({limits.source}) size its VM: {record.vm_memory_mib} MiB, "
            f"{record.vm_vcpus} vCPUs"
        )


def _make_member(rt: RuntimeStore, record: Container, info: OciInfo, join: pod.Join, bundle, log: RuntimeLog) -> None:
    """Turn *record*/*info* (not kept yet) into a pod member of *join*'s sandbox: the
    engine's /etc files as its own, no mounts of its own, the sandbox's uts and ipc
    namespaces when its config joins the sandbox's. Raises PodError."""
    notes: list[str] = []
    files = pod.member_files(info.id, bundle.mounts, notes)
    for note in notes:
        log.warn(f"{info.id}: {note}")
    record.hosts = files.get("hosts", "")
    record.resolv_conf = files.get("resolv_conf", "")
    record.hostname = files.get("hostname", record.hostname)
    record.mounts = []
    info.sandbox = join.sandbox
    info.member_tag = pod.member_tag(info.id)
    try:
        _, sandbox_info = rt.load(join.sandbox)
        info.member_namespaces = pod.shared_namespaces(bundle.namespace_paths, sandbox_info.standin_pid)
    except ContainerNotFound:
        info.member_namespaces = []
    log.debug(f"{info.id}: a member of pod sandbox {join.sandbox} ({join.reason}), runs in its VM")


def _fork_member_standin(
    rt: RuntimeStore, record: Container, info: OciInfo, state_dir: Path, console_socket: str | None, size
) -> int:
    """Fork a pod member's stand-in (shim.oci.standin.run_member); its pid."""
    from shim.containers.options import boot_config_of

    config = boot_config_of(record).replace(rootfs_share=info.member_tag, sandbox_namespaces=info.member_namespaces)
    sandbox_record = record_id(info.sandbox)

    def body(report_w: int) -> int:
        os.write(report_w, b"R")
        os.close(report_w)
        return standin.run_member(
            rt.containers, sandbox_record, config.to_dict(), info.rootfs, info.member_tag, state_dir
        )

    pid, report_r = _fork_standin(body, console_socket, size, "vmshim-member")
    return _await_standin(pid, report_r)


def _remove_cgroup(cgroup, log: RuntimeLog, wait: float = hostcgroup.SETTLE_WAIT) -> None:
    try:
        cgroup.remove(wait=wait)
    except VmshimError as exc:
        log.warn(f"the container's host cgroup was not removed: {exc}")


def _os_stop(os_container: bool) -> dict:
    """An OS container's stop signal and timeout (shim.containers.osmode) for the record;
    {} keeps the defaults."""
    if not os_container:
        return {}
    from shim.containers import osmode

    return {"stop_signal": osmode.STOP_SIGNAL, "stop_timeout": osmode.DEFAULT_STOP_TIMEOUT}


def _fork_main_standin(
    rt: RuntimeStore, record_id: str, state_dir: Path, console_socket: str | None, size, network_ns: str | None = None
) -> int:
    """Fork the main stand-in; its pid once it is ready (in the container's network
    namespace, shim.oci.netns). Raises VmshimError."""

    def body(report_w: int) -> int:
        try:
            netns_mod.enter(network_ns)
        except VmshimError as exc:
            os.write(report_w, b"E" + str(exc).encode()[:4000])
            return 125
        os.write(report_w, b"R")
        os.close(report_w)
        return standin.run_main(rt.containers, record_id, state_dir)

    pid, report_r = _fork_standin(body, console_socket, size, "vmshim-standin")
    return _await_standin(pid, report_r)


def _await_standin(pid: int, report_r: int) -> int:
    """*pid* once its stand-in reported ready (``R``) on *report_r*; an ``E`` report is its
    error. On failure the stand-in is ended. Closes *report_r*. Raises VmshimError."""
    try:
        answer = os.read(report_r, 4096)
        if answer.startswith(b"E"):
            raise VmshimError(answer[1:].decode(errors="replace"))
        if answer != b"R":
            raise VmshimError("the container's stand-in process did not start")
    except BaseException:
        _end_standin(pid, None)
        raise
    finally:
        os.close(report_r)
    return pid


def _fork_standin(body, console_socket: str | None, size, name: str) -> tuple[int, int]:
    """Fork a stand-in that runs ``body(report_w)`` and exits with what it returns; with
    *console_socket*, a new pty's slave is its stdio and the master goes to the socket.
    Returns (pid, read end of the report pipe). Precondition: no threads (fork)."""
    master = slave = None
    if console_socket:
        master, slave = standin.open_console(size)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the stand-in
        code = 125
        try:
            os.close(report_r)
            if master is not None:
                os.close(master)
            standin.become_standin(slave, name)
            code = body(report_w)
        finally:
            standin.exit_now(code)
    os.close(report_w)
    try:
        if master is not None:
            assert slave is not None and console_socket  # opened together above
            os.close(slave)
            standin.send_console(console_socket, master)
    except BaseException:
        os.close(report_r)
        _end_standin(pid, None)
        raise
    finally:
        if master is not None:
            os.close(master)
    return pid, report_r


def start(rt: RuntimeStore, oci_id: str, log: RuntimeLog | None = None) -> None:
    """Start the created container's process; return once it runs. Raises
    ContainerStateError unless it is created, VmshimError when it could not start."""
    log = log or RuntimeLog()
    record, info = rt.load(oci_id)
    status = oci_status(record, info)
    if status != "created":
        raise ContainerStateError("start", "created", status, oci_id)
    hooks_mod.run_hooks("startContainer", info.hooks, state_of(record, info), warn=log.warn)
    state_dir = rt.dir(oci_id)
    placer = _vm_placer(record, info) if not info.sandbox else None
    fd = os.open(state_dir / FIFO, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        answer = _wait_started(fd, info, placer)
    finally:
        os.close(fd)
    if answer != standin.STARTED:
        try:
            reason = (state_dir / standin.START_ERROR).read_text().strip()
        except OSError:
            reason = "the stand-in process ended before the process started"
        raise VmshimError(f"cannot start container {oci_id}: {reason}")
    (state_dir / FIFO).unlink(missing_ok=True)
    if info.sandbox:
        info.member_started = True
        rt.save_info(info)
    if placer is not None:
        try:
            placer.finish()
        except VmshimError as exc:
            raise VmshimError(f"cannot start container {oci_id}: {exc}") from None
    record, info = rt.load(oci_id)
    hooks_mod.run_hooks("poststart", info.hooks, state_of(record, info), warn=log.warn)


def _vm_placer(record: Container, info: OciInfo):
    """What moves the VM's QEMU and helpers into the host cgroup (None without one)."""
    if not info.cgroup:
        return None
    from shim.containers.vm_placement import domain_name

    return hostcgroup.VmPlacer(hostcgroup.HostCgroup.from_dict(info.cgroup), domain_name(record.id))


def _wait_started(fd: int, info: OciInfo, placer=None) -> bytes:
    """Read the stand-in's answer from the fifo (b"" when it closed without one); in the
    meantime move the VM into the host cgroup as soon as libvirt has started it."""
    deadline = time.monotonic() + START_WAIT
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    placed = placer is None
    while time.monotonic() < deadline:
        if not placed:
            try:
                placed = placer.tick()
            except VmshimError:
                pass  # finish() tries again and reports
        if poller.poll(200):
            try:
                return os.read(fd, 1)
            except BlockingIOError:
                continue
        if not alive(info.standin_pid, info.standin_start):
            return b""
    raise VmshimError(f"container {info.id} did not start within {START_WAIT:.0f} s")


def run(
    rt: RuntimeStore,
    oci_id: str,
    bundle_dir: str,
    *,
    pid_file: str | None = None,
    console_socket: str | None = None,
    detach: bool = False,
    log: RuntimeLog | None = None,
    systemd_cgroup: bool = False,
) -> int:
    """create + start; without *detach* wait for the process and delete the container,
    returning its exit status."""
    pid = create(
        rt, oci_id, bundle_dir, pid_file=pid_file, console_socket=console_socket, log=log, systemd_cgroup=systemd_cgroup
    )
    try:
        start(rt, oci_id, log)
    except BaseException:
        delete(rt, oci_id, force=True, log=log)
        raise
    if detach:
        return 0
    code = wait_child(pid)
    delete(rt, oci_id, force=True, log=log)
    return code


def wait_child(pid: int) -> int:
    """Wait for our child *pid*; its exit status (128+N for a signal)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return 255
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def write_pid_file(path: str, pid: int) -> None:
    """Write *pid* atomically (engines poll for the file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


# ---- state / kill / delete / pause ----------------------------------------------------------


def state(rt: RuntimeStore, oci_id: str) -> dict:
    """The ``state`` JSON. Raises ContainerNotFound."""
    from shim.containers import manage

    record, info = rt.load(oci_id)
    record = manage.reconcile(rt.containers, record)
    return state_of(record, info)


def kill(rt: RuntimeStore, oci_id: str, signum: int, *, all_processes: bool = False) -> None:
    """Send *signum* to the container's process (a created container's stand-in gets
    it). Raises ContainerStateError when it is stopped."""
    from shim.containers import manage

    record, info = rt.load(oci_id)
    status = oci_status(record, info)
    if status == "stopped":
        raise ContainerStateError("kill", "created, running or paused", status, oci_id)
    if status == "created" or info.sandbox:
        # A member's stand-in forwards SIGINT/TERM/HUP/QUIT; any other signal that ends
        # it (SIGKILL) ends the member too (its monitor connection closes).
        _signal_standin(info.standin_pid, info.standin_start, signum)
        return
    if all_processes:
        for pid in rt.exec_pids(oci_id):
            _signal_standin(pid, process_start_time(pid), signum)
    manage.kill(record.id, signum, store=rt.containers)


def delete(rt: RuntimeStore, oci_id: str, *, force: bool = False, log: RuntimeLog | None = None) -> None:
    """Remove the container. Refused unless it is stopped, unless *force*. Raises
    ContainerNotFound (not with *force*), ContainerStateError."""
    from shim.containers import manage

    log = log or RuntimeLog()
    try:
        record, info = rt.load(oci_id)
    except ContainerNotFound:
        if force:
            return
        raise
    status = oci_status(record, info)
    if status != "stopped" and not force:
        raise ContainerStateError("delete", "stopped (or use --force)", status, oci_id)
    if info.sandbox:
        _delete_member(rt, record, info, log)
        return
    if status == "created":
        _signal_standin(info.standin_pid, info.standin_start, signal.SIGKILL)
    if status == "paused":
        manage.unpause(record.id, store=rt.containers)
    try:
        manage.remove(record.id, force=True, store=rt.containers)
    except ContainerNotFound:
        pass
    for pid, start_time in [(info.standin_pid, info.standin_start)] + [
        (p, process_start_time(p)) for p in rt.exec_pids(oci_id)
    ]:
        _end_standin(pid, start_time)
    if info.cgroup:
        _remove_cgroup(hostcgroup.HostCgroup.from_dict(info.cgroup), log)
    hooks_mod.run_hooks("poststop", info.hooks, state_of(record, info) | {"status": "stopped"}, warn=log.warn)
    shutil.rmtree(rt.dir(oci_id), ignore_errors=True)


def _delete_member(rt: RuntimeStore, record: Container, info: OciInfo, log: RuntimeLog) -> None:
    """Remove pod member *info*: end its stand-in (the member dies with it), unplug its
    rootfs share from the sandbox's VM, remove its host cgroup and state."""
    _signal_standin(info.standin_pid, info.standin_start, signal.SIGKILL)
    _end_standin(info.standin_pid, info.standin_start)
    if info.member_tag:
        unplug_member(info.sandbox, info.member_tag, log)
    if info.cgroup:
        _remove_cgroup(hostcgroup.HostCgroup.from_dict(info.cgroup), log)
    hooks_mod.run_hooks("poststop", info.hooks, state_of(record, info) | {"status": "stopped"}, warn=log.warn)
    rt.containers.delete(record.id)
    shutil.rmtree(rt.dir(info.id), ignore_errors=True)


def unplug_member(sandbox: str, tag: str, log: RuntimeLog | None = None) -> None:
    """Ask for a member's rootfs share *tag* to leave sandbox *sandbox*'s VM (nothing
    when the VM is gone)."""
    from shim.containers.vm_placement import domain_name
    from shim.vm.libvirt_backend import LibvirtBackend

    try:
        LibvirtBackend().detach_filesystem(domain_name(record_id(sandbox)), tag)
    except VmshimError as exc:
        (log or RuntimeLog()).warn(f"the pod member's share {tag} stays in the VM of {sandbox} until it stops: {exc}")


def pause(rt: RuntimeStore, oci_id: str) -> None:
    from shim.containers import manage

    record, info = rt.load(oci_id)
    if info.sandbox:
        _freeze_member(rt, record, info, True)
        return
    manage.pause(record.id, store=rt.containers)


def resume(rt: RuntimeStore, oci_id: str) -> None:
    from shim.containers import manage

    record, info = rt.load(oci_id)
    if info.sandbox:
        _freeze_member(rt, record, info, False)
        return
    manage.unpause(record.id, store=rt.containers)


def _freeze_member(rt: RuntimeStore, record: Container, info: OciInfo, frozen: bool) -> None:
    """Pause (*frozen*) or resume pod member *info*: its cgroup in the sandbox's VM is
    frozen or thawed by the guest (the sandbox and the other members run on). Raises
    ContainerStateError, VmshimError."""
    from shim.containers import manage
    from shim.containers import monitor_api as api

    operation, needed = ("pause", "running") if frozen else ("resume", "paused")
    status = oci_status(record, info)
    if status != needed:
        raise ContainerStateError(operation, needed, status, info.id)
    sandbox, _ = rt.load(info.sandbox)
    client = manage.monitor_client(rt.containers, sandbox)
    if client is None:
        raise VmshimError(f"cannot {operation} pod member {info.id}: its sandbox {info.sandbox} is not running")
    with client:
        api.raise_for_error(client.request("freeze_member", 60, in_member=record.id, frozen=frozen))
    info.member_paused = frozen
    rt.save_info(info)


def processes(rt: RuntimeStore, oci_id: str) -> list[int]:
    """Host pids standing for the container's processes: the main stand-in and the
    stand-ins of exec'd processes (runc's ``ps`` lists host pids)."""
    record, info = rt.load(oci_id)
    if oci_status(record, info) == "stopped":
        return []
    return [info.standin_pid] + rt.exec_pids(oci_id)


def list_states(rt: RuntimeStore) -> list[dict]:
    out = []
    for oci_id in rt.ids():
        try:
            out.append(state(rt, oci_id))
        except VmshimError:
            continue
    return out


def _signal_standin(pid: int, start_time, signum: int) -> None:
    if start_time is not None and alive(pid, start_time):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _end_standin(pid: int, start_time) -> None:
    """Wait a moment for a stand-in to leave by itself, then SIGKILL it (reaping it
    when it is our child)."""
    deadline = time.monotonic() + STANDIN_EXIT_WAIT
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            pass
        if start_time is not None and not alive(pid, start_time):
            return
        if start_time is None:
            break
        time.sleep(0.05)
    if start_time is None or alive(pid, start_time):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# ---- exec ---------------------------------------------------------------------------------


def exec_process(
    rt: RuntimeStore,
    oci_id: str,
    process: dict,
    *,
    detach: bool = False,
    pid_file: str | None = None,
    console_socket: str | None = None,
    log: RuntimeLog | None = None,
) -> int:
    """Run *process* (an OCI process object) in the running container. With *detach*
    return 0 once it runs (its stand-in's pid is in *pid_file*); otherwise its exit
    status. Raises BundleError for a bad process, ContainerStateError unless running."""
    from shim.oci.bundle import parse_process

    log = log or RuntimeLog()
    record, info = rt.load(oci_id)
    status = oci_status(record, info)
    if status != "running":
        raise ContainerStateError("exec", "running", status, oci_id)
    target, member = record, ""
    if info.sandbox:  # a pod member: its process runs in the sandbox's VM
        target, sandbox_info = rt.load(info.sandbox)
        if oci_status(target, sandbox_info) != "running":
            raise VmshimError(f"cannot exec in pod member {oci_id}: its sandbox {info.sandbox} is not running")
        member = record.id
    notes: list[str] = []
    try:
        spec, size = parse_process(process, notes)
    except ValueError as exc:
        raise BundleError(f"the process to exec: {exc}") from None
    for note in notes:
        log.warn(f"{oci_id}: exec: {note}")
    spec = spec.replace(seccomp=record.process.seccomp)  # runc's rule
    if spec.tty and not console_socket and detach:
        raise BundleError("process.terminal is true: --console-socket is needed with --detach")
    pid, report_r = _fork_standin(
        lambda report_w: standin.run_exec(rt.containers, target, spec, report_w, member),
        console_socket if spec.tty else None,
        size,
        "vmshim-exec",
    )
    answer = b""
    try:
        while chunk := os.read(report_r, 4096):
            answer += chunk
    except BaseException:
        _end_standin(pid, None)
        raise
    finally:
        os.close(report_r)
    if answer != standin.STARTED:
        wait_child(pid)
        message = (
            answer[1:].decode(errors="replace")
            if answer.startswith(b"E")
            else "the exec stand-in ended before the process started"
        )
        raise VmshimError(f"cannot exec in container {oci_id}: {message}")
    rt.add_exec(oci_id, pid)
    if info.cgroup:
        try:
            hostcgroup.HostCgroup.from_dict(info.cgroup).add(pid)
        except VmshimError as exc:
            log.warn(f"{oci_id}: exec: {exc}")
    if pid_file:
        write_pid_file(pid_file, pid)
    if detach:
        return 0
    return wait_child(pid)


def read_process_file(path: str) -> dict:
    """The ``--process`` JSON file. Raises BundleError."""
    return read_json_object(path, f"the process file {path}")
