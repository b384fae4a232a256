"""Start a container's process in new namespaces (or another one in its namespaces).
Stdlib only; used by the guest agent and, on the host, for ``--isolation process``.

How a container process comes to life (three processes, two forks)::

    caller ──fork──▶ intermediate: join cgroup, unshare(namespaces) or setns(…)
                       └─fork──▶ container process (PID 1 of the new pid namespace):
                                  mounts + pivot_root, hostname, pty or pipes on 0/1/2,
                                  user, cwd, env, execve
                     intermediate: reports the container's pid, exits at once

``unshare(CLONE_NEWPID)`` only moves the *children* of the caller into the new pid
namespace, hence the second fork. The intermediate exits immediately and the container
process is re-parented to the caller, which is PID 1 in the guest and a *child subreaper*
on the host (:func:`spawn_container` sets that). So the caller ``waitpid``s the container
process itself and gets its real status (``exit_code_from_status``: 128+N on signal N), and
signals it directly by its pid. No relay process stays behind.

The two children talk to the caller over one CLOEXEC ``SOCK_SEQPACKET`` socket pair:

- ``pid:<n>``          the container's pid (in the caller's pid namespace)
- ``pty`` + fd         the pty master, opened *inside* the container's /dev/pts
- ``err:<code>:<msg>`` setup or exec failed; the process exits with <code>
- end of file          every sender is gone: the exec succeeded (or the error was sent)

Exit codes for failures, as docker reports them: 127 command not found, 126 found but not
executable, 125 any other setup failure (mounts, unknown user, missing cwd).

Note that a PID 1 ignores signals it has no handler for (SIGKILL excepted), also when they
come from outside its pid namespace: ``docker stop`` has the same behaviour.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import termios

from guest.protocol import exit_code_from_status
from guest.runtime import rootfs as rootfs_mod
from guest.runtime import syscalls
from guest.runtime.cgroups import Cgroup
from guest.runtime.users import ExecUser, UserError, resolve_user
from guest.spec import ProcessSpec

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_NAMESPACES = ("mnt", "pid", "uts", "ipc", "net")
NAMESPACE_ORDER = ("cgroup", "ipc", "uts", "net", "pid", "mnt")
"""The order in which setns joins them (as nsenter does): mnt last, since after it
/proc/<pid>/ns would be looked up in the container."""

EXIT_SETUP_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class SpawnError(Exception):
    """The process could not be started. ``exit_code`` is what the caller should report
    (125/126/127, see the module doc); the text is for the user."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class _ChildFailure(Exception):
    """Raised inside the children; carries the exit code to report."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class Spawned:
    """A started process and the caller's ends of its stdio.

    With a tty there is one fd, ``master`` (read output, write input, resize); ``stdin``,
    ``stdout`` and ``stderr`` are None. Without, ``stdin`` is the write end of its stdin
    pipe (None when stdin was not requested: the process reads /dev/null), ``stdout`` and
    ``stderr`` the read ends of its output pipes. The caller owns these fds.
    ``console`` (an OS container's init only) is a slave fd of that pty held by the caller:
    an init closes its stdio and opens /dev/console only to write, and without a slave
    open the master would read EIO (end of output) and the pty would be torn down.
    """

    def __init__(
        self,
        pid: int,
        tty: bool,
        master: int | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ):
        self.pid = pid
        self.tty = tty
        self.master = master
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.console: int | None = None

    def __repr__(self) -> str:
        return (
            f"Spawned(pid={self.pid}, tty={self.tty}, master={self.master}, "
            f"stdin={self.stdin}, stdout={self.stdout}, stderr={self.stderr})"
        )

    def fds(self) -> list[int]:
        return [fd for fd in (self.master, self.stdin, self.stdout, self.stderr) if fd is not None]

    def close(self) -> None:
        """Close every caller-side fd still open (idempotent)."""
        for name in ("master", "stdin", "stdout", "stderr", "console"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)


class _Plan:
    """Everything the children need, decided by the caller before forking."""

    def __init__(
        self,
        *,
        process: ProcessSpec,
        hostname: str,
        stdin: bool,
        rows: int,
        cols: int,
        cgroup: Cgroup | None,
        unshare_flags: int = 0,
        rootfs: str | None = None,
        bind_files: dict[str, str] | None = None,
        cgroup2_inside: bool = False,
        loopback: bool = False,
        set_hostname: bool = False,
        join_fds: list[int] | None = None,
        builtin: Callable[[], int] | None = None,
        masked_paths: Iterable[str] | None = None,
        readonly_paths: Iterable[str] | None = None,
        privileged: bool = False,
        devices: Iterable[dict[str, Any]] = (),
        os_init: bool = False,
        hold: bool = False,
    ) -> None:
        self.process = process
        self.hostname = hostname
        self.stdin = stdin
        self.rows = rows
        self.cols = cols
        self.cgroup = cgroup
        # A new container: unshare these, assemble the rootfs, set it up.
        self.unshare_flags = unshare_flags
        self.rootfs = rootfs
        self.bind_files = bind_files or {}
        self.cgroup2_inside = cgroup2_inside
        self.loopback = loopback
        self.set_hostname = set_hostname
        self.masked_paths = masked_paths  # None: rootfs.MASKED_PATHS
        self.readonly_paths = readonly_paths
        self.privileged = privileged
        self.devices = list(devices)
        self.os_init = os_init
        # Exec: join these namespaces instead (open fds, in NAMESPACE_ORDER).
        self.join_fds = join_fds or []
        # Instead of execve: call builtin() in the container and exit with its result.
        self.builtin = builtin
        self.seccomp_program: bytes | None = None  # compiled by _spawn, installed by the container process
        self.limits_applied = False  # rlimits set before a new user namespace
        # Held (hold_container): the container process waits before its user, stdio and
        # exec for the process to run, sent by Held.go.
        self.hold = hold


# ---- the caller's side ------------------------------------------------------------------


def spawn_container(
    rootfs: str | None,
    process: ProcessSpec,
    hostname: str,
    cgroup: Cgroup | None,
    namespaces: Iterable[str] = DEFAULT_NAMESPACES,
    hosts_files: dict[str, str] | None = None,
    stdin: bool = True,
    rows: int = 24,
    cols: int = 80,
    masked_paths: Iterable[str] | None = None,
    readonly_paths: Iterable[str] | None = None,
    privileged: bool = False,
    devices: Iterable[dict[str, Any]] = (),
    builtin: Callable[[], int] | None = None,
    os_init: bool = False,
    join: tuple[int, tuple[str, ...]] | None = None,
) -> Spawned:
    """Start *process* as PID 1 of a new container whose root is *rootfs* (a directory,
    usually an overlay mount; it is bind-mounted, never changed except for the mount
    points it lacks).

    *namespaces* names the new namespaces (``mnt pid uts ipc net cgroup``). Without
    ``mnt`` the process is only chroot'ed; with *rootfs* None it keeps the caller's root
    (tests, and plain processes on the host). *hosts_files* maps container paths to files to
    bind-mount there (see :func:`rootfs.prepare_rootfs`). ``process.tty`` selects a pty
    (of *rows* × *cols*) instead of pipes. *masked_paths* / *readonly_paths* replace the
    default lists of :func:`rootfs.setup_mounts` (None: the defaults). *builtin*: as for
    :func:`exec_in_container`. *os_init*: the process is an init (guest.runtime.osinit):
    its cgroup is delegated to it, /run and /tmp are tmpfs. *join*: (pid, names): first
    join these namespaces of process *pid* (a pod member sharing its sandbox's uts and
    ipc), then make the new *namespaces* (which must not name them).

    Returns once the process has exec'ed. Raises SpawnError (with its exit code) when the
    namespaces, mounts, user, cwd or exec fail; the failed process has then been reaped.
    """
    plan = _container_plan(
        rootfs,
        process,
        hostname,
        cgroup,
        namespaces=namespaces,
        hosts_files=hosts_files,
        stdin=stdin,
        rows=rows,
        cols=cols,
        masked_paths=masked_paths,
        readonly_paths=readonly_paths,
        privileged=privileged,
        devices=devices,
        builtin=builtin,
        os_init=os_init,
    )
    if join is not None:
        join_pid, join_names = join
        if set(join_names) & set(namespaces):
            raise SpawnError("a namespace cannot be both joined and new")
        plan.join_fds = _open_namespaces(join_pid, join_names, "the pod's")
    try:
        syscalls.set_child_subreaper()
        spawned = _spawn(plan)
        assert isinstance(spawned, Spawned)
        return spawned
    finally:
        for fd in plan.join_fds:
            os.close(fd)


def hold_container(
    rootfs: str,
    process: ProcessSpec,
    hostname: str,
    cgroup: Cgroup | None,
    namespaces: Iterable[str] = DEFAULT_NAMESPACES,
    **options: Any,
) -> Held:
    """Like :func:`spawn_container` (*options*: its *hosts_files*, *masked_paths*,
    *readonly_paths*, *privileged*, *devices*), but the container process stops short of
    its user, stdio and execve and waits for :meth:`Held.go`: its cgroup, namespaces,
    mounts and root are made now. A snapshot template holds one when it is saved, so a
    restored copy does not make them under an empty TCG translation cache.

    *process* is only a placeholder (its user namespace maps are refused: they would be
    made before the real process is known). Raises SpawnError."""
    if process.id_mappings:
        raise SpawnError("a container with a user namespace cannot be held before its process is known")
    import resource  # noqa: F401 - now: after its pivot_root the held process cannot import

    from guest.runtime import seccomp  # noqa: F401 - likewise, for the seccomp filter it installs

    plan = _container_plan(rootfs, process, hostname, cgroup, namespaces=namespaces, stdin=False, **options)
    plan.hold = True
    _last_cap()
    syscalls.set_child_subreaper()
    held = _spawn(plan)
    assert isinstance(held, Held)
    return held


def _container_plan(
    rootfs: str | None,
    process: ProcessSpec,
    hostname: str,
    cgroup: Cgroup | None,
    *,
    namespaces: Iterable[str],
    hosts_files: dict[str, str] | None = None,
    stdin: bool,
    rows: int = 24,
    cols: int = 80,
    masked_paths: Iterable[str] | None = None,
    readonly_paths: Iterable[str] | None = None,
    privileged: bool = False,
    devices: Iterable[dict[str, Any]] = (),
    builtin: Callable[[], int] | None = None,
    os_init: bool = False,
) -> _Plan:
    unknown = set(namespaces) - set(syscalls.NAMESPACE_FLAGS)
    if unknown:
        raise SpawnError(f"unknown namespaces: {', '.join(sorted(unknown))}")
    flags = 0
    for name in namespaces:
        flags |= syscalls.NAMESPACE_FLAGS[name]
    cgroup2_inside = cgroup is not None and cgroup.version == 2 and "mnt" in namespaces
    return _Plan(
        process=process,
        hostname=hostname,
        stdin=stdin,
        rows=rows,
        cols=cols,
        cgroup=cgroup,
        unshare_flags=flags,
        rootfs=os.path.abspath(rootfs) if rootfs is not None else None,
        bind_files=dict(hosts_files or {}),
        cgroup2_inside=cgroup2_inside,
        loopback="net" in namespaces,
        set_hostname="uts" in namespaces,
        masked_paths=masked_paths,
        readonly_paths=readonly_paths,
        privileged=privileged,
        devices=devices,
        builtin=builtin,
        os_init=os_init,
    )


def _open_namespaces(pid: int, names: Iterable[str], whose: str) -> list[int]:
    """Open /proc/PID/ns/NAME for *names* in NAMESPACE_ORDER. Raises SpawnError."""
    fds: list[int] = []
    for name in NAMESPACE_ORDER:
        if name in names:
            try:
                fds.append(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                raise SpawnError(f"cannot join {whose} {name} namespace: {exc.strerror}") from None
    return fds


def exec_in_container(
    container_pid: int,
    process: ProcessSpec,
    *,
    hostname: str = "",
    cgroup: Cgroup | None = None,
    namespaces: Iterable[str] = DEFAULT_NAMESPACES,
    stdin: bool = True,
    rows: int = 24,
    cols: int = 80,
    builtin: Callable[[], int] | None = None,
) -> Spawned:
    """Start *process* inside the running container whose PID 1 is *container_pid* (as
    seen by the caller): join its *namespaces* and *cgroup* (and its user namespace first,
    when it has one of its own). Same return and errors as :func:`spawn_container`.

    *builtin*: a callable (no arguments, returns an exit code) run in the container in
    place of ``execve`` of ``process.args`` (see guest.runtime.builtins). Everything it
    needs must be imported before this call: the container's root has no python."""
    join_fds = []
    try:
        try:
            own_user = os.stat(f"/proc/{container_pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        except OSError:
            own_user = False
        if own_user:
            join_fds.append(os.open(f"/proc/{container_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
        for name in NAMESPACE_ORDER:
            if name in namespaces:
                path = f"/proc/{container_pid}/ns/{name}"
                try:
                    join_fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                except OSError as exc:
                    raise SpawnError(f"cannot join the container's {name} namespace: {exc.strerror}") from None
        plan = _Plan(
            process=process,
            hostname=hostname,
            stdin=stdin,
            rows=rows,
            cols=cols,
            cgroup=cgroup,
            join_fds=join_fds,
            builtin=builtin,
        )
        syscalls.set_child_subreaper()
        spawned = _spawn(plan)
        assert isinstance(spawned, Spawned)
        return spawned
    finally:
        for fd in join_fds:
            os.close(fd)


def _spawn(plan: _Plan) -> Spawned | Held:
    """Fork the intermediate, collect the reports, return the Spawned (a Held with
    ``plan.hold``) or raise SpawnError."""
    if plan.process.rlimits:
        import resource  # noqa: F401 - here: an exec's child is in the container's mount
        #                  namespace before it could import it (the image has no python)
    if not plan.hold:
        plan.seccomp_program = _seccomp_program(plan.process)  # here: the child has no python
    if plan.process.capabilities is not None:
        _last_cap()  # read once here, not by every child
    spawned = Spawned(pid=0, tty=plan.process.tty)
    stdio, ours, theirs = ([None, None, None], [], []) if plan.hold else _stdio_pipes(plan, spawned)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        intermediate = os.fork()
        if intermediate == 0:
            parent_sock.close()
            _intermediate(plan, child_sock, stdio)  # never returns
        child_sock.close()
        for fd in theirs:
            os.close(fd)
        theirs = []
        pid, master, console, error = _collect_reports(
            parent_sock, lambda: _write_id_maps(intermediate, plan.process.id_mappings), until_held=plan.hold
        )
        _wait_exactly(intermediate)
    except BaseException:
        for fd in ours + theirs:
            os.close(fd)
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    if plan.hold and error is None:
        return Held(pid, parent_sock, plan)
    parent_sock.close()
    return _started(spawned, pid, master, console, error)


def _stdio_pipes(plan: _Plan, spawned: Spawned) -> tuple[list[int | None], list[int], list[int]]:
    """The pipes of a process without a tty: (the child's 0, 1, 2 (None: /dev/null),
    the caller's ends (also set on *spawned*), the child's ends)."""
    stdio: list[int | None] = [None, None, None]
    ours: list[int] = []
    theirs: list[int] = []
    if plan.process.tty:
        return stdio, ours, theirs
    if plan.stdin:
        r, w = os.pipe()
        stdio[0], spawned.stdin = r, w
        theirs.append(r)
        ours.append(w)
    for index, name in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        stdio[index] = w
        setattr(spawned, name, r)
        theirs.append(w)
        ours.append(r)
    return stdio, ours, theirs


def _started(
    spawned: Spawned, pid: int, master: int | None, console: int | None, error: tuple[int, str] | None
) -> Spawned:
    """*spawned* with the reported *pid* and pty; or, after an *error*, everything closed,
    the process reaped and SpawnError raised."""
    if error is not None:
        spawned.close()
        for held in (master, console):
            if held is not None:
                os.close(held)
        if pid:
            _wait_exactly(pid)
        raise SpawnError(error[1], error[0])
    spawned.pid = pid
    spawned.master, spawned.console = master, console
    return spawned


MAX_GO = 256 * 1024
"""Largest ``go`` message a held container process reads (the process spec as JSON)."""


class Held:
    """A container process forked up to its execve and waiting (:func:`hold_container`).

    :meth:`go` gives it the process to become; :meth:`release` ends it unused. Exactly one
    of them is called. ``pid`` is its pid (in the caller's pid namespace)."""

    def __init__(self, pid: int, sock: socket.socket, plan: _Plan):
        self.pid = pid
        self._sock: socket.socket | None = sock
        self._plan = plan

    def go(self, process: ProcessSpec, *, hostname: str, stdin: bool, rows: int = 24, cols: int = 80) -> Spawned:
        """Make the held process *process* (on a uts namespace of its own, *hostname* is
        set) and return it as :func:`spawn_container` does. Raises HeldGone when it is not
        there to take it (it was not started: spawn it the usual way), SpawnError when it
        failed after taking it. Precondition: *process* has no user namespace maps."""
        if process.id_mappings:
            raise HeldGone("a held container process cannot enter a user namespace")
        if self._sock is None:
            raise HeldGone("the held container process was used or released already")
        plan = self._plan
        plan.process, plan.stdin = process, stdin
        seccomp_program = _seccomp_program(process)
        if process.capabilities is not None:
            _last_cap()
        go = json.dumps(
            {
                "process": process.to_dict(),
                "hostname": hostname,
                "stdin": stdin,
                "rows": rows,
                "cols": cols,
                "seccomp": seccomp_program.hex() if seccomp_program is not None else None,
            }
        ).encode()
        if len(go) > MAX_GO:
            raise HeldGone("the process spec is too large for a held container process")
        spawned = Spawned(pid=0, tty=process.tty)
        stdio, ours, theirs = _stdio_pipes(plan, spawned)
        sock, self._sock = self._sock, None
        try:
            try:
                socket.send_fds(sock, [go], theirs)
            except OSError as exc:
                raise HeldGone(f"the held container process is gone: {exc.strerror}") from None
            finally:
                for fd in theirs:
                    os.close(fd)
            _pid, master, console, error = _collect_reports(sock, pid=self.pid)
        except BaseException:
            for fd in ours:
                os.close(fd)
            sock.close()
            self._end()
            raise
        sock.close()
        return _started(spawned, self.pid, master, console, error)

    def release(self) -> None:
        """End the held process unused and reap it (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._end()

    def _end(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_exactly(self.pid)


class HeldGone(SpawnError):
    """A held container process could not take its process; nothing of it ran."""


def _write_id_maps(pid: int, maps: dict[str, list[list[int]]] | None) -> None:
    """Write the new user namespace's maps of the intermediate *pid* (from here, the
    parent namespace: arbitrary maps need CAP_SETUID/CAP_SETGID there)."""
    if not maps:
        return
    for kind in ("gid", "uid"):
        text = "".join(f"{c} {h} {s}\n" for c, h, s in maps[kind])
        with open(f"/proc/{pid}/{kind}_map", "w") as f:
            f.write(text)


def _collect_reports(
    sock: socket.socket, write_maps: Callable[[], None] | None = None, until_held: bool = False, pid: int = 0
) -> tuple[int, int | None, int | None, tuple[int, str] | None]:
    """Read the children's reports until end of file: (pid, pty master, a held console
    slave or None, (code, message) or None). On ``maps`` (a new user namespace), call
    *write_maps* and answer ``go`` (``no:<reason>`` when it failed). *until_held*: stop
    once the pid came and the container process said ``held`` (hold_container); *pid*:
    the container process's, known already (Held.go)."""
    master, console = None, None
    error: tuple[int, str] | None = None
    held = False
    while not (until_held and held and pid):
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 2)  # pty: master, console
        except InterruptedError:
            continue
        if not data and not fds:
            break
        if data == b"maps":
            try:
                if write_maps is not None:
                    write_maps()
                sock.send(b"go")
            except OSError as exc:
                sock.send(b"no:" + str(exc).encode()[:500])
        elif data.startswith(b"pid:"):
            pid = int(data[4:])
        elif data == b"held":
            held = True
        elif data == b"pty" and fds and master is None:
            master = fds.pop(0)
            if fds:
                console = fds.pop(0)
        elif data.startswith(b"err:"):
            code, _, message = data[4:].partition(b":")
            error = (int(code), message.decode(errors="replace"))
        for fd in fds:  # anything unexpected
            os.close(fd)
    if not pid and error is None:
        error = (EXIT_SETUP_FAILED, "the container process did not start (no report)")
    if until_held and not held and error is None:
        error = (EXIT_SETUP_FAILED, "the held container process ended before it was ready")
    return pid, master, console, error


def _wait_exactly(pid: int) -> int:
    """Block until *pid* exits; return its status as an exit code (EINTR-safe)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return exit_code_from_status(status)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 255  # somebody else reaped it


def wait(pid: int) -> int:
    """Block until child *pid* exits; return its exit code (128+N if killed by signal N)."""
    return _wait_exactly(pid)


def reap(pid: int) -> int | None:
    """Exit code of child *pid* if it has exited (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done == 0:
        return None
    return exit_code_from_status(status)


TIOCGPTPEER = 0x5441


def reopen_console(master: int) -> int | None:
    """A new fd of the slave of pty *master* (TIOCGPTPEER: no path is looked up), held by
    the agent for an OS container's init after its console was hung up; None when the
    kernel refuses."""
    try:
        return fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a pty (master or slave); the foreground process gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# ---- the children -----------------------------------------------------------------------


def _report(sock: socket.socket, message: bytes, fds: Sequence[int] = ()) -> None:
    try:
        if fds:
            socket.send_fds(sock, [message], list(fds))
        else:
            sock.send(message)
    except OSError:
        pass  # the caller is gone; nothing left to tell


def _report_failure(sock: socket.socket, code: int, message: str) -> None:
    raw = message.encode(errors="replace")[:60000]
    _report(sock, b"err:%d:" % code + raw)


def _reset_signals() -> None:
    """Give the child default dispositions and an empty mask: Python ignores SIGPIPE and
    SIGXFSZ, and ignored signals survive execve."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass  # not the main thread
    for signum in range(1, signal.NSIG):
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _intermediate(plan: _Plan, sock: socket.socket, stdio: list[int | None]) -> None:
    """First child: enter the cgroup and namespaces, fork the container process, report
    its pid, exit. Never returns."""
    code = 0
    try:
        _reset_signals()
        if plan.cgroup is not None:
            plan.cgroup.join_self()  # before unshare(CLONE_NEWCGROUP): it becomes the root
        for fd in plan.join_fds:  # an exec's; or a pod member's shared uts/ipc
            syscalls.setns(fd, 0)
        if plan.unshare_flags and plan.process.id_mappings:
            _enter_user_namespace(plan, sock)
        elif plan.unshare_flags:
            syscalls.unshare(plan.unshare_flags)
        pid = os.fork()
        if pid == 0:
            _container_process(plan, sock, stdio)  # never returns
        _report(sock, b"pid:%d" % pid)
    except _ChildFailure as exc:
        _report_failure(sock, exc.exit_code, str(exc))
        code = exc.exit_code
    except BaseException as exc:  # noqa: BLE001 - we are a forked child: never unwind
        _report_failure(sock, EXIT_SETUP_FAILED, f"cannot create the container: {_describe(exc)}")
        code = EXIT_SETUP_FAILED
    os._exit(code)


def _enter_user_namespace(plan: _Plan, sock: socket.socket) -> None:
    """unshare a new user namespace with the others (which it then owns), have the
    caller write its maps, and become its root. The rlimits and OOM score are set first:
    raising them needs privileges in the parent namespace."""
    _apply_process_limits(plan.process)
    plan.limits_applied = True
    syscalls.unshare(plan.unshare_flags | syscalls.CLONE_NEWUSER)
    _report(sock, b"maps")
    answer = sock.recv(1024)
    if answer != b"go":
        raise _ChildFailure("cannot write the user namespace's id maps: " + answer[3:].decode(errors="replace"))
    for become in (os.setresgid, os.setresuid):
        try:
            become(0, 0, 0)
        except OSError:
            pass  # container id 0 is not mapped: the process's own user must be


def _container_process(plan: _Plan, sock: socket.socket, stdio: list[int | None]) -> None:
    """Second child: becomes the container's process. Never returns."""
    code = EXIT_SETUP_FAILED
    try:
        os.setsid()
        if plan.process.rlimits:
            import resource  # noqa: F401 - now: the container's root has no python
        if plan.rootfs is not None:
            _enter_rootfs(plan, plan.rootfs)
        if plan.loopback:
            loopback_up()
        resolved: tuple[str, ExecUser] | None = None
        if plan.hold:
            # Its root cannot change until it runs: no container process ran yet.
            try:
                resolved = (plan.process.user, resolve_user(plan.process.user, "/"))
            except UserError:
                pass
            _read_executable(plan.process)
            stdio = _await_go(plan, sock)
        if plan.set_hostname and plan.hostname:
            syscalls.sethostname(plan.hostname)
        if resolved is not None and resolved[0] == plan.process.user:
            user = resolved[1]
        else:
            try:
                user = resolve_user(plan.process.user, "/")
            except UserError as exc:
                raise _ChildFailure(str(exc)) from None
        _setup_stdio(plan, sock, stdio, user.uid)
        if not plan.limits_applied:
            _apply_process_limits(plan.process)
        caps = plan.process.capabilities
        seccomp_filter = plan.seccomp_program
        if seccomp_filter is not None and not plan.process.no_new_privs:
            _install_seccomp(seccomp_filter)  # while we still hold CAP_SYS_ADMIN (as runc)
        bounding = None
        if caps is not None:
            bounding = _drop_bounding(caps.get("bounding", []))
            if user.uid != 0:
                syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 1)
        if plan.process.additional_gids:
            user = user._replace(groups=tuple(dict.fromkeys(list(user.groups) + list(plan.process.additional_gids))))
        _become(user)
        if caps is not None:
            _set_capabilities(_sets_for(caps, user.uid), bounding)
        if plan.process.umask is not None:
            os.umask(plan.process.umask)
        if plan.process.no_new_privs:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            if seccomp_filter is not None:
                _install_seccomp(seccomp_filter)  # last: the fewest syscalls after it
        try:
            os.chdir(plan.process.cwd)
        except OSError as exc:
            raise _ChildFailure(
                f"cannot change to the working directory {plan.process.cwd}: {(exc.strerror or str(exc)).lower()}"
            ) from None
        env = build_env(plan.process, hostname=plan.hostname, home=user.home)
        if plan.builtin is not None:
            sock.close()  # end of file for the caller: "started"
            code = 1
            try:
                code = plan.builtin()
            finally:
                os._exit(code)
        _exec(plan.process.args, env)
    except _ChildFailure as exc:
        code = exc.exit_code
        _report_failure(sock, code, str(exc))
    except BaseException as exc:  # noqa: BLE001 - forked child: report, never unwind
        _report_failure(sock, code, f"cannot start the container process: {_describe(exc)}")
    os._exit(code)


MAX_WARM_READ = 64 << 20
"""Most bytes of its program a held process reads ahead (:func:`_read_executable`)."""


def _read_executable(process: ProcessSpec) -> None:
    """Read *process*'s program (a regular file, at most MAX_WARM_READ bytes) into the
    page cache, in the container's root: a held process's VM is saved with it, so a
    restored copy's execve does not read it from the image's layer disk. Errors are
    ignored: the execve will report them."""
    try:
        path = find_executable(process.args[0], build_env(process).get("PATH", DEFAULT_PATH))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, _ChildFailure):
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            left = MAX_WARM_READ
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
    except OSError:
        pass
    finally:
        os.close(fd)


