"""What a freshly forked vmshim child (a monitor, a host agent) does with its stdio."""

from __future__ import annotations

import os
import sys


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
