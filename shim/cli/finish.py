"""Ending a command whose work is done without the interpreter's teardown."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr and end the process with *code* at once: no atexit
    handlers, no freeing of every module and object (~10 ms of each ``vmshim run`` here,
    after the container's exit code arrived). Precondition: nothing of the command is
    left to do in this process (the container's monitor is a process of its own)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
