"""A loaded compose project: typed services, networks and volumes.

:func:`load_project` is the one entry: files → :mod:`.loader` → :mod:`.schema` →
:class:`Project`. The values here are normalised (lists for commands, ``K=V`` lists for
environments, seconds for durations, ``{name: condition}`` for depends_on), so the
planner does not deal with compose's many spellings.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from shim.compose import loader, schema
from shim.compose.errors import ComposeError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(value, default: float) -> float:
    """A compose duration (``1m30s``, ``500ms``, or a number of seconds) in seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value.strip()))


def env_list(value) -> list[str]:
    """environment/labels in either form as ``K=V`` entries; ``K`` alone (host value)
    stays ``K`` for shim.containers.options.parse_env_entry."""
    if isinstance(value, dict):
        out = []
        for key, val in value.items():
            if val is None:
                out.append(key)
            elif isinstance(val, bool):
                out.append(f"{key}={'true' if val else 'false'}")
            else:
                out.append(f"{key}={val}")
        return out
    return [str(v) for v in value or []]


def as_dict(value) -> dict[str, str]:
    return {k: v for k, _, v in (e.partition("=") for e in env_list(value))}


def command_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


@dataclass
class HealthCheck:
    test: list[str]
    """docker's form: ["CMD", args…], ["CMD-SHELL", text] or ["NONE"]."""
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0

    def to_docker(self) -> dict:
        """The image-config form (durations in nanoseconds), as the monitor reads it."""
        ns = 1_000_000_000
        return {
            "Test": list(self.test),
            "Interval": int(self.interval * ns),
            "Timeout": int(self.timeout * ns),
            "Retries": self.retries,
            "StartPeriod": int(self.start_period * ns),
        }


@dataclass
class Service:
    name: str
    image: str | None = None
    build: dict | None = None
    """{"context": abs path, "dockerfile": …, "args": {…}, "target": …}."""
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    ports: list = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    volumes: list = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    networks: dict[str, list[str]] = field(default_factory=dict)
    """network key → aliases."""
    depends_on: dict[str, str] = field(default_factory=dict)
    """service → condition."""
    healthcheck: HealthCheck | None = None
    healthcheck_disabled: bool = False
    restart: str = "no"
    replicas: int = 1
    memory: str | None = None
    memory_reservation: str | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    hostname: str | None = None
    working_dir: str | None = None
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    init: bool = False
    stop_signal: str | None = None
    stop_grace_period: float | None = None
    read_only: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    isolation: str = "vm"
    os: bool = False
    """vmshim's ``os: true``: an OS container (the image's init as PID 1; ``vmshim run --os``)."""
    profiles: list[str] = field(default_factory=list)
    container_name: str | None = None
    stdin_open: bool = False
    tty: bool = False
    dns: list[str] = field(default_factory=list)
    extra_hosts: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    """The service's merged document (for ``config`` and the config hash)."""

    def image_name(self, project: str) -> str:
        """The image to run: ``image:``, else the one ``build:`` makes (docker compose
        names it ``<project>-<service>``)."""
        return self.image or f"{project}-{self.name}"


@dataclass
class Network:
    key: str
    name: str
    external: bool = False
    internal: bool = False
    subnet: str | None = None
    gateway: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Volume:
    key: str
    name: str
    external: bool = False
    size: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Project:
    name: str
    directory: Path
    services: dict[str, Service]
    networks: dict[str, Network]
    volumes: dict[str, Volume]
    document: dict
    warnings: list[str] = field(default_factory=list)
    disabled: dict[str, Service] = field(default_factory=dict)
    """Services left out by profiles (``down`` still removes their containers)."""

    def chosen(self, names=()) -> list[Service]:
        """The services *names* (all when empty), in dependency order."""
        return [s for s in self.ordered() if not names or s.name in names]

    def ordered(self) -> list[Service]:
        """Services in dependency order (dependencies first)."""
        done: list[str] = []

        def visit(name):
            if name in done:
                return
            for dep in self.services[name].depends_on:
                if dep in self.services:
                    visit(dep)
            done.append(name)

        for name in sorted(self.services):
            visit(name)
        return [self.services[n] for n in done]

    def service(self, name: str) -> Service:
        if name not in self.services:
            raise ComposeError(f"no such service: {name}")
        return self.services[name]


