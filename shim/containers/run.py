"""``vmshim create`` and ``vmshim run``: turn flags and an image into a stored container,
then start it through its monitor (shim.containers.manage.start).

``run`` in the foreground is create + start + attach: the CLI spawns the container's
monitor (a fork, no new interpreter), asks it to boot and start the main process, and
streams stdio with it until the exit code arrives. So a foreground container shows in
``ps -a`` when it is done, ``--rm`` removes it, and the VM is owned by the monitor in
both cases.
"""

from __future__ import annotations

import secrets

from shim.containers.logs import LogLimits
from shim.containers.netrequest import NetworkRequest
from shim.containers.options import (
    RunOptions,
    build_process_spec,
    new_container_id,
    parse_restart,
    parse_signal,
    random_name,
)
from shim.containers.store import Container, ContainerStore
from shim.network.dns import host_resolv_conf

DEFAULT_STOP_TIMEOUT = 10


def hosts_file(hostname: str) -> str:
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"


def prepare(options: RunOptions) -> Container:
    """Resolve the image, convert its layers, and build the container's record (not
    stored yet). Raises ImageNotFound, UsageError, LayerError."""
    from shim.images.layers import layer_disk
    from shim.images.store import ImageStore

    store = ImageStore()
    image = store.resolve(options.image)
    image_config = image.config.get("config") or {}
    spec = build_process_spec(image_config, options)
    resources, mounts = _resources_and_mounts(options, spec)
    container_id = new_container_id()
    hostname = options.hostname or container_id[:12]
    disks = [str(layer_disk(store, layer)) for layer in image.layers]
    policy, retries = parse_restart(options.restart)
    stop_signal = options.stop_signal or image_config.get("StopSignal") or "SIGTERM"
    stop_timeout = DEFAULT_STOP_TIMEOUT
    if options.os_container:
        from shim.containers import osmode

        stop_signal = options.stop_signal or osmode.STOP_SIGNAL
        stop_timeout = osmode.DEFAULT_STOP_TIMEOUT
    return Container(
        id=container_id,
        name=options.name or random_name(),
        image=options.image,
        image_id=image.config_digest,
        isolation=options.isolation,
        process=spec,
        hostname=hostname,
        token=secrets.token_hex(16),
        layer_disks=disks,
        resources=resources,
        mounts=list(mounts),
        read_only=options.read_only,
        **_device_fields(options),
        interactive=options.interactive,
        tty=options.tty,
        auto_remove=options.remove,
        restart_policy=policy,
        restart_max=retries,
        stop_signal=parse_signal(stop_signal),
        stop_timeout=options.stop_timeout if options.stop_timeout is not None else stop_timeout,
        os_container=options.os_container,
        # A --rm container never starts twice: its writable layer can live in RAM.
        writable="tmpfs" if options.remove else "disk",
        hosts=hosts_file(hostname),
        resolv_conf=host_resolv_conf(),
        network=_network_of(options, image_config),
        log=LogLimits.parse(options.log_opts),
        labels={**(image_config.get("Labels") or {}), **options.labels},
        healthcheck=effective_healthcheck(image_config.get("Healthcheck"), options.healthcheck),
    )


def effective_healthcheck(image_check: dict | None, flags: dict | None) -> dict | None:
    """The image's HEALTHCHECK with ``--health-*`` fields on top; None when there is no
    test or it is NONE (``--no-healthcheck``)."""
    merged = {**(image_check or {}), **(flags or {})}
    test = merged.get("Test") or []
    if not test or test[0] == "NONE":
        return None
    return merged


def _network_of(options: RunOptions, image_config: dict) -> NetworkRequest:
    """The networking request to store (``-P`` resolved against the image's EXPOSE).
    Raises NetworkError, NetworkNotFound (a --network that does not exist)."""
    from shim.containers.networking import check_networks_exist, parse_request

    request = options.network if options.network is not None else parse_request()
    check_networks_exist(request)
    return request.resolve_exposed(image_config)


def _resources_and_mounts(options: RunOptions, spec):
    """Check the limits (warnings go to stderr, as docker prints them), put the
    per-process ones into *spec*, and prepare the mounts (volumes are created here, so
    this comes last). Returns (Resources, [MountRequest]). Raises UsageError,
    VolumeError."""
    import sys

    from shim.containers.resources import Resources
    from shim.containers.mounts import prepare_mounts

    resources = options.resources or Resources()
    for warning in resources.check(options.isolation):
        print(f"WARNING: {warning}", file=sys.stderr)
    spec.rlimits = resources.rlimits()
    spec.oom_score_adj = resources.oom_score_adj
    mounts = prepare_mounts(list(options.mounts), list(options.volumes_from), options.isolation)
    return resources, mounts


def create(options: RunOptions, store: ContainerStore | None = None) -> Container:
    """Store a new container (state ``created``) with its writable layer. Nothing runs
    yet. Raises what :func:`prepare` raises, UsageError for a taken name, VmshimError
    when the writable disk cannot be made (then nothing is left behind)."""
    store = store or ContainerStore()
    record = prepare(options)
    try:
        store.create(record)
    except BaseException:
        _remove_anonymous_volumes(record)
        raise
    if record.writable == "disk" and record.isolation == "vm":
        from shim.containers.vm_placement import make_rw_disk

        try:
            make_rw_disk(store.rw_disk(record.id))
        except BaseException:
            store.delete(record.id)
            _remove_anonymous_volumes(record)
            raise
    return record


def _device_fields(options: RunOptions) -> dict:
    """The record's ``privileged``, ``devices`` and, with --privileged, empty masked and
    read-only path lists (docker's behaviour). Raises UsageError."""
    from shim.containers.security import parse_device

    security = options.security
    if security is None:
        return {}
    out = {"privileged": security.privileged, "devices": [parse_device(d, options.isolation) for d in security.devices]}
    if security.privileged:
        out["masked_paths"], out["readonly_paths"] = [], []
    return out


def _remove_anonymous_volumes(record: Container) -> None:
    if record.mounts:
        from shim.containers.mounts import remove_anonymous

        remove_anonymous(record.mounts)


def run(options: RunOptions, *, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2, on_started=None) -> int:
    """Create and start a container. In the foreground (not ``options.detach``) attach
    to it and return its exit code (128+N if killed by signal N); detached, return 0
    once it runs. *on_started* (optional) is called with the record once it runs.
    Raises what create and start raise (CommandNotFound: 127 …)."""
    from shim.containers import manage
    from shim.containers.attach import parse_detach_keys

    store = ContainerStore()
    record = create(options, store)
    return manage.start(
        record.id,
        attach=not options.detach,
        interactive=options.interactive,
        stdin_fd=stdin_fd,
        stdout_fd=stdout_fd,
        stderr_fd=stderr_fd,
        store=store,
        on_started=on_started,
        detach_keys=parse_detach_keys(options.detach_keys),
    )
