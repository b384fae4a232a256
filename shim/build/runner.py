"""Run one RUN step in a fresh container and hand back its filesystem diff as a layer tar.

Each step gets its own container on the layers so far: a microVM (``--isolation vm``) or
host namespaces (``--isolation process``), made through the same placements ``vmshim run``
uses, with a writable layer the host can read back afterwards:

- vm: a sparse ext4 file attached as the VM's writable disk. After the process exits the
  host asks the agent to shut down and waits until QEMU closes the channel (the guest
  unmounts and syncs the disk before it reboots, and QEMU exits right after): the disk is
  then complete, and is read at once while a detached process (:mod:`shim.build.reap`)
  waits for libvirt to forget the domain.
- process: the placement's ``rw_dir`` is a directory of the build's own, outside the run
  directory that teardown removes.

The step's stdout and stderr are written to the given file descriptor as they arrive.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from guest import protocol
from guest.spec import BootConfig, ProcessSpec
from shim import paths
from shim.build import diff, reap
from shim.build.tree import LayerWriter, RootView
from shim.build.errors import BuildError
from shim.errors import AgentError

MAIN_ID = 1
START_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0
OUTPUT_TAIL = 64 * 1024


class RunStepError(BuildError):
    """The command of a RUN step failed (exit code ``code``); ``output`` is its last
    output."""

    def __init__(self, message: str, code: int, output: bytes = b""):
        super().__init__(message)
        self.code = code
        self.output = output


@dataclass
class StepResult:
    container_id: str
    layer: Path | None  # the diff as a layer tar; None when the step changed nothing
    digest: str | None
    entries: int


class StepRunner:
    """Runs RUN steps for one build."""

    def __init__(self, store, *, isolation: str = "vm", memory_mib: int = 256,
                 work_root: Path | None = None, status=lambda text: None,
                 warn=lambda text: None):
        self.store = store
        self.isolation = isolation
        self.memory_mib = memory_mib
        self.work_root = Path(work_root) if work_root is not None else paths.root() / "build" / "work"
        self.status = status
        self.warn = warn
        sweep_stale(self.work_root)

    def run(self, layers: list[dict], process: ProcessSpec, base: RootView, *,
            out_fd: int, container_id: str | None = None, announce=None) -> StepResult:
        """Run *process* on *layers*; return its diff. Raises RunStepError when the
        command fails (non-zero exit, or it cannot start), VmshimError for VM trouble.
        *announce* (optional) is called with the container id before it starts."""
        from shim.images.layers import layer_disk
        from shim.images.store import LayerRef

        container_id = container_id or secrets.token_hex(32)
        disks = []
        for i, desc in enumerate(layers):
            if not disks:
                self.status("preparing layer disks")
            disks.append(layer_disk(self.store, LayerRef(desc["digest"], desc["mediaType"],
                                                         desc["size"])))
        self.work_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=self.work_root, prefix=f"{container_id[:12]}-"))
        os.chmod(work, 0o711)  # QEMU (as libvirt-qemu) must reach the disk in it
        try:
            boot = BootConfig(container_id=container_id, token=secrets.token_hex(16),
                              hostname=container_id[:12], process=process,
                              layer_count=len(disks),
                              writable="disk" if self.isolation == "vm" else "tmpfs",
                              hosts=_hosts(container_id[:12]), resolv_conf=_resolv_conf())
            if announce is not None:
                announce(container_id)
            if self.isolation == "vm":
                upper_source = self._run_vm(boot, disks, work, out_fd)
            else:
                upper_source = self._run_process(boot, disks, work, out_fd)
            with upper_source as upper:
                self.status("committing the layer")
                return self._commit(container_id, upper, base, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ---- placements ---------------------------------------------------------------------------
    def _run_vm(self, boot: BootConfig, disks: list[Path], work: Path, out_fd: int):
        from shim.containers.vm_placement import VmPlacement

        rw = work / "rw.img"
        diff.make_disk(rw)
        run_dir = paths.run_dir() / boot.container_id
        placement = VmPlacement(boot, disks, run_dir, name=f"build-{boot.container_id[:12]}",
                                memory_mib=self.memory_mib, rw_disk=rw)
        self.status("booting the build microVM")
        try:
            client = placement.boot()
            try:
                code, tail = _run_main(client, boot, out_fd, self.status)
                _shutdown(client)
            finally:
                client.close()
        except BaseException:
            placement.kill()
            reap.spawn(placement.domain, str(run_dir))
            raise
        reap.spawn(placement.domain, str(run_dir))  # QEMU has exited; libvirt catches up
        _check(code, tail, boot.process)
        return _Mounted(rw, work / "mnt")

    def _run_process(self, boot: BootConfig, disks: list[Path], work: Path, out_fd: int):
        from shim.containers.process_placement import ProcessPlacement

        run_dir = paths.run_dir() / boot.container_id
        placement = ProcessPlacement(boot, disks, run_dir, name=f"build-{boot.container_id[:12]}",
                                     rw_dir=work / "rw")
        try:
            client = placement.boot()
            try:
                code, tail = _run_main(client, boot, out_fd, self.status)
                _shutdown(client)
            finally:
                client.close()
        except BaseException:
            placement.kill()
            placement.teardown()
            raise
        placement.teardown()
        _check(code, tail, boot.process)
        return _Plain(work / "rw" / "upper")

    # ---- the diff -----------------------------------------------------------------------------
    def _commit(self, container_id: str, upper: Path, base: RootView, work: Path) -> StepResult:
        if not upper.is_dir():
            return StepResult(container_id, None, None, 0)
        out = work / "layer.tar"
        writer = LayerWriter(out)
        try:
            skip = diff.runtime_leftovers(upper, base)
            count = diff.write_upper(upper, writer, base, skip=skip, warn=self.warn)
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        if count == 0:
            return StepResult(container_id, None, None, 0)
        final = self.work_root / f"{container_id[:12]}-layer.tar"
        os.replace(out, final)
        return StepResult(container_id, final, digest, count)


class _Mounted:
    """Context manager: the upper directory of a VM step's disk, mounted read-only."""

    def __init__(self, image: Path, target: Path):
        self.image, self.target = image, target
        self._cm = None

    def __enter__(self) -> Path:
        self._cm = diff.mounted_disk(self.image, self.target)
        return self._cm.__enter__() / "upper"

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


