"""The subjects a benchmark compares, each driven the way its users drive it.

- :class:`VmshimSubject` — the ``vmshim`` CLI as a subprocess, ``--isolation vm`` or
  ``process`` (never its internals, so the figures stay valid while those change).
- :class:`RuncSubject` — runc on the same image's rootfs, unpacked from the image store
  into an OCI bundle (``runc spec`` + our changes), with its own ``--root`` state dir.
- :class:`Floor` — bare ``qemu-system-x86_64`` with the guest image
  (:func:`shim.guestimage.boot_floor_command`), timed to the agent's first bytes.

Every container or VM a subject makes is recorded in ``live`` until removed, and
:meth:`cleanup` removes what is left; the runner calls it on every exit path.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shim.bench import procmem
from shim.errors import VmshimError

IDLE = ("sleep", "86400")
"""What an idle container runs."""

IMAGE = "busybox"
"""The image every subject runs (the workloads need its tools)."""


class BenchError(VmshimError):
    """A benchmark could not take a measurement; the message says why (it ends up in
    results.json as the reason a figure is missing)."""


class CommandFailed(BenchError):
    def __init__(self, argv: list[str], code: int | None, stderr: str):
        self.argv, self.code, self.stderr = argv, code, stderr
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["(no stderr)"]
        how = "timed out" if code is None else f"exited {code}"
        super().__init__(f"`{shown(argv)}` {how}: {last[0].strip()}")


def shown(argv: list[str]) -> str:
    """*argv* as a user would type it: the CLI as ``vmshim``, long scripts elided."""
    out = list(argv)
    if len(out) >= 3 and out[1:3] == ["-m", "shim.cli.main"]:
        out = ["vmshim"] + out[3:]
    elif out:
        out[0] = os.path.basename(out[0])
    return " ".join(a if len(a) <= 120 and "\n" not in a else "'<script>'" for a in out)


def default_cli() -> list[str]:
    """How to run ``vmshim``: the entry point next to this Python (the venv's), else the
    one on PATH, else ``python -m shim.cli.main``."""
    local = Path(sys.executable).parent / "vmshim"
    if local.is_file() and os.access(local, os.X_OK):
        return [str(local)]
    found = shutil.which("vmshim")
    if found:
        return [found]
    return [sys.executable, "-m", "shim.cli.main"]


def run(
    argv: list[str], timeout: float = 300, check: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run *argv* to completion (text output). Raises CommandFailed when it exits non-zero
    (with *check*) or outlives *timeout* (always; the process is killed)."""
    try:
        proc = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, None, (exc.stderr or b"").decode(errors="replace")) from None
    out = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )
    if check and out.returncode != 0:
        raise CommandFailed(argv, out.returncode, out.stderr)
    return out


def timed(argv: list[str], timeout: float = 300) -> float:
    """Wall seconds from spawning *argv* to its exit (output discarded). Raises
    CommandFailed."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, None, (exc.stderr or b"").decode(errors="replace")) from None
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return elapsed


def timed_first_output(argv: list[str], timeout: float = 300) -> float:
    """Wall seconds from spawning *argv* to the first byte on its stdout; then waits for
    it to exit. Raises CommandFailed when it prints nothing or fails."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        stdout = proc.stdout
        assert stdout is not None  # stdout=PIPE
        first = None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(stdout, selectors.EVENT_READ)
                if sel.select(timeout) and os.read(stdout.fileno(), 1):
                    first = time.perf_counter() - start
            stdout.read()
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                err.seek(0)
                raise CommandFailed(argv, None, err.read().decode(errors="replace"))
            stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, stderr)
    if first is None:
        raise BenchError(f"`{shown(argv)}` printed nothing")
    return first


# ------------------------------------------------------------------------------------------
# what this vmshim can do


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def parse_help(text: str) -> tuple[set[str], set[str]]:
    """(commands, options) listed in a click ``--help`` text."""
    commands: set[str] = set()
    options: set[str] = set()
    section = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line.strip().rstrip(":").lower()
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if section == "commands" and line.startswith("  ") and not line.startswith("    " * 2):
            commands.add(stripped.split()[0])
        elif section == "options" and stripped.startswith("-"):
            head = re.split(r"\s{2,}", stripped)[0]
            options.update(_OPTION.findall(head))
    return commands, options


