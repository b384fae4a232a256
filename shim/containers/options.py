"""What the user asked for (``vmshim run`` flags) and how it combines with the image.

The one place where image config + flags become a :class:`guest.spec.ProcessSpec`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from guest.spec import CAPABILITIES, ProcessSpec
from shim.containers.store import Container, check_name
from shim.errors import UsageError

if TYPE_CHECKING:  # imported where used at run time (CLI start-up)
    from shim.containers.netrequest import NetworkRequest
    from shim.containers.resources import Resources
    from shim.containers.security import SecurityOptions

ISOLATIONS = ("vm", "process")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_KEY = re.compile(r"^[^=\s\x00]+$")


@dataclass
class RunOptions:
    image: str
    command: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    env: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    name: str | None = None
    hostname: str | None = None
    interactive: bool = False
    tty: bool = False
    remove: bool = False
    isolation: str = "vm"
    detach: bool = False
    restart: str = "no"
    """``no``, ``on-failure[:N]``, ``always`` or ``unless-stopped``."""
    stop_timeout: int | None = None
    stop_signal: str | None = None
    resources: Resources | None = None
    """None: no limits; sizes the VM."""
    mounts: list = field(default_factory=list)
    """shim.volumes.specs.MountRequest list (-v, --mount, --tmpfs)."""
    volumes_from: list[str] = field(default_factory=list)
    read_only: bool = False
    network: NetworkRequest | None = None
    """-p, --network, --dns …; None: the default
    NAT network with nothing published."""
    log_opts: list[str] = field(default_factory=list)
    """``--log-opt`` values (shim.containers.logs.LogLimits.parse)."""
    security: SecurityOptions | None = None
    """--privileged, --cap-add …; None: docker's
    defaults."""
    labels: dict = field(default_factory=dict)
    """``--label`` (parsed by :func:`parse_labels`) and compose's labels."""
    detach_keys: str = "ctrl-p,ctrl-q"
    """``--detach-keys`` of a foreground ``-it`` run."""
    healthcheck: dict | None = None
    """``--health-*`` as docker's Config.Healthcheck (overrides the image's fields);
    ``{"Test": ["NONE"]}`` for ``--no-healthcheck``; None: the image's."""
    os_container: bool = False
    """``--os``: run the image's init as the container's PID 1 (shim.containers.osmode)."""
    init: str | None = None
    """``--init PATH``: that init (default /sbin/init); only with ``--os``."""

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise UsageError(f"invalid --isolation {self.isolation!r}: use one of {', '.join(ISOLATIONS)}")
        if self.name is not None:
            check_name(self.name)
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise UsageError(f"invalid -w {self.workdir!r}: the working directory must be absolute")
        policy, _max = parse_restart(self.restart)
        if self.remove and policy != "no":
            raise UsageError("--rm and --restart cannot be combined (a removed container cannot be restarted)")
        if self.stop_signal is not None:
            parse_signal(self.stop_signal)
        if self.init is not None and not self.os_container:
            raise UsageError("--init names the init of an OS container: add --os")
        if self.os_container:
            from shim.containers.osmode import check_isolation

            check_isolation(self.isolation)  # before anything is pulled or made
        from shim.containers.logs import LogLimits

        LogLimits.parse(self.log_opts)  # bad --log-opt: UsageError before anything is made