def _await_go(plan: _Plan, sock: socket.socket) -> list[int | None]:
    """A held container process (:func:`hold_container`): say ``held``, then wait for
    :meth:`Held.go` and take its process, hostname, terminal size, seccomp filter and
    pipes into *plan*. Returns the fds for 0, 1, 2. Ends quietly (exit 0) when the holder
    let go without one."""
    _report(sock, b"held")
    while True:
        try:
            data, fds, flags, _addr = socket.recv_fds(sock, MAX_GO, 3)
            break
        except InterruptedError:
            continue
    if not data:
        os._exit(0)
    if flags & socket.MSG_TRUNC:
        raise _ChildFailure("the process spec did not fit the held container process's buffer")
    go = json.loads(data)
    plan.process = ProcessSpec.from_dict(go["process"])
    plan.hostname, plan.stdin, plan.rows, plan.cols = go["hostname"], go["stdin"], go["rows"], go["cols"]
    plan.seccomp_program = bytes.fromhex(go["seccomp"]) if go["seccomp"] is not None else None
    stdio: list[int | None] = [None, None, None]
    if not plan.process.tty:
        for index, fd in zip((0, 1, 2) if plan.stdin else (1, 2), fds):
            stdio[index] = fd
    return stdio


def _apply_process_limits(process: ProcessSpec) -> None:
    """``process.rlimits`` and ``process.oom_score_adj``, while still root (raising a
    hard limit or lowering the OOM score needs CAP_SYS_RESOURCE)."""
    if process.rlimits:
        import resource

        for name, soft, hard in process.rlimits:
            values = (resource.RLIM_INFINITY if soft < 0 else soft, resource.RLIM_INFINITY if hard < 0 else hard)
            try:
                resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), values)
            except (OSError, ValueError) as exc:
                # EPERM arrives as ValueError("not allowed to raise maximum limit").
                reason = (getattr(exc, "strerror", None) or str(exc)).lower()
                if "not allowed" in reason or getattr(exc, "errno", None) == errno.EPERM:
                    reason = "raising a hard limit needs CAP_SYS_RESOURCE"
                raise _ChildFailure(f"cannot set ulimit {name}={_rlim(soft)}:{_rlim(hard)}: {reason}") from None
    if process.oom_score_adj is not None:
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(process.oom_score_adj))
        except OSError as exc:
            raise _ChildFailure(
                f"cannot set oom_score_adj={process.oom_score_adj}: {(exc.strerror or str(exc)).lower()}"
            ) from None


