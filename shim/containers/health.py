"""Health checks (``HEALTHCHECK``, ``--health-*``, compose ``healthcheck:``), run by the
container's monitor through the same exec path as ``vmshim exec``.

The monitor's loop is single-threaded; a :class:`HealthChecker` lives in it and uses its
timers. Every *interval* it execs the check's command in the container (a :class:`Probe`
stands where a client connection would: the monitor routes the exec's started / output
/ exit frames to it). A probe that does not exit within *timeout* counts as a failure
and is sent SIGKILL. The result goes into the record's ``state.health`` (docker's
State.Health): ``starting`` until the first success (failures inside the start period
do not count), ``healthy``, or ``unhealthy`` after *retries* failures in a row.

The output kept per probe is bounded (OUTPUT_LIMIT, as docker), and so is the log
(LOG_ENTRIES): the command runs in the container, so what it prints is the guest's.
"""

from __future__ import annotations

import signal
import time

from guest import protocol
from shim.containers.options import exec_spec
from shim.containers.store import now_rfc3339

OUTPUT_LIMIT = 4096
LOG_ENTRIES = 5
NS = 1_000_000_000
DEFAULTS = {"Interval": 30 * NS, "Timeout": 30 * NS, "Retries": 3, "StartPeriod": 0}
STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"


def probe_args(test: list[str]) -> list[str]:
    """docker's Test → argv: ["CMD", a…] → [a…]; ["CMD-SHELL", s] → sh -c s."""
    if test and test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(test[1:])]
    if test and test[0] == "CMD":
        return list(test[1:])
    return list(test)


def settings(check: dict) -> tuple[float, float, int, float]:
    """(interval s, timeout s, retries, start period s) with docker's defaults."""

    def value(key):
        raw = check.get(key)
        return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else DEFAULTS[key]

    return (value("Interval") / NS, value("Timeout") / NS, max(1, value("Retries")), value("StartPeriod") / NS)


def next_state(health: dict, code: int, output: str, started: str, *, retries: int, in_start_period: bool) -> dict:
    """The new State.Health after one probe (pure; the unit tests drive it)."""
    log = list(health.get("Log") or [])[-(LOG_ENTRIES - 1) :]
    log.append({"Start": started, "End": now_rfc3339(), "ExitCode": code, "Output": output[:OUTPUT_LIMIT]})
    status = health.get("Status") or STARTING
    streak = int(health.get("FailingStreak") or 0)
    if code == 0:
        status, streak = HEALTHY, 0
    elif not (in_start_period and status == STARTING):
        streak += 1
        if streak >= retries:
            status = UNHEALTHY
    return {"Status": status, "FailingStreak": streak, "Log": log}


class Probe:
    """Stands in for a client connection in the monitor (same duck type as its Conn:
    ``closed``, ``kind``, ``send``, ``finish``) and collects one probe's result."""

    def __init__(self, on_done):
        self.closed = False
        self.kind = "proc"
        self.output = bytearray()
        self.code: int | None = None
        self.on_done = on_done
        self.started = now_rfc3339()

    def send(self, type: str, payload: bytes = b"", **fields) -> None:
        if type in (protocol.STDOUT, protocol.STDERR):
            room = OUTPUT_LIMIT - len(self.output)
            if room > 0:
                self.output += payload[:room]
        elif type == protocol.EXIT:
            code = fields.get("code")
            self.code = code if isinstance(code, int) and not isinstance(code, bool) else -1
        elif type == protocol.ERROR:
            message = fields.get("message")
            self.output += (message if isinstance(message, str) else "exec failed").encode()[:OUTPUT_LIMIT]
            self.code = -1

    def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_done(self)


