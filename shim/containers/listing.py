"""What ``vmshim ps`` shows of a container: docker's status text, the ``--filter`` rules,
one row of ``ps --format`` (:func:`ps_entry`), and :func:`list_filtered`, the list it
prints. The CLI parses flags, calls :func:`list_filtered` and prints rows."""

from __future__ import annotations

import re
import time

from shim.containers import manage
from shim.containers.store import Container, monitor_alive, parse_rfc3339
from shim.errors import UsageError, VmshimError
from shim.network.store import NetworkStore

FILTER_KEYS = ("id", "name", "status", "ancestor", "exited", "isolation", "label", "health")


def ago(seconds: float) -> str:
    """docker's "time ago" words: ``5 seconds``, ``1 minute``, ``Less than a second``."""
    seconds = max(0, int(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    if seconds < 1:
        return "Less than a second"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def display_status(record: Container) -> str:
    """The status docker would show: the record's, or ``restarting`` while a restart
    policy waits to start it again (and its monitor lives)."""
    if record.state.restarting and monitor_alive(record):
        return "restarting"
    return record.status.value


def status_text(record: Container, now: float | None = None) -> str:
    """docker's STATUS column: Up 5 seconds, Exited (0) 3 seconds ago, Created …"""
    now = time.time() if now is None else now
    status = display_status(record)
    if status == "restarting":
        finished = parse_rfc3339(record.state.finished_at) or now
        return f"Restarting ({record.state.exit_code}) {ago(now - finished)} ago"
    if status in ("running", "paused"):
        started = parse_rfc3339(record.state.started_at) or now
        text = f"Up {ago(now - started)}"
        health = (record.state.health or {}).get("Status") if record.healthcheck else None
        if health:  # docker: "Up 5 seconds (healthy)"
            text += " (health: starting)" if health == "starting" else f" ({health})"
        return text + " (Paused)" if status == "paused" else text
    if status == "exited":
        finished = parse_rfc3339(record.state.finished_at) or now
        return f"Exited ({record.state.exit_code}) {ago(now - finished)} ago"
    return status.capitalize()


def health_status(record: Container) -> str:
    """starting/healthy/unhealthy, or none without a health check."""
    if not record.healthcheck:
        return "none"
    return (record.state.health or {}).get("Status") or "starting"


def command_text(record: Container) -> str:
    """The container's command line, its arguments joined by spaces."""
    return " ".join(record.process.args)


def created_text(record: Container) -> str:
    """docker's CreatedAt: ``2026-12-04 16:01:37 +0000 UTC``."""
    created = parse_rfc3339(record.created)
    if created is None:
        return record.created
    return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(created))


def created_ago(record: Container, now: float | None = None) -> str:
    """docker's CREATED column: ``5 minutes ago``."""
    now = time.time() if now is None else now
    return f"{ago(now - (parse_rfc3339(record.created) or now))} ago"


def ports_text(record: Container) -> str:
    """docker's PORTS column: what is published now (``0.0.0.0:8080->80/tcp, …``); empty
    for a container that does not run."""
    if record.status.value not in ("running", "paused"):
        return ""
    try:
        endpoints = NetworkStore().endpoints_of(record.id)
    except VmshimError:
        return ""
    return ", ".join(str(port) for _net, ep in endpoints for port in ep.ports)


def ps_entry(record: Container) -> dict:
    """One container as ``ps --format json`` prints it (and templates see it)."""
    return {
        "ID": record.short_id,
        "Image": record.image,
        "Command": command_text(record),
        "CreatedAt": created_text(record),
        "Status": status_text(record),
        "State": display_status(record),
        "Names": record.name,
        "Isolation": record.isolation,
        "ExitCode": record.state.exit_code,
        "Ports": ports_text(record),
        "Health": health_status(record),
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(record.labels.items())),
    }


# ---- --filter ------------------------------------------------------------------------------


def parse_filters(filters) -> list[tuple[str, str]]:
    """``KEY=VALUE`` items → pairs; raises UsageError for an unknown key or a missing ``=``."""
    out = []
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise UsageError(f"invalid --filter {item!r}: use KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}")
        out.append((key, value))
    return out


def label_matches(labels: dict, wanted: str) -> bool:
    """``label=K`` (present) or ``label=K=V`` (equal), docker's filter."""
    key, sep, value = wanted.partition("=")
    return key in labels and (not sep or labels[key] == value)


def matches(record: Container, filters: list[tuple[str, str]]) -> bool:
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
            ok = any(v in (record.image, record.image_id) or record.image_id.endswith(v) for v in values)
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


def list_filtered(*, show_all: bool, filters=()) -> list[Container]:
    """The containers ``ps`` lists, newest first: running ones (all with *show_all*, or
    when a ``status``/``exited`` filter asks for stopped ones) that match every filter.
    Raises UsageError for a malformed filter."""
    wanted = parse_filters(filters)
    if any(key in ("status", "exited") for key, _ in wanted):
        show_all = True
    records = [r for r in manage.list_containers(all=show_all) if matches(r, wanted)]
    records.reverse()  # newest first, like docker
    return records