def _cap_mask(names: Iterable[str], bounding: int | None = None) -> int:
    """The mask of capabilities *names* that are in the bounding set (this process's,
    unless *bounding*, a mask of it, is given)."""
    from guest.spec import CAPABILITIES

    mask = 0
    for name in names:
        mask |= 1 << CAPABILITIES.index(name)
    if bounding is None:
        bounding = _bounding_now()  # one prctl per capability
    return mask & bounding  # a capability we do not have cannot be given


def _bounding_now() -> int:
    """This process's bounding set (on a host that lacks some capability, --privileged
    gets every one there is)."""
    mask = 0
    for cap in range(_last_cap() + 1):
        try:
            if syscalls.prctl(PR_CAPBSET_READ, cap) == 1:
                mask |= 1 << cap
        except OSError:
            break
    return mask


PR_CAPBSET_READ = 23

_last_cap_read: list[int] = []
"""/proc/sys/kernel/cap_last_cap once read (the kernel's: it does not change)."""


def _last_cap() -> int:
    if _last_cap_read:
        return _last_cap_read[0]
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            value = int(f.read())
    except (OSError, ValueError):
        return 40
    _last_cap_read.append(value)
    return value


def _drop_bounding(keep: Iterable[str]) -> int:
    """Drop every capability not in *keep* from the bounding set (needs CAP_SETPCAP, so
    before the uid changes): what an exec can ever gain. Returns the bounding set now
    (a mask: *keep* as far as it was in the set), for :func:`_set_capabilities`."""
    wanted = _cap_mask(keep)
    for cap in range(_last_cap() + 1):
        if not wanted & (1 << cap):
            try:
                syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
            except OSError as exc:
                raise _ChildFailure(f"cannot drop capability {cap} from the bounding set: {exc.strerror}") from None
    return wanted


