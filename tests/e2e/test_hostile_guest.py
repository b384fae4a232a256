"""The malicious-guest suite: containers whose guest agent attacks the host (issue 12).

A guest image variant is built from a copy of ``guest/`` whose agent carries
tests/e2e/hostile_agent.py's additions (``VMSHIM_GUEST_SOURCE``, see
shim.guestimage.guest_source_dir). Each test shows that the monitor stays up (or, where
the attack is a stream of bad messages or broken framing, that the container is killed
with one clear line), that exec and logs behave, that stop and rm -f work, and that
nothing on the host outside the container's own directories changed. Three VM boots in
all: one long-lived container takes the single-message attacks one after the other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.e2e import hostile_agent
from tests.e2e.conftest import err, ok, out, vmshim, wait_no_new_domains
from tests.waiting import alive, wait_until

pytestmark = pytest.mark.vm
PREFIX = f"hg{os.getpid()}"
SLOW_BOOT = {"VMSHIM_BOOT_TIMEOUT": "600"}
TICKER = "echo started; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"
MONITOR_LOG_CAP = 64 * 1024
"""monitor.log after any attack: a few lines, never a copy of the flood."""


def root() -> Path:
    from shim import paths

    return paths.root()


def host_snapshot() -> dict[str, tuple]:
    """(size, mtime, mode) of everything under the state root except the places a
    container run is expected to change (its own directory, the guest image builds and
    caches, run-time sockets, the networks' address books), plus a few host files a
    guest would love to reach."""
    base = root()
    skip = {base / "containers", base / "guest", base / "cache", base / "run", base / "networks"}
    seen = {}
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if Path(dirpath, d) not in skip]
        for name in files + dirs:
            p = Path(dirpath, name)
            st = p.lstat()
            seen[str(p)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    for extra in ("/etc/passwd", "/etc/crontab", "/root/.ssh"):
        try:
            st = os.lstat(extra)
            seen[extra] = (st.st_size, st.st_mtime_ns, st.st_mode)
        except OSError:
            seen[extra] = None
    return seen


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory):
    """The environment that makes the CLI (and the monitors it forks) use the hostile
    guest image; the image is built here, once (content-hashed: cached across runs)."""
    import guest

    src = tmp_path_factory.mktemp("hostile") / "guest"
    shutil.copytree(Path(guest.__file__).resolve().parent, src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(src / "agent.py", "a") as f:
        f.write(hostile_agent.PATCH)
    env = dict(SLOW_BOOT, VMSHIM_GUEST_SOURCE=str(src))
    ok("guest", "build", env=env, timeout=900)
    return env


def container_dir(name: str, env) -> Path:
    cid = ok("inspect", "-f", "{{.Id}}", name, env=env).strip()
    return root() / "containers" / cid


def monitor_pid(name: str, env) -> int:
    return int(ok("inspect", "-f", "{{.State.Pid}}", name, env=env).strip())


def test_single_bad_messages_are_dropped_and_the_monitor_stays_up(hostile_env, domains_before):
    """Issue 12, attack 5: ``stdout`` with ``id: [1]`` after ``started`` and after every
    later hello, then a deeply nested header, wrong types everywhere and ids out of
    range. The monitor survives each, exec and logs work, stop and rm -f work."""
    env = hostile_env
    name = f"{PREFIX}-single"
    before = host_snapshot()
    ok("run", "-d", "--name", name, "-e", "HOSTILE=wrongtype", "busybox", "sh", "-c", TICKER, env=env)
    try:
        cdir = container_dir(name, env)
        wait_until(lambda: "tick 1" in ok("logs", name, env=env), 120, "ticks in the log")
        first = monitor_pid(name, env)
        assert alive(first)
        assert ok("exec", name, "echo", "exec works", env=env) == "exec works\n"
        assert monitor_pid(name, env) == first and alive(first)
        # A re-attached monitor gets the same frame after the agent's next hello.
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not alive(first), 10, "monitor gone")
        assert ok("exec", name, "echo", "again", env=env) == "again\n"
        second = monitor_pid(name, env)
        assert second != first and alive(second)
        for attack in ("deepjson", "types", "hugeid", "wrongtype"):
            proc = vmshim("exec", name, "hostile", attack, env=env)
            assert proc.returncode == 0, f"exec after {attack}: {err(proc)}"
            assert ok("exec", name, "echo", attack, env=env) == f"{attack}\n"
            assert alive(second), f"the monitor died of {attack}"
        assert monitor_pid(name, env) == second
        logs = ok("logs", name, env=env)
        assert "tick 2" in logs and "INJECTED" not in logs
        report = (cdir / "monitor.log").read_text(errors="replace")
        assert "dropped a message from the agent" in report
        assert "Traceback" not in report
        assert (cdir / "monitor.log").stat().st_size < MONITOR_LOG_CAP
        ok("stop", "-t", "2", name, env=env)
        assert ok("inspect", "-f", "{{.State.Status}}", name, env=env).strip() == "exited"
    finally:
        proc = vmshim("rm", "-f", name, env=env)
    assert proc.returncode == 0, err(proc)
    assert not wait_no_new_domains(domains_before, 60)
    assert host_snapshot() == before


@contextlib.contextmanager
def _failed_run(env, attack: str, domains_before):
    """Run container ``PREFIX-ATTACK`` in the foreground with its agent playing ATTACK;
    the run must fail with one line on stderr. Yields (name, that line, the run's
    process); then removes the container and checks that the host is as it was."""
    name = f"{PREFIX}-{attack}"
    before = host_snapshot()
    try:
        proc = vmshim(
            "run",
            "--name",
            name,
            "-e",
            f"HOSTILE={attack}",
            "busybox",
            "sh",
            "-c",
            "echo started; sleep 600",
            env=env,
            timeout=600,
        )
        assert proc.returncode != 0
        lines = err(proc).strip().splitlines()
        assert len(lines) == 1, err(proc)
        yield name, lines[0], proc
    finally:
        rm = vmshim("rm", "-f", name, env=env)
    assert rm.returncode == 0, err(rm)
    assert not wait_no_new_domains(domains_before, 60)
    assert host_snapshot() == before


def test_a_flood_of_bad_messages_ends_the_run_with_one_clear_line(hostile_env, domains_before):
    """1,000 bad messages and 5,000 frames of output for ids that do not exist: the
    monitor kills the container once MAX_BAD_MESSAGES were dropped, the foreground run
    fails with one line saying so, monitor.log stays small, rm -f works."""
    from shim.containers.monitor import MAX_BAD_MESSAGES

    env = hostile_env
    with _failed_run(env, "flood", domains_before) as (name, line, proc):
        assert f"the agent sent {MAX_BAD_MESSAGES} messages that break the protocol" in line
        assert "INJECTED" not in out(proc)
        cdir = container_dir(name, env)
        assert (cdir / "monitor.log").stat().st_size < MONITOR_LOG_CAP
        assert "INJECTED" not in ok("logs", name, env=env)
        error = ok("inspect", "-f", "{{.State.Error}}", name, env=env)
        assert "break the protocol" in error


def test_garbage_that_breaks_the_framing_ends_the_run_with_one_clear_line(hostile_env, domains_before):
    env = hostile_env
    with _failed_run(env, "garbage", domains_before) as (name, line, _):
        assert "the agent broke the protocol" in line
        # created when the garbage came with the start's reply (a failed start, as in
        # docker), exited when it came later: not running either way
        status = ok("inspect", "-f", "{{.State.Status}}", name, env=env).strip()
        assert status in ("created", "exited")