def normalize_project_name(text: str) -> str:
    """docker compose's rule: lower case, only [a-z0-9_-], starting with a letter/digit."""
    name = re.sub(r"[^a-z0-9_-]", "", text.lower())
    name = name.lstrip("_-")
    if not name:
        raise ComposeError(f"project name {text!r} has no usable characters; use -p NAME")
    return name


def load_project(
    files: Sequence[str] = (),
    *,
    project_name: str | None = None,
    env_files: Sequence[str] = (),
    profiles: Sequence[str] = (),
    cwd: Path | None = None,
) -> Project:
    """Find, read, merge and validate the compose files; return the project with the
    services of the active profiles. Raises ComposeError (nothing is created)."""
    cwd = cwd or Path.cwd()
    paths = loader.find_files(list(files), cwd)
    directory = paths[0].parent.resolve()
    env = loader.environment(directory, list(env_files))
    document = loader.load_document(paths, env)
    warnings = schema.validate(document)
    if project_name is None:
        project_name = env.get("COMPOSE_PROJECT_NAME") or document.get("name") or directory.name
    name = normalize_project_name(project_name)
    active = set(profiles) or set(filter(None, env.get("COMPOSE_PROFILES", "").split(",")))
    services, disabled = {}, {}
    for key, raw in (document.get("services") or {}).items():
        service = _service(key, raw, directory)
        if service.profiles and not (set(service.profiles) & active or "*" in active):
            disabled[key] = service
        else:
            services[key] = service
    for service in services.values():
        for dep in service.depends_on:
            if dep in disabled:
                raise ComposeError(
                    f"services.{service.name}.depends_on.{dep}: service "
                    f"{dep!r} is in profiles {disabled[dep].profiles} that "
                    "are not enabled (--profile)"
                )
    networks = {k: _network(k, v or {}, name) for k, v in (document.get("networks") or {}).items()}
    if "default" not in networks:
        networks["default"] = Network(key="default", name=f"{name}_default")
    volumes = {k: _volume(k, v or {}, name) for k, v in (document.get("volumes") or {}).items()}
    return Project(
        name=name,
        directory=directory,
        services=services,
        networks=networks,
        volumes=volumes,
        document=document,
        warnings=warnings,
        disabled=disabled,
    )


def _network(key: str, raw: dict, project: str) -> Network:
    configs = (raw.get("ipam") or {}).get("config") or [{}]
    return Network(
        key=key,
        name=raw.get("name") or f"{project}_{key}",
        external=bool(raw.get("external")),
        internal=bool(raw.get("internal")),
        subnet=configs[0].get("subnet"),
        gateway=configs[0].get("gateway"),
        labels=as_dict(raw.get("labels")),
    )


def _volume(key: str, raw: dict, project: str) -> Volume:
    return Volume(
        key=key,
        name=raw.get("name") or f"{project}_{key}",
        external=bool(raw.get("external")),
        size=(raw.get("driver_opts") or {}).get("size"),
        labels=as_dict(raw.get("labels")),
    )


