"""``vmshim ps`` and ``vmshim inspect``. Thin: read the store, format, print."""

from __future__ import annotations

import json
import re
import time

import click

from shim.cli.each import TEMPLATE_FIELD, render_template
from shim.errors import UsageError, VmshimError

FILTER_KEYS = ("id", "name", "status", "ancestor", "exited", "isolation", "label", "health")


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    if seconds < 1:
        return "Less than a second"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def status_text(record, now: float | None = None) -> str:
    """docker's STATUS column: Up 5 seconds, Exited (0) 3 seconds ago, Created …"""
    from shim.containers.store import parse_rfc3339

    now = time.time() if now is None else now
    status = display_status(record)
    if status == "restarting":
        finished = parse_rfc3339(record.state.finished_at) or now
        return f"Restarting ({record.state.exit_code}) {_ago(now - finished)} ago"
    if status in ("running", "paused"):
        started = parse_rfc3339(record.state.started_at) or now
        text = f"Up {_ago(now - started)}"
        health = (record.state.health or {}).get("Status") if record.healthcheck else None
        if health:  # docker: "Up 5 seconds (healthy)"
            text += " (health: starting)" if health == "starting" else f" ({health})"
        return text + " (Paused)" if status == "paused" else text
    if status == "exited":
        finished = parse_rfc3339(record.state.finished_at) or now
        return f"Exited ({record.state.exit_code}) {_ago(now - finished)} ago"
    return status.capitalize()


def display_status(record) -> str:
    """The status docker would show: the record's, or ``restarting`` while a restart
    policy waits to start it again (and its monitor lives)."""
    from shim.containers.store import monitor_alive

    if record.state.restarting and monitor_alive(record):
        return "restarting"
    return record.status.value


def _command(record) -> str:
    return " ".join(record.process.get("args") or [])


def parse_filters(filters) -> list[tuple[str, str]]:
    out = []
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise UsageError(f"invalid --filter {item!r}: use KEY=VALUE with KEY one of "
                             f"{', '.join(FILTER_KEYS)}")
        out.append((key, value))
    return out


def matches(record, filters: list[tuple[str, str]]) -> bool:
    """docker's rule: values for the same key are ORed, different keys ANDed."""
    by_key: dict[str, list[str]] = {}
    for key, value in filters:
        by_key.setdefault(key, []).append(value)
    for key, values in by_key.items():
        if key == "id":
            ok = any(record.id.startswith(v) for v in values)
        elif key == "name":
            ok = any(re.search(v, record.name) for v in values)
        elif key == "status":
            ok = display_status(record) in values
        elif key == "ancestor":
            ok = any(v in (record.image, record.image_id) or record.image_id.endswith(v)
                     for v in values)
        elif key == "exited":
            ok = record.status.value == "exited" and str(record.state.exit_code) in values
        elif key == "label":
            ok = all(label_matches(record.labels, v) for v in values)
        elif key == "health":
            ok = health_status(record) in values
        else:
            ok = record.isolation in values
        if not ok:
            return False
    return True


def ports_text(record) -> str:
    """docker's PORTS column: what is published now (``0.0.0.0:8080->80/tcp, …``); empty
    for a container that does not run."""
    if record.status.value not in ("running", "paused"):
        return ""
    from shim.network.store import NetworkStore

    try:
        endpoints = NetworkStore().endpoints_of(record.id)
    except VmshimError:
        return ""
    return ", ".join(str(port) for _net, ep in endpoints for port in ep.ports)


def created_text(record) -> str:
    """docker's CreatedAt: ``2026-12-04 16:01:37 +0000 UTC``."""
    from shim.containers.store import parse_rfc3339

    created = parse_rfc3339(record.created)
    if created is None:
        return record.created
    return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(created))


def label_matches(labels: dict, wanted: str) -> bool:
    """``label=K`` (present) or ``label=K=V`` (equal), docker's filter."""
    key, sep, value = wanted.partition("=")
    return key in labels and (not sep or labels[key] == value)


def health_status(record) -> str:
    """starting/healthy/unhealthy, or none without a health check."""
    if not record.healthcheck:
        return "none"
    return (record.state.health or {}).get("Status") or "starting"


def ps_entry(record) -> dict:
    return {"ID": record.short_id, "Image": record.image, "Command": _command(record),
            "CreatedAt": created_text(record), "Status": status_text(record),
            "State": display_status(record), "Names": record.name, "Isolation": record.isolation,
            "ExitCode": record.state.exit_code, "Ports": ports_text(record),
            "Health": health_status(record),
            "Labels": ",".join(f"{k}={v}" for k, v in sorted(record.labels.items()))}