class _Plain:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc):
        return False


def _run_main(client, boot: BootConfig, out_fd: int, status) -> tuple[int, bytes]:
    """Start the main process and copy its output to *out_fd* until it exits; return
    (exit code, the output's last OUTPUT_TAIL bytes). Raises RunStepError when it cannot
    start, AgentError when the channel breaks."""
    client.send(protocol.START, token=boot.token, id=MAIN_ID, stdin=False, tty=False,
                rows=24, cols=80)
    deadline = time.monotonic() + START_TIMEOUT  # one deadline: chatter does not extend it
    reply = client.recv(START_TIMEOUT)
    while reply.type in (protocol.LOG, protocol.HELLO):
        reply = client.recv(max(0.01, deadline - time.monotonic()))
    if reply.type == protocol.ERROR:
        message = protocol.printable(
            reply.get("message", str, "the agent could not start the command"))
        code = reply.get("code", int, 125)
        raise RunStepError(f"{message}", code or 125)
    if reply.type != protocol.STARTED:
        raise AgentError(f"the agent answered {reply.type!r} to start")
    status(None)
    tail = bytearray()
    while True:
        msg = client.recv(None)
        if msg.type in (protocol.STDOUT, protocol.STDERR):
            if msg.get("id", int, MAIN_ID) != MAIN_ID:
                continue
            _write_all(out_fd, msg.payload)
            tail += msg.payload
            if len(tail) > OUTPUT_TAIL:
                del tail[:len(tail) - OUTPUT_TAIL]
        elif msg.type == protocol.EXIT and msg.get("id", int) == MAIN_ID:
            return msg.get("code", int), bytes(tail)
        elif msg.type == protocol.ERROR:
            raise AgentError(protocol.printable(
                msg.get("message", str, "the agent reported an error")))


def _shutdown(client) -> None:
    """Ask the agent to power off and wait until the channel closes (QEMU exited, or the
    host agent left). Raises AgentError when it does not happen in time."""
    from shim.vm.agent_client import wait_readable

    try:
        client.send(protocol.SHUTDOWN)
    except AgentError:
        return  # already gone
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentError(f"the build container did not shut down within "
                             f"{SHUTDOWN_TIMEOUT:.0f} s")
        if wait_readable([client.sock], left):
            try:
                client.read_available()  # whatever it still says is of no interest
            except AgentError:
                return  # end of file: it is gone


def _check(code: int, tail: bytes, process: ProcessSpec) -> None:
    if code != 0:
        raise RunStepError(f"The command '{' '.join(process.args)}' returned a non-zero "
                           f"code: {code}", code, tail)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            time.sleep(0.01)
        except BrokenPipeError:
            return


STALE_AGE = 24 * 3600


def sweep_stale(directory: Path, age: float = STALE_AGE) -> None:
    """Remove what builds killed mid-step (SIGKILL, a crash) left in *directory* more
    than *age* seconds ago; anything with a mount below it is left alone."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    if not entries:
        return
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if now - entry.lstat().st_mtime < age:
                continue
        except OSError:
            continue
        prefix = str(entry)
        if any(m == prefix or m.startswith(prefix + "/") for m in mounts):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _hosts(hostname: str) -> str:
    return ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{hostname}\n")


def _resolv_conf() -> str:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if not (ln.startswith("nameserver") and (" 127." in ln or " ::1" in ln))]
    return "\n".join(keep) + "\n"
