"""The docker-shaped ``inspect`` document of a container (:func:`inspect_container`):
its state, config, limits, mounts, networks and what its isolation reports."""

from __future__ import annotations

from shim import paths
from shim.containers import manage
from shim.containers.listing import display_status
from shim.containers.networking import network_settings
from shim.containers.store import Container, ContainerStore, monitor_alive
from shim.errors import VmshimError


def inspect_container(ref: str, store: ContainerStore | None = None) -> dict:
    """The inspect document of the container *ref* names (after reconciling a running
    record whose monitor died). Raises ContainerNotFound."""
    store = store if store is not None else ContainerStore()
    return inspect_data(manage.reconcile(store, store.find(ref)))


def inspect_data(record: Container) -> dict:
    """The docker-shaped inspect document of one container."""
    state = record.state
    status = display_status(record)
    monitor_pid = state.monitor_pid if monitor_alive(record) else 0
    info = manage.placement_info(record) if status in ("running", "paused") else {}
    process = record.process
    return {
        "Id": record.id,
        "Name": "/" + record.name,
        "Created": record.created,
        "Path": process.args[0],
        "Args": process.args[1:],
        "State": {
            "Status": status,
            "Running": status in ("running", "paused"),
            "Paused": status == "paused",
            "Restarting": status == "restarting",
            "OOMKilled": state.oom_killed,
            "Dead": False,
            "Pid": monitor_pid,
            "MonitorPid": monitor_pid,
            "ContainerPid": state.pid,
            "ExitCode": state.exit_code,
            "Error": state.error,
            "StartedAt": state.started_at,
            "FinishedAt": state.finished_at,
            **(
                {"Health": state.health or {"Status": "starting", "FailingStreak": 0, "Log": []}}
                if record.healthcheck
                else {}
            ),
        },
        "Image": record.image_id,
        "RestartCount": state.restart_count,
        "LogPath": str(ContainerStore().log_path(record.id)),
        "Config": {
            "Hostname": record.hostname,
            "User": process.user,
            "Env": list(process.env),
            "Cmd": list(process.args),
            "WorkingDir": process.cwd,
            "Image": record.image,
            "Tty": record.tty,
            "OpenStdin": record.interactive,
            "StopSignal": record.stop_signal,
            "StopTimeout": record.stop_timeout,
            "Labels": dict(record.labels),
            **({"Healthcheck": record.healthcheck} if record.healthcheck else {}),
        },
        "HostConfig": {
            "Isolation": record.isolation,
            "AutoRemove": record.auto_remove,
            "RestartPolicy": {"Name": record.restart_policy, "MaximumRetryCount": record.restart_max},
            "LogConfig": _log_config(record),
            **host_config(record),  # limits (Memory: the limit) and mounts
        },
        "Mounts": inspect_mounts(record),
        "NetworkSettings": _network_settings(record),
        "Vmshim": {
            "Domain": record.domain if record.isolation == "vm" else "",
            "Writable": record.writable,
            "LayerDisks": record.layer_disks,
            "Os": record.os_container,
            **info,
        },
    }


def host_config(record: Container) -> dict:
    """docker ``inspect``'s HostConfig fields for a container record's limits and mounts
    (``Memory`` is the limit, 0 = none, as in docker; the VM's size is ``VmMemory``)."""
    r, mounts = record.resources, record.mounts
    return {
        "Memory": max(r.memory, 0),
        "MemorySwap": r.memory_swap,
        "MemoryReservation": r.memory_reservation,
        "NanoCpus": r.nano_cpus,
        "CpuShares": r.cpu_shares,
        "CpusetCpus": r.cpuset_cpus,
        "PidsLimit": r.pids_limit or None,
        "BlkioWeight": r.blkio_weight,
        "BlkioDeviceReadBps": [{"Path": d, "Rate": v} for d, v in r.device_read_bps],
        "BlkioDeviceWriteBps": [{"Path": d, "Rate": v} for d, v in r.device_write_bps],
        "Ulimits": [{"Name": n, "Soft": s, "Hard": h} for n, s, h in r.ulimits],
        "OomScoreAdj": r.oom_score_adj or 0,
        "ReadonlyRootfs": record.read_only,
        "Binds": [
            f"{m.source}:{m.target}{':ro' if m.readonly else ''}"
            for m in mounts
            if m.type == "bind" or (m.type == "volume" and not m.anonymous)
        ],
        "Tmpfs": {m.target: m.options for m in mounts if m.type == "tmpfs"},
        "VmMemory": record.vm_memory_mib << 20 if record.isolation == "vm" else 0,
        "VmCpus": record.vm_vcpus if record.isolation == "vm" else 0,
    }


def inspect_mounts(record: Container) -> list[dict]:
    """docker ``inspect``'s top-level ``Mounts`` for a container record."""
    out = []
    for m in record.mounts:
        entry = {"Type": m.type, "Destination": m.target, "RW": not m.readonly, "Mode": "ro" if m.readonly else ""}
        if m.type == "bind":
            entry["Source"] = m.source
        elif m.type == "volume":
            entry.update(Name=m.source, Driver="local", Source=str(paths.volumes_dir() / m.source / "volume.img"))
        else:
            entry["Source"] = ""
        out.append(entry)
    return out


def _network_settings(record: Container) -> dict:
    try:
        return network_settings(record.id, record.network)
    except VmshimError as exc:
        return {"Error": str(exc)}


def _log_config(record: Container) -> dict:
    """docker's HostConfig.LogConfig: the json-file driver and its rotation options."""
    limits = record.log
    return {"Type": "json-file", "Config": {"max-size": str(limits.max_size), "max-file": str(limits.max_files)}}