@dataclass
class Capabilities:
    """Which parts of the docker-like CLI this vmshim has (read from its ``--help``)."""

    commands: set[str] = field(default_factory=set)
    run_options: set[str] = field(default_factory=set)

    @classmethod
    def probe(cls, cli: list[str]) -> Capabilities:
        commands, _ = parse_help(run(cli + ["--help"], timeout=60).stdout)
        options: set[str] = set()
        if "run" in commands:
            _, options = parse_help(run(cli + ["run", "--help"], timeout=60).stdout)
        return cls(commands, options)

    @property
    def detached(self) -> bool:
        return "--detach" in self.run_options or "-d" in self.run_options

    def lifecycle_missing(self, *need: str) -> str | None:
        """Why detached-container benchmarks cannot run (None when they can). *need*:
        verbs beyond ``run -d`` and ``rm``, e.g. ``exec``, ``inspect``."""
        missing = [] if self.detached else ["`vmshim run -d`"]
        missing += [f"`vmshim {verb}`" for verb in ("rm", *need) if verb not in self.commands]
        if not missing:
            return None
        return f"{', '.join(missing)} not available"

    def volumes_missing(self) -> str | None:
        missing = []
        if "volume" not in self.commands:
            missing.append("`vmshim volume`")
        if "--volume" not in self.run_options and "-v" not in self.run_options:
            missing.append("`vmshim run -v`")
        return f"volumes: {' and '.join(missing)} not available" if missing else None


# ------------------------------------------------------------------------------------------
# vmshim


def _find_pids(obj, prefix: str = "") -> dict[str, int]:
    """Every ``…Pid`` field (> 0) of an inspect document, by dotted path."""
    found: dict[str, int] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, (dict, list)):
                found.update(_find_pids(value, path))
            elif str(key).endswith("Pid") and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found[path] = value
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found.update(_find_pids(value, f"{prefix}[{i}]"))
    return found


