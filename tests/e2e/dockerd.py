"""A private dockerd (Debian's docker.io, 20.10) for the e2e tests of engines' networks, and
the network namespace it runs in.

:class:`EngineHost` is a network namespace of its own inside the test run's namespace (made
by scripts/test), joined to it by a veth pair: a second "host" at ``<net>.2`` whose
gateway is the test namespace at ``<net>.1``. An engine run there keeps its iptables
rules (docker sets the FORWARD policy to DROP), bridges and NAT away from the rest of the
suite; libvirtd stays in the test namespace, where vmshim-runtime makes the taps its VMs
open (shim.oci.netns.libvirtd_netns). Processes enter it with ``nsenter --net=``, not
``ip netns exec``: that remounts /sys, which hides the cgroup hierarchies.

:class:`Dockerd` starts dockerd there with everything private: ``--data-root``,
``--exec-root``, ``--pidfile``, a unix socket under the work directory, a cgroup parent of
its own, its own managed containerd, and the runtime under test registered as ``vmshim``
(through tests.e2e.oci_engines.runtime_wrapper, which passes VMSHIM_ROOT on). Leaving it
removes every container, ends dockerd by its PID (and whatever of its children is left,
by PID), unmounts what it left under the work directory and removes its cgroups.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

from tests.e2e.oci_engines import (
    _run,
    pids_mentioning,
    remove_cgroup_trees,
    runtime_wrapper,
    unmount_under,
    wait_for_exit,
)

DOCKER = "/usr/bin/docker"
"""The client of Debian's docker.io (same API version as its dockerd)."""
DOCKERD = "/usr/sbin/dockerd"


def missing_docker() -> str | None:
    """Why dockerd cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in (DOCKER, DOCKERD, "/usr/sbin/iptables"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is not installed (apt-get install docker.io)"
    return None


class EngineHost:
    """A network namespace NAME with ``eth0`` = ``<prefix>.2/24`` (default route via
    ``<prefix>.1``), the other end ``veth`` = ``<prefix>.1/24`` in this namespace."""

    def __init__(self, name: str, veth: str, prefix: str):
        self.name, self.veth, self.prefix = name, veth, prefix
        self.path = f"/run/netns/{name}"
        self.address = f"{prefix}.2"
        self.gateway = f"{prefix}.1"
        """This (the test run's) namespace's address as the engine host sees it."""

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def __enter__(self) -> Self:
        def sh(*argv: str) -> None:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

        sh("ip", "netns", "add", self.name)
        try:
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
               "netns", self.name)
            sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.veth)
            sh("ip", "link", "set", self.veth, "up")
            sh(*self.nsenter("sh", "-c", f"ip link set lo up && ip addr add {self.address}/24 "
                             f"dev eth0 && ip link set eth0 up && ip route add default via "
                             f"{self.gateway}"))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "link", "delete", self.veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=30)


class HostLink:
    """A veth pair joining two EngineHosts directly, ``<prefix>.1/24`` on *a*'s end and
    ``<prefix>.2/24`` on *b*'s (both named *name*): two machines on one wire, for a
    swarm of two nodes. Removed with *a*'s and *b*'s namespaces, or on leaving."""

    def __init__(self, a: EngineHost, b: EngineHost, name: str, prefix: str):
        self.a, self.b, self.name = a, b, name
        self.address_a, self.address_b = f"{prefix}.1", f"{prefix}.2"

    def __enter__(self) -> Self:
        def sh(*argv: str) -> None:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

        sh(*self.a.nsenter("ip", "link", "add", self.name, "type", "veth", "peer", "name",
                           self.name, "netns", self.b.path))
        for host, address in ((self.a, self.address_a), (self.b, self.address_b)):
            sh(*host.nsenter("sh", "-c", f"ip addr add {address}/24 dev {self.name} && "
                             f"ip link set {self.name} up"))
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(self.a.nsenter("ip", "link", "delete", self.name), capture_output=True,
                       timeout=30)


class Dockerd:
    """dockerd in *host* (an EngineHost) with state under *workdir* and *runtime* as its
    ``vmshim`` runtime (see the module doc). Context manager."""

    def __init__(self, workdir: Path, runtime: str, host: EngineHost,
                 default_runtime: str | None = None):
        """*default_runtime* (e.g. ``"vmshim"``) becomes daemon.json's ``default-runtime``:
        what Swarm tasks, which cannot name a runtime, run with."""
        self.workdir = Path(workdir)
        self.host = host
        w = self.workdir
        for d in ("data", "x", "bin"):
            (w / d).mkdir(parents=True, exist_ok=True)
        self.socket = w / "docker.sock"
        self.argv_log = w / "runtime-argv"
        self.runtime = runtime_wrapper(runtime, w / "bin", self.argv_log)
        # one per daemon: two daemons of one test run (a two-node swarm) must not share it
        self.cgroup_parent = f"vmshim-e2e-dockerd-{os.getpid()}-{self.workdir.name}"
        self.config = w / "daemon.json"
        extra = {"default-runtime": default_runtime} if default_runtime else {}
        self.config.write_text(json.dumps({**extra,
            "data-root": str(w / "data"),
            "exec-root": str(w / "x"),
            "pidfile": str(w / "dockerd.pid"),
            "hosts": [f"unix://{self.socket}"],
            "runtimes": {"vmshim": {"path": str(self.runtime)}},
            "cgroup-parent": self.cgroup_parent,
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "storage-driver": "overlay2",
            "iptables": True,
            "ip-forward": True,
            "userland-proxy": True,
            "log-driver": "json-file",
            "features": {"buildkit": False},
            "default-ulimits": {"nofile": {"Name": "nofile", "Hard": 20000, "Soft": 20000}},
        }, indent=1))
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.socket}")
        self.env.pop("DOCKER_CONFIG", None)
        self.env["DOCKER_CONFIG"] = str(w / "client")
        self.proc: subprocess.Popen | None = None

    def docker(self, *args: str, timeout: float = 300, check: bool = False,
               input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``docker ARGS`` against this daemon (from the test namespace: the socket is a
        file); text output. check=True raises AssertionError on failure."""
        return _run([DOCKER, *[str(a) for a in args]], self.env, input, timeout, check)

    def load(self, archive: Path) -> None:
        self.docker("load", "-i", str(archive), check=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "dockerd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        try:
            log = open(self.workdir / "dockerd.log", "ab")
            # nsenter execs dockerd: the Popen pid is dockerd's
            self.proc = subprocess.Popen(
                self.host.nsenter(DOCKERD, "--config-file", str(self.config)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            log.close()
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dockerd exited {self.proc.returncode}: {self.log_tail()}")
                try:
                    if self.docker("version", timeout=20).returncode == 0:
                        break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not answer in 60 s: {self.log_tail()}")
                time.sleep(0.2)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Tear down everything this instance started (see the module doc)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                ids = self.docker("ps", "-aq", timeout=60).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=300)
            except subprocess.TimeoutExpired:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        # its containerd and shims name the work directory in their argv
        wait_for_exit(lambda: pids_mentioning(str(self.workdir)), 30)
        unmount_under(self.workdir)
        remove_cgroup_trees(self.cgroup_parent, wait=10)