def _set_capabilities(caps: dict[str, list[str]], bounding: int | None = None) -> None:
    """The effective, permitted, inheritable and ambient sets of an OCI process. An
    ambient capability the kernel refuses (it must be permitted and inheritable too) is
    left out, as runc does. *bounding*: the bounding set's mask when the caller knows
    it (what :func:`_drop_bounding` returned), else it is read (one prctl a capability)."""
    from guest.spec import CAPABILITIES

    if bounding is None:
        bounding = _bounding_now()
    try:
        syscalls.capset(
            _cap_mask(caps.get("effective", []), bounding),
            _cap_mask(caps.get("permitted", []), bounding),
            _cap_mask(caps.get("inheritable", []), bounding),
        )
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        raise _ChildFailure(f"cannot set the process's capabilities: {exc.strerror}") from None
    for name in caps.get("ambient", []):
        try:
            syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_RAISE, CAPABILITIES.index(name))
        except OSError:
            pass


def _sets_for(caps: dict[str, list[str]], uid: int) -> dict[str, list[str]]:
    """The five sets to apply. Only ``bounding`` given (``vmshim run``, docker's rule):
    root gets it as effective and permitted, any other user nothing."""
    if set(caps) != {"bounding"}:
        return caps
    granted = list(caps["bounding"]) if uid == 0 else []
    return {"bounding": list(caps["bounding"]), "effective": granted, "permitted": granted}


