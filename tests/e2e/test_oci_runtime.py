"""vmshim-runtime driven the way conmon and containerd-shim drive runc: as a subprocess,
with this test process as the child subreaper that reaps the stand-ins and reads their
exit status. Every container boots a real microVM."""

from __future__ import annotations

import array
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shim.oci.hostcgroup import default_name
from tests.e2e.conftest import vmshim_domains, wait_no_new_domains

pytestmark = [pytest.mark.vm, pytest.mark.host_root]

RUNTIME = [sys.executable, "-m", "shim.cli.runtime"]
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "ls", "uname", "sleep", "id", "tty", "true", "grep", "env", "stat")


def runtime(root: Path, *args, timeout=240, log: Path | None = None):
    """Run vmshim-runtime. Its output goes through files, not pipes: a stand-in keeps
    the stdio it was given for as long as the container runs (as runc's init does)."""
    extra = ["--log", str(log)] if log else []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(
            RUNTIME + ["--root", str(root)] + extra + list(args),
            stdout=out,
            stderr=err,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


def make_bundle(parent: Path, name: str, args: list[str], **process) -> Path:
    """A bundle whose rootfs is the static busybox (no image needed). *parent* must be
    searchable by everyone: the rootfs is shared into the VM by libvirt's virtiofsd."""
    bundle = parent / name
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    config = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": name,
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, **process},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def edit_config(bundle: Path, change) -> None:
    config = json.loads((bundle / "config.json").read_text())
    change(config)
    (bundle / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def subreaper():
    """Make this process the child subreaper, as conmon and containerd-shim are."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    yield
    # Give the role back and reap what it adopted: otherwise every monitor that later
    # tests' containers leave behind stays a zombie child of pytest, /proc/PID stays, and
    # the "no monitor outlived rm/down" checks of those tests fail when they run after this.
    assert libc.prctl(36, 0, 0, 0, 0) == 0
    reap_adopted_zombies()


def reap_adopted_zombies() -> None:
    """waitpid the zombies among this process's children that no subprocess.Popen owns."""
    owned = {p.pid for p in getattr(subprocess, "_active", None) or []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in owned:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            try:
                os.waitpid(int(entry.name), os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture
def work(subreaper):
    parent = Path(tempfile.mkdtemp(prefix="vmshim-oci-", dir="/var/tmp"))
    parent.chmod(0o755)
    root = parent / "state"
    before = vmshim_domains()
    yield parent, root
    for oci_id in runtime(root, "list", "-q").stdout.split():
        runtime(root, "delete", "--force", oci_id)
    assert not wait_no_new_domains(before), "a VM was left behind"
    shutil.rmtree(parent, ignore_errors=True)


def reap(pid: int, timeout: float = 60) -> int:
    """Wait for the stand-in (re-parented to us) and return its exit status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"stand-in {pid} did not exit")


def state(root: Path, oci_id: str) -> dict:
    res = runtime(root, "state", oci_id)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_run_in_a_vm_with_exit_status(work):
    parent, root = work
    bundle = make_bundle(parent, "hello", ["sh", "-c", "echo kernel $(uname -r); exit 3"])
    res = runtime(root, "run", "--bundle", str(bundle), "hello")
    assert res.returncode == 3, res.stderr
    guest_release = res.stdout.split("kernel ", 1)[1].split()[0]
    assert guest_release != os.uname().release  # its own kernel: it ran in a VM
    assert runtime(root, "list", "-q").stdout.strip() == ""


def test_lifecycle_rules_hooks_exec_and_ps(work):
    parent, root = work
    hook_log = parent / "hooks.log"
    hook = parent / "hook.sh"
    hook.write_text(
        f"#!/bin/sh\nstatus=$(cat | tr -d ' \\n' | sed 's/.*\"status\":\"\\([a-z]*\\)\".*/\\1/')\n"
        f'echo "$1 $status" >> {hook_log}\n'
    )
    hook.chmod(0o755)
    bundle = make_bundle(
        parent, "life", ["sh", "-c", "trap 'echo bye; exit 7' TERM; echo up; while true; do sleep 0.2; done"]
    )
    edit_config(
        bundle,
        lambda c: c.update(
            hooks={
                kind: [{"path": str(hook), "args": ["hook", kind]}]
                for kind in ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
            }
        ),
    )
    pid_file = parent / "life.pid"
    res = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "life")
    assert res.returncode == 0, res.stderr
    pid = int(pid_file.read_text())
    created = state(root, "life")
    assert (created["status"], created["pid"], created["bundle"]) == ("created", pid, str(bundle))
    assert Path(f"/proc/{pid}").exists()

    for refused in (("kill", "nope-such-container", "KILL"), ("delete", "life")):
        assert runtime(root, *refused).returncode != 0
    res = runtime(root, "start", "life")
    assert res.returncode == 0, res.stderr
    assert state(root, "life")["status"] == "running"
    again = runtime(root, "start", "life")
    assert again.returncode != 0 and "created" in again.stderr

    denied = runtime(root, "delete", "life")
    assert denied.returncode != 0 and "running" in denied.stderr
    process = parent / "process.json"
    process.write_text(
        json.dumps(
            {
                "args": ["sh", "-c", "echo from exec $(hostname); exit 4"],
                "cwd": "/",
                "env": ["PATH=/bin"],
                "terminal": False,
            }
        )
    )
    res = runtime(root, "exec", "--process", str(process), "life")
    assert (res.returncode, res.stdout.strip()) == (4, "from exec life")
    res = runtime(root, "ps", "--format", "json", "life")
    assert json.loads(res.stdout)[0] == pid
    # No cgroupsPath: the stand-in and QEMU are in the default host cgroup.
    cgroup = f"/vmshim-runtime/{default_name('life', str(root))}"
    memory = "/sys/fs/cgroup/memory" if os.path.isdir("/sys/fs/cgroup/memory") else "/sys/fs/cgroup"
    members = {int(p) for p in Path(memory + cgroup, "cgroup.procs").read_text().split()}
    assert pid in members and len(members) >= 3, members  # stand-in, monitor, QEMU, …

    assert runtime(root, "pause", "life").returncode == 0
    assert state(root, "life")["status"] == "paused"
    assert runtime(root, "resume", "life").returncode == 0
    assert runtime(root, "kill", "life", "TERM").returncode == 0
    assert reap(pid) == 7
    deadline = time.monotonic() + 30
    while state(root, "life")["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state(root, "life")["status"] == "stopped"
    refused = runtime(root, "kill", "life", "KILL")
    assert refused.returncode != 0 and "stopped" in refused.stderr
    assert runtime(root, "delete", "life").returncode == 0
    assert runtime(root, "state", "life").returncode != 0
    assert not os.path.exists(memory + cgroup)
    assert hook_log.read_text().split("\n")[:-1] == [
        "prestart created",
        "createRuntime created",
        "createContainer created",
        "startContainer created",
        "poststart running",
        "poststop stopped",
    ]


def test_linux_devices_are_made_in_the_container(work):
    """linux.devices: the guest makes each node with its number, mode and owner (also
    outside /dev), as runc does on the host."""
    parent, root = work
    bundle = make_bundle(
        parent, "devs", ["sh", "-c", "stat -c '%n %F %t:%T %a %u:%g' /dev/fuse /dev/mytun /dev/sub/null2 /opt/null3"]
    )
    edit_config(
        bundle,
        lambda c: c["linux"].update(
            devices=[
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o640, "uid": 0, "gid": 5},
                {"path": "/dev/mytun", "type": "c", "major": 10, "minor": 200, "fileMode": 0o600},
                {"path": "/dev/sub/null2", "type": "u", "major": 1, "minor": 3},
                {"path": "/opt/null3", "type": "c", "major": 1, "minor": 3, "fileMode": 0o644},
            ],
            resources={
                "devices": [
                    {"allow": False, "access": "rwm"},
                    {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"},
                ]
            },
        ),
    )
    res = runtime(root, "run", "--bundle", str(bundle), "devs")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "/dev/fuse character special file a:e5 640 0:5",
        "/dev/mytun character special file a:c8 600 0:0",
        "/dev/sub/null2 character special file 1:3 666 0:0",
        "/opt/null3 character special file 1:3 644 0:0",
    ], res.stdout


def test_uid_gid_mappings_make_a_user_namespace(work, subreaper):
    """A user namespace with the config's maps, made by the guest: the process is root in
    it, the rootfs (owned by the mapped ids, as engines prepare it) is root's, a file of
    an unmapped id shows as the overflow id, and an exec joins the namespace."""
    parent, root = work
    script = (
        "id -u; cat /proc/self/uid_map; cat /proc/self/gid_map; "
        "stat -c %u:%g /bin/busybox /unmapped; "
        "echo x > /dev/null && echo x > /dev/mynull && echo null-ok; "
        "trap 'exit 0' TERM; while :; do sleep 0.2; done"
    )
    bundle = make_bundle(parent, "userns", ["sh", "-c", script])
    for dirpath, dirnames, filenames in os.walk(bundle / "rootfs"):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            os.lchown(name, 100000, 200000)
    (bundle / "rootfs" / "unmapped").write_text("")
    out = parent / "userns.out"

    def userns(config):
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        # mknod is refused in a user namespace: the guest's own node is bound instead
        config["linux"]["devices"] = [{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3}]

    edit_config(bundle, userns)
    pid_file = parent / "userns.pid"
    err = parent / "userns.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:  # the stand-in keeps them
        proc = subprocess.run(
            RUNTIME + ["--root", str(root), "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "userns"],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            timeout=240,
        )
    assert proc.returncode == 0, err.read_text()
    pid = int(pid_file.read_text())
    res = runtime(root, "start", "userns")
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 60
    while "null-ok" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line.split() for line in out.read_text().splitlines()]
    assert lines[:6] == [
        ["0"],
        ["0", "100000", "65536"],
        ["0", "200000", "65536"],
        ["0:0"],
        ["65534:65534"],
        ["null-ok"],
    ], out.read_text() + err.read_text()
    process = parent / "userns-exec.json"
    process.write_text(
        json.dumps(
            {"args": ["sh", "-c", "id -u; cat /proc/self/uid_map"], "cwd": "/", "env": ["PATH=/bin"], "terminal": False}
        )
    )
    res = runtime(root, "exec", "--process", str(process), "userns")
    assert res.returncode == 0, res.stderr
    assert [line.split() for line in res.stdout.splitlines()] == [["0"], ["0", "100000", "65536"]]
    assert runtime(root, "kill", "userns", "TERM").returncode == 0
    assert reap(pid) == 0
    assert runtime(root, "delete", "userns").returncode == 0


def test_kill_and_force_delete_of_a_created_container(work):
    parent, root = work
    bundle = make_bundle(parent, "idle", ["true"])
    pid_file = parent / "idle.pid"
    assert runtime(root, "create", "-b", str(bundle), "--pid-file", str(pid_file), "idle").returncode == 0
    pid = int(pid_file.read_text())
    assert runtime(root, "kill", "idle", "9").returncode == 0
    assert reap(pid) == -9
    assert state(root, "idle")["status"] == "stopped"
    assert runtime(root, "delete", "idle").returncode == 0
    # --force deletes a created one outright, and a missing one quietly
    assert runtime(root, "create", "-b", str(bundle), "idle2").returncode == 0
    assert runtime(root, "delete", "--force", "idle2").returncode == 0
    assert runtime(root, "delete", "--force", "idle2").returncode == 0
    assert runtime(root, "list", "-q").stdout.strip() == ""


@pytest.mark.parametrize(
    "breakage, needle",
    [
        (lambda b: (b / "config.json").write_text('{"ociVersion": '), "not valid JSON"),
        (lambda b: shutil.rmtree(b / "rootfs"), "root.path"),
    ],
)
def test_bad_bundle_leaves_nothing(work, breakage, needle):
    parent, root = work
    bundle = make_bundle(parent, "bad", ["true"])
    breakage(bundle)
    log = parent / "log.json"
    before = vmshim_domains()
    children = set(_children())
    res = runtime(
        root, "--log-format", "json", "create", "-b", str(bundle), "--pid-file", str(parent / "bad.pid"), "bad", log=log
    )
    assert res.returncode == 1
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert needle in json.loads(log.read_text().splitlines()[-1])["msg"]
    assert not (parent / "bad.pid").exists()
    assert runtime(root, "list", "-q").stdout.strip() == ""
    assert vmshim_domains() == before
    assert set(_children()) <= children  # no stand-in was left to us


def _children() -> list[int]:
    try:
        text = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_terminal_through_the_console_socket(work):
    parent, root = work
    bundle = make_bundle(
        parent,
        "tty",
        ["sh", "-c", "tty; read line; echo got $line; exit 5"],
        terminal=True,
        consoleSize={"height": 30, "width": 100},
    )
    sock_path = parent / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    pid_file = parent / "tty.pid"
    proc = subprocess.Popen(
        RUNTIME
        + [
            "--root",
            str(root),
            "create",
            "-b",
            str(bundle),
            "--console-socket",
            str(sock_path),
            "--pid-file",
            str(pid_file),
            "tty",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server.settimeout(60)
    conn, _ = server.accept()
    fds = array.array("i")
    msg, ancdata, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: fds.itemsize])
    conn.close()
    server.close()
    assert proc.wait(60) == 0, proc.stderr.read()
    master = fds[0]
    pid = int(pid_file.read_text())
    assert runtime(root, "start", "tty").returncode == 0
    os.write(master, b"hi\r")
    out = b""
    deadline = time.monotonic() + 60
    while b"got hi" not in out and time.monotonic() < deadline:
        try:
            out += os.read(master, 4096)
        except OSError:
            break
    os.close(master)
    assert b"/dev/pts/" in out and b"got hi" in out
    assert reap(pid) == 5
    assert runtime(root, "delete", "tty").returncode == 0
