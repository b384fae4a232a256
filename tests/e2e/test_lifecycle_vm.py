"""The container lifecycle in vm isolation, as a user drives it: detached containers, a
monitor per container, exec, logs, stop/start, pause, cp, recovery after crashes, and
20 containers at once. Every test here boots microVMs (marked vm). Tests that only look
at a running container share one (``box``, never stopped, restarted or renamed by any
test, so none depends on another's effects or order); a test that changes a container's
life (stop, kill, rm, a killed monitor) makes its own (``own_box``)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import CLI, err, ok, out, vmshim, vmshim_domains, wait_no_new_domains
from tests.waiting import alive, holds_for, wait_until

pytestmark = pytest.mark.vm
PREFIX = f"lc{os.getpid()}"
TICKER = 'trap "echo bye; exit 5" TERM; echo started; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done'
SLOW_BOOT = {"VMSHIM_BOOT_TIMEOUT": "600"}


def inspect(name: str, template: str) -> str:
    return ok("inspect", "-f", template, name).strip()


def state_root() -> Path:
    from shim import paths

    return paths.root()


def mounts_mentioning(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if text in line]


def _ticker(name: str) -> str:
    proc = vmshim("run", "-d", "--name", name, "busybox", "sh", "-c", TICKER, env=SLOW_BOOT)
    assert proc.returncode == 0, err(proc)
    return name


@pytest.fixture(scope="module")
def box():
    """A detached container that ticks once a second, shared by the tests that only look
    at it (or change it and put it back in a ``finally``); removed at the end."""
    name = _ticker(f"{PREFIX}-box")
    yield name
    vmshim("rm", "-f", name)


@pytest.fixture
def own_box(request):
    """A ticking container of this test's own, for a test that changes its life."""
    name = _ticker(f"{PREFIX}-{request.node.name.removeprefix('test_')[:24]}")
    yield name
    vmshim("rm", "-f", name)


def test_run_detached_prints_the_id_and_ps_lists_it(box):
    cid = inspect(box, "{{.Id}}")
    assert len(cid) == 64
    listed = [json.loads(line) for line in ok("ps", "--format", "json").splitlines()]
    mine = [c for c in listed if c["Names"] == box]
    assert mine and mine[0]["State"] == "running" and mine[0]["ID"] == cid[:12]
    assert cid[:12] in ok("ps", "-q").split()
    assert box in ok("ps", "--filter", f"name={box}")


def test_inspect_reports_state_monitor_and_domain(box):
    [doc] = json.loads(ok("inspect", box))
    state = doc["State"]
    assert state["Status"] == "running" and state["Running"] and not state["OOMKilled"]
    assert state["ExitCode"] == 0 and state["StartedAt"].endswith("Z")
    assert state["FinishedAt"] == "0001-01-01T00:00:00Z"
    assert alive(state["Pid"])  # the monitor
    assert doc["Vmshim"]["Domain"] in vmshim_domains()
    assert alive(doc["Vmshim"]["QemuPid"])
    assert doc["HostConfig"]["Isolation"] == "vm"


def test_exec_runs_beside_the_main_process(box):
    assert ok("exec", box, "sh", "-c", "echo hi; uname -r").splitlines()[0] == "hi"
    assert vmshim("exec", box, "sh", "-c", "exit 42").returncode == 42
    proc = vmshim("exec", box, "/nope")
    assert proc.returncode == 127 and "/nope" in err(proc)
    assert ok(
        "exec", "-e", "A=b c", "-w", "/tmp", "-u", "1000:1000", box, "sh", "-c", 'echo "$A"; pwd; id -u'
    ).splitlines() == ["b c", "/tmp", "1000"]
    assert ok("exec", "-i", box, "cat", input=b"piped\n") == "piped\n"
    assert ok("exec", "-d", box, "sh", "-c", "echo detached > /tmp/d") == ""
    wait_until(lambda: ok("exec", box, "cat", "/tmp/d") == "detached\n", 30, "detached exec")
    # It runs in the container's namespaces: the main process is PID 1 there.
    assert "sh -c trap" in ok("exec", box, "cat", "/proc/1/cmdline").replace("\0", " ")