def _find_key(obj, name: str):
    """The first value of a field called *name* (any case) anywhere in *obj*."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if str(key).lower() == name.lower() and not isinstance(value, (dict, list)):
                return value
        for value in obj.values():
            hit = _find_key(value, name)
            if hit is not None:
                return hit
    elif isinstance(obj, list):
        for value in obj:
            hit = _find_key(value, name)
            if hit is not None:
                return hit
    return None


def qemu_pid_of(domain: str) -> int | None:
    """QEMU's pid for a libvirt *domain*: libvirt's pid file, else the libvirt backend."""
    try:
        pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
        if procmem.alive(pid):
            return pid
    except (OSError, ValueError):
        pass
    try:
        from shim.vm.libvirt_backend import LibvirtBackend

        return LibvirtBackend().qemu_pid(domain)
    except Exception:  # noqa: BLE001 - the caller says the figure lacks QEMU
        return None


@dataclass
class Owned:
    """The host processes a container owns, and which inspect field led to which."""

    pids: set[int]
    roots: dict[str, int]


class _CliSubject:
    """A subject driven through its command line: ``exec`` runs what ``exec_argv`` says."""

    def exec_argv(self, ref: str, *cmd: str) -> list[str]:
        raise NotImplementedError

    def exec(self, ref: str, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(self.exec_argv(ref, *cmd), timeout=timeout)


class VmshimSubject(_CliSubject):
    """``vmshim`` with one ``--isolation``."""

    def __init__(self, cli: list[str], isolation: str, tag: str):
        self.cli = cli
        self.isolation = isolation
        self.tag = tag
        self.live: set[str] = set()
        self.ids: dict[str, str] = {}
        """name → container id (as `run -d` printed it), to check for leftover domains."""
        self._seq = 0

    def argv(self, *args: str) -> list[str]:
        return self.cli + list(args)

    def run_argv(self, *cmd: str, extra: tuple[str, ...] = ()) -> list[str]:
        """``vmshim run --rm --isolation I [extra] busybox CMD``."""
        return self.argv("run", "--rm", "--isolation", self.isolation, *extra, IMAGE, *cmd)

    def new_name(self) -> str:
        self._seq += 1
        return f"{self.tag}-{self.isolation}-{self._seq}"

    def start(self, cmd: tuple[str, ...] = IDLE, extra: tuple[str, ...] = (), timeout: float = 180) -> str:
        """``vmshim run -d``; returns the container's name (recorded for cleanup before it
        is run, so a half-made container is removed too)."""
        name = self.new_name()
        self.live.add(name)
        out = run(
            self.argv("run", "-d", "--name", name, "--isolation", self.isolation, *extra, IMAGE, *cmd), timeout=timeout
        ).stdout.split()
        if out:
            self.ids[name] = out[-1]
        return name

    def exec_argv(self, ref: str, *cmd: str) -> list[str]:
        return self.argv("exec", ref, *cmd)

    def wait_ready(self, ref: str, timeout: float = 120) -> None:
        """Until ``exec ref true`` succeeds. Raises BenchError with the last failure."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.exec(ref, "true", timeout=max(5.0, deadline - time.monotonic()))
                return
            except CommandFailed as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"container {ref} never answered exec: {exc}") from None
                time.sleep(0.2)

    def inspect(self, ref: str) -> dict:
        out = run(self.argv("inspect", ref), timeout=60).stdout
        try:
            data = json.loads(out)
        except ValueError:
            raise BenchError(f"`vmshim inspect {ref}` did not print JSON") from None
        if isinstance(data, list):
            data = data[0] if data else {}
        return data if isinstance(data, dict) else {}

    def owned(self, ref: str) -> Owned:
        """Host processes of the container: every ``…Pid`` of its inspect output (the
        monitor, the agent, QEMU) with their descendants, QEMU found through libvirt when
        inspect names only the domain, and every process in a cgroup named after it."""
        info = self.inspect(ref)
        roots = _find_pids(info)
        if self.isolation == "vm":  # the container's own pids are the guest's, not ours
            roots = {k: v for k, v in roots.items() if "container" not in k.lower()}
        full_id = str(_find_key(info, "Id") or "")
        if self.isolation == "vm" and not any(k.lower().endswith("qemupid") for k in roots):
            domain = _find_key(info, "Domain") or _find_key(info, "DomainName")
            if not domain and len(full_id) >= 12:
                domain = f"vmshim-{full_id[:12]}"
            qemu = qemu_pid_of(str(domain)) if domain else None
            if qemu is None:
                raise BenchError(f"no QEMU process found for {ref} (domain {domain!r})")
            roots["QemuPid(libvirt)"] = qemu
        if not roots:
            raise BenchError(f"`vmshim inspect {ref}` shows no pid")
        pids = procmem.descendants(list(roots.values()), procmem.parent_map())
        if len(full_id) >= 32:
            pids |= procmem.pids_in_cgroup_matching(full_id)
        return Owned(pids, roots)

    def remove(self, ref: str) -> None:
        """``vmshim rm -f``; a container that does not exist (its ``run -d`` failed early)
        counts as removed. Raises CommandFailed (the name stays recorded for cleanup)."""
        try:
            run(self.argv("rm", "-f", ref), timeout=120)
        except CommandFailed as exc:
            if "no such container" not in exc.stderr.lower():
                raise
        self.live.discard(ref)

    def cleanup(self) -> list[str]:
        """Remove every container this subject made; return what could not be removed."""
        left = []
        for ref in sorted(self.live):
            try:
                self.remove(ref)
            except BenchError as exc:
                left.append(f"{ref}: {exc}")
        return left


# ------------------------------------------------------------------------------------------
# runc


def unpack_layers(layers: list[Path], rootfs: Path) -> None:
    """Apply image layer tars (bottom first) to *rootfs*, OCI whiteouts included: a
    ``.wh.NAME`` deletes NAME from the layers below, ``.wh..wh..opq`` empties its
    directory. Uses GNU tar (which reads any compression) for the extraction."""
    rootfs.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        with tarfile.open(layer, "r:*") as tar:
            names = [m.name for m in tar.getmembers()]
        for name in names:
            norm = os.path.normpath(name.lstrip("/"))
            if norm.startswith(".."):
                raise BenchError(f"layer {layer.name} has an entry outside the rootfs: {name}")
            parent, base = os.path.split(norm)
            target_dir = rootfs / parent
            if base == ".wh..wh..opq":
                if target_dir.is_dir():
                    for child in target_dir.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
            elif base.startswith(".wh."):
                victim = target_dir / base[len(".wh.") :]
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                elif victim.exists() or victim.is_symlink():
                    victim.unlink()
        run(["tar", "-x", "-f", str(layer), "-C", str(rootfs), "--exclude=.wh.*", "--numeric-owner"], timeout=300)