class HealthChecker:
    """One container's health check inside its monitor (see the module doc)."""

    def __init__(self, monitor, check: dict):
        self.monitor = monitor
        self.test = probe_args(check.get("Test") or [])
        self.interval, self.timeout, self.retries, self.start_period = settings(check)
        self.began = time.monotonic()
        self.probe: Probe | None = None
        self.probe_id: int | None = None

    def begin(self) -> None:
        self.monitor._update(lambda r: setattr(r.state, "health", {"Status": STARTING, "FailingStreak": 0, "Log": []}))
        self.monitor._timer(min(self.interval, 1.0), "health", self._run)

    def _run(self) -> None:
        monitor = self.monitor
        record = monitor.record_if_kept
        if not monitor.main_running or monitor.agent is None or record is None:
            return
        spec = exec_spec(record, self.test)
        self.probe = Probe(self._done)
        self.probe_id = monitor._new_proc_id()
        monitor.pending[self.probe_id] = self.probe
        monitor._to_agent(
            protocol.EXEC,
            token=record.token,
            id=self.probe_id,
            process=spec.to_dict(),
            stdin=False,
            tty=False,
            rows=24,
            cols=80,
        )
        monitor._timer(self.timeout, "health-timeout", self._timed_out)

    def _timed_out(self) -> None:
        probe, proc_id = self.probe, self.probe_id
        if probe is None or probe.closed:
            return
        self.monitor.pending.pop(proc_id, None)
        self.monitor.procs.pop(proc_id, None)
        self.monitor._to_agent(protocol.SIGNAL, id=proc_id, signal=int(signal.SIGKILL))
        probe.code = -1
        probe.output = bytearray(f"Health check exceeded timeout ({self.timeout:g}s)".encode())
        probe.finish()

    def _done(self, probe: Probe) -> None:
        monitor = self.monitor
        monitor._cancel_timers("health-timeout")
        self.probe = None
        code = probe.code if probe.code is not None else -1
        in_start = time.monotonic() - self.began < self.start_period
        output = bytes(probe.output).decode("utf-8", "replace")
        monitor._update(
            lambda r: setattr(
                r.state,
                "health",
                next_state(r.state.health, code, output, probe.started, retries=self.retries, in_start_period=in_start),
            )
        )
        if monitor.main_running:
            monitor._timer(self.interval, "health", self._run)


def start(monitor) -> HealthChecker | None:
    """Begin checking the monitor's container if its record has a health check."""
    record = monitor.record_if_kept
    check = record.healthcheck if record is not None else None
    if not check or not probe_args(check.get("Test") or []):
        return None
    checker = HealthChecker(monitor, check)
    checker.begin()
    return checker


def stop(monitor) -> None:
    """The main process ended: no more probes."""
    monitor._cancel_timers("health", "health-timeout")


# ---- ``--health-*`` flags -------------------------------------------------------------------


def parse_duration(text: str, flag: str) -> int:
    """A Go-style duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds. Raises
    UsageError naming *flag*."""
    import re

    from shim.errors import UsageError

    units = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": NS, "m": 60 * NS, "h": 3600 * NS}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"invalid {flag} {text!r}: use a duration such as 30s, 1m30s or 500ms")
    return int(sum(float(n) * units[u] for n, u in parts))


def from_flags(
    *,
    health_cmd=None,
    health_interval=None,
    health_timeout=None,
    health_retries=None,
    health_start_period=None,
    no_healthcheck=False,
    **_ignored,
) -> dict | None:
    """``run``/``create``'s health flags as a Config.Healthcheck overlay (None: none
    given). Raises UsageError."""
    from shim.errors import UsageError

    if no_healthcheck:
        if any(
            v is not None for v in (health_cmd, health_interval, health_timeout, health_retries, health_start_period)
        ):
            raise UsageError("--no-healthcheck conflicts with the --health-* options")
        return {"Test": ["NONE"]}
    check: dict[str, object] = {}
    if health_cmd is not None:
        check["Test"] = ["CMD-SHELL", health_cmd]
    for value, key, flag in (
        (health_interval, "Interval", "--health-interval"),
        (health_timeout, "Timeout", "--health-timeout"),
        (health_start_period, "StartPeriod", "--health-start-period"),
    ):
        if value is not None:
            check[key] = parse_duration(value, flag)
    if health_retries is not None:
        if health_retries < 0:
            raise UsageError(f"invalid --health-retries {health_retries}: must not be negative")
        check["Retries"] = health_retries
    return check or None
