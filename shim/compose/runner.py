"""The compose verbs, as a library the thin CLI (shim.cli.compose) calls.

Everything a project made carries the ``com.docker.compose.project`` label (containers,
networks, volumes), and the verbs that act on what exists (down, ps, logs, stop …) find
it by that label, not from the file: a file that changed since ``up`` still cleans up.

Starting: services go in dependency order, in waves (a service whose depends_on
conditions hold starts with the others of its wave). The replicas of a wave are started
together: each container's monitor is spawned (a fork, one at a time) and asked to
start, then the replies are collected, so their VMs boot in parallel.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from shim.compose import planner
from shim.compose.planner import project_containers
from shim.compose.errors import ComposeError, DependencyFailed
from shim.compose.model import Project, Service
from shim.compose.progress import Line, Progress
from shim.errors import ContainerNotFound, ImageNotFound, VmshimError

if TYPE_CHECKING:  # imported where used at run time (CLI start-up)
    from shim.containers.monitor_api import MonitorClient
    from shim.containers.store import Container

WAIT_TIMEOUT = 300.0
START_REPLY_TIMEOUT = 180.0


# ---- what exists -------------------------------------------------------------------------------


def number_of(record) -> int:
    return int((record.labels or {}).get(planner.LABEL_NUMBER, "0") or 0)


def service_of(record) -> str:
    return (record.labels or {}).get(planner.LABEL_SERVICE, "")


# ---- images ---------------------------------------------------------------------------------------


def image_id(ref: str) -> str | None:
    from shim.images.store import ImageStore

    try:
        return ImageStore().resolve(ref).config_digest
    except (ImageNotFound, VmshimError):
        return None


def build_service(
    project: Project, service: Service, progress: Progress, *, no_cache: bool = False, isolation: str | None = None
) -> str:
    """Build *service*'s image (``build:``); return its id. Raises BuildError …"""
    from pathlib import Path

    from shim.build.builder import BuildOptions, BuildOutput, build

    spec = service.build or {}
    name = service.image_name(project.name)
    line = progress.line(f"Image {name}", "Building")
    dockerfile = spec.get("dockerfile")
    options = BuildOptions(
        context=Path(spec["context"]),
        dockerfile=(Path(spec["context"]) / dockerfile) if dockerfile else None,
        tags=[name],
        build_args={k: v for k, v in (spec.get("args") or {}).items() if v is not None},
        target=spec.get("target"),
        no_cache=no_cache,
        quiet=True,
        isolation=isolation or service.isolation,
    )
    result = build(options, BuildOutput())
    line.done("Built")
    return result.image_id


def ensure_images(
    project: Project, services: list[Service], progress: Progress, *, build: bool = False, pull: str = "missing"
) -> dict[str, str]:
    """Build or pull what *services* need; {service: image id}."""
    ids: dict[str, str] = {}
    for service in services:
        ref = service.image_name(project.name)
        current = image_id(ref)
        if service.build is not None and (build or current is None):
            ids[service.name] = build_service(project, service, progress)
            continue
        if current is None or pull == "always":
            if service.image is None:
                raise ComposeError(
                    f"services.{service.name}: image {ref} is missing and the service has no build section"
                )
            pull_image(ref, progress)
            current = image_id(ref)
        ids[service.name] = current or ""
    return ids


def pull_image(ref: str, progress: Progress) -> None:
    from shim.images.distribution import pull
    from shim.images.reference import parse_reference
    from shim.images.store import ImageStore

    line = progress.line(f"Image {ref}", "Pulling")
    pull(parse_reference(ref), store=ImageStore())
    line.done("Pulled")


# ---- networks and volumes -----------------------------------------------------------------


def ensure_networks(project: Project, services: list[Service], progress: Progress) -> None:
    from shim.errors import NetworkNotFound
    from shim.containers.networking import create_network
    from shim.network.store import NetworkStore

    store = NetworkStore()
    wanted = {key for s in services for key in s.networks}
    for key in sorted(wanted):
        net = project.networks[key]
        try:
            store.get(net.name)
            continue
        except NetworkNotFound:
            if net.external:
                raise ComposeError(
                    f"networks.{key}: external network {net.name} does not exist (vmshim network create)"
                ) from None
        line = progress.line(f"Network {net.name}", "Creating")
        labels = {**net.labels, planner.LABEL_PROJECT: project.name, planner.LABEL_NETWORK: key}
        create_network(net.name, subnet=net.subnet, gateway=net.gateway, internal=net.internal, labels=labels)
        line.done("Created")


