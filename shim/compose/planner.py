"""What a project needs: container names and labels, and each replica's RunOptions.

Pure functions of the :class:`~shim.compose.model.Project` (and, for the config hash,
the image id), so they are unit-tested without a state store. Names follow docker
compose: containers ``<project>-<service>-<n>``, networks ``<project>_<key>``, volumes
``<project>_<key>``, built images ``<project>-<service>``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shim.compose.errors import ComposeError
from shim.compose.model import Project, Service

LABEL_PROJECT = "com.docker.compose.project"
LABEL_SERVICE = "com.docker.compose.service"
LABEL_NUMBER = "com.docker.compose.container-number"
LABEL_ONEOFF = "com.docker.compose.oneoff"
LABEL_HASH = "com.docker.compose.config-hash"
LABEL_NETWORK = "com.docker.compose.network"
LABEL_VOLUME = "com.docker.compose.volume"
LABEL_WORKDIR = "com.docker.compose.project.working_dir"
LABEL_IMAGE = "com.docker.compose.image"


def container_name(project: Project, service: Service, number: int) -> str:
    if service.container_name:
        return service.container_name
    return f"{project.name}-{service.name}-{number}"


def config_hash(service: Service, image_id: str = "") -> str:
    """A digest of everything that decides the container: a change recreates it."""
    text = json.dumps({"service": service.raw, "image": image_id}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def container_labels(
    project: Project, service: Service, number: int, *, oneoff: bool = False, image_id: str = ""
) -> dict[str, str]:
    labels = dict(service.labels)
    labels.update(
        {
            LABEL_PROJECT: project.name,
            LABEL_SERVICE: service.name,
            LABEL_NUMBER: str(number),
            LABEL_ONEOFF: "True" if oneoff else "False",
            LABEL_HASH: config_hash(service, image_id),
            LABEL_WORKDIR: str(project.directory),
        }
    )
    if service.build is not None:
        labels[LABEL_IMAGE] = service.image_name(project.name)
    return labels


def replicas(service: Service, scale: dict[str, int]) -> int:
    count = scale.get(service.name, service.replicas)
    if count > 1 and service.container_name:
        raise ComposeError(
            f"services.{service.name}: container_name {service.container_name!r} "
            f"cannot be used with {count} replicas (names must be unique)"
        )
    return count


def parse_scale(values) -> dict[str, int]:
    """``--scale svc=N`` flags. Raises ComposeError."""
    out = {}
    for entry in values:
        name, sep, count = entry.partition("=")
        if not sep or not count.isdigit():
            raise ComposeError(f"invalid --scale {entry!r}: expected SERVICE=NUMBER")
        out[name] = int(count)
    return out


# ---- ports ------------------------------------------------------------------------------------


def port_specs(service: Service) -> list[str]:
    """The service's ports as ``-p`` specs."""
    out = []
    for entry in service.ports:
        if isinstance(entry, dict):
            spec = str(entry["target"])
            if entry.get("published") is not None:
                spec = f"{entry['published']}:{spec}"
                if entry.get("host_ip"):
                    spec = f"{entry['host_ip']}:{spec}"
            out.append(f"{spec}/{entry.get('protocol', 'tcp')}")
        else:
            out.append(str(entry))
    return out


def balanced_ports(service: Service, count: int) -> list:
    """The fixed host ports that *count* replicas cannot each bind: with more than one
    replica, a ``HOST:CONTAINER`` port with a single host port is served by a balancer
    over the replicas (shim.compose.balancer) instead of by each. Returns PortMappings."""
    from shim.network.ports import parse_publish

    if count <= 1:
        return []
    out = []
    for spec in port_specs(service):
        for mapping in parse_publish(spec):
            if mapping.host_port and not _is_range_spec(spec):
                out.append(mapping)
    return out


def _is_range_spec(spec: str) -> bool:
    host = spec.rsplit(":", 1)[0] if ":" in spec else ""
    return "-" in host.rsplit(":", 1)[-1]


def replica_ports(service: Service, count: int, number: int) -> list[str]:
    """``-p`` specs for replica *number*: fixed single ports go to the balancer (see
    :func:`balanced_ports`); a host range ``8000-8002:80`` gives each replica one port
    of the range, in order (docker's behaviour); the rest as written."""
    from shim.network.ports import parse_publish

    out = []
    for spec in port_specs(service):
        mappings = parse_publish(spec)
        if count > 1 and _is_range_spec(spec):
            head, target = spec.rsplit(":", 1)
            ip_prefix, _, host_range = head.rpartition(":")
            low, high = (int(p) for p in host_range.split("-"))
            port = low + number - 1
            if port > high:
                raise ComposeError(
                    f"services.{service.name}.ports: {spec} has fewer host ports than the {count} replicas"
                )
            out.append(f"{ip_prefix + ':' if ip_prefix else ''}{port}:{target}")
        elif count > 1 and any(m.host_port for m in mappings):
            continue  # the balancer publishes it
        else:
            out.append(spec)
    return out


# ---- volumes ----------------------------------------------------------------------------------