class RuncSubject(_CliSubject):
    """An OCI runtime with runc's command line (runc itself, or vmshim-runtime as
    subject ``oci``) on a bundle made from the image's layers, state under our own --root."""

    def __init__(self, workdir: Path, tag: str, *, name: str = "runc", binary: str | None = None):
        self.name = name
        self.binary = binary or shutil.which("runc")
        self.dir = workdir / name
        self.rootfs = self.dir / "rootfs"
        self.state = self.dir / "state"
        self.tag = tag
        self.live: set[str] = set()
        self._template: dict | None = None
        self._seq = 0

    def unavailable(self) -> str | None:
        return None if self.binary else f"{self.name}: not installed"

    def prepare(self) -> None:
        """Unpack the image into the shared rootfs and take ``runc spec`` as the template
        (once). Raises BenchError."""
        if self._template is not None:
            return
        if not self.binary:
            raise BenchError(f"{self.name}: not installed")
        from shim.images.store import ImageStore

        try:
            store = ImageStore()
            image = store.resolve(IMAGE)
            layers = [store.blob_path(layer.digest) for layer in image.layers]
        except VmshimError as exc:
            raise BenchError(f"{self.name}: cannot read the {IMAGE} image from the store: {exc}") from None
        self.state.mkdir(parents=True, exist_ok=True)
        unpack_layers(layers, self.rootfs)
        spec_dir = self.dir / "spec"
        spec_dir.mkdir(exist_ok=True)
        run([self.binary, "spec", "--bundle", str(spec_dir)], timeout=30)
        self._template = json.loads((spec_dir / "config.json").read_text())
        self._env = image.env or self._template["process"]["env"]

    def _bundle(self, name: str, args: tuple[str, ...], mounts: tuple[tuple[str, str], ...]) -> Path:
        spec = json.loads(json.dumps(self._template))
        spec["process"]["terminal"] = False
        spec["process"]["args"] = list(args)
        spec["process"]["env"] = list(self._env)
        spec["root"] = {"path": str(self.rootfs), "readonly": False}
        spec["hostname"] = name[:63]
        for source, dest in mounts:
            spec["mounts"].append({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "rw"]})
        bundle = self.dir / "bundles" / name
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle

    def new_name(self) -> str:
        self._seq += 1
        return f"{self.tag}-{self.name}-{self._seq}"

    def _cmd(self, *args: str) -> list[str]:
        assert self.binary is not None, "runc is not installed (see unavailable())"
        return [self.binary, "--root", str(self.state), *args]

    def run_argv(self, *cmd: str) -> list[str]:
        """``runc run`` in the foreground of a fresh bundle running *cmd* (runc deletes the
        container when it exits); the bundle is written now, not while timed."""
        self.prepare()
        name = self.new_name()
        self.live.add(name)
        bundle = self._bundle(name, cmd, ())
        return self._cmd("run", "--bundle", str(bundle), name)

    def start(self, cmd: tuple[str, ...] = IDLE, mounts: tuple[tuple[str, str], ...] = ()) -> str:
        """``runc run -d`` (stdio on /dev/null); returns the container id."""
        self.prepare()
        name = self.new_name()
        self.live.add(name)
        bundle = self._bundle(name, cmd, mounts)
        argv = self._cmd("run", "-d", "--bundle", str(bundle), name)
        # the container inherits runc's stdio: /dev/null, and a file for runc's errors
        # (a pipe would stay open as long as the container runs)
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    argv, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=60
                )
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                err.seek(0)
                raise CommandFailed(argv, code, err.read().decode(errors="replace"))
        return name

    def exec_argv(self, ref: str, *cmd: str) -> list[str]:
        return self._cmd("exec", ref, *cmd)

    def wait_ready(self, ref: str, timeout: float = 60) -> None:
        self.exec(ref, "true", timeout=timeout)

    def owned(self, ref: str) -> Owned:
        """The container's init (from ``runc state``) and its descendants. runc leaves no
        process of its own behind a detached container (an engine would add its shim)."""
        state = json.loads(run(self._cmd("state", ref), timeout=30).stdout)
        pid = int(state.get("pid") or 0)
        if pid <= 0:
            raise BenchError(f"runc state of {ref} shows no pid")
        return Owned(procmem.descendants([pid], procmem.parent_map()), {"pid": pid})

    def remove(self, ref: str) -> None:
        run(self._cmd("delete", "-f", ref), timeout=60, check=False)
        still = run(self._cmd("state", ref), timeout=30, check=False)
        if still.returncode == 0:
            raise BenchError(f"runc delete -f {ref} left the container behind")
        self.live.discard(ref)
        shutil.rmtree(self.dir / "bundles" / ref, ignore_errors=True)

    def cleanup(self) -> list[str]:
        left = []
        if self.binary:
            for ref in sorted(self.live):
                try:
                    self.remove(ref)
                except BenchError as exc:
                    left.append(f"{ref}: {exc}")
        if not left:
            shutil.rmtree(self.dir, ignore_errors=True)
        return left