def ensure_volumes(project: Project, services: list[Service], progress: Progress) -> None:
    from shim.units import parse_bytes
    from shim.volumes.store import VolumeStore

    store = VolumeStore()
    wanted = set()
    for service in services:
        for entry in service.volumes:
            source = entry.get("source") if isinstance(entry, dict) else (entry.split(":")[0] if ":" in entry else None)
            if source in project.volumes:
                wanted.add(source)
    for key in sorted(wanted):
        volume = project.volumes[key]
        if store.exists(volume.name):
            continue
        if volume.external:
            raise ComposeError(f"volumes.{key}: external volume {volume.name} does not exist (vmshim volume create)")
        line = progress.line(f"Volume {volume.name}", "Creating")
        labels = {**volume.labels, planner.LABEL_PROJECT: project.name, planner.LABEL_VOLUME: key}
        size = parse_bytes(volume.size, f"volumes.{key}.driver_opts.size") if volume.size else None
        store.create(volume.name, size=size, labels=labels)
        line.done("Created")


# ---- starting containers ---------------------------------------------------------------------


@dataclass
class Starting:
    record: Container
    client: MonitorClient
    line: Line


def begin_start(record, line) -> Starting:
    """Spawn the container's monitor and ask it to start (no waiting for the reply).
    Mirrors shim.containers.manage.start for a detached start."""
    from shim.containers import manage, monitor
    from shim.containers import monitor_api as api
    from shim.containers import state as lifecycle
    from shim.containers.store import ContainerStore, monitor_alive

    store = ContainerStore()
    record = manage.wait_monitor_gone(store, store.load(record.id))
    with store.locked(record.id) as fresh:
        lifecycle.check("start", fresh.status, fresh.name)
        if monitor_alive(fresh):
            raise VmshimError(f"container {fresh.name} is starting already")
        client, pid, start_time = monitor.spawn(store, fresh.id)
        fresh.state.monitor_pid = pid
        fresh.state.monitor_start = start_time
        store.save(fresh)
    client.send(api.REQUEST, op="start", attach=False, stdin=False)
    return Starting(record=fresh, client=client, line=line)


def finish_starts(starting: list[Starting]) -> list[str]:
    """Collect the replies of :func:`begin_start`; the errors (``name: message``)."""
    from shim.containers import monitor_api as api

    errors = []
    for item in starting:
        try:
            with item.client:
                api.raise_for_error(item.client.recv(START_REPLY_TIMEOUT))
            item.line.done("Started")
        except VmshimError as exc:
            item.line.fail("Error")
            errors.append(f"{item.record.name}: {exc}")
    return errors


def create_replica(project: Project, service: Service, number: int, count: int, image: str, progress: Progress):
    from shim.containers.run import create

    name = planner.container_name(project, service, number)
    line = progress.line(f"Container {name}", "Creating")
    record = create(planner.run_options(project, service, number, count, image_id=image))
    line.done("Created")
    return record


def converge_service(
    project: Project,
    service: Service,
    count: int,
    image: str,
    progress: Progress,
    *,
    force_recreate: bool = False,
    no_recreate: bool = False,
) -> list:
    """Make the service's containers match the file: keep the ones whose config hash
    is current, recreate the others, add missing replicas, remove extra ones. Returns
    the records to start (created or stopped)."""
    from shim.containers import manage

    wanted_hash = planner.config_hash(service, image)
    existing = {number_of(r): r for r in project_containers(project.name, services=[service.name])}
    to_start = []
    for number, record in sorted(existing.items()):
        if number > count:
            line = progress.line(f"Container {record.name}", "Stopping")
            manage.stop(record.id)
            manage.remove(record.id, force=True)
            line.done("Removed")
    for number in range(1, count + 1):
        record = existing.get(number)
        stale = (
            record is not None
            and not no_recreate
            and (force_recreate or record.labels.get(planner.LABEL_HASH) != wanted_hash)
        )
        if record is not None and stale:
            line = progress.line(f"Container {record.name}", "Recreate")
            manage.stop(record.id)
            manage.remove(record.id, force=True)
            line.done("Recreated")
            record = None
        if record is None:
            record = create_replica(project, service, number, count, image, progress)
        elif record.status.value in ("running", "paused"):
            progress.line(f"Container {record.name}", "Running").done("Running")
            continue
        to_start.append(record)
    return to_start