def test_exec_with_a_tty(box):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        CLI + ["exec", "-it", box, "sh", "-c", "tty; echo done"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"done" not in seen and time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert b"/dev/pts/" in seen and b"done" in seen


def test_logs_tail_timestamps_since(box):
    wait_until(lambda: "tick 2" in ok("logs", box), 60, "three ticks")
    lines = ok("logs", box).splitlines()
    assert lines[0] == "started" and lines[1] == "tick 0"
    assert ok("logs", "--tail", "1", box).count("\n") == 1
    stamped = ok("logs", "-t", "--tail", "2", box).splitlines()
    assert all(line[:4].isdigit() and "Z tick" in line for line in stamped)
    assert ok("logs", "--since", "1970-01-01T00:00:00Z", box).splitlines()[0] == "started"
    assert ok("logs", "--since", "2999-01-01T00:00:00Z", box) == ""


def test_logs_follow_streams_new_output(box):
    proc = subprocess.Popen(CLI + ["logs", "-f", "--tail", "0", box], stdout=subprocess.PIPE)
    try:
        from tests.e2e.test_run import _read_fd_until

        _read_fd_until(proc.stdout.fileno(), b"tick", 30)
    finally:
        proc.kill()
        proc.wait()


def test_top_and_stats(box):
    table = ok("top", box).splitlines()
    assert table[0].split()[:3] == ["USER", "PID", "PPID"]
    assert any("sh -c trap" in line for line in table[1:])
    stats = [json.loads(x) for x in ok("stats", "--no-stream", "--format", "json", box).splitlines()]
    assert stats[0]["Name"] == box and stats[0]["Memory"] > 0
    assert stats[0]["MemoryLimit"] == 256 << 20


def test_cp_both_directions(box, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"from the host\n")
    ok("cp", str(src), f"{box}:/tmp/")
    assert ok("exec", box, "cat", "/tmp/in.txt") == "from the host\n"
    ok("cp", str(src), f"{box}:/tmp/renamed")
    assert ok("exec", box, "cat", "/tmp/renamed") == "from the host\n"
    ok("exec", box, "sh", "-c", "mkdir -p /srv/d && echo x > /srv/d/f && ln -s f /srv/d/l")
    ok("cp", f"{box}:/srv/d", str(tmp_path))
    assert (tmp_path / "d" / "f").read_text() == "x\n"
    assert os.readlink(tmp_path / "d" / "l") == "f"
    ok("cp", f"{box}:/etc/hostname", str(tmp_path / "hn"))
    assert (tmp_path / "hn").read_text().strip() == inspect(box, "{{.Id}}")[:12]
    proc = vmshim("cp", f"{box}:/nope", str(tmp_path))
    assert proc.returncode != 0 and "/nope" in err(proc)


def test_pause_and_unpause(box):
    ok("pause", box)
    try:
        assert inspect(box, "{{.State.Status}}") == "paused"
        assert "(Paused)" in ok("ps", "--filter", f"name={box}")
        proc = vmshim("exec", box, "true")
        assert proc.returncode != 0 and "paused" in err(proc)
        before = ok("logs", box).count("tick")
        holds_for(lambda: ok("logs", box).count("tick") == before, 2.5, "no ticks while paused")  # the VM does not run
    finally:
        ok("unpause", box)
    assert inspect(box, "{{.State.Status}}") == "running"
    assert ok("exec", box, "echo", "back") == "back\n"


def test_rename():
    """On a created container of its own (renaming needs no VM)."""
    name = f"{PREFIX}-ren"
    cid = ok("create", "--name", name, "busybox", "true").strip()
    try:
        ok("rename", name, f"{name}-x")
        assert inspect(f"{name}-x", "{{.Name}}") == f"/{name}-x"
        assert inspect(f"{name}-x", "{{.Id}}") == cid
        assert vmshim("inspect", name).returncode != 0
        proc = vmshim("rename", f"{name}-x", "bad name")
        assert proc.returncode != 0
        assert inspect(f"{name}-x", "{{.Name}}") == f"/{name}-x"
    finally:
        vmshim("rm", "-f", cid)


def test_monitor_kill9_then_exec_and_logs_follow_keep_working(own_box):
    monitor = int(inspect(own_box, "{{.State.Pid}}"))
    qemu = int(inspect(own_box, "{{.Vmshim.QemuPid}}"))
    follower = subprocess.Popen(CLI + ["logs", "-f", "--tail", "0", own_box], stdout=subprocess.PIPE)
    try:
        os.kill(monitor, signal.SIGKILL)
        wait_until(lambda: not alive(monitor), 10, "monitor gone")
        holds_for(lambda: alive(qemu), 2, "the VM running with no monitor")  # it does not care
        assert ok("exec", own_box, "echo", "still here") == "still here\n"
        new = int(inspect(own_box, "{{.State.Pid}}"))
        assert new != monitor and alive(new)
        from tests.e2e.test_run import _read_fd_until

        seen = _read_fd_until(follower.stdout.fileno(), b"tick", 30)
        mark = int(seen.split(b"tick ")[-1].split()[0]) if b"tick " in seen else 0
        _read_fd_until(follower.stdout.fileno(), b"tick %d" % (mark + 2), 30)
    finally:
        follower.kill()
        follower.wait()
    ticks = [int(x.split()[1]) for x in ok("logs", own_box).splitlines() if x.startswith("tick")]
    assert ticks == list(range(len(ticks)))  # nothing lost while no monitor listened


def test_stop_then_start_keeps_the_filesystem_and_the_logs(own_box):
    ok("exec", own_box, "sh", "-c", "echo kept > /data")
    ok("stop", "-t", "5", own_box)
    assert inspect(own_box, "{{.State.Status}} {{.State.ExitCode}}") == "exited 5"
    assert inspect(own_box, "{{.State.FinishedAt}}") != "0001-01-01T00:00:00Z"
    assert inspect(own_box, "{{.Vmshim.Domain}}") not in vmshim_domains()
    assert "Exited (5)" in ok("ps", "-a", "--filter", f"name={own_box}")
    assert own_box not in ok("ps")
    first_logs = ok("logs", own_box)
    assert first_logs.rstrip().endswith("bye")
    ok("start", own_box, env=SLOW_BOOT)
    assert ok("exec", own_box, "cat", "/data") == "kept\n"
    assert ok("logs", own_box).startswith(first_logs)
    assert ok("logs", own_box).count("started") == 2


def test_restart_and_wait(own_box):
    started = inspect(own_box, "{{.State.StartedAt}}")
    ok("restart", "-t", "5", own_box, env=SLOW_BOOT)
    assert inspect(own_box, "{{.State.Status}}") == "running"
    assert inspect(own_box, "{{.State.StartedAt}}") > started
    waiter = subprocess.Popen(CLI + ["wait", own_box], stdout=subprocess.PIPE)
    ok("kill", "-s", "TERM", own_box)  # `wait` answers with the exit code whether it came first or not
    assert waiter.communicate(timeout=60)[0].decode().strip() == "5"


def test_attach_streams_the_main_process(box):
    proc = subprocess.Popen(CLI + ["attach", "--no-stdin", box], stdout=subprocess.PIPE)
    try:
        from tests.e2e.test_run import _read_fd_until

        _read_fd_until(proc.stdout.fileno(), b"tick", 30)
    finally:
        proc.kill()  # SIGKILL: nothing forwarded, the container goes on
        proc.wait()
    assert inspect(box, "{{.State.Status}}") == "running"


def test_qemu_kill9_marks_exited_and_cleans_up(own_box):
    qemu = int(inspect(own_box, "{{.Vmshim.QemuPid}}"))
    domain = inspect(own_box, "{{.Vmshim.Domain}}")
    cid = inspect(own_box, "{{.Id}}")
    os.kill(qemu, signal.SIGKILL)
    wait_until(lambda: inspect(own_box, "{{.State.Status}}") == "exited", 60, "exited")
    assert int(inspect(own_box, "{{.State.ExitCode}}")) != 0
    assert "without reporting" in inspect(own_box, "{{.State.Error}}")
    wait_until(lambda: domain not in vmshim_domains(), 30, "domain gone")
    wait_until(lambda: not (state_root() / "run" / cid[:12]).exists(), 30, "run dir gone")


def test_rm_needs_force_while_running_then_leaves_nothing(own_box):
    cid = inspect(own_box, "{{.Id}}")
    monitor = int(inspect(own_box, "{{.State.Pid}}"))
    qemu = int(inspect(own_box, "{{.Vmshim.QemuPid}}"))
    proc = vmshim("rm", own_box)
    assert proc.returncode != 0 and "running" in err(proc)
    ok("rm", "-f", own_box)
    assert vmshim("inspect", own_box).returncode != 0
    assert f"vmshim-{cid[:12]}" not in vmshim_domains()
    assert not alive(monitor) and not alive(qemu)
    assert not (state_root() / "containers" / cid).exists()
    assert not mounts_mentioning(cid)


def test_create_then_start_attached(domains_before):
    name = f"{PREFIX}-created"
    cid = ok("create", "--name", name, "busybox", "sh", "-c", "echo made; exit 3").strip()
    assert inspect(name, "{{.State.Status}}") == "created"
    assert (state_root() / "containers" / cid / "rw.img").exists()
    proc = vmshim("start", "-a", name, env=SLOW_BOOT)
    assert proc.returncode == 3 and out(proc) == "made\n"
    assert inspect(name, "{{.State.Status}} {{.State.ExitCode}}") == "exited 3"
    ok("rm", name)
    assert not wait_no_new_domains(domains_before)


def test_foreground_run_shows_in_ps_a_and_rm_flag_removes(domains_before):
    name = f"{PREFIX}-fg"
    assert ok("run", "--name", name, "busybox", "echo", "fg", env=SLOW_BOOT) == "fg\n"
    assert "Exited (0)" in ok("ps", "-a", "--filter", f"name={name}")
    assert ok("logs", name) == "fg\n"
    ok("rm", name)
    ok("run", "--rm", "--name", name, "busybox", "true", env=SLOW_BOOT)
    assert vmshim("inspect", name).returncode != 0
    assert not wait_no_new_domains(domains_before)


def test_restart_policy_on_failure(domains_before):
    name = f"{PREFIX}-flaky"
    ok(
        "run",
        "-d",
        "--name",
        name,
        "--restart",
        "on-failure:2",
        "busybox",
        "sh",
        "-c",
        "echo try; exit 1",
        env=SLOW_BOOT,
    )
    wait_until(
        lambda: inspect(name, "{{.RestartCount}} {{.State.Status}} {{.State.Pid}}") == "2 exited 0", 240, "two restarts"
    )
    assert ok("logs", name).count("try") == 3
    assert vmshim("run", "--rm", "--restart", "always", "busybox", "true").returncode == 125
    ok("rm", name)
    assert not wait_no_new_domains(domains_before)


def test_container_prune(domains_before):
    name = f"{PREFIX}-prune"
    ok("run", "--name", name, "busybox", "true", env=SLOW_BOOT)
    pruned = ok("container", "prune", "-f")
    assert inspect_fails(name) and "Total:" in pruned


def inspect_fails(name: str) -> bool:
    return vmshim("inspect", name).returncode != 0


@pytest.mark.skipif(
    not os.environ.get("VMSHIM_TEST_PRIVATE_LIBVIRTD"),
    reason="restarts libvirtd: only a private one the test run started "
    "(scripts/test sets VMSHIM_TEST_PRIVATE_LIBVIRTD)",
)
def test_libvirtd_restart_leaves_containers_running(domains_before):
    name = f"{PREFIX}-lv"
    ok("run", "-d", "--name", name, "busybox", "sh", "-c", TICKER, env=SLOW_BOOT)
    qemu = int(inspect(name, "{{.Vmshim.QemuPid}}"))
    pid_file = Path("/run/libvirt/libvirtd.pid")
    old = int(pid_file.read_text())
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: not alive(old), 60, "libvirtd stopped")
    subprocess.run(["libvirtd", "-d", "-p", str(pid_file)], check=True)
    wait_until(
        lambda: subprocess.run(["virsh", "-c", "qemu:///system", "list"], capture_output=True).returncode == 0,
        60,
        "libvirtd back",
    )
    assert alive(qemu)
    assert inspect(name, "{{.State.Status}}") == "running"
    assert ok("exec", name, "echo", "alive") == "alive\n"
    assert inspect(name, "{{.Vmshim.Domain}}") in vmshim_domains()
    ok("stop", "-t", "5", name)
    assert inspect(name, "{{.State.ExitCode}}") == "5"
    ok("rm", name)
    assert not wait_no_new_domains(domains_before)


def test_twenty_detached_containers_in_parallel(domains_before):
    names = [f"{PREFIX}-p{i:02d}" for i in range(20)]

    def start(name):
        return vmshim(
            "run", "-d", "-m", "32m", "--name", name, "busybox", "sleep", "100000", env=SLOW_BOOT, timeout=900
        )

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(start, names))
    try:
        assert [r.returncode for r in results] == [0] * 20, [err(r) for r in results]
        ids = {out(r).strip() for r in results}
        listed = [json.loads(x) for x in ok("ps", "--no-trunc", "--format", "json").splitlines()]
        mine = {c["ID"] for c in listed if c["Names"].startswith(f"{PREFIX}-p")}
        assert mine == ids
        assert all(c["State"] == "running" for c in listed if c["ID"] in ids)
        docs = json.loads(ok("inspect", *names))
        pids = [d["State"]["Pid"] for d in docs] + [d["Vmshim"]["QemuPid"] for d in docs]
        assert all(alive(p) for p in pids)
    finally:
        with ThreadPoolExecutor(10) as pool:
            removed = list(pool.map(lambda n: vmshim("rm", "-f", n, timeout=300), names))
    assert [r.returncode for r in removed] == [0] * 20, [err(r) for r in removed]
    # libvirt forgets a VM 1-2 s after QEMU exits, in the background (rm does not wait).
    domains = {f"vmshim-{cid[:12]}" for cid in ids}
    wait_until(lambda: not domains & vmshim_domains(), 60, "the 20 domains gone")
    wait_until(lambda: not any(alive(p) for p in pids), 30, "QEMU and monitors gone")
    for cid in ids:
        assert not (state_root() / "containers" / cid).exists()
        assert not (state_root() / "run" / cid[:12]).exists()
        assert not mounts_mentioning(cid)