# ------------------------------------------------------------------------------------------
# the floor


@dataclass(eq=False)
class FloorVM:
    """A bare QEMU booted to the agent's hello (connected; QEMU is our child)."""

    proc: subprocess.Popen
    sock: socket.socket
    hello: float
    """Seconds from spawning QEMU to the agent's first bytes."""
    run_dir: Path

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class Floor:
    """The bare QEMU boot of the guest image, timed to the agent's first bytes, with a
    config drive for a container with no layers (the agent reads it before hello)."""

    def __init__(self, workdir: Path, accel_kind: str, kernel: str | None = None):
        self.dir = workdir / ("floor" if kernel is None else f"floor-{kernel}")
        self.accel_kind = accel_kind
        self.kernel = kernel
        """``minimal``/``distro``; None: the kernel `vmshim run` boots now."""
        self._drive: Path | None = None
        self.live: set[FloorVM] = set()

    def unavailable(self) -> str | None:
        if not shutil.which("qemu-system-x86_64"):
            return "floor: qemu-system-x86_64 not installed"
        return None

    def _guest_image(self):
        """The guest image `vmshim run` boots now (built first if the guest sources
        changed, as `vmshim run` would). Raises BenchError."""
        try:
            from shim.guestimage import ensure_guest_image

            return ensure_guest_image(kernel=self.kernel)
        except Exception as exc:  # noqa: BLE001 - the reason the floor has no figure
            raise BenchError(f"floor: no guest image: {exc}") from None

    def _argv(self, sock: str, serial: str) -> list[str]:
        from guest.spec import BootConfig, ProcessSpec
        from shim.guestimage import boot_floor_command
        from shim.vm.configdrive import build_config_drive

        image = self._guest_image()
        if self._drive is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            config = BootConfig(
                container_id="floor",
                token=secrets.token_hex(16),
                hostname="floor",
                process=ProcessSpec(args=["/bin/true"]),
                layer_count=0,
            )
            self._drive = build_config_drive(config, self.dir / "config.iso")
        # same command, the accelerator (and its kernel arguments) vmshim would use
        return boot_floor_command(image, sock, serial, config_drive=str(self._drive), accel_kind=self.accel_kind)

    def boot(self, timeout: float = 120) -> FloorVM:
        """Start QEMU and return once the agent's first bytes arrived."""
        self.dir.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="boot-", dir=self.dir))
        sock_path = str(run_dir / "agent.sock")
        try:
            argv = self._argv(sock_path, str(run_dir / "console.log"))
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = start + timeout
        sock = None
        try:
            while sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(sock_path)
                    sock = s
                except OSError:
                    s.close()
                    if proc.poll() is not None:
                        raise BenchError(f"floor: QEMU exited {proc.returncode} before the agent spoke")
                    if time.perf_counter() > deadline:
                        raise BenchError("floor: QEMU's agent socket never appeared")
                    time.sleep(0.005)
            sock.settimeout(max(1.0, deadline - time.perf_counter()))
            try:
                data = sock.recv(1)
            except TimeoutError:
                raise BenchError(f"floor: no word from the agent within {timeout:.0f} s") from None
            if not data:
                raise BenchError("floor: the agent closed its channel without a word")
            vm = FloorVM(proc, sock, time.perf_counter() - start, run_dir)
        except BaseException:
            if sock is not None:
                sock.close()
            proc.kill()
            proc.wait()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        self.live.add(vm)
        return vm

    def stop(self, vm: FloorVM) -> None:
        vm.close()
        self.live.discard(vm)
        shutil.rmtree(vm.run_dir, ignore_errors=True)

    def boot_time(self) -> float:
        vm = self.boot()
        try:
            return vm.hello
        finally:
            self.stop(vm)

    def owned(self, vm: FloorVM) -> Owned:
        return Owned(procmem.descendants([vm.proc.pid], procmem.parent_map()), {"qemu": vm.proc.pid})

    def cleanup(self) -> list[str]:
        for vm in list(self.live):
            self.stop(vm)
        shutil.rmtree(self.dir, ignore_errors=True)
        return []
