"""The container lifecycle in process isolation (namespaces on the host, no VM): the same
verbs and the same monitor; the host agent plays the VM's part."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.e2e.conftest import vmshim
from tests.e2e.test_lifecycle_vm import TICKER, alive, err, inspect, mounts_mentioning, ok, state_root
from tests.waiting import holds_for, wait_until

PREFIX = f"lp{os.getpid()}"


@pytest.fixture
def ticker():
    name = f"{PREFIX}-{os.urandom(3).hex()}"
    ok("run", "-d", "--isolation", "process", "--name", name, "busybox", "sh", "-c", TICKER)
    yield name
    vmshim("rm", "-f", name)


def test_run_detached_ps_exec_logs_stop_start_rm(ticker):
    cid = inspect(ticker, "{{.Id}}")
    listed = [json.loads(x) for x in ok("ps", "--format", "json").splitlines()]
    assert [c["State"] for c in listed if c["Names"] == ticker] == ["running"]
    assert inspect(ticker, "{{.HostConfig.Isolation}}") == "process"
    assert ok("exec", ticker, "sh", "-c", "echo hi; cat /proc/1/cmdline").startswith("hi\nsh")
    assert vmshim("exec", ticker, "sh", "-c", "exit 3").returncode == 3
    assert vmshim("exec", ticker, "/nope").returncode == 127
    assert ok("exec", "-i", ticker, "cat", input=b"abc") == "abc"
    wait_until(lambda: "tick 1" in ok("logs", ticker), 30, "ticks")
    assert ok("logs", "--tail", "1", ticker).startswith("tick")
    ok("exec", ticker, "sh", "-c", "echo kept > /data")
    ok("stop", "-t", "5", ticker)
    assert inspect(ticker, "{{.State.Status}} {{.State.ExitCode}}") == "exited 5"
    assert ok("logs", ticker).rstrip().endswith("bye")
    assert not mounts_mentioning(cid)  # rootfs and layers unmounted while stopped
    ok("start", ticker)
    assert ok("exec", ticker, "cat", "/data") == "kept\n"
    assert ok("logs", ticker).count("started") == 2
    proc = vmshim("rm", ticker)
    assert proc.returncode != 0 and "running" in err(proc)
    monitor = int(inspect(ticker, "{{.State.Pid}}"))
    agent = int(inspect(ticker, "{{.Vmshim.AgentPid}}"))
    ok("rm", "-f", ticker)
    assert vmshim("inspect", ticker).returncode != 0
    assert ticker not in ok("ps", "-a")
    assert not alive(monitor) and not alive(agent)
    assert not mounts_mentioning(cid)
    assert not (state_root() / "containers" / cid).exists()
    assert not (state_root() / "run" / cid[:12]).exists()


def test_pause_top_cp_kill(ticker, tmp_path):
    ok("pause", ticker)
    assert inspect(ticker, "{{.State.Status}}") == "paused"
    before = ok("logs", ticker).count("tick")
    holds_for(lambda: ok("logs", ticker).count("tick") == before, 2, "no ticks while paused")
    ok("unpause", ticker)
    assert any("sh -c trap" in line for line in ok("top", ticker).splitlines())
    (tmp_path / "f").write_text("x\n")
    ok("cp", str(tmp_path / "f"), f"{ticker}:/tmp/f")
    assert ok("exec", ticker, "cat", "/tmp/f") == "x\n"
    ok("cp", f"{ticker}:/etc/hostname", str(tmp_path / "h"))
    assert (tmp_path / "h").read_text().strip() == inspect(ticker, "{{.Config.Hostname}}")
    ok("kill", "-s", "TERM", ticker)
    assert ok("wait", ticker).strip() == "5"


def test_monitor_kill9_recovery(ticker):
    monitor = int(inspect(ticker, "{{.State.Pid}}"))
    os.kill(monitor, signal.SIGKILL)
    wait_until(lambda: not alive(monitor), 10, "monitor gone")
    # A window with no monitor at all: the container's output waits in its host agent.
    holds_for(lambda: not alive(monitor), 1.5, "the killed monitor stays dead")
    assert ok("exec", ticker, "echo", "ok") == "ok\n"
    assert int(inspect(ticker, "{{.State.Pid}}")) != monitor
    wait_until(lambda: len([x for x in ok("logs", ticker).splitlines() if x.startswith("tick")]) > 4, 30, "more ticks")
    ticks = [int(x.split()[1]) for x in ok("logs", ticker).splitlines() if x.startswith("tick")]
    assert ticks == list(range(len(ticks)))


def test_host_agent_kill9_marks_exited_and_cleans(ticker):
    cid = inspect(ticker, "{{.Id}}")
    agent = int(inspect(ticker, "{{.Vmshim.AgentPid}}"))
    os.kill(agent, signal.SIGKILL)
    wait_until(lambda: inspect(ticker, "{{.State.Status}}") == "exited", 30, "exited")
    assert int(inspect(ticker, "{{.State.ExitCode}}")) != 0
    wait_until(lambda: not mounts_mentioning(cid), 30, "unmounted")
    wait_until(lambda: not (state_root() / "run" / cid[:12]).exists(), 30, "run dir gone")


def test_foreground_run_and_rm_flag():
    name = f"{PREFIX}-fg"
    assert ok("run", "--isolation", "process", "--name", name, "busybox", "echo", "fg") == "fg\n"
    assert "Exited (0)" in ok("ps", "-a", "--filter", f"name={name}")
    ok("rm", name)
    ok("run", "--rm", "--isolation", "process", "--name", name, "busybox", "true")
    assert vmshim("inspect", name).returncode != 0
