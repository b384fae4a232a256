"""The stand-in: the host process an engine is given as the container's (or an exec'd
process's) pid.

conmon and containerd-shim make themselves child subreapers, run ``vmshim-runtime
create`` (or ``exec``), read the pid file and wait for that pid. A process in a VM has
no host pid, so the runtime forks a stand-in for it: it inherits the stdio the engine
gave the runtime (or the slave of the pty whose master went to ``--console-socket``),
pumps it to and from the process in the VM (shim.containers.attach.StdioPump, through the
container's monitor), forwards the signals it receives, and exits with the process's
exit status. Once its parent (the runtime command) exits it is re-parented to the
engine, which reaps it like runc's container process.

The main stand-in waits for ``start`` on ``exec.fifo`` (as runc's init does): ``start``
opens the fifo for reading, the stand-in asks its monitor to boot the VM and start the
process, and writes ``0`` into the fifo once the process runs (or closes it without a
byte when that failed, after writing the reason to ``start-error``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
from pathlib import Path
from typing import TYPE_CHECKING

from shim.errors import VmshimError

if TYPE_CHECKING:
    from guest.protocol import Message

START_ERROR = "start-error"
STARTED = b"0"


# ---- the console --------------------------------------------------------------------------


def open_console(size: tuple[int, int] | None) -> tuple[int, int]:
    """A new pty (master, slave), sized *size* (rows, cols) when given."""
    master, slave = os.openpty()
    if size:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    return master, slave


def send_console(socket_path: str, master: int) -> None:
    """Hand the pty *master* to the engine's ``--console-socket`` (SCM_RIGHTS, as runc
    does). Raises VmshimError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(socket_path)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as exc:
        raise VmshimError(f"cannot send the console to {socket_path}: {exc.strerror or exc}") from None


# ---- becoming a stand-in (in the forked child) --------------------------------------------


def become_standin(tty_slave: int | None, name: str = "vmshim-standin") -> None:
    """In a freshly forked child: a session of its own, the pty slave (if any) as
    controlling terminal and stdio, default signal dispositions."""
    os.setsid()
    if tty_slave is not None:
        fcntl.ioctl(tty_slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(tty_slave, fd)
        if tty_slave > 2:
            os.close(tty_slave)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def run_main(store, record_id: str, state_dir: Path) -> int:
    """The main stand-in after ``create``: wait for ``start``, then boot and pump. Returns
    the exit status to exit with."""
    from shim.containers import manage
    from shim.oci.state import FIFO

    fifo = os.open(state_dir / FIFO, os.O_WRONLY | os.O_CLOEXEC)  # blocks until start

    def started(_record) -> None:
        os.write(fifo, STARTED)
        os.close(fifo)

    try:
        return manage.start(
            record_id,
            attach=True,
            interactive=True,
            stdin_fd=0,
            stdout_fd=1,
            stderr_fd=2,
            store=store,
            on_started=started,
        )
    except VmshimError as exc:
        _write_quietly(state_dir / START_ERROR, str(exc))
        return exc.exit_code or 125
    except Exception as exc:  # noqa: BLE001 - the engine only sees our exit status
        _write_quietly(state_dir / START_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        return 125


def run_exec(store, record, process, report_fd: int, member: str = "") -> int:
    """An exec stand-in: start *process* (a ProcessSpec) in the running container, write
    ``0`` to *report_fd* once it runs (or ``E<message>`` when it could not start), pump
    its stdio and return its exit status. *member*: a pod member's container id; then
    *record* is its sandbox's and the process runs in that member."""
    from shim.containers import manage
    from shim.containers import monitor_api as api
    from shim.containers.attach import terminal_size

    try:
        client = manage.monitor_client(store, record)
        if client is None:
            raise VmshimError(f"container {record.name} is not running")
        rows, cols = terminal_size(0) if process.tty else (24, 80)
        reply = api.raise_for_error(
            client.request(
                "exec",
                None,
                process=process.to_dict(),
                stdin=True,
                tty=process.tty,
                rows=rows,
                cols=cols,
                detach=False,
                **({"in_member": member} if member else {}),
            )
        )
    except VmshimError as exc:
        os.write(report_fd, b"E" + str(exc).encode()[:4000])
        os.close(report_fd)
        return exc.exit_code or 125
    os.write(report_fd, STARTED)
    os.close(report_fd)
    return _pump(client, reply, process.tty)


def run_member(store, sandbox_record: str, config: dict, rootfs: str, tag: str, state_dir: Path) -> int:
    """A pod member's stand-in after ``create``: wait for ``start``, plug the member's
    rootfs into the sandbox's running VM (virtiofs share *tag*), have the sandbox's
    monitor start it (``exec`` with ``member``, guest.runtime.member), then pump its
    stdio and return its exit status. Ending this process ends the member."""
    from shim.containers import manage
    from shim.containers import monitor_api as api
    from shim.containers.attach import terminal_size
    from shim.containers.vm_placement import domain_name
    from shim.oci.state import FIFO
    from shim.vm.domain import Filesystem
    from shim.vm.libvirt_backend import LibvirtBackend

    fifo = os.open(state_dir / FIFO, os.O_WRONLY | os.O_CLOEXEC)  # blocks until start
    tty = bool(config.get("process", {}).get("tty"))
    plugged = False
    client = None
    try:
        sandbox = store.load(sandbox_record)
        client = manage.monitor_client(store, sandbox)
        if client is None:
            raise VmshimError(f"the pod's sandbox container {sandbox.name} is not running")
        domain = domain_name(sandbox.id)
        LibvirtBackend().attach_filesystem(domain, Filesystem(source_dir=rootfs, tag=tag))
        plugged = True
        rows, cols = terminal_size(0) if tty else (24, 80)
        reply = api.raise_for_error(
            client.request("exec", None, member=config, stdin=True, tty=tty, rows=rows, cols=cols)
        )
    except Exception as exc:  # noqa: BLE001 - the engine only sees start's error
        if plugged:
            with contextlib.suppress(Exception):
                LibvirtBackend().detach_filesystem(domain, tag)
        if client is not None:
            client.close()
        text = str(exc) if isinstance(exc, VmshimError) else f"internal error: {type(exc).__name__}: {exc}"
        _write_quietly(state_dir / START_ERROR, f"pod member: {text}")
        os.close(fifo)
        return getattr(exc, "exit_code", None) or 125
    os.write(fifo, STARTED)
    os.close(fifo)
    return _pump(client, reply, tty)


def _pump(client, reply: Message, tty: bool) -> int:
    """Pump the stdio of the exec the monitor's *reply* started (closing *client* after);
    its exit status, or 137 when the VM went away under the process."""
    from shim.containers.attach import StdioPump

    with client:
        try:
            return StdioPump(client, reply.get("id", int), stdin_fd=0, stdout_fd=1, stderr_fd=2, tty=tty).run()
        except VmshimError:
            return 137


def exit_now(code: int) -> None:
    """Leave the forked child without running the parent's cleanup."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    os._exit(code if 0 <= code <= 255 else 255)


def _write_quietly(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass
