"""Real podman and a real containerd (ctr) running containers through an OCI runtime:
vmshim-runtime (each container in its own microVM) and, as the baseline that proves the
harness itself, runc. Every test runs once per runtime.

The image is the busybox that ``vmshim save`` exports (docker-archive; the oci-archive is
loaded too), imported into each engine: no registry. Where each container ran is shown
by its kernel release: the guest image's kernel for vmshim-runtime, the host's for runc.

Preconditions: root, podman/conmon/containerd/ctr installed (skipped otherwise), run the
way scripts/lib/test-in-namespace runs the suite: a private mount namespace and a network
namespace with /sys remounted and the cgroup hierarchies bound back. No container has a
network. Everything lives under one 0755 directory in /var/tmp, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

import pytest

from tests.e2e.oci_engines import (
    BUSYBOX_REF,
    RUNC,
    Containerd,
    Podman,
    image_archive,
    in_private_mount_namespace,
    make_workdir,
    missing_cgroups,
    missing_engines,
    mounts_under,
    read_argv_log,
    remove_workdir,
    run_in_pty,
    subcommand,
)

VMSHIM_RUNTIME = shutil.which("vmshim-runtime", path=os.path.dirname(sys.executable)) or "vmshim-runtime"

pytestmark = [
    pytest.mark.host_root,
    pytest.mark.skipif(missing_engines() is not None, reason=str(missing_engines())),
]


@dataclass
class Runtime:
    path: str
    kernel: str
    """The kernel release a container of this runtime reports (``uname -r``)."""


@pytest.fixture(scope="module", params=["vmshim", "runc"])
def runtime(request):
    if request.param == "runc":
        if missing_cgroups() is not None:
            pytest.skip(str(missing_cgroups()))
        return Runtime(RUNC, os.uname().release)
    from shim.guestimage import ensure_guest_image

    kernel = ensure_guest_image().kernel_release
    assert kernel and kernel != os.uname().release
    return Runtime(VMSHIM_RUNTIME, kernel)


def _out(proc) -> str:
    return f"rc={proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"


@pytest.fixture(scope="module")
def workdir(runtime):
    path = make_workdir()
    yield path
    remove_workdir(path)


@pytest.fixture(scope="module")
def podman(workdir, busybox_archive, runtime):
    with Podman(runtime.path, workdir / "p") as engine:
        assert engine.load(busybox_archive) == BUSYBOX_REF
        yield engine
    assert not mounts_under(workdir / "p")


@pytest.fixture(scope="module")
def containerd(workdir, busybox_archive, runtime):
    if not in_private_mount_namespace():
        pytest.skip("containerd needs a private mount namespace (scripts/test makes one)")
    with Containerd(workdir / "c", runtime.path) as engine:
        assert engine.import_image(busybox_archive) == BUSYBOX_REF
        yield engine
    assert not engine.shim_pids()
    assert not mounts_under(workdir / "c")
    # containerd's cgroup for its namespace is gone, whichever layout the host has.
    for parent in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        assert not os.path.exists(f"{parent}/{engine.namespace}")


@pytest.fixture(scope="module")
def busybox_oci_archive(workdir):
    return image_archive(workdir / "busybox-oci.tar", fmt="oci-archive")


# --- podman ---------------------------------------------------------------------------------


def test_podman_loads_oci_archive_too(podman, busybox_oci_archive):
    assert podman.load(busybox_oci_archive) == BUSYBOX_REF


def test_podman_run_rm(podman, runtime):
    proc = podman.podman("run", "--rm", *podman.run_args(), "busybox", "sh", "-c", "echo hi; uname -r")
    assert proc.returncode == 0, _out(proc)
    assert proc.stdout == f"hi\n{runtime.kernel}\n"
    assert podman.podman("ps", "-aq").stdout == ""


def test_podman_exit_code(podman):
    proc = podman.podman("run", "--rm", *podman.run_args(), "busybox", "sh", "-c", "exit 3")
    assert proc.returncode == 3, _out(proc)


def test_podman_detached_exec_logs_stop_rm(podman, runtime):
    script = 'echo started; trap "echo bye; exit 0" TERM; while :; do sleep 0.1; done'
    proc = podman.podman("run", "-d", "--name", "h1", *podman.run_args(), "busybox", "sh", "-c", script)
    assert proc.returncode == 0, _out(proc)
    try:
        proc = podman.podman("exec", "h1", "sh", "-c", "echo in-exec; uname -r; exit 7")
        assert (proc.returncode, proc.stdout) == (7, f"in-exec\n{runtime.kernel}\n"), _out(proc)
        rc, out = run_in_pty(podman.command("exec", "-t", "h1", "sh", "-c", "tty; exit 2"), env=podman.env)
        assert rc == 2 and b"/dev/pts/" in out, out
        deadline = time.monotonic() + 20
        while "started" not in podman.podman("logs", "h1").stdout:
            assert time.monotonic() < deadline, "no 'started' in podman logs"
            time.sleep(0.2)
        status = podman.podman("inspect", "--format", "{{.State.Status}}", "h1").stdout
        assert status.strip() == "running"
        proc = podman.podman("stop", "--time", "10", "h1")
        assert proc.returncode == 0, _out(proc)
        status = podman.podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "h1").stdout
        assert status.strip() == "exited 0"  # the TERM trap ran: no SIGKILL
        assert podman.podman("logs", "h1").stdout == "started\nbye\n"
    finally:
        proc = podman.podman("rm", "--force", "h1")
    assert proc.returncode == 0, _out(proc)
    assert "h1" not in podman.podman("ps", "-a", "--format", "{{.Names}}").stdout


def test_podman_run_it_has_a_tty(podman, runtime):
    rc, out = run_in_pty(
        podman.command(
            "run", "-it", "--rm", *podman.run_args(), "busybox", "sh", "-c", "tty; read line; echo got $line; uname -r"
        ),
        env=podman.env,
        input=b"typed\r",
        input_after=b"/dev/pts/",
    )
    text = out.decode(errors="replace")
    assert rc == 0, text
    assert "/dev/pts/" in text and "got typed" in text and runtime.kernel in text, text


def test_podman_runtime_calls_are_logged(podman):
    """Every runtime call came through the wrapper, all on its private state root."""
    podman.podman("run", "--rm", *podman.run_args(), "busybox", "true", check=True)
    calls = read_argv_log(podman.argv_log)
    subs = [subcommand(argv) for _, _, argv in calls]
    assert {"create", "start", "delete"} <= set(subs), subs
    callers = {caller for caller, _, argv in calls if subcommand(argv) == "create"}
    assert callers == {"conmon"}


# --- containerd -----------------------------------------------------------------------------


def test_ctr_imports_oci_archive_too(containerd, busybox_oci_archive):
    assert containerd.import_image(busybox_oci_archive) == BUSYBOX_REF


def test_ctr_run_rm(containerd, runtime):
    proc = containerd.ctr(
        "run", "--rm", *containerd.run_args(), BUSYBOX_REF, "h-echo", "sh", "-c", "echo hi; uname -r", timeout=120
    )
    assert proc.returncode == 0, _out(proc)
    assert proc.stdout == f"hi\n{runtime.kernel}\n"


def test_ctr_exit_code(containerd):
    proc = containerd.ctr(
        "run", "--rm", *containerd.run_args(), BUSYBOX_REF, "h-exit", "sh", "-c", "exit 3", timeout=120
    )
    assert proc.returncode == 3, _out(proc)


def test_ctr_task_exec_ps_kill(containerd, runtime):
    script = 'trap "exit 0" TERM; while :; do sleep 0.1; done'
    proc = containerd.ctr("run", "-d", *containerd.run_args(), BUSYBOX_REF, "h-task", "sh", "-c", script)
    assert proc.returncode == 0, _out(proc)
    try:
        proc = containerd.ctr("task", "exec", "--exec-id", "x1", "h-task", "sh", "-c", "echo in-exec; uname -r; exit 5")
        assert (proc.returncode, proc.stdout) == (5, f"in-exec\n{runtime.kernel}\n"), _out(proc)
        proc = containerd.ctr("task", "ps", "h-task")
        assert proc.returncode == 0, _out(proc)
        rows = proc.stdout.splitlines()
        assert rows[0].split() == ["PID", "INFO"] and len(rows) >= 2, proc.stdout
        proc = containerd.ctr("task", "kill", "h-task")  # SIGTERM
        assert proc.returncode == 0, _out(proc)
        deadline = time.monotonic() + 20
        while "STOPPED" not in containerd.ctr("task", "ls").stdout:
            assert time.monotonic() < deadline, containerd.ctr("task", "ls").stdout
            time.sleep(0.2)
    finally:
        containerd.ctr("task", "kill", "--signal", "SIGKILL", "h-task")
        containerd.ctr("task", "delete", "h-task")
        containerd.ctr("container", "delete", "h-task")
    assert "h-task" not in containerd.ctr("container", "ls", "-q").stdout
    subs = [subcommand(argv) for _, _, argv in read_argv_log(containerd.argv_log)]
    assert {"create", "start", "exec", "ps", "kill", "delete"} <= set(subs), subs