def parse_labels(items: list[str]) -> dict[str, str]:
    """``K=V`` (or ``K``) items as a dict. Raises UsageError on an empty key."""
    labels = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key.strip():
            raise UsageError(f"invalid --label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels


RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")


def parse_restart(text: str) -> tuple[str, int]:
    """``--restart`` → (policy, maximum retries; 0 = unlimited). Raises UsageError."""
    policy, _, count = (text or "no").partition(":")
    if policy not in RESTART_POLICIES or (count and policy != "on-failure"):
        raise UsageError(f"invalid --restart {text!r}: use no, on-failure[:N], always or unless-stopped")
    if count:
        if not count.isdigit():
            raise UsageError(f"invalid --restart {text!r}: N must be a number")
        return policy, int(count)
    return policy, 0


def parse_signal(text: str | int) -> int:
    """A signal by number or name (``9``, ``KILL``, ``SIGKILL``). Raises UsageError."""
    import signal

    raw = str(text).strip().upper()
    rt = re.fullmatch(r"(?:SIG)?RTM(IN|AX)([+-]\d+)?", raw)
    if rt:  # glibc's numbering (systemd images say STOPSIGNAL SIGRTMIN+3)
        base = 34 if rt.group(1) == "IN" else 64
        number = base + int(rt.group(2) or 0)
        if 34 <= number <= 64:
            return number
        raise UsageError(f"invalid signal {text!r}")
    if raw.isdigit():
        number = int(raw)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = raw if raw.startswith("SIG") else "SIG" + raw
        if name in signal.Signals.__members__:
            return int(signal.Signals[name])
    raise UsageError(f"invalid signal {text!r}")


def boot_config_of(record: Container):
    """The guest's BootConfig for a stored container record (shim.containers.store)."""
    from guest.spec import ROOTFS_SHARE_TAG, BootConfig

    return BootConfig(
        container_id=record.id,
        token=record.token,
        hostname=record.hostname,
        process=record.process,
        layer_count=len(record.layer_disks),
        writable="disk" if record.writable == "disk" and record.isolation == "vm" else "tmpfs",
        hosts=record.hosts,
        resolv_conf=record.resolv_conf,
        rootfs_share=ROOTFS_SHARE_TAG if record.rootfs else "",
        masked_paths=record.masked_paths,
        readonly_paths=record.readonly_paths,
        sysctl=dict(record.sysctl),
        privileged=record.privileged,
        devices=list(record.devices),
        os=record.os_container,
        **_limits_of(record),
    )


def _limits_of(record: Container) -> dict:
    """BootConfig ``limits`` and ``read_only`` from a record (its ``mounts`` are made by
    the placement: shim.containers.mounts)."""
    out: dict = {"read_only": record.read_only}
    if not record.resources.is_empty():
        out["limits"] = record.resources.limits(record.isolation)
    return out


def parse_env_entry(entry: str, source: str = "-e") -> str | None:
    """Turn one ``-e`` value into ``K=V``. ``K`` alone takes the host's value (docker's
    rule) and yields None when the host has none. Raises UsageError when malformed."""
    key, sep, value = entry.partition("=")
    if not key or not _ENV_KEY.match(key):
        raise UsageError(f"invalid {source} {entry!r}: expected KEY=VALUE with a non-empty KEY without spaces")
    if sep:
        return f"{key}={value}"
    if key in os.environ:
        return f"{key}={os.environ[key]}"
    return None


def read_env_file(path: str) -> list[str]:
    """Read a docker-style env file: ``K=V`` or ``K`` per line, ``#`` comments."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --env-file {path}: {exc.strerror}") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = parse_env_entry(line, source=f"line {number} of --env-file {path}:")
        if entry is not None:
            out.append(entry)
    return out


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """Later entries replace earlier ones with the same key; order of first appearance kept."""
    merged: dict[str, str] = {}
    for entry in list(base) + list(overrides):
        key, _, value = entry.partition("=")
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def build_process_spec(image_config: dict, options: RunOptions) -> ProcessSpec:
    """Combine the image's config (OCI ``config`` object) with the run flags.

    Raises UsageError when there is nothing to run or a flag is malformed.
    """
    cfg = image_config or {}
    user_env = [e for e in (parse_env_entry(x) for x in options.env) if e is not None]
    file_env = [e for f in options.env_files for e in read_env_file(f)]
    env = merge_env(cfg.get("Env") or [f"PATH={DEFAULT_PATH}"], file_env + user_env)
    if options.os_container:
        from shim.containers.osmode import init_args

        entrypoint, cmd = init_args(options.init, list(options.command)), []
    elif options.entrypoint is not None:
        entrypoint = [options.entrypoint] if options.entrypoint else []
        cmd = list(options.command)  # docker: --entrypoint resets the image's CMD
    else:
        entrypoint = list(cfg.get("Entrypoint") or [])
        cmd = list(options.command) or list(cfg.get("Cmd") or [])
    args = entrypoint + cmd
    if not args:
        raise UsageError(f"no command given and image {options.image} has no CMD or ENTRYPOINT")
    if options.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    capabilities, seccomp, no_new_privs = confinement(options.security, options.os_container)
    return ProcessSpec(
        args=args,
        env=env,
        cwd=options.workdir or cfg.get("WorkingDir") or "/",
        user=options.user if options.user is not None else (cfg.get("User") or ""),
        tty=options.tty,
        capabilities=capabilities,
        seccomp=seccomp,
        no_new_privs=no_new_privs,
    )


def exec_spec(
    record: Container,
    command: list[str],
    *,
    env: Sequence[str] = (),
    workdir=None,
    user=None,
    tty: bool = False,
    privileged: bool = False,
):
    """The ProcessSpec of an exec: the container's env with *env* on top, its user and
    workdir unless given, its capabilities (every one with *privileged*), seccomp and
    no_new_privs."""
    if not command:
        raise UsageError("exec needs a command")
    base = record.process
    extra = [e for e in (parse_env_entry(x) for x in env) if e is not None]
    environment = merge_env(base.env, extra)
    if tty and not any(e.startswith("TERM=") for e in environment):
        environment.append("TERM=xterm")
    if workdir is not None and not workdir.startswith("/"):
        raise UsageError(f"invalid -w {workdir!r}: the working directory must be absolute")
    seccomp = base.seccomp
    if privileged and seccomp == "default" and base.capabilities is not None:
        from guest.runtime.seccomp import default_for  # as the container's caps shaped it

        seccomp = default_for(base.capabilities.get("bounding", []))
    return ProcessSpec(
        args=list(command),
        env=environment,
        cwd=workdir or base.cwd,
        user=base.user if user is None else user,
        tty=tty,
        capabilities={"bounding": list(CAPABILITIES)} if privileged else base.capabilities,
        seccomp=seccomp,
        no_new_privs=base.no_new_privs,
    )


def confinement(security=None, os_container: bool = False) -> tuple[dict, object, bool]:
    """(ProcessSpec capabilities, seccomp, no_new_privs) for a container's processes:
    docker's defaults (with an init's extra capabilities for *os_container*:
    shim.containers.osmode) changed by *security* (a SecurityOptions or None). Raises
    UsageError."""
    from shim.containers.security import SecurityOptions, capability_set, parse_security_opts

    security = security or SecurityOptions()
    caps = capability_set(security)
    if os_container and not security.privileged:
        from shim.containers.osmode import OS_CAPABILITIES
        from shim.containers.security import cap_name

        dropped = {cap_name(c, "--cap-drop") for c in security.cap_drop}
        caps += [c for c in OS_CAPABILITIES if c not in caps and c not in dropped and "ALL" not in dropped]
    seccomp, no_new_privs = parse_security_opts(security.security_opt, caps)
    if security.privileged:
        seccomp = None  # docker: --privileged runs unconfined
    return {"bounding": caps}, seccomp, no_new_privs


_ADJECTIVES = ("brave", "calm", "eager", "fond", "keen", "lucid", "merry", "quiet", "swift", "witty")
_NOUNS = ("babbage", "curie", "darwin", "euler", "hopper", "lovelace", "noether", "turing", "wirth", "yonath")


def new_container_id() -> str:
    import secrets  # here, not at the top: secrets imports hashlib, ~4 ms of every command that reads a record

    return secrets.token_hex(32)


def random_name() -> str:
    import secrets  # see new_container_id

    return f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}_{secrets.token_hex(2)}"
