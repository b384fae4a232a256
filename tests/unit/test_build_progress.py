"""``vmshim build --progress tty``: the collapsing step view (shim/cli/build_progress.py)."""

from __future__ import annotations

import io
import os
import threading

from shim.cli.build_progress import TtyOutput


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_steps_collapse_and_cached_steps_are_marked():
    stream, clock = io.StringIO(), Clock()
    out = TtyOutput(stream, clock=clock, tick=0)
    out.step(1, 3, "FROM busybox")
    out.line(" ---> Using cache")
    out.line(" ---> 0123456789ab")
    out.step(2, 3, "RUN make")
    clock.now += 2.5
    os.write(out.run_fd, b"".join(b"line %d\n" % i for i in range(10)))
    for _ in range(200):  # the reader thread picks the output up
        if len(out.steps[1].tail) == 10:
            break
        threading.Event().wait(0.01)
    view = out.render()
    assert view[0] == "[+] Building 2.5s (1/3)"
    assert view[1] == " => CACHED [1/3] FROM busybox"
    assert view[2] == " => [2/3] RUN make  2.5s"
    assert view[3:] == [f" => => # line {i}" for i in range(4, 10)]  # the last six
    out.line(" ---> abcdef012345")
    out.close()
    final = stream.getvalue()
    last = final[final.rindex("[+] Building") :]
    assert "line 9" not in last and " => [2/3] RUN make  2.5s" in last
    assert last.startswith("[+] Building 2.5s (2/3) FINISHED\n")
    assert "\x1b[" in final


def test_a_failed_step_keeps_all_its_output_and_control_bytes_are_replaced():
    stream, clock = io.StringIO(), Clock()
    out = TtyOutput(stream, clock=clock, tick=0)
    out.step(1, 1, "RUN false")
    os.write(out.run_fd, b"".join(b"out %d\n" % i for i in range(8)) + b"bad\x1b[2Jbyte\n")
    out.warn("something")
    out.close(failed=True)
    last = stream.getvalue()[stream.getvalue().rindex("[+] Building") :]
    assert all(f" => => # out {i}" in last for i in range(8))
    assert " => => # bad?[2Jbyte" in last and "[Warning] something" in last