def wait_condition(project: str, service: str, condition: str, *, timeout: float, dependent: str) -> None:
    """Block until *service*'s containers satisfy *condition*. Raises DependencyFailed."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in project_containers(project, services=[service])]
        state = condition_state(records, condition)
        if state == "ok":
            return
        if state != "wait":
            raise DependencyFailed(
                f"dependency failed to start: {state} ({dependent} depends on {service}: {condition})"
            )
        if time.monotonic() > deadline:
            raise DependencyFailed(
                f"timed out waiting for {service} to be "
                f"{condition.removeprefix('service_')} ({dependent} "
                "depends on it)"
            )
        time.sleep(0.2)


def condition_state(records, condition: str) -> str:
    """ "ok", "wait", or the reason it can never hold."""
    if not records:
        return "wait"
    for record in records:
        status = record.status.value
        if condition == "service_completed_successfully":
            if status in ("running", "paused", "created"):
                return "wait"
            if record.state.exit_code != 0:
                return f"container {record.name} exited ({record.state.exit_code})"
            continue
        if status == "exited":
            return f"container {record.name} exited ({record.state.exit_code})"
        if status != "running":
            return "wait"
        if condition == "service_healthy":
            if not record.healthcheck:
                return f"container {record.name} has no health check"
            health = (record.state.health or {}).get("Status", "starting")
            if health == "unhealthy":
                return f"container {record.name} is unhealthy"
            if health != "healthy":
                return "wait"
    return "ok"


def waves(services: list[Service]) -> list[list[Service]]:
    """Services grouped so that each one comes after everything it depends on."""
    names = {s.name for s in services}
    level: dict[str, int] = {}

    def depth(service: Service) -> int:
        if service.name not in level:
            deps = [by_name[d] for d in service.depends_on if d in names]
            level[service.name] = 1 + max((depth(d) for d in deps), default=-1)
        return level[service.name]

    by_name = {s.name: s for s in services}
    for service in services:
        depth(service)
    out: list[list[Service]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for service in services:
        out[level[service.name]].append(service)
    return out


def with_dependencies(project: Project, names: list[str]) -> list[Service]:
    """The named services and what they depend on (all services when *names* is empty)."""
    if not names:
        return project.ordered()
    wanted: set[str] = set()

    def add(name):
        if name in wanted:
            return
        wanted.add(name)
        for dep in project.service(name).depends_on:
            add(dep)

    for name in names:
        add(name)
    return [s for s in project.ordered() if s.name in wanted]


def up(
    project: Project,
    services: Sequence[str] = (),
    *,
    build: bool = False,
    scale: dict[str, int] | None = None,
    wait: bool = False,
    wait_timeout: float = WAIT_TIMEOUT,
    force_recreate: bool = False,
    no_recreate: bool = False,
    progress: Progress | None = None,
) -> int:
    """Create and start the project's services (and their dependencies). Returns 0,
    or 1 when a container failed to start or (with *wait*) is not healthy/running."""
    from shim.compose import balancer

    progress = progress or Progress()
    scale = dict(scale or {})
    for name in scale:
        project.service(name)
    chosen = with_dependencies(project, list(services))
    for service in chosen:
        for warning in planner.ignored_keys(service):
            progress.warn(warning)
    ensure_networks(project, chosen, progress)
    ensure_volumes(project, chosen, progress)
    images = ensure_images(project, chosen, progress, build=build)
    failures = []
    for wave in waves(chosen):
        for service in wave:
            for dep, condition in service.depends_on.items():
                if dep in {s.name for s in chosen}:
                    wait_condition(project.name, dep, condition, timeout=wait_timeout, dependent=service.name)
        starting = []
        for service in wave:
            count = planner.replicas(service, scale)
            records = converge_service(
                project,
                service,
                count,
                images[service.name],
                progress,
                force_recreate=force_recreate,
                no_recreate=no_recreate,
            )
            for record in records:
                line = progress.line(f"Container {record.name}", "Starting")
                try:
                    starting.append(begin_start(record, line))
                except VmshimError as exc:
                    line.fail("Error")
                    failures.append(f"{record.name}: {exc}")
        failures += finish_starts(starting)
        for service in wave:
            balancer.refresh(project.name, service, planner.replicas(service, scale))
        if failures:
            break
    if failures:
        progress.close()
        for failure in failures:
            print(f"Error: {failure}", file=sys.stderr)
        return 1
    if wait:
        return wait_ready(project, chosen, wait_timeout, progress)
    progress.close()
    return 0


def wait_ready(project: Project, services: list[Service], timeout: float, progress: Progress) -> int:
    """``up --wait``: every container running, and healthy where it has a check.
    Returns 0, or 1 (with the reason on stderr) when one is unhealthy or exited."""
    deadline = time.monotonic() + timeout
    names = [s.name for s in services]
    lines = {
        r.name: progress.line(f"Container {r.name}", "Waiting")
        for r in project_containers(project.name, services=names)
    }
    while True:
        records = project_containers(project.name, services=names)
        pending, failed = [], []
        for record in records:
            status = record.status.value
            health = (record.state.health or {}).get("Status") if record.healthcheck else None
            line = lines.get(record.name)
            if status == "exited" or health == "unhealthy":
                what = "unhealthy" if health == "unhealthy" else f"exited ({record.state.exit_code})"
                failed.append(f"container {record.name} is {what}")
                if line:
                    line.fail("Error" if status == "exited" else "Unhealthy")
            elif status != "running" or health not in (None, "healthy"):
                pending.append(record.name)
            elif line:
                line.done("Healthy" if health else "Running")
        if failed:
            progress.close()
            for text in failed:
                print(f"Error: {text}", file=sys.stderr)
            return 1
        if not pending:
            progress.close()
            return 0
        if time.monotonic() > deadline:
            progress.close()
            print(f"Error: timed out waiting for {', '.join(pending)}", file=sys.stderr)
            return 1
        time.sleep(0.25)


# ---- stopping and removing ---------------------------------------------------------------------


def _parallel(func, items):
    """Run *func* over *items* in threads (monitor requests: no forks happen there)."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(func, items))


