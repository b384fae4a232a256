"""exit_now: the CLI's quick end keeps what was printed and the exit code."""

from __future__ import annotations

import subprocess
import sys


def test_exit_now_flushes_stdout_and_stderr_and_keeps_the_code():
    code = (
        "import sys; from shim.cli.finish import exit_now; "
        "print('out', end=''); print('err', end='', file=sys.stderr); exit_now(3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")