def mount_specs(project: Project, service: Service) -> tuple[list[str], list[str]]:
    """(``-v`` specs, ``--mount`` specs) with named volumes renamed to the project's and
    relative bind sources made absolute (against the project directory)."""
    volumes, mounts = [], []
    for entry in service.volumes:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) >= 2:
                parts[0] = _source(project, parts[0])
            volumes.append(":".join(parts))
            continue
        kind = entry.get("type", "volume")
        fields = [f"type={kind}", f"target={entry['target']}"]
        if entry.get("source") and kind != "tmpfs":
            source = entry["source"]
            source = (
                _source(project, source)
                if kind == "volume"
                else str((project.directory / source).resolve())
                if not source.startswith("/")
                else source
            )
            fields.append(f"source={source}")
        if entry.get("read_only"):
            fields.append("readonly")
        if (entry.get("volume") or {}).get("nocopy"):
            fields.append("volume-nocopy")
        tmpfs = entry.get("tmpfs") or {}
        if tmpfs.get("size") is not None:
            fields.append(f"tmpfs-size={tmpfs['size']}")
        if tmpfs.get("mode") is not None:
            fields.append(f"tmpfs-mode={tmpfs['mode']:o}")
        mounts.append(",".join(fields))
    return volumes, mounts


def _source(project: Project, source: str) -> str:
    if source.startswith(("/", ".", "~")):
        if source.startswith("~"):
            return str(Path(source).expanduser())
        return str((project.directory / source).resolve())
    volume = project.volumes.get(source)
    return volume.name if volume is not None else source


# ---- run options ------------------------------------------------------------------------------


def run_options(
    project: Project,
    service: Service,
    number: int,
    count: int,
    *,
    image_id: str = "",
    command: list[str] | None = None,
    oneoff: bool = False,
    name: str | None = None,
    remove: bool = False,
    detach: bool = True,
):
    """The RunOptions of replica *number* of *count*. Raises UsageError/NetworkError
    (a value vmshim's run refuses: the message names the flag)."""
    from shim.containers.options import RunOptions
    from shim.containers.resources import from_flags
    from shim.containers.security import SecurityOptions
    from shim.containers.networking import parse_request
    from shim.volumes.specs import parse_all

    entrypoint, cmd = None, service.command or []
    if service.entrypoint is not None:
        entrypoint = service.entrypoint[0] if service.entrypoint else ""
        cmd = list(service.entrypoint[1:]) + list(service.command or [])
    if command:
        cmd = list(service.entrypoint[1:] if service.entrypoint else []) + list(command)
    volumes, mounts = mount_specs(project, service)
    networks = [project.networks[key].name for key in service.networks]
    request = parse_request(
        network=networks,
        publish=[] if oneoff else replica_ports(service, count, number),
        expose=service.expose,
        dns_servers=service.dns,
        add_hosts=service.extra_hosts,
    )
    for key, aliases in service.networks.items():
        net = project.networks[key].name
        config = request.endpoint_config.setdefault(net, {})
        config["aliases"] = [service.name] + [a for a in aliases if a != service.name]
    check = None
    if service.healthcheck_disabled:
        check = {"Test": ["NONE"]}
    elif service.healthcheck is not None:
        check = service.healthcheck.to_docker()
    resources = from_flags(
        memory=service.memory,
        memory_reservation=service.memory_reservation,
        cpus=service.cpus,
        pids_limit=service.pids_limit,
    )
    return RunOptions(
        image=service.image_name(project.name),
        command=cmd,
        entrypoint=entrypoint,
        env=list(service.environment),
        env_files=list(service.env_files),
        workdir=service.working_dir,
        user=service.user,
        name=name or container_name(project, service, number),
        hostname=service.hostname,
        interactive=service.stdin_open,
        tty=service.tty,
        remove=remove,
        isolation=service.isolation,
        detach=detach,
        restart="no" if oneoff else service.restart,
        stop_signal=service.stop_signal,
        stop_timeout=int(service.stop_grace_period) if service.stop_grace_period is not None else None,
        resources=resources,
        mounts=parse_all(volumes, mounts, service.tmpfs),
        read_only=service.read_only,
        network=request,
        labels=container_labels(project, service, number, oneoff=oneoff, image_id=image_id),
        healthcheck=check,
        os_container=service.os,
        security=SecurityOptions(
            privileged=service.privileged,
            cap_add=list(service.cap_add),
            cap_drop=list(service.cap_drop),
            security_opt=list(service.raw.get("security_opt") or []),
        ),
    )


def ignored_keys(service: Service) -> list[str]:
    """Keys of the subset that this vmshim accepts but cannot apply yet (warned)."""
    out = []
    for key in ("init",):
        if service.raw.get(key):
            out.append(f"services.{service.name}.{key}: not applied by this vmshim (no such run option yet), ignored")
    return out


def project_containers(project: str, *, services: list[str] | None = None, oneoff: bool | None = False) -> list:
    """The project's containers (all states), by label, sorted by service and number."""
    from shim.containers.store import ContainerStore

    out = []
    for record in ContainerStore().list():
        labels = record.labels or {}
        if labels.get(LABEL_PROJECT) != project:
            continue
        if services and labels.get(LABEL_SERVICE) not in services:
            continue
        if oneoff is not None and (labels.get(LABEL_ONEOFF) == "True") != oneoff:
            continue
        out.append(record)
    return sorted(out, key=lambda r: (r.labels.get(LABEL_SERVICE, ""), int(r.labels.get(LABEL_NUMBER, "0") or 0)))
