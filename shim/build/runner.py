"""Run one RUN step in a fresh container and hand back its filesystem diff as a layer tar.

Each step gets its own container on the layers so far: a microVM (``--isolation vm``) or
host namespaces (``--isolation process``), made through the same placements ``vmshim run``
uses. The process is started with ``hold``: after it exits the agent stays, and the host
asks it for the step's changes (``diff``), which arrive as an OCI layer tar over the
agent channel, are spooled to the build's work directory (capped), checked like a
registry layer and rewritten into the step's layer (:mod:`shim.build.diff`). The host
never mounts the VM's writable disk (a sparse ext4 file it deletes unread) and never walks
the process placement's upper directory itself. Then the agent is told to shut down; a
detached process (:mod:`shim.build.reap`) waits for libvirt to forget the domain.

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
from shim import files, paths
from shim.build import diff, reap
from shim.build.tree import LayerWriter, RootView
from shim.build.errors import BuildError
from shim.containers.netrequest import NetworkRequest
from shim.containers.resources import DEFAULT_VM_MIB
from shim.errors import AgentError

MAIN_ID = 1
DIFF_ID = 2
START_TIMEOUT = 60.0
DIFF_IDLE_TIMEOUT = 300.0
"""Longest silence of the agent while it sends a step's changes."""
DIFF_WARNINGS = 20
"""Most lines of the agent's complaints about a diff shown as warnings."""
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

    def __init__(
        self,
        store,
        *,
        isolation: str = "vm",
        memory_mib: int = DEFAULT_VM_MIB,
        work_root: Path | None = None,
        status=lambda text: None,
        warn=lambda text: None,
        network: NetworkRequest | None = None,
    ):
        self.store = store
        self.network = network
        """shim.containers.networking.NetworkRequest for every step (None: no
        network at all, only lo)."""
        self.isolation = isolation
        self.memory_mib = memory_mib
        self.work_root = Path(work_root) if work_root is not None else paths.root() / "build" / "work"
        self.status = status
        self.warn = warn
        sweep_stale(self.work_root)

    def run(
        self,
        layers: list[dict],
        process: ProcessSpec,
        base: RootView,
        *,
        out_fd: int,
        container_id: str | None = None,
        announce=None,
        mounts=None,
    ) -> StepResult:
        """Run *process* on *layers*; return its diff. Raises RunStepError when the
        command fails (non-zero exit, or it cannot start), VmshimError for VM trouble.
        *announce* (optional) is called with the container id before it starts.
        *mounts*: the step's ``RUN --mount``s (shim.build.mounts.StepMounts)."""
        from shim.images.layers import layer_disk
        from shim.images.store import LayerRef

        container_id = container_id or secrets.token_hex(32)
        disks: list[Path] = []
        for i, desc in enumerate(layers):
            if not disks:
                self.status("preparing layer disks")
            disks.append(layer_disk(self.store, LayerRef(desc["digest"], desc["mediaType"], desc["size"])))
        self.work_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=self.work_root, prefix=f"{container_id[:12]}-"))
        os.chmod(work, 0o711)  # QEMU (as libvirt-qemu) must reach the disk in it
        try:
            boot = BootConfig(
                container_id=container_id,
                token=secrets.token_hex(16),
                hostname=container_id[:12],
                process=process,
                layer_count=len(disks),
                writable="disk" if self.isolation == "vm" else "tmpfs",
                hosts=_hosts(container_id[:12]),
                resolv_conf=_resolv_conf(),
            )
            if announce is not None:
                announce(container_id)
            spool = work / "diff.tar"
            requests = list(mounts.requests) if mounts is not None else []
            if self.isolation == "vm":
                self._run_vm(boot, disks, work, out_fd, spool, requests)
            else:
                self._run_process(boot, disks, work, out_fd, spool, requests)
            self.status("committing the layer")
            return self._commit(container_id, spool, base, work, mounts.mount_points if mounts is not None else set())
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ---- placements ---------------------------------------------------------------------------
    def _run_vm(self, boot: BootConfig, disks: list[Path], work: Path, out_fd: int, spool: Path, mounts: list) -> None:
        from shim.containers.vm_placement import VmPlacement

        rw = work / "rw.img"
        diff.make_disk(rw)
        run_dir = paths.run_dir() / boot.container_id[:12]  # short: agent.sock <= 107 bytes
        placement = VmPlacement(
            boot,
            disks,
            run_dir,
            name=f"build-{boot.container_id[:12]}",
            memory_mib=self.memory_mib,
            rw_disk=rw,
            network=self.network,
            mounts=mounts,
        )
        network_of = boot.container_id if self.network is not None else None
        self.status("booting the build microVM")
        try:
            code, tail = self._step(placement.boot(), boot, out_fd, spool)
        except BaseException:
            placement.kill()
            placement.attachments.release()
            reap.spawn(placement.domain, str(run_dir), network_of)
            raise
        placement.attachments.release()  # QEMU has exited: its disks and shares are free
        reap.spawn(placement.domain, str(run_dir), network_of)  # libvirt catches up
        _check(code, tail, boot.process)

    def _step(self, client, boot: BootConfig, out_fd: int, spool: Path) -> tuple[int, bytes]:
        """Run the step's process through the booted agent *client*, fetch its changes
        into *spool* when it succeeded, shut the guest down, close the client; the exit
        code and the output's tail."""
        try:
            code, tail = _run_main(client, boot, out_fd, self.status)
            if code == 0:
                self.status("reading the step's changes")
                _fetch_diff(client, boot, spool, self.warn)
            _shutdown(client)
        finally:
            client.close()
        return code, tail

    def _run_process(
        self, boot: BootConfig, disks: list[Path], work: Path, out_fd: int, spool: Path, mounts: list
    ) -> None:
        from shim.containers.process_placement import ProcessPlacement

        run_dir = paths.run_dir() / boot.container_id[:12]  # short: agent.sock <= 107 bytes
        placement = ProcessPlacement(
            boot,
            disks,
            run_dir,
            name=f"build-{boot.container_id[:12]}",
            rw_dir=work / "rw",
            network=self.network,
            mounts=mounts,
        )
        try:
            code, tail = self._step(placement.boot(), boot, out_fd, spool)
        except BaseException:
            placement.kill()
            placement.teardown()
            raise
        placement.teardown()
        _check(code, tail, boot.process)

    # ---- the diff -----------------------------------------------------------------------------
    def _commit(self, container_id: str, spool: Path, base: RootView, work: Path, mount_points: set[str]) -> StepResult:
        diff.check(spool)
        out = work / "layer.tar"
        writer = LayerWriter(out)
        try:
            count = diff.write_layer(spool, writer, base, mount_points=mount_points)
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            spool.unlink(missing_ok=True)
        if count == 0:
            return StepResult(container_id, None, None, 0)
        final = self.work_root / f"{container_id[:12]}-layer.tar"
        os.replace(out, final)
        return StepResult(container_id, final, digest, count)