_default_programs: dict[tuple[str, ...], bytes] = {}
"""The default profile compiled, by bounding set (a pooled VM compiles docker's while it
waits for its container: see guest.init.warm_up)."""


def prepare_filters(process: ProcessSpec) -> None:
    """Compile *process*'s default seccomp filter into the cache :func:`_spawn` reads, and
    read cap_last_cap, ahead of its start: a snapshot template saves them with its VM, so
    a restored copy does not compute them in ``start`` under an empty TCG translation
    cache. A custom profile is compiled at the start as before. Raises SpawnError."""
    if process.seccomp == "default":
        _seccomp_program(process)
    if process.capabilities is not None:
        _last_cap()


def _seccomp_program(process: ProcessSpec) -> bytes | None:
    """The compiled filter for *process* (None: no filter). ``"default"`` is resolved
    against the bounding set (every capability when there is none). Raises SpawnError."""
    if process.seccomp is None:
        return None
    from guest.runtime import seccomp
    from guest.spec import CAPABILITIES

    oci = process.seccomp
    try:
        if oci == "default":
            caps = process.capabilities
            bounding = CAPABILITIES if caps is None else caps.get("bounding", [])
            key = tuple(sorted(bounding))
            if key not in _default_programs:
                _default_programs[key] = seccomp.compile_filter(seccomp.default_for(bounding))
            return _default_programs[key]
        return seccomp.compile_filter(oci)
    except seccomp.SeccompError as exc:
        raise SpawnError(f"cannot apply the seccomp profile: {exc}") from None


