"""guest.runtime on this host, as root: overlay, namespaces, cgroups (v1 here), processes.

A tiny busybox rootfs (busybox-static plus its applet symlinks) is the image layer.
Every test checks that nothing is left behind: no mounts, no cgroup directories.

The last tests run guest.init's PID-1 code for real, as PID 1 of a new pid namespace,
with loop devices standing in for the VM's disks and a socketpair for the virtio port.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from guest import protocol
from guest.runtime import process, rootfs
from guest.runtime.cgroups import Cgroup, detect_version
from guest.runtime.container import HOST_NAMESPACES, Container
from guest.runtime.process import SpawnError
from guest.spec import BootConfig, ProcessSpec
from tests.pipes import read_to_end

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.host_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts, cgroups)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


def _mounts_under(path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mounts") as f:
        return [line for line in f if prefix in line.split()[1]]


@pytest.fixture(scope="module")
def busybox_layer(tmp_path_factory) -> Path:
    """A read-only image layer: /bin/busybox + applets, /etc/passwd, /etc/group, /home."""
    lower = tmp_path_factory.mktemp("layer")
    (lower / "bin").mkdir()
    shutil.copy2(BUSYBOX, lower / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (lower / "bin" / applet).symlink_to("busybox")
    (lower / "etc").mkdir()
    (lower / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:A user:/home/user:/bin/sh\n")
    (lower / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\nwheel:x:10:user\n")
    for d in ("root", "home/user", "tmp"):
        (lower / d).mkdir(parents=True)
    os.chown(lower / "home" / "user", 1000, 1000)
    return lower


class Box:
    """A container made by Container.create for one test, with a helper to run in it."""

    def __init__(self, container: Container, tmp: Path):
        self.container = container
        self.tmp = tmp
        self.spawned: list = []

    def spawn(self, args, *, user="", tty=False, stdin=False, cwd="/", env=()):
        spec = ProcessSpec(args=list(args), user=user, tty=tty, cwd=cwd, env=list(env))
        if self.container.main is None:
            spawned = self.container.start(spec, stdin=stdin)
        else:
            spawned = self.container.exec(spec, stdin=stdin)
        self.spawned.append(spawned)
        return spawned

    def run(self, args, *, input: bytes | None = None, **kw):
        """Start *args* (as the main process, or exec'ed if there is one); return
        (exit code, stdout, stderr)."""
        spawned = self.spawn(args, stdin=input is not None, **kw)
        if input is not None:
            os.write(spawned.stdin, input)
            os.close(spawned.stdin)
            spawned.stdin = None
        out = read_to_end(spawned.stdout)
        err = read_to_end(spawned.stderr)
        code = process.wait(spawned.pid)
        spawned.close()
        return code, out.decode(), err.decode()


def _read_until(fd, marker: bytes) -> bytes:
    """Read *fd* until *marker* appears (or EOF, which fails the test)."""
    seen = b""
    while marker not in seen:
        chunk = os.read(fd, 4096)
        assert chunk, f"EOF before {marker!r}: {seen!r}"
        seen += chunk
    return seen


class Boxes:
    """The boxes of one test on the busybox layer, each in its own directory under *tmp*;
    :meth:`close` destroys them and checks that no mount or cgroup is left behind."""

    def __init__(self, busybox_layer: Path, tmp: Path):
        self.layer, self.tmp = busybox_layer, tmp
        self.boxes: list[Box] = []

    def create(self, config: BootConfig, *, namespaces=HOST_NAMESPACES, mounts=None) -> Box:
        work = self.tmp / config.container_id
        container = Container.create(
            config,
            lowerdirs=[str(self.layer)],
            upperdir=str(work / "upper"),
            workdir=str(work / "work"),
            rootfs=str(work / "rootfs"),
            files_dir=str(work / "files"),
            namespaces=namespaces,
            mounts=mounts,
        )
        box = Box(container, work)
        self.boxes.append(box)
        return box

    def close(self) -> None:
        cgroup_dirs = []
        for box in self.boxes:
            if box.container.cgroup:
                cgroup_dirs += box.container.cgroup.directories
            box.container.destroy()
            for spawned in box.spawned:
                process.reap(spawned.pid)
                spawned.close()
        assert _mounts_under(self.tmp) == [], "mounts left behind"
        assert [d for d in cgroup_dirs if os.path.exists(d)] == [], "cgroups left behind"


@pytest.fixture
def make_box(busybox_layer, tmp_path):
    boxes = Boxes(busybox_layer, tmp_path)

    def make(
        *,
        hostname="box1",
        memory_limit=0,
        pids_limit=0,
        namespaces=HOST_NAMESPACES,
        resolv_conf="nameserver 192.0.2.53\n",
    ):
        config = BootConfig(
            container_id=f"test-{secrets.token_hex(4)}",
            token="t",
            hostname=hostname,
            process=ProcessSpec(args=["true"]),
            layer_count=1,
            resolv_conf=resolv_conf,
            memory_limit=memory_limit,
            pids_limit=pids_limit,
        )
        return boxes.create(config, namespaces=namespaces)

    yield make
    boxes.close()


def test_echo_hello(make_box):
    assert make_box().run(["echo", "hello"]) == (0, "hello\n", "")


def test_exit_code(make_box):
    assert make_box().run(["sh", "-c", "exit 7"])[0] == 7


def test_command_not_found_is_127_with_the_message(make_box):
    box = make_box()
    with pytest.raises(SpawnError) as info:
        box.run(["/nope"])
    assert info.value.exit_code == 127
    assert str(info.value) == 'exec: "/nope": no such file or directory'
    box.container.main = None  # nothing runs; a second attempt is allowed
    with pytest.raises(SpawnError) as info:
        box.run(["nope"])
    assert info.value.exit_code == 127 and "executable file not found in $PATH" in str(info.value)
    box.container.main = None
    with pytest.raises(SpawnError) as info:
        box.run(["/etc/passwd"])
    assert info.value.exit_code == 126 and "permission denied" in str(info.value)


def test_pid_1_hostname_and_only_own_processes(make_box):
    code, out, _ = make_box(hostname="quiet-owl").run(
        ["sh", "-c", "echo $$; hostname; cat /etc/hostname; ps -o pid,args"]
    )
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "1" and lines[1] == "quiet-owl" and lines[2] == "quiet-owl"
    pids = [int(line.split()[0]) for line in lines[4:]]
    assert pids and max(pids) < 10, out  # sh (1) and ps: nothing from the host


def test_files_mounts_and_network(make_box):
    code, out, err = make_box().run(
        [
            "sh",
            "-c",
            (
                "cat /etc/resolv.conf; grep box1 /etc/hosts; ls /dev; mount | cut -d' ' -f3,5; "
                "ip -o link | cut -d: -f2; echo x > /written"
            ),
        ]
    )
    assert code == 0, err
    assert "nameserver 192.0.2.53" in out and "127.0.1.1\tbox1" in out
    for dev in ("null", "zero", "urandom", "tty", "ptmx", "pts", "shm", "stdout"):
        assert f"\n{dev}\n" in out
    assert "/proc proc" in out and "/sys sysfs" in out and "/dev/pts devpts" in out
    links = [word for word in out.split() if word in ("lo", "eth0")]
    assert "lo" in links and "eth0" not in links  # a network namespace of its own


def test_writes_go_to_the_upper_layer(make_box, busybox_layer):
    box = make_box()
    assert box.run(["sh", "-c", "echo data > /written; rm /bin/vi"])[0] == 0
    assert (box.tmp / "upper" / "written").read_text() == "data\n"
    assert (busybox_layer / "bin" / "vi").is_symlink()  # the layer is untouched


@pytest.mark.parametrize(
    "user,expected",
    [
        # uid, gid, every group (id -G), HOME
        ("1000", "1000 1000 1000 10 /home/user"),
        ("user", "1000 1000 1000 10 /home/user"),
        ("1000:10", "1000 10 10 /home/user"),
        ("4321:4321", "4321 4321 4321 /"),
        ("", "0 0 0 /root"),
    ],
)
def test_user(make_box, user, expected):
    code, out, err = make_box().run(["sh", "-c", "echo $(id -u) $(id -g) $(id -G) $HOME"], user=user)
    assert code == 0, err
    assert out.split() == expected.split()


def test_unknown_user_is_a_clear_error(make_box):
    with pytest.raises(SpawnError) as info:
        make_box().run(["true"], user="nobody-here")
    assert info.value.exit_code == 125
    assert "unable to find user nobody-here" in str(info.value)


def test_missing_cwd_is_a_clear_error(make_box):
    with pytest.raises(SpawnError) as info:
        make_box().run(["true"], cwd="/no/such/dir")
    assert "/no/such/dir" in str(info.value)


def test_stdin(make_box):
    assert make_box().run(["sh", "-c", "tr a-z A-Z"], input=b"hello\n")[1] == "HELLO\n"


def test_sigkill_on_pid_1_is_137(make_box):
    box = make_box()
    spawned = box.spawn(["sleep", "100"])
    os.kill(spawned.pid, signal.SIGKILL)
    assert process.wait(spawned.pid) == 137


def test_sigterm_is_143(make_box):
    # A PID 1 only gets the signals it handles (SIGKILL aside), exactly as with docker:
    # a shell that traps TERM ends with 143 …
    box = make_box()
    spawned = box.spawn(["sh", "-c", "trap 'exit 143' TERM; echo ready; while :; do sleep 0.05; done"])
    _read_until(spawned.stdout, b"ready")  # the trap is set
    os.kill(spawned.pid, signal.SIGTERM)
    assert process.wait(spawned.pid) == 143
    # … and without a pid namespace, a plain sleep dies of it: 128 + 15.
    box = make_box(namespaces=("mnt", "uts", "ipc", "net"))
    spawned = box.spawn(["sleep", "100"])
    os.kill(spawned.pid, signal.SIGTERM)
    assert process.wait(spawned.pid) == 143


def test_tty(make_box):
    box = make_box()
    spawned = box.spawn(["sh", "-c", "tty; echo $TERM"], tty=True)
    out = read_to_end(spawned.master).decode()
    assert process.wait(spawned.pid) == 0
    assert "/dev/pts/0" in out and "xterm" in out


def test_exec_joins_the_container(make_box):
    box = make_box(hostname="joined")
    main = box.spawn(["sh", "-c", "echo main > /tmp/marker; echo ready; sleep 100"])
    _read_until(main.stdout, b"ready")  # the marker is written
    code, out, err = box.run(["sh", "-c", "hostname; cat /tmp/marker; cat /proc/1/cmdline | tr '\\0' ' '"], user="user")
    assert code == 0, err
    assert out.splitlines()[:2] == ["joined", "main"] and "sleep 100" in out
    os.kill(main.pid, signal.SIGKILL)
    assert process.wait(main.pid) == 137


def test_cgroup_membership_and_limits(make_box):
    """The host's own layout: v1 controllers (this machine) or one v2 tree (v2-only hosts)."""
    box = make_box(memory_limit=64 * 1024 * 1024, pids_limit=64)
    cgroup: Cgroup = box.container.cgroup
    cid = box.container.config.container_id
    assert cgroup.version == detect_version()
    if cgroup.version == 1:
        memory_dir = cgroup.paths["memory"]
        assert memory_dir.endswith(f"/memory/vmshim/{cid}")
        memory_max = Path(memory_dir, "memory.limit_in_bytes")
        pids_max, member = Path(cgroup.paths["pids"], "pids.max"), f":memory:/vmshim/{cid}"
    else:
        assert cgroup.path.endswith(f"/vmshim/{cid}")
        memory_max = Path(cgroup.path, "memory.max")
        pids_max, member = Path(cgroup.path, "pids.max"), f"/vmshim/{cid}"
    assert memory_max.read_text().strip() == str(64 << 20)
    assert pids_max.read_text().strip() == "64"
    spawned = box.spawn(["sleep", "100"])
    with open(f"/proc/{spawned.pid}/cgroup") as f:
        lines = f.read().splitlines()
    assert any(line.endswith(member) for line in lines), lines
    assert spawned.pid in cgroup.procs()
    os.kill(spawned.pid, signal.SIGKILL)
    process.wait(spawned.pid)


def test_memory_limit_oom_kills(make_box):
    box = make_box(memory_limit=32 * 1024 * 1024)
    code, _, _ = box.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"])
    assert code == 137
    assert box.container.oom_killed()


def test_cgroup_v2_code_path_on_the_unified_mount(busybox_layer, tmp_path):
    """The guest's v2 layout, exercised on this host's (controller-less) v2 mount: the
    group is created and joined, the container gets a cgroup namespace rooted there and
    sees cgroup2 at /sys/fs/cgroup; limits need controllers this mount lacks."""
    # A hybrid host (this one) has the v2 tree at unified/; a v2-only host at the root.
    unified = next((root for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup") if detect_version(root) == 2), None)
    assert unified, "no cgroup2 mount: every systemd host has one (unified/ or the root)"
    cgroup = Cgroup.create(f"v2-{secrets.token_hex(3)}", root=unified)
    rootfs_dir = tmp_path / "rootfs"
    rootfs.mount_overlay([str(busybox_layer)], str(tmp_path / "upper"), str(tmp_path / "work"), str(rootfs_dir))
    try:
        assert cgroup.version == 2 and cgroup.path == f"{unified}/vmshim/{cgroup.name}"
        config = BootConfig(
            container_id=cgroup.name, token="t", hostname="v2box", process=ProcessSpec(args=["true"]), layer_count=1
        )
        container = Container(
            config, str(rootfs_dir), files_dir=str(tmp_path / "files"), cgroup=cgroup, namespaces=HOST_NAMESPACES
        )
        spawned = container.start(
            ProcessSpec(args=["sh", "-c", "cat /proc/self/cgroup; mount | grep cgroup2; sleep 100"]), stdin=False
        )
        first = os.read(spawned.stdout, 4096).decode()
        while "cgroup2" not in first:
            first += os.read(spawned.stdout, 4096).decode()
        assert "0::/\n" in first and "/sys/fs/cgroup type cgroup2" in first
        assert spawned.pid in cgroup.procs()
        if unified.endswith("/unified"):  # a hybrid host's v2 mount has no controllers
            with pytest.raises(Exception, match="memory.max"):
                cgroup.set_limits(memory=1 << 30)
        else:
            cgroup.set_limits(memory=1 << 30)
            assert Path(cgroup.path, "memory.max").read_text().strip() == str(1 << 30)
        os.kill(spawned.pid, signal.SIGKILL)
        assert process.wait(spawned.pid) == 137
        spawned.close()
    finally:
        cgroup.remove()
        rootfs.unmount(str(rootfs_dir), detach=True)
    assert not os.path.exists(cgroup.path)
    assert _mounts_under(tmp_path) == []


# ---- guest.init as PID 1 of a pid namespace ---------------------------------------------

DRIVER = """
import os, sys
sys.path.insert(0, {repo!r})
import guest.agent, guest.init as init
# init mounts tmpfs over /tmp and /run: a checkout living there (a CI clone in /tmp) would
# vanish under it, so load every guest module now, as the guest image has them all.
import importlib, pkgutil, guest, guest.runtime
for pkg in (guest, guest.runtime):
    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
fd = {fd}
disks = {disks!r}
init.find_disks = lambda: dict(disks)
init.MODULES_LIST = "/nonexistent"
init.DISK_TIMEOUT = 1.0
init.console.open = lambda: None  # keep logging to our stderr, not the host's console
init.console.verbose = True
guest.agent.open_port = lambda timeout=10.0, name=None: fd
init.main()
"""


@pytest.fixture
def loop_disks(busybox_layer, tmp_path):
    """Attach files as loop devices; yields attach(path) -> /dev/loopN, detaches after."""
    attached = []

    def attach(path: Path) -> str:
        dev = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False)


def _run_init(tmp_path, disks: dict) -> tuple[subprocess.Popen, _Host]:
    host_sock, guest_sock = socket.socketpair()
    script = DRIVER.format(repo=str(REPO), fd=guest_sock.fileno(), disks=disks)
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--fork",
            "--propagation",
            "private",
            sys.executable,
            "-S",
            "-c",
            script,
        ],
        pass_fds=[guest_sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    guest_sock.close()
    return proc, _Host(host_sock)


def _console_of_ended(proc: subprocess.Popen) -> str:
    """The init's console output, once it ended (killed if it still runs)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return proc.stdout.read().decode(errors="replace")


class _Host:
    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(30)
        self.reader = protocol.FrameReader()
        self.inbox = []

    def send(self, type, payload=b"", **fields):
        self.sock.sendall(protocol.encode(type, payload, **fields))

    def recv(self):
        while not self.inbox:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the agent closed the channel")
            self.inbox.extend(self.reader.feed(data))
        return self.inbox.pop(0)


def _config_drive(tmp_path: Path, config: BootConfig) -> Path:
    """The host's ISO; as a squashfs when this host's kernel has no iso9660 (the guest's
    has it; init detects the filesystem either way)."""
    with open("/proc/filesystems") as f:
        has_iso = "iso9660" in f.read().split()
    if has_iso:
        pytest.importorskip("pycdlib")
        from shim.vm.configdrive import build_config_drive

        return build_config_drive(config, tmp_path / "config.iso")
    src = tmp_path / "config-src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config.to_dict()))
    image = tmp_path / "config.sqfs"
    subprocess.run(["gensquashfs", "--pack-dir", str(src), "--quiet", str(image)], check=True)
    return image


@pytest.mark.skipif(
    not shutil.which("gensquashfs") or not shutil.which("losetup") or not shutil.which("unshare"),
    reason="needs gensquashfs, losetup, unshare",
)
def test_init_boots_runs_and_powers_off(busybox_layer, loop_disks, tmp_path):
    squash = tmp_path / "layer.sqfs"
    subprocess.run(["gensquashfs", "--pack-dir", str(busybox_layer), "--quiet", str(squash)], check=True)
    config = BootConfig(
        container_id=f"init-{secrets.token_hex(3)}",
        token="tok",
        hostname="vm1",
        process=ProcessSpec(args=["sh", "-c", ("echo hi from $(hostname) $$; cat /etc/hostname; exit 3")]),
        layer_count=1,
        resolv_conf="nameserver 192.0.2.1\n",
        # init runs on the host here, where it may find no cgroup of its
        # own: without one the device rules (and so an unprivileged
        # container) are refused, by design.
        privileged=True,
    )
    disks = {"vmshim-config": loop_disks(_config_drive(tmp_path, config)), "vmshim-l0": loop_disks(squash)}
    proc, host = _run_init(tmp_path, disks)
    try:
        hello = host.recv()
        assert hello.type == protocol.HELLO, hello
        host.send(protocol.START, token="tok", id=1, stdin=False, tty=False, rows=24, cols=80)
        started = host.recv()
        assert started.type == protocol.STARTED, started
        out = b""
        while True:
            msg = host.recv()
            if msg.type == protocol.STDOUT:
                out += msg.payload
            elif msg.type == protocol.EXIT:
                break
        assert out == b"hi from vm1 1\nvm1\n"
        assert msg.get("code", int) == 3
        proc.wait(timeout=20)  # powers off after a short grace
    finally:
        console = _console_of_ended(proc)
    # reboot(2) in a pid namespace ends its init "by SIGHUP": that is our power-off.
    assert proc.returncode == -signal.SIGHUP, console
    assert "vmshim-agent: ready at" in console
    assert "FATAL" not in console, console


@pytest.mark.skipif(not shutil.which("losetup") or not shutil.which("unshare"), reason="needs losetup, unshare")
def test_init_reports_fatal_errors_and_powers_off(loop_disks, tmp_path):
    proc, host = _run_init(tmp_path, {})  # no config drive at all
    try:
        assert host.recv().type == protocol.HELLO
        error = host.recv()
        assert error.type == protocol.ERROR
        assert "vmshim-config" in error.get("message", str)
        proc.wait(timeout=20)
    finally:
        console = _console_of_ended(proc)
    assert proc.returncode == -signal.SIGHUP, console
    assert "FATAL" in console and "vmshim-config" in console