def _run_main(client, boot: BootConfig, out_fd: int, status) -> tuple[int, bytes]:
    """Start the main process and copy its output to *out_fd* until it exits; return
    (exit code, the output's last OUTPUT_TAIL bytes). Raises RunStepError when it cannot
    start, AgentError when the channel breaks."""
    client.send(protocol.START, token=boot.token, id=MAIN_ID, stdin=False, tty=False, rows=24, cols=80, hold=True)
    deadline = time.monotonic() + START_TIMEOUT  # one deadline: chatter does not extend it
    reply = client.recv(START_TIMEOUT)
    while reply.type in (protocol.LOG, protocol.HELLO):
        reply = client.recv(max(0.01, deadline - time.monotonic()))
    if reply.type == protocol.ERROR:
        message = protocol.printable(reply.get("message", str, "the agent could not start the command"))
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
                del tail[: len(tail) - OUTPUT_TAIL]
        elif msg.type == protocol.EXIT and msg.get("id", int) == MAIN_ID:
            return msg.get("code", int), bytes(tail)
        elif msg.type == protocol.ERROR:
            raise AgentError(protocol.printable(msg.get("message", str, "the agent reported an error")))


def _fetch_diff(client, boot: BootConfig, spool: Path, warn, limit: int = diff.MAX_DIFF_BYTES) -> None:
    """Ask the agent for the step's changes (after the main process exited) and write the
    tar it streams to *spool*, at most *limit* bytes. The stream is not looked into here
    (see diff.check). Raises DiffError when the agent cannot send it or sends too much,
    AgentError when the channel breaks or falls silent."""
    client.send(protocol.DIFF, token=boot.token, id=DIFF_ID)
    reply = client.recv(START_TIMEOUT)
    while reply.type != protocol.ERROR and reply.type != protocol.STARTED:
        reply = client.recv(START_TIMEOUT)  # hello, log, late output: not about the diff
    if reply.type == protocol.ERROR:
        raise diff.DiffError(
            f"the agent cannot send the RUN step's changes: {_field(reply, 'message', str, 'no reason given')[:300]}"
        )
    size = 0
    errors = bytearray()
    with open(spool, "wb") as out:
        while True:
            msg = client.recv(DIFF_IDLE_TIMEOUT)
            ours = _field(msg, "id", int, None) == DIFF_ID
            if msg.type == protocol.STDOUT and ours:
                size += len(msg.payload)
                if size > limit:
                    raise diff.DiffError(f"the RUN step's changes are larger than {limit} bytes; refused")
                out.write(msg.payload)
            elif msg.type == protocol.STDERR and ours:
                errors += msg.payload[: OUTPUT_TAIL - len(errors)]
            elif msg.type == protocol.EXIT and ours:
                code = _field(msg, "code", int, 1)
                break
            elif msg.type == protocol.ERROR:
                raise AgentError(
                    "the agent failed while sending the RUN step's changes: "
                    f"{_field(msg, 'message', str, 'no reason given')[:300]}"
                )
    lines = [_printable(ln) for ln in errors.decode(errors="replace").splitlines() if ln.strip()]
    if code != 0:
        reason = lines[-1] if lines else f"exit code {code}"
        raise diff.DiffError(f"the agent could not send the RUN step's changes: {reason}")
    for line in lines[:DIFF_WARNINGS]:
        warn(line)


def _field(msg, name: str, kind, default):
    """A header field of a message from the agent; a wrong type is AgentError."""
    try:
        return msg.get(name, kind, default)
    except protocol.ProtocolError as exc:
        raise AgentError(f"the agent broke the protocol: {exc}") from None


def _printable(text: str, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


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
            raise AgentError(f"the build container did not shut down within {SHUTDOWN_TIMEOUT:.0f} s")
        if wait_readable([client.sock], left):
            try:
                client.read_available()  # whatever it still says is of no interest
            except AgentError:
                return  # end of file: it is gone


def _check(code: int, tail: bytes, process: ProcessSpec) -> None:
    if code != 0:
        raise RunStepError(f"The command '{' '.join(process.args)}' returned a non-zero code: {code}", code, tail)


def _write_all(fd: int, data: bytes) -> None:
    """The build's output to *fd*, until its reader goes away."""
    try:
        files.write_all(fd, data)
    except BrokenPipeError:
        pass


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
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"


def _resolv_conf() -> str:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if not (ln.startswith("nameserver") and (" 127." in ln or " ::1" in ln))]
    return "\n".join(keep) + "\n"
