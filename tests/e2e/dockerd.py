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

import os
import subprocess
from pathlib import Path

from shim.bench import engine_daemon as ed
from shim.bench.engine_daemon import DOCKER, DOCKERD
from shim.bench.engine_daemon import missing_dockerd as missing_docker  # noqa: F401
from tests.e2e.oci_engines import _run, runtime_wrapper


class EngineHost(ed.Resource):
    """A network namespace NAME with ``eth0`` = ``<prefix>.2/24`` (default route via
    ``<prefix>.1``), the other end ``veth`` = ``<prefix>.1/24`` in this namespace."""

    def __init__(self, name: str, veth: str, prefix: str):
        self.name, self.veth, self.prefix = name, veth, prefix
        self.path = f"/run/netns/{name}"
        self.address = f"{prefix}.2"
        self.gateway = f"{prefix}.1"
        """This (the test run's) namespace's address as the engine host sees it."""

    @classmethod
    def of_this_run(cls, tag: str, prefix: str) -> EngineHost:
        """Namespace ``vmshim-TAG-PID`` and veth ``vTAG<PID mod 100000>`` (names no other
        test run uses at the same time) on ``<prefix>.0/24``."""
        pid = os.getpid()
        return cls(f"vmshim-{tag}-{pid}", f"v{tag}{pid % 100000}", prefix)

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def start(self) -> None:
        def sh(*argv: str) -> None:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        sh(
            *self.nsenter(
                "sh",
                "-c",
                f"ip link set lo up && ip addr add {self.address}/24 "
                f"dev eth0 && ip link set eth0 up && ip route add default via "
                f"{self.gateway}",
            )
        )

    def close(self) -> None:
        subprocess.run(["ip", "link", "delete", self.veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=30)


class HostLink(ed.Resource):
    """A veth pair joining two EngineHosts directly, ``<prefix>.1/24`` on *a*'s end and
    ``<prefix>.2/24`` on *b*'s (both named *name*): two machines on one wire, for a
    swarm of two nodes. Removed with *a*'s and *b*'s namespaces, or on leaving."""

    def __init__(self, a: EngineHost, b: EngineHost, name: str, prefix: str):
        self.a, self.b, self.name = a, b, name
        self.address_a, self.address_b = f"{prefix}.1", f"{prefix}.2"

    def start(self) -> None:
        def sh(*argv: str) -> None:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

        sh(
            *self.a.nsenter(
                "ip", "link", "add", self.name, "type", "veth", "peer", "name", self.name, "netns", self.b.path
            )
        )
        for host, address in ((self.a, self.address_a), (self.b, self.address_b)):
            sh(*host.nsenter("sh", "-c", f"ip addr add {address}/24 dev {self.name} && ip link set {self.name} up"))

    def close(self) -> None:
        subprocess.run(self.a.nsenter("ip", "link", "delete", self.name), capture_output=True, timeout=30)


class Dockerd(ed.Resource):
    """dockerd in *host* (an EngineHost) with state under *workdir* and *runtime* as its
    ``vmshim`` runtime (see the module doc). Context manager."""

    def __init__(self, workdir: Path, runtime: str, host: EngineHost, default_runtime: str | None = None):
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
        extra = {"default_runtime": default_runtime} if default_runtime else {}
        self.config.write_text(
            ed.dockerd_config(
                w, self.runtime, self.cgroup_parent, iptables=True, ip_forward=True, userland_proxy=True, **extra
            )
        )
        self.env = ed.docker_env(w)
        self.proc: subprocess.Popen | None = None

    def docker(
        self, *args: str, timeout: float = 300, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``docker ARGS`` against this daemon (from the test namespace: the socket is a
        file); text output. check=True raises AssertionError on failure."""
        return _run([DOCKER, *[str(a) for a in args]], self.env, input, timeout, check)

    def load(self, archive: Path) -> None:
        self.docker("load", "-i", str(archive), check=True)

    def log_tail(self, lines: int = 30) -> str:
        return ed.log_tail(self.workdir / "dockerd.log", lines)

    def start(self) -> None:
        # nsenter execs dockerd: the Popen pid is dockerd's
        self.proc = ed.start_daemon(
            self.host.nsenter(DOCKERD, "--config-file", str(self.config)),
            self.workdir / "dockerd.log",
            lambda: self.docker("version", timeout=20).returncode == 0,
            what="dockerd",
            timeout=60,
        )

    def close(self) -> None:
        """Tear down everything this instance started (see the module doc)."""
        ed.close_dockerd(self.proc, self.workdir, self.cgroup_parent, cgroup_wait=10)