def _install_seccomp(program: bytes) -> None:
    from guest.runtime import seccomp

    try:
        seccomp.install_program(program)
    except OSError as exc:
        raise _ChildFailure(
            f"cannot apply the seccomp profile (does the kernel have CONFIG_SECCOMP_FILTER?): {exc.strerror}"
        ) from None


def _rlim(value: int) -> str:
    return "unlimited" if value < 0 else str(value)


def _become(user: ExecUser) -> None:
    """Switch to the container user's groups, gid and uid (in that order: the uid last,
    while we may still change the others). An unprivileged caller asking for its own
    ids is left as it is (it could not call setgroups), which lets tests run unprivileged."""
    if os.geteuid() != 0 and (os.getuid(), os.getgid()) == (user.uid, user.gid):
        return
    os.setgroups(user.groups)
    os.setgid(user.gid)
    os.setuid(user.uid)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror.lower()}{where}"
    return str(exc) or type(exc).__name__


def _enter_rootfs(plan: _Plan, rootfs: str) -> None:
    """Make *rootfs* (``plan.rootfs``) this process's root."""
    if plan.unshare_flags & syscalls.CLONE_NEWNS:
        try:
            rootfs_mod.setup_mounts(
                rootfs,
                bind_files=plan.bind_files,
                cgroup2=plan.cgroup2_inside,
                masked_paths=plan.masked_paths,
                readonly_paths=plan.readonly_paths,
                privileged=plan.privileged,
                devices=plan.devices,
                os_init=plan.os_init,
            )
            rootfs_mod.pivot_to(rootfs)
        except OSError as exc:
            raise _ChildFailure(f"cannot set up the container's filesystem: {_describe(exc)}") from None
    else:
        os.chroot(rootfs)
        os.chdir("/")