def _service(name: str, raw: dict, directory: Path) -> Service:
    deploy = raw.get("deploy") or {}
    limits = (deploy.get("resources") or {}).get("limits") or {}
    reservations = (deploy.get("resources") or {}).get("reservations") or {}
    build = raw.get("build")
    if build is not None:
        build = {"context": build} if isinstance(build, str) else dict(build)
        context = Path(build.get("context") or ".")
        build["context"] = str((directory / context).resolve())
        build["args"] = as_dict(build.get("args"))
        if not Path(build["context"]).is_dir():
            raise ComposeError(f"services.{name}.build.context: {build['context']} is not a directory")
    nets = raw.get("networks")
    networks: dict[str, list]
    if nets is None:
        networks = {"default": []}
    elif isinstance(nets, list):
        networks = {n: [] for n in nets}
    else:
        networks = {n: list((c or {}).get("aliases") or []) for n, c in nets.items()}
    deps = raw.get("depends_on") or {}
    depends = (
        {d: "service_started" for d in deps} if isinstance(deps, list) else {d: c["condition"] for d, c in deps.items()}
    )
    check, disabled = _healthcheck(raw.get("healthcheck"))
    replicas = deploy.get("replicas", raw.get("scale", 1))
    env_files = raw.get("env_file") or []
    return Service(
        name=name,
        image=raw.get("image"),
        build=build,
        command=command_list(raw.get("command")),
        entrypoint=command_list(raw.get("entrypoint")),
        environment=env_list(raw.get("environment")),
        env_files=[str((directory / f).resolve()) for f in ([env_files] if isinstance(env_files, str) else env_files)],
        ports=list(raw.get("ports") or []),
        expose=[str(e) for e in raw.get("expose") or []],
        volumes=list(raw.get("volumes") or []),
        tmpfs=[raw["tmpfs"]] if isinstance(raw.get("tmpfs"), str) else list(raw.get("tmpfs") or []),
        networks=networks,
        depends_on=depends,
        healthcheck=check,
        healthcheck_disabled=disabled,
        restart=raw.get("restart", "no"),
        replicas=int(replicas),
        memory=_text(limits.get("memory") or raw.get("mem_limit")),
        memory_reservation=_text(reservations.get("memory") or raw.get("mem_reservation")),
        cpus=float(limits["cpus"]) if "cpus" in limits else (float(raw["cpus"]) if "cpus" in raw else None),
        pids_limit=limits.get("pids", raw.get("pids_limit")),
        hostname=raw.get("hostname"),
        working_dir=raw.get("working_dir"),
        user=raw.get("user"),
        labels=as_dict(raw.get("labels")),
        init=bool(raw.get("init", False)),
        stop_signal=str(raw["stop_signal"]) if "stop_signal" in raw else None,
        stop_grace_period=seconds(raw["stop_grace_period"], 10) if "stop_grace_period" in raw else None,
        read_only=bool(raw.get("read_only", False)),
        cap_add=list(raw.get("cap_add") or []),
        cap_drop=list(raw.get("cap_drop") or []),
        privileged=bool(raw.get("privileged", False)),
        isolation=raw.get("isolation", "vm"),
        os=bool(raw.get("os", False)),
        profiles=list(raw.get("profiles") or []),
        container_name=raw.get("container_name"),
        stdin_open=bool(raw.get("stdin_open")),
        tty=bool(raw.get("tty")),
        dns=[raw["dns"]] if isinstance(raw.get("dns"), str) else list(raw.get("dns") or []),
        extra_hosts=[
            e.replace("=", ":", 1) if "=" in e and ":" not in e else e for e in env_list(raw.get("extra_hosts"))
        ],
        raw=raw,
    )


def _text(value) -> str | None:
    return None if value is None else str(value)


def _healthcheck(raw) -> tuple[HealthCheck | None, bool]:
    """(the file's check or None, whether the image's check is disabled)."""
    if raw is None:
        return None, False
    if raw.get("disable") or raw.get("test") in (["NONE"], "NONE"):
        return None, True
    test = raw.get("test")
    if test is None:
        return None, False  # only timings: applied over the image's test by the planner
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    return HealthCheck(
        test=list(test),
        interval=seconds(raw.get("interval"), 30.0),
        timeout=seconds(raw.get("timeout"), 30.0),
        retries=int(raw.get("retries", 3)),
        start_period=seconds(raw.get("start_period"), 0.0),
    ), False
