"""What ``ps``/``top`` show for a long-lived helper process (the monitor), without a
dependency: the kernel's ``comm`` (``prctl(PR_SET_NAME)``, 15 bytes, what ``top`` and
``ps -o comm`` show) and the command line (``ps -f``, ``/proc/PID/cmdline``), rewritten in
place in the memory that held the original argv, as setproctitle(3) does. CPython keeps
its own copies of argv, so overwriting the C strings is safe. The title is cut to the
size of the original command line (a vmshim command line is longer than a monitor's title
in practice)."""

from __future__ import annotations

import ctypes
import ctypes.util

PR_SET_NAME = 15


def set_process_title(title: str) -> None:
    """Make ``ps`` show *title* for this process. Never raises (a title is cosmetic)."""
    raw = title.encode(errors="replace")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    start, end = _argv_area()
    if not start or end <= start:
        return
    size = end - start
    text = raw[: size - 1]
    ctypes.memset(start, 0, size)
    ctypes.memmove(start, text, len(text))


def _argv_area() -> tuple[int, int]:
    """(arg_start, arg_end) of this process, from /proc/self/stat (fields 48 and 49)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[45]), int(fields[46])  # fields after "comm)" start at field 3
    except (OSError, IndexError, ValueError):
        return 0, 0