def loopback_up() -> None:
    """Bring up ``lo`` in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _setup_stdio(plan: _Plan, sock: socket.socket, stdio: list[int | None], uid: int) -> None:
    """Put the pty slave (opened in the container's own /dev/pts) or the pipes on 0/1/2,
    and close every other inherited fd except the report socket."""
    if plan.process.tty:
        master, slave = os.openpty()
        set_window_size(slave, plan.rows, plan.cols)
        os.fchown(slave, uid, -1)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        if plan.os_init and plan.rootfs is not None:
            rootfs_mod.bind_console(os.ttyname(slave))
        _report(sock, b"pty", [master, slave] if plan.os_init else [master])
        os.close(master)
        targets = [slave, slave, slave]
    else:
        if stdio[0] is None:
            stdio[0] = os.open("/dev/null", os.O_RDONLY)
        targets = [fd for fd in stdio if fd is not None]  # all of them: _spawn made the pipes, stdin is above
    # dup2 via fresh copies first, so a target already sitting on 0..2 is not clobbered.
    copies = [os.dup(fd) for fd in targets]
    for index, fd in enumerate(copies):
        os.dup2(fd, index)  # inheritable
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)


def build_env(process: ProcessSpec, *, hostname: str = "", home: str = "/") -> dict[str, str]:
    """The environment for execve: the spec's K=V list plus defaults docker sets
    (PATH, HOSTNAME, HOME, and TERM=xterm with a tty) where the spec has none."""
    env: dict[str, str] = {}
    for item in process.env:
        key, _, value = item.partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    if hostname:
        env.setdefault("HOSTNAME", hostname)
    env.setdefault("HOME", home or "/")
    if process.tty:
        env.setdefault("TERM", "xterm")
    return env


def find_executable(name: str, path_var: str) -> str:
    """Resolve *name* like execvp does, in the current root. A name with a slash is used
    as is. Raises _ChildFailure(127) when nothing on *path_var* matches."""
    if "/" in name:
        return name
    for directory in path_var.split(":"):
        candidate = os.path.join(directory or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    raise _ChildFailure(f'exec: "{name}": executable file not found in $PATH', EXIT_NOT_FOUND)


def _exec(args: list[str], env: dict[str, str]) -> None:
    path = find_executable(args[0], env.get("PATH", DEFAULT_PATH))
    try:
        os.execve(path, args, env)
    except OSError as exc:
        reason = (exc.strerror or "error").lower()
        code = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        raise _ChildFailure(f'exec: "{args[0]}": {reason}', code) from None
