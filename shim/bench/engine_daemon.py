"""A private container engine daemon (dockerd, containerd) for the bench and the e2e tests:
its configuration, starting it and waiting until it answers, stopping it, and removing
what it leaves behind (children, mounts, cgroups), each by PID or below a path of its own.

Used by shim.bench.engine_net and by tests/e2e (dockerd.py, oci_engines.py), so that the
bench measures the engine the tests check, set up and torn down the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from shim.bench.drivers import BenchError

DOCKER = "/usr/bin/docker"
"""The client of Debian's docker.io (same API version as its dockerd)."""
DOCKERD = "/usr/sbin/dockerd"


class Resource:
    """A context manager over something set up in steps (a namespace, a daemon): entering
    runs :meth:`start`, and :meth:`close` when that fails, so close must undo whatever part
    of start was done; leaving runs :meth:`close`."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def missing_dockerd(*tools: str) -> str | None:
    """Why dockerd cannot run here (a skip reason), or None. *tools*: more executables
    needed besides docker, dockerd and iptables."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in (DOCKER, DOCKERD, "/usr/sbin/iptables", *tools):
        if not os.access(tool, os.X_OK):
            return f"{tool} is not installed (apt-get install docker.io)"
    return None


def dockerd_config(workdir: Path, runtime: Path, cgroup_parent: str, **extra) -> str:
    """daemon.json for a dockerd whose state is all under *workdir* (data root, exec root,
    pid file, the socket ``docker.sock``), with *runtime* registered as ``vmshim`` and its
    containers under the cgroup *cgroup_parent*; *extra* keys are added (``-`` for ``_``)."""
    return json.dumps(
        {
            **{key.replace("_", "-"): value for key, value in extra.items()},
            "data-root": str(workdir / "data"),
            "exec-root": str(workdir / "x"),
            "pidfile": str(workdir / "dockerd.pid"),
            "hosts": [f"unix://{workdir / 'docker.sock'}"],
            "runtimes": {"vmshim": {"path": str(runtime)}},
            "cgroup-parent": cgroup_parent,
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "storage-driver": "overlay2",
            "log-driver": "json-file",
            "features": {"buildkit": False},
            "default-ulimits": {"nofile": {"Name": "nofile", "Hard": 20000, "Soft": 20000}},
        },
        indent=1,
    )


def docker_env(workdir: Path) -> dict[str, str]:
    """The environment for a docker client of the dockerd of dockerd_config(*workdir*)."""
    return dict(os.environ, DOCKER_HOST=f"unix://{workdir / 'docker.sock'}", DOCKER_CONFIG=str(workdir / "client"))


def log_tail(log: Path, lines: int) -> str:
    """The last *lines* lines of a daemon's log ("" when unreadable)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_daemon(
    argv: list[str], log: Path, answers: Callable[[], bool], *, what: str, timeout: float, poll: float = 0.2
) -> subprocess.Popen:
    """Start *argv* in a new session, its output appended to *log*, and wait until
    *answers()* is true (a probe timing out counts as no). Returns the process; the
    caller stops it (stop_daemon) also when this raises. Raises BenchError naming *what*
    when it exits first or does not answer within *timeout* s."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}: {log_tail(log, 30)}")
        try:
            if answers():
                return proc
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not answer in {timeout:.0f} s: {log_tail(log, 30)}")
        time.sleep(poll)


def stop_daemon(proc: subprocess.Popen | None, grace: float = 60) -> None:
    """SIGTERM *proc* if it still runs, SIGKILL after *grace* s; reaps it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)


def close_dockerd(proc: subprocess.Popen | None, workdir: Path, cgroup_parent: str, cgroup_wait: float = 0) -> None:
    """Tear down the dockerd *proc* of dockerd_config(*workdir*, …, *cgroup_parent*): while
    it runs remove all its containers, then stop it, SIGKILL (by PID) what is left of its
    children (its containerd and shims name *workdir* in their argv), unmount what is left
    below *workdir* and remove its cgroups (retrying for *cgroup_wait* s)."""
    if proc is not None and proc.poll() is None:

        def docker(*args: str, timeout: float) -> str:
            return subprocess.run(
                [DOCKER, *args],
                env=docker_env(workdir),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            ).stdout

        try:
            ids = docker("ps", "-aq", timeout=60).split()
            if ids:
                docker("rm", "-f", *ids, timeout=300)
        except subprocess.TimeoutExpired:
            pass
    stop_daemon(proc)
    wait_for_exit(lambda: pids_mentioning(str(workdir)), 30)
    unmount_under(workdir)
    remove_cgroup_trees(cgroup_parent, wait=cgroup_wait)


def pids_mentioning(text: str) -> list[int]:
    """PIDs (not this process) with TEXT as, or inside, one of their argv words."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in word for word in argv):
            found.append(int(entry.name))
    return found


def wait_for_exit(pids_now: Callable[[], list[int]], timeout: float) -> None:
    """Wait until PIDS_NOW() is empty; after TIMEOUT s SIGKILL those left, by PID."""
    deadline = time.monotonic() + timeout
    while pids_now():
        if time.monotonic() > deadline:
            for pid in pids_now():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = time.monotonic() + 5
            while pids_now() and time.monotonic() < killed:
                time.sleep(0.1)
            return
        time.sleep(0.1)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path* in this mount namespace, deepest last."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below *path* (deepest first)."""
    for target in sorted(set(mounts_under(path)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True, timeout=30)


def remove_cgroup_trees(name: str, wait: float = 0) -> list[str]:
    """Remove the (empty) cgroup directory trees /sys/fs/cgroup[/<hierarchy>]/<name> that an
    engine made for its containers, retrying for WAIT s while some are busy (a process
    still exiting); return those that could not be removed."""
    deadline = time.monotonic() + wait
    while True:
        left = _remove_cgroup_trees_once(name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _remove_cgroup_trees_once(name: str) -> list[str]:
    name = name.strip("/")
    assert name and "/" not in name and name not in (".", "..")
    left = []
    cgroup = Path("/sys/fs/cgroup")
    roots = [cgroup] + ([p for p in cgroup.iterdir() if p.is_dir()] if cgroup.is_dir() else [])
    for root in roots:
        top = root / name
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        if top.exists():
            left.append(str(top))
    return left
