"""What a freshly forked vmshim child (a monitor, a host agent) does with its stdio."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Callable


def redirect_stdio(log_fd: int, keep: int) -> None:
    """Stdin from /dev/null, stdout and stderr to *log_fd*, every other descriptor but
    *keep* closed, and ``sys.stdout``/``sys.stderr`` bound anew to descriptors 1 and 2.

    Precondition: called in the child right after ``fork``. The rebinding matters: the
    parent's stream objects may write to descriptors just closed (pytest's capture does),
    and a child that logs through them would die of EBADF on its first line."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def fork_detached(
    child_end: socket.socket, main: Callable[[], None], *, close_in_child: socket.socket, what: str
) -> None:
    """Run *main* in a grandchild that is nobody's child (fork, new session, fork again),
    the way monitors and the pool's keeper come to life. The child closes
    *close_in_child* (the parent's end of their socketpair), the parent closes
    *child_end* and reaps the intermediate child. The grandchild exits 0 when *main*
    returns; when it raises, "*what* failed:" and the traceback go to its stderr (where
    *main* redirected it: its log) and it exits 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        try:
            close_in_child.close()
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _run_then_exit(main, what)
        finally:
            os._exit(1)
    child_end.close()
    try:
        os.waitpid(pid, 0)  # retried on EINTR by Python (PEP 475)
    except ChildProcessError:
        pass


def _run_then_exit(main: Callable[[], None], what: str) -> None:  # pragma: no cover - child
    code = 0
    try:
        main()
    except BaseException:  # noqa: BLE001 - whatever ends it, say why in the log
        code = 1
        try:
            sys.stderr.write(f"{what} failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)