def stop(
    project_name: str, services: Sequence[str] = (), *, timeout: float | None = None, progress: Progress | None = None
) -> None:
    from shim.containers import manage

    progress = progress or Progress()
    records = [
        r
        for r in project_containers(project_name, services=list(services) or None, oneoff=None)
        if r.status.value in ("running", "paused", "restarting")
    ]
    lines = {r.id: progress.line(f"Container {r.name}", "Stopping") for r in records}

    def one(record):
        manage.stop(record.id, timeout)
        lines[record.id].done("Stopped")

    _parallel(one, records)
    progress.close()


def down(
    project_name: str,
    *,
    volumes: bool = False,
    rmi: str | None = None,
    timeout: float | None = None,
    project: Project | None = None,
    progress: Progress | None = None,
) -> None:
    """Stop and remove every container, network (and with *volumes* every volume) that
    carries the project's label; with ``rmi="local"`` the images compose built."""
    from shim.compose import balancer
    from shim.containers import manage
    from shim.containers.networking import remove_network
    from shim.network.store import NetworkStore
    from shim.volumes.store import VolumeStore

    progress = progress or Progress()
    records = project_containers(project_name, oneoff=None)
    built = {r.labels.get(planner.LABEL_IMAGE) for r in records} - {None}
    lines = {r.id: progress.line(f"Container {r.name}", "Stopping") for r in records}

    def one(record):
        try:
            manage.stop(record.id, timeout)
            lines[record.id].update("Removing")
            manage.remove(record.id, force=True)
            lines[record.id].done("Removed")
        except ContainerNotFound:
            lines[record.id].done("Removed")

    _parallel(one, records)
    balancer.remove_project(project_name)
    for net in NetworkStore().list():
        if net.labels.get(planner.LABEL_PROJECT) == project_name:
            line = progress.line(f"Network {net.name}", "Removing")
            remove_network(net.name)
            line.done("Removed")
    if volumes:
        volume_store = VolumeStore()
        for volume in volume_store.list():
            if volume.labels.get(planner.LABEL_PROJECT) == project_name:
                line = progress.line(f"Volume {volume.name}", "Removing")
                volume_store.remove(volume.name)
                line.done("Removed")
    if rmi:
        from shim.images.store import ImageStore

        if project is not None:
            built |= {
                s.image_name(project.name)
                for s in project.services.values()
                if s.build is not None and (rmi == "all" or s.image is None)
            }
            if rmi == "all":
                built |= {s.image for s in project.services.values() if s.image}
        store = ImageStore()
        for ref in sorted(built):
            line = progress.line(f"Image {ref}", "Removing")
            try:
                store.remove(ref)
                line.done("Removed")
            except VmshimError:
                line.done("Not found")
    progress.close()