HEADERS = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND",
           "CreatedAt": "CREATED AT", "Status": "STATUS", "State": "STATE", "Names": "NAMES",
           "Isolation": "ISOLATION", "ExitCode": "EXIT CODE", "Ports": "PORTS",
           "Labels": "LABELS", "Health": "HEALTH"}
"""Column titles of ``--format 'table {{.Field}}…'``, as docker prints them."""


def print_columns(rows: list[list[str]]) -> None:
    """Cells aligned in columns three spaces apart (docker's tabwriter look)."""
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows)
              for i in range(max(len(r) for r in rows))]
    for row in rows:
        click.echo("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def print_template_table(template: str, entries: list[dict]) -> None:
    """``table TEMPLATE``: a header line from the field names, then one row per entry;
    ``\t`` in the template separates columns."""
    header = TEMPLATE_FIELD.sub(lambda m: HEADERS.get(m.group(2), m.group(2).upper()),
                           template.replace("\\t", "\t"))
    rows = [header.split("\t")]
    rows += [render_template(template, entry).split("\t") for entry in entries]
    print_columns(rows)


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers, not only running ones.")
@click.option("-q", "--quiet", is_flag=True, help="Only print container ids.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help=f"Filter ({', '.join(FILTER_KEYS)}).")
@click.option("--format", "fmt", metavar="json|[table] TEMPLATE",
              help="json: one JSON object per line; a Go-style template such as "
                   "'{{.ID}} {{.Names}} {{.Ports}}' (fields: ID, Image, Command, CreatedAt, "
                   "Status, State, Names, Ports, Labels); 'table …' adds a header.")
@click.option("--no-trunc", is_flag=True, help="Full ids and commands.")
def ps(show_all, quiet, filters, fmt, no_trunc):
    """List containers."""
    from shim.containers import manage

    wanted = parse_filters(filters)
    if any(key in ("status", "exited") for key, _ in wanted):
        show_all = True
    records = [r for r in manage.list_containers(all=show_all) if matches(r, wanted)]
    records.reverse()  # newest first, like docker
    if quiet:
        for record in records:
            click.echo(record.id if no_trunc else record.short_id)
        return
    if fmt == "json":
        for record in records:
            entry = ps_entry(record)
            if no_trunc:
                entry["ID"] = record.id
            click.echo(json.dumps(entry))
        return
    if fmt and fmt.startswith("table"):
        print_template_table(fmt[len("table"):].strip() or DEFAULT_TABLE,
                             [ps_entry(record) for record in records])
        return
    if fmt:
        for record in records:
            click.echo(render_template(fmt, ps_entry(record)))
        return
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]]
    from shim.containers.store import parse_rfc3339

    for record in records:
        command = _command(record)
        if not no_trunc and len(command) > 20:
            command = command[:19] + "…"
        created = parse_rfc3339(record.created) or time.time()
        rows.append([record.id if no_trunc else record.short_id, record.image,
                     json.dumps(command, ensure_ascii=False), f"{_ago(time.time() - created)} ago",
                     status_text(record), ports_text(record), record.name])
    print_columns(rows)


# ---- inspect ------------------------------------------------------------------------------

def inspect_data(record) -> dict:
    """The docker-shaped inspect document of one container."""
    from shim.containers import manage
    from shim.containers.store import ContainerStore, monitor_alive

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
    from shim.containers.resources import host_config as limits_host_config

    return limits_host_config(record)


def inspect_mounts(record) -> list[dict]:
    from shim.containers.resources import inspect_mounts as mounts

    return mounts(record)


def _network_settings(record) -> dict:
    from shim.containers.networking import network_settings

    try:
        return network_settings(record.id, getattr(record, "network", None))
    except VmshimError as exc:
        return {"Error": str(exc)}


DEFAULT_TABLE = "{{.ID}}\t{{.Image}}\t{{.Command}}\t{{.CreatedAt}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
@click.command()
@click.option("-f", "--format", "fmt", metavar="TEMPLATE", help="e.g. '{{.State.Status}}'.")
@click.argument("containers", nargs=-1, required=True)
def inspect(fmt, containers):
    """Show containers' configuration and state as JSON."""
    from shim.containers import manage
    from shim.containers.store import ContainerStore

    from shim.cli.each import inspect_each

    store = ContainerStore()
    inspect_each(containers, lambda ref: inspect_data(manage.reconcile(store, store.find(ref))), fmt)


def _log_config(record) -> dict:
    """docker's HostConfig.LogConfig: the json-file driver and its rotation options."""
    from shim.containers.logs import LogLimits

    limits = LogLimits.from_dict(record.log)
    return {"Type": "json-file", "Config": {"max-size": str(limits.max_size),
                                            "max-file": str(limits.max_files)}}
