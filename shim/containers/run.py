"""``vmshim run`` in the foreground: resolve the image, place the container (microVM or
host namespaces), start its process through the agent, stream stdio, return its exit code.

Both placements end in the same place: an :class:`AgentClient` that has seen ``hello``.
From there on the conversation is identical, which is what makes the two isolations
comparable.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from guest import protocol
from guest.spec import BootConfig
from shim import paths
from shim.containers.attach import StdioPump, terminal_size
from shim.containers.options import RunOptions, build_process_spec, new_container_id, random_name
from shim.errors import AgentError, CommandNotExecutable, CommandNotFound

MAIN_PROCESS_ID = 1
START_TIMEOUT = 30.0
"""Seconds between ``start`` and ``started``: mounting and exec inside the guest."""


def hosts_file(hostname: str) -> str:
    return (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n"
    )


def host_resolv_conf() -> str:
    """The host's resolv.conf without loopback resolvers (unreachable from a container)."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if not (ln.startswith("nameserver") and
                                       (" 127." in ln or " ::1" in ln))]
    return "\n".join(keep) + "\n"


def prepare(options: RunOptions):
    """Resolve the image and build the boot config and layer disks. No VM yet.

    Returns (image, boot_config, layer_disk_paths). Raises ImageNotFound, UsageError,
    LayerError."""
    from shim.images.layers import layer_disk
    from shim.images.store import ImageStore

    store = ImageStore()
    image = store.resolve(options.image)
    spec = build_process_spec(image.config.get("config") or {}, options)
    container_id = new_container_id()
    hostname = options.hostname or container_id[:12]
    boot = BootConfig(
        container_id=container_id,
        token=secrets.token_hex(16),
        hostname=hostname,
        process=spec,
        layer_count=len(image.layers),
        hosts=hosts_file(hostname),
        resolv_conf=host_resolv_conf(),
    )
    disks = [layer_disk(store, layer) for layer in image.layers]
    return image, boot, disks


def make_placement(options: RunOptions, boot: BootConfig, disks: list[Path], name: str):
    run_dir = paths.run_dir() / boot.container_id
    if options.isolation == "vm":
        from shim.containers.vm_placement import VmPlacement

        return VmPlacement(boot, disks, run_dir, name=name, memory_mib=options.memory_mib)
    from shim.containers.process_placement import ProcessPlacement

    return ProcessPlacement(boot, disks, run_dir, name=name)


def start_process(client, boot: BootConfig, *, stdin: bool, tty: bool) -> int:
    """Ask the agent to start the container's main process; return its pid in the guest.

    Raises CommandNotFound (127) / CommandNotExecutable (126) / AgentError."""
    rows, cols = terminal_size(0) if tty else (24, 80)
    client.send(protocol.START, token=boot.token, id=MAIN_PROCESS_ID, stdin=stdin, tty=tty,
                rows=rows, cols=cols)
    reply = client.recv(START_TIMEOUT)
    if reply.type == protocol.STARTED:
        return reply.get("pid", int, 0)
    if reply.type == protocol.ERROR:
        message = reply.get("message", str, "the agent could not start the process")
        code = reply.get("code", int, 0)
        if code == 127:
            raise CommandNotFound(message)
        if code == 126:
            raise CommandNotExecutable(message)
        raise AgentError(message)
    raise AgentError(f"the agent answered {reply.type!r} to start")


def run_foreground(options: RunOptions, *, stdin_fd: int = 0, stdout_fd: int = 1,
                   stderr_fd: int = 2) -> int:
    """Run one container to completion; return its exit code (128+N if killed by signal N).

    Always tears the VM (or host mounts) down, also on errors and Ctrl-C."""
    image, boot, disks = prepare(options)
    name = options.name or random_name()
    placement = make_placement(options, boot, disks, name)
    try:
        client = placement.boot()
        start_process(client, boot, stdin=options.interactive, tty=options.tty)
        pump = StdioPump(client, MAIN_PROCESS_ID,
                         stdin_fd=stdin_fd if options.interactive else None,
                         stdout_fd=stdout_fd, stderr_fd=stderr_fd, tty=options.tty)
        code = pump.run()
        _say_shutdown(client)
        return code
    except KeyboardInterrupt:
        placement.abort()
        return 130
    except BaseException:
        placement.abort()
        raise
    finally:
        placement.release()


def _say_shutdown(client) -> None:
    """Tell the agent we are done so the VM powers off now instead of after its grace."""
    try:
        client.send(protocol.SHUTDOWN)
    except AgentError:
        pass
