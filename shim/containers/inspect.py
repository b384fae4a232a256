"""The docker-shaped ``inspect`` document of a container (:func:`inspect_container`):
its state, config, limits, mounts, networks and what its isolation reports."""

from __future__ import annotations

from shim import paths
from shim.containers import manage
from shim.containers.listing import display_status
from shim.containers.logs import LogLimits
from shim.containers.networking import network_settings
from shim.containers.resources import Resources
from shim.containers.store import Container, ContainerStore, monitor_alive
from shim.errors import VmshimError
from shim.volumes.specs import MountRequest


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
        "Path": (process.get("args") or [""])[0],
        "Args": (process.get("args") or [])[1:],
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
            **({"Health": state.health or {"Status": "starting", "FailingStreak": 0,
                                           "Log": []}} if record.healthcheck else {}),
        },
        "Image": record.image_id,
        "RestartCount": state.restart_count,
        "LogPath": str(ContainerStore().log_path(record.id)),
        "Config": {
            "Hostname": record.hostname,
            "User": process.get("user", ""),
            "Env": process.get("env", []),
            "Cmd": process.get("args", []),
            "WorkingDir": process.get("cwd", "/"),
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
            "RestartPolicy": {"Name": record.restart_policy,
                              "MaximumRetryCount": record.restart_max},
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


def host_config(record) -> dict:
    """docker ``inspect``'s HostConfig fields for a container record's limits and mounts
    (``Memory`` is the limit, 0 = none, as in docker; the VM's size is ``VmMemory``)."""
    r = Resources.from_dict(getattr(record, "resources", None))
    mounts = [MountRequest.from_dict(m) for m in getattr(record, "mounts", None) or []]
    return {
        "Memory": max(r.memory, 0), "MemorySwap": r.memory_swap,
        "MemoryReservation": r.memory_reservation, "NanoCpus": r.nano_cpus,
        "CpuShares": r.cpu_shares, "CpusetCpus": r.cpuset_cpus,
        "PidsLimit": r.pids_limit or None, "BlkioWeight": r.blkio_weight,
        "BlkioDeviceReadBps": [{"Path": d, "Rate": v} for d, v in r.device_read_bps],
        "BlkioDeviceWriteBps": [{"Path": d, "Rate": v} for d, v in r.device_write_bps],
        "Ulimits": [{"Name": n, "Soft": s, "Hard": h} for n, s, h in r.ulimits],
        "OomScoreAdj": r.oom_score_adj or 0,
        "ReadonlyRootfs": bool(getattr(record, "read_only", False)),
        "Binds": [f"{m.source}:{m.target}{':ro' if m.readonly else ''}"
                  for m in mounts if m.type == "bind" or (m.type == "volume" and not m.anonymous)],
        "Tmpfs": {m.target: m.options for m in mounts if m.type == "tmpfs"},
        "VmMemory": getattr(record, "memory_mib", 0) << 20 if record.isolation == "vm" else 0,
        "VmCpus": r.vm_vcpus() if record.isolation == "vm" else 0,
    }


def inspect_mounts(record) -> list[dict]:
    """docker ``inspect``'s top-level ``Mounts`` for a container record."""
    out = []
    for m in (MountRequest.from_dict(d) for d in getattr(record, "mounts", None) or []):
        entry = {"Type": m.type, "Destination": m.target, "RW": not m.readonly,
                 "Mode": "ro" if m.readonly else ""}
        if m.type == "bind":
            entry["Source"] = m.source
        elif m.type == "volume":
            entry.update(Name=m.source, Driver="local",
                         Source=str(paths.volumes_dir() / m.source / "volume.img"))
        else:
            entry["Source"] = ""
        out.append(entry)
    return out


def _network_settings(record: Container) -> dict:
    try:
        return network_settings(record.id, getattr(record, "network", None))
    except VmshimError as exc:
        return {"Error": str(exc)}


def _log_config(record: Container) -> dict:
    """docker's HostConfig.LogConfig: the json-file driver and its rotation options."""
    limits = LogLimits.from_dict(record.log)
    return {"Type": "json-file", "Config": {"max-size": str(limits.max_size),
                                            "max-file": str(limits.max_files)}}