# ---- logs ----------------------------------------------------------------------------------------

COLORS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")


def logs(
    project_name: str,
    services: Sequence[str] = (),
    *,
    follow: bool = False,
    tail: int | None = None,
    timestamps: bool = False,
    out=None,
    no_color: bool = False,
    stop_when=None,
) -> None:
    """Print the containers' output, each line prefixed with ``name | ``; with
    *follow*, keep printing (containers that appear later included) until interrupted
    or, when given, ``stop_when()`` is true."""
    from shim.containers.logs import read_entries, render, select_lines
    from shim.containers.store import ContainerStore

    out = out or sys.stdout.buffer
    color = not no_color and hasattr(out, "isatty") and out.isatty()
    store = ContainerStore()
    offsets: dict[str, int] = {}
    width = 0

    def prefix(record, index):
        text = record.name.ljust(width) + " | "
        if color:
            return f"\x1b[{COLORS[index % len(COLORS)]}m{text}\x1b[0m".encode()
        return text.encode()

    first = True
    while True:
        records = project_containers(project_name, services=list(services) or None)
        width = max([width] + [len(r.name) for r in records])
        for index, record in enumerate(records):
            entries, offsets[record.id] = read_entries(store.log_path(record.id), offsets.get(record.id, 0))
            lines = select_lines(entries, tail=tail if first else None)
            for line in lines:
                data = render(line, timestamps)
                out.write(prefix(record, index) + data + (b"" if data.endswith(b"\n") else b"\n"))
        out.flush()
        first = False
        if not follow or (stop_when is not None and stop_when()):
            return
        time.sleep(0.2)


# ---- one container of a service ----------------------------------------------------------------


def container_of(project_name: str, service: str, index: int = 1):
    for record in project_containers(project_name, services=[service]):
        if number_of(record) == index:
            return record
    raise ComposeError(f"service {service!r} has no container number {index} (is the project up? vmshim compose ps)")


def run_oneoff(
    project: Project,
    service_name: str,
    command: list[str],
    *,
    remove: bool,
    detach: bool = False,
    no_deps: bool = False,
    progress: Progress,
) -> int:
    """``compose run``: a one-off container of the service (deps started first)."""
    import secrets

    from shim.containers.run import run as run_container

    service = project.service(service_name)
    if not no_deps and service.depends_on:
        code = up(project, list(service.depends_on), progress=progress)
        if code:
            return code
    else:
        ensure_networks(project, [service], progress)
        ensure_volumes(project, [service], progress)
    progress.close()
    images = ensure_images(project, [service], Progress())
    name = f"{project.name}-{service.name}-run-{secrets.token_hex(6)}"
    options = planner.run_options(
        project,
        service,
        1,
        1,
        image_id=images[service.name],
        command=command,
        oneoff=True,
        name=name,
        remove=remove,
        detach=detach,
    )
    options.interactive = sys.stdin.isatty() and not detach
    options.tty = options.interactive and sys.stdout.isatty()
    started: list[Container] = []
    code = run_container(options, on_started=started.append)
    if detach and started:
        print(started[0].name)
    return code
