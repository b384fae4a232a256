"""Real container engines (podman, containerd + ctr) driven against one OCI runtime binary.

The harness for the OCI runtime CLI: it runs the engines themselves, isolated so that they
touch nothing of the host's own engine state, and points them at the runtime under test
(``/usr/sbin/runc`` to validate the harness, the vmshim runtime later).

Preconditions shared by everything here: root, and a private mount namespace with a
network namespace of its own, as scripts/lib/test-in-namespace makes them (``/sys`` mounted
for the netns with the host's cgroup hierarchies bound back under ``/sys/fs/cgroup``:
``ip netns exec`` alone leaves no cgroups, and runc fails with "no cgroup mount found").
Containers get no network (``--network none``); nothing here makes a bridge, veth or rule.

What this host needs (Debian 12, cgroup v1, no CAP_SYS_RESOURCE, RLIMIT_NOFILE hard 20000):
podman's default rlimits for root (nofile 1048576, nproc 4194304) exceed what runc may set,
so the generated containers.conf sets both to what this process may set (``default_ulimits``).

The runtime is always called through a small wrapper script (``runtime_wrapper``) that logs
every invocation (caller, cwd, argv) and can add ``--root STATE``: podman's ``--runtime-flag``
is not passed on to the ``podman container cleanup`` exit command, which then used runc's
default root /run/runc; the wrapper keeps every call on the same private state root.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Self

RUNC = "/usr/sbin/runc"
REPO = Path(__file__).resolve().parents[2]
#: The name both engines give the busybox archive that ``vmshim save`` writes (docker-archive
#: RepoTags, and the oci-archive's org.opencontainers.image.ref.name annotation).
BUSYBOX_REF = "docker.io/library/busybox:latest"


def missing_engines() -> str | None:
    """Why the engines cannot run here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("podman", "conmon", "containerd", "ctr", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def missing_cgroups() -> str | None:
    """Why runc could not make cgroups here (a skip reason), or None: ``ip netns exec``
    mounts a fresh /sys without /sys/fs/cgroup (test-in-namespace binds them back)."""
    root = Path("/sys/fs/cgroup")
    if not root.is_dir() or not any(root.iterdir()):
        return ("no cgroup hierarchies under /sys/fs/cgroup (after ip netns exec?): run "
                "the way scripts/lib/test-in-namespace does")
    return None


def in_private_mount_namespace() -> bool:
    """True when this process's mount namespace differs from one of its ancestors' (an
    ``unshare --mount`` above us made it). Ancestors, not PID 1: PID 1's ns link may be
    unreadable even for root (it is on this sandboxed host)."""
    mine = os.readlink("/proc/self/ns/mnt")
    pid = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            return False
        try:
            if pid > 0 and os.readlink(f"/proc/{pid}/ns/mnt") != mine:
                return True
        except OSError:
            continue
    return False


def make_workdir(prefix: str = "vmshim-oci-") -> Path:
    """A fresh directory under /var/tmp, mode 0755 (traversable by libvirt-qemu, which the
    vmshim runtime will need for bundle rootfs paths). Remove it with remove_workdir()."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    return path


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path* in this mount namespace, deepest last."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below *path* (deepest first)."""
    for target in sorted(set(mounts_under(path)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True, timeout=30)


def remove_workdir(path: Path) -> None:
    """Unmount what is left below *path*, then delete it; refuses (AssertionError) when a
    mount survives, rather than deleting through it."""
    unmount_under(path)
    left = mounts_under(path)
    assert not left, f"mounts left under {path}: {left}"
    for _ in range(20):  # a process still exiting may write a last file meanwhile
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.25)
    shutil.rmtree(path)


def pids_mentioning(text: str) -> list[int]:
    """PIDs (not this process) with TEXT as, or inside, one of their argv words."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in word for word in argv):
            found.append(int(entry.name))
    return found


def wait_for_exit(pids_now, timeout: float) -> None:
    """Wait until PIDS_NOW() (a callable) is empty; after TIMEOUT s SIGKILL those left, by PID."""
    deadline = time.monotonic() + timeout
    while pids_now():
        if time.monotonic() > deadline:
            for pid in pids_now():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = time.monotonic() + 5
            while pids_now() and time.monotonic() < killed:
                time.sleep(0.1)
            return
        time.sleep(0.1)


def remove_cgroup_trees(name: str, wait: float = 0) -> list[str]:
    """Remove the (empty) cgroup directory trees /sys/fs/cgroup[/<hierarchy>]/<name> that an
    engine made for its containers, retrying for WAIT s while some are busy (a process
    still exiting); return those that could not be removed."""
    deadline = time.monotonic() + wait
    while True:
        left = _remove_cgroup_trees_once(name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _remove_cgroup_trees_once(name: str) -> list[str]:
    name = name.strip("/")
    assert name and "/" not in name and name not in (".", "..")
    left = []
    roots = [Path("/sys/fs/cgroup")] + [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
    for root in roots:
        top = root / name
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, dirnames, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        if top.exists():
            left.append(str(top))
    return left


# --- the runtime wrapper --------------------------------------------------------------------

_WRAPPER = """#!/bin/sh
# Generated by tests/e2e/oci_engines.py: log this call, then run the real runtime.
rec={log}/$(date +%s%N)-$$
{{ printf '%s\\0' "$(cat /proc/$PPID/comm 2>/dev/null)" "$PWD" "$@"; }} > "$rec.tmp" 2>/dev/null \\
  && mv "$rec.tmp" "$rec"
{env}exec {runtime}{root} "$@"
"""
_PASSED_ENV = ("VMSHIM_ROOT", "VMSHIM_GUEST_KERNEL")
"""Set again in the wrapper: conmon runs the runtime with a filtered environment, which
would send vmshim-runtime to the default state root and its guest kernel."""


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def runtime_wrapper(runtime: str, directory: Path, argv_log: Path,
                    state_root: Path | None = None) -> Path:
    """Write DIRECTORY/<basename of runtime>, an executable that records each call as one file
    in ARGV_LOG (see read_argv_log) and execs RUNTIME, with ``--root STATE_ROOT`` first when
    given. Same basename as the runtime, so podman treats it as it treats the runtime."""
    directory.mkdir(parents=True, exist_ok=True)
    argv_log.mkdir(parents=True, exist_ok=True)
    path = directory / os.path.basename(runtime)
    root = f" --root {_sh_quote(str(state_root))}" if state_root else ""
    env = "".join(f"export {k}={_sh_quote(os.environ[k])}\n" for k in _PASSED_ENV if k in os.environ)
    path.write_text(_WRAPPER.format(log=_sh_quote(str(argv_log)), runtime=_sh_quote(runtime),
                                    root=root, env=env))
    path.chmod(0o755)
    return path


def read_argv_log(argv_log: Path) -> list[tuple[str, str, list[str]]]:
    """The calls a runtime_wrapper recorded, oldest first: (caller's comm, cwd, argv[1:])."""
    calls = []
    if not argv_log.is_dir():
        return calls
    for rec in sorted(p for p in argv_log.iterdir() if not p.name.endswith(".tmp")):
        fields = rec.read_bytes().decode(errors="replace").split("\0")[:-1]
        if len(fields) >= 2:
            calls.append((fields[0], fields[1], fields[2:]))
    return calls


def subcommand(argv: list[str]) -> str | None:
    """The runtime subcommand in a recorded argv (global flags such as --root X skipped)."""
    with_value = {"--root", "--log", "--log-format", "--criu", "--rootless"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            i += 2 if a in with_value else 1
            continue
        return a
    return None


# --- podman ---------------------------------------------------------------------------------

def _settable_ulimits() -> list[str]:
    """nofile/nproc ulimits runc can set for root here: the hard limits of this process
    (nproc also capped at kernel.pid_max: podman lowers its own nproc to that)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 32768
    if nproc == resource.RLIM_INFINITY or nproc > pid_max:
        nproc = pid_max
    if nofile == resource.RLIM_INFINITY:
        nofile = 1048576
    return [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]


class Podman:
    """podman 4.x, fully private: storage, run and tmp dirs, file locks, events, network
    config and logs all under WORKDIR, and runtime RUNTIME (through runtime_wrapper, state
    root WORKDIR/rt when runtime_root; with json_log, podman passes it
    ``--log-format=json --log FILE`` as it does runc). Every ``run``/``create`` must add run_args()
    (no network, never pull, a cgroup parent of its own that close() removes).

    Preconditions: root, see the module docstring; WORKDIR's path short (the runroot must
    stay <= 50 characters for conmon's socket paths). Use as a context manager or call
    close(); it does not delete WORKDIR.
    """

    def __init__(self, runtime: str, workdir: Path, *, storage_driver: str = "overlay",
                 runtime_root: bool = True, json_log: bool = True):
        self.workdir = Path(workdir)
        self.real_runtime = runtime
        w = self.workdir
        for d in ("storage", "run", "tmp", "networks", "blobcache", "bin"):
            (w / d).mkdir(parents=True, exist_ok=True)
        assert len(str(w / "run")) <= 50, f"runroot too long for conmon: {w / 'run'}"
        self.argv_log = w / "runtime-argv"
        self.runtime = runtime_wrapper(runtime, w / "bin", self.argv_log,
                                       w / "rt" if runtime_root else None)
        self.cgroup_parent = _name(f"vmshim-e2e-{w.parent.name}-{w.name}")
        ulimits = ", ".join(f'"{u}"' for u in _settable_ulimits())
        # podman passes ``--log-format=json --log <userdata>/oci-log`` (and reads errors from
        # that file) only to runtimes whose basename is listed; runc and crun are by default
        json_names = ["crun", "runc", "kata", "runsc", "youki", "krun"]
        if json_log and self.runtime.name not in json_names:
            json_names.append(self.runtime.name)
        if not json_log:
            json_names = [n for n in json_names if n != self.runtime.name]
        json_list = ", ".join(f'"{n}"' for n in json_names)
        (w / "containers.conf").write_text(f"""\
[containers]
log_driver = "k8s-file"
default_ulimits = [{ulimits}]

[network]
network_config_dir = "{w}/networks"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{w}/tmp/events.log"
lock_type = "file"
runtime_supports_json = [{json_list}]
tmp_dir = "{w}/tmp"
volume_path = "{w}/storage/volumes"
""")
        (w / "storage.conf").write_text(f"""\
[storage]
driver = "{storage_driver}"
graphroot = "{w}/storage"
runroot = "{w}/run"
""")
        (w / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = dict(os.environ, CONTAINERS_CONF=str(w / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(w / "storage.conf"),
                        CONTAINERS_REGISTRIES_CONF=str(w / "registries.conf"))
        self.base = ["podman", "--root", str(w / "storage"), "--runroot", str(w / "run"),
                     "--tmpdir", str(w / "tmp"), "--storage-driver", storage_driver,
                     "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                     "--network-config-dir", str(w / "networks"),
                     "--volumepath", str(w / "storage" / "volumes"),
                     "--runtime", str(self.runtime)]

    def command(self, *args: str) -> list[str]:
        """The full podman argv for ARGS (for Popen, e.g. under a pty with self.env)."""
        return self.base + [str(a) for a in args]

    def run_args(self) -> list[str]:
        """Arguments every ``podman run``/``create`` here needs, right after the subcommand."""
        return ["--network", "none", "--pull", "never", "--cgroup-parent", "/" + self.cgroup_parent]

    def podman(self, *args: str, input: str | None = None, timeout: float = 120,
               check: bool = False) -> subprocess.CompletedProcess:
        """Run podman ARGS; text output. check=True raises AssertionError on failure."""
        return _run(self.command(*args), self.env, input, timeout, check)

    def load(self, archive: Path, timeout: float = 120) -> str:
        """``podman load`` ARCHIVE (docker-archive or oci-archive); returns the image name.

        Run in a mount namespace of its own in which a WORKDIR directory covers
        /var/lib/containers/cache: podman 4.3 (containers/common 0.50) writes its
        blob-info cache there whatever --root says."""
        blob = self.workdir / "blobcache"
        target = next(p for p in ("/var/lib/containers/cache", "/var/lib/containers", "/var/lib")
                      if os.path.isdir(p))
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(blob), target,
                *self.command("load", "-i", str(archive))]
        proc = _run(argv, self.env, None, timeout, True)
        names = re.findall(r"^Loaded image(?:\(s\))?: (\S+)", proc.stdout, re.MULTILINE)
        assert names, f"podman load printed no image name: {proc.stdout!r} {proc.stderr!r}"
        return names[0].split(",")[0]

    def close(self) -> None:
        """Remove every container (force, no stop timeout), wait for the conmons and
        ``podman container cleanup`` processes of WORKDIR to end (SIGKILL by PID after 30 s),
        unmount what podman left under WORKDIR, remove the cgroup parent. Keeps images and
        WORKDIR."""
        try:
            self.podman("rm", "--all", "--force", "--time", "0", timeout=120)
        except subprocess.TimeoutExpired:
            pass
        wait_for_exit(lambda: pids_mentioning(str(self.workdir / "storage")), 30)
        unmount_under(self.workdir)
        remove_cgroup_trees(self.cgroup_parent, wait=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- containerd -----------------------------------------------------------------------------

class Containerd:
    """A private containerd (config, root, state, sockets, logs under WORKDIR; CRI and the
    snapshotters that cannot work here disabled), for ``ctr`` with the runc v2 shim.

    The shim's sockets go to /run/containerd/s (hard-coded in containerd 1.6) and ctr's FIFOs
    to /run/containerd/fifo: WORKDIR/run-containerd is bind-mounted on /run/containerd for
    the daemon's lifetime (the directory is made, and removed after, when missing). Hence
    the precondition: a private mount namespace (in_private_mount_namespace()), root.
    Containers are created in containerd namespace ``namespace`` (cgroups
    /sys/fs/cgroup/*/<namespace>/<id>, removed on exit). ``run_args()`` gives
    ``--runc-binary <wrapper of runtime>`` for ``ctr run``.

    Context manager: entering starts containerd and waits for ``ctr version``; leaving kills
    and deletes every task and container of the namespace, stops exactly that containerd
    and its shims (by PID), unmounts what is left under WORKDIR. WORKDIR is not deleted.
    """

    def __init__(self, workdir: Path, runtime: str = RUNC, namespace: str | None = None):
        self.workdir = Path(workdir)
        self.real_runtime = runtime
        self.namespace = namespace or _name(f"vmshim-e2e-{self.workdir.parent.name}")
        self.socket = self.workdir / "containerd.sock"
        self.argv_log = self.workdir / "runtime-argv"
        self.proc: subprocess.Popen | None = None
        self._made_run_dir = False
        self._bound = False
        w = self.workdir
        for d in ("root", "state", "run-containerd", "bin"):
            (w / d).mkdir(parents=True, exist_ok=True)
        # the shim always passes --root <state>/runc/<ns>: no state root added here
        self.runtime = runtime_wrapper(runtime, w / "bin", self.argv_log)
        disabled = ", ".join(f'"io.containerd.{p}"' for p in (
            "grpc.v1.cri", "snapshotter.v1.btrfs", "snapshotter.v1.zfs",
            "snapshotter.v1.devmapper", "snapshotter.v1.aufs", "tracing.processor.v1.otlp",
            "internal.v1.tracing"))
        (w / "config.toml").write_text(f"""\
version = 2
root = "{w}/root"
state = "{w}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[debug]
  level = "info"

[cgroup]
  path = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/root/opt"
""")
        self.env = dict(os.environ, CONTAINERD_ADDRESS=str(self.socket),
                        CONTAINERD_NAMESPACE=self.namespace)

    def run_args(self) -> list[str]:
        """Arguments every ``ctr run`` here needs (right after ``run``)."""
        return ["--runc-binary", str(self.runtime)]

    def command(self, *args: str) -> list[str]:
        """The full ctr argv for ARGS."""
        return ["ctr", "--address", str(self.socket), "--namespace", self.namespace,
                *[str(a) for a in args]]

    def ctr(self, *args: str, input: str | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run ctr ARGS against this containerd; text output."""
        return _run(self.command(*args), self.env, input, timeout, check)

    def import_image(self, archive: Path, timeout: float = 120) -> str:
        """``ctr images import`` ARCHIVE (docker-archive or oci-archive); returns its name."""
        proc = self.ctr("images", "import", str(archive), timeout=timeout, check=True)
        names = re.findall(r"^unpacking (\S+) \(sha256:", proc.stdout, re.MULTILINE)
        assert names, f"ctr images import printed no image name: {proc.stdout!r}"
        return names[0]

    def __enter__(self) -> Self:
        if not in_private_mount_namespace():
            raise RuntimeError("Containerd needs a private mount namespace (unshare --mount): "
                               "it bind-mounts over /run/containerd")
        try:
            run_dir = Path("/run/containerd")
            if not run_dir.exists():
                run_dir.mkdir()
                self._made_run_dir = True
            subprocess.run(["mount", "--bind", str(self.workdir / "run-containerd"),
                            str(run_dir)], check=True, capture_output=True, timeout=30)
            self._bound = True
            log = open(self.workdir / "containerd.log", "ab")
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.workdir / "config.toml")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            log.close()
            deadline = time.monotonic() + 30
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"containerd exited {self.proc.returncode}: "
                                       f"{self.log_tail()}")
                try:
                    if self.ctr("version", timeout=10).returncode == 0:
                        break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"containerd did not answer in 30 s: {self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "containerd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def shim_pids(self) -> list[int]:
        """PIDs of the shims of this containerd (their argv names its socket address)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and str(self.socket).encode() in argv:
                pids.append(int(entry.name))
        return pids

    def close(self) -> None:
        """Tear down everything this instance started (see the class docstring)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                tasks = self.ctr("tasks", "ls", "-q", timeout=30).stdout.split()
                for task in tasks:
                    self.ctr("tasks", "kill", "--signal", "SIGKILL", task, timeout=30)
                for task in tasks:
                    for _ in range(40):
                        if self.ctr("tasks", "delete", task, timeout=30).returncode == 0:
                            break
                        time.sleep(0.25)
                for c in self.ctr("containers", "ls", "-q", timeout=30).stdout.split():
                    self.ctr("containers", "delete", c, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shims = self.shim_pids()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        for pid in shims:  # only shims still running with our address in their argv
            if pid in self.shim_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        unmount_under(self.workdir)
        if self._bound:
            subprocess.run(["umount", "-l", "/run/containerd"], check=False, capture_output=True,
                           timeout=30)
            self._bound = False
        if self._made_run_dir:
            try:
                os.rmdir("/run/containerd")
            except OSError:
                pass
            self._made_run_dir = False
        remove_cgroup_trees(self.namespace, wait=10)


# --- images and terminals -------------------------------------------------------------------

def image_archive(output: Path, image: str = "busybox", fmt: str = "docker-archive",
                  vmshim_root: str | None = None, timeout: float = 300) -> Path:
    """``vmshim save --format FMT -o OUTPUT IMAGE`` with the project's CLI (this Python,
    ``-m shim.cli.main``), from the store VMSHIM_ROOT names (the env's unless given).
    Both formats import into podman and containerd as BUSYBOX_REF."""
    env = dict(os.environ)
    if vmshim_root:
        env["VMSHIM_ROOT"] = vmshim_root
    argv = [sys.executable, "-m", "shim.cli.main", "save", "--format", fmt, "-o", str(output),
            image]
    _run(argv, env, None, timeout, True, cwd=str(REPO))
    return Path(output)


def run_in_pty(argv: list[str], env: dict | None = None, input: bytes | None = None,
               input_after: bytes = b"", timeout: float = 60) -> tuple[int | None, bytes]:
    """Run ARGV with a new pty as its stdin/stdout/stderr (new session, pty as controlling
    terminal); write INPUT once the output shows INPUT_AFTER (at once when empty); return
    (exit code, everything it printed).
    After TIMEOUT s its process group is killed (SIGKILL; exit code -9, or None when even
    that did not end it in 10 s)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # noqa: PLW1509
    os.close(slave)
    out = b""
    start = time.monotonic()
    pending = input
    try:
        while time.monotonic() - start < timeout:
            if pending is not None and input_after in out:
                os.write(master, pending)
                pending = None
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave fd closed
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None and pending is None:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            return proc.wait(10), out
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return None, out
    finally:
        os.close(master)


def _name(text: str) -> str:
    """TEXT as a containerd namespace / cgroup name: alphanumeric runs joined by '-'."""
    return "-".join(re.findall(r"[A-Za-z0-9]+", text))[:60].strip("-")


def _run(argv, env, input, timeout, check, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, check=False, input=input, capture_output=True, text=True,
                          errors="replace", env=env, timeout=timeout, cwd=cwd,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
    return proc
