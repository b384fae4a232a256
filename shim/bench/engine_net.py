"""``vmshim bench --only engine_network``: the network of a container that dockerd runs
with ``--runtime vmshim`` (a microVM plugged into the engine's namespace, shim.oci.netns)
next to the same container with ``--runtime runc``.

A private dockerd (its own data root, exec root, socket, cgroup parent, managed
containerd) runs in a network namespace made for the bench, with vmshim-runtime
registered as ``vmshim``. Each subject runs one busybox httpd on docker's default bridge;
from inside that namespace (``nsenter --net=``, no traffic leaves it) a small client
measures, per sample:

- round trip: the median of RTT_REQUESTS HTTP/1.0 GETs of a 6-byte file, each on a new
  TCP connection, connect to last byte (ms);
- throughput: one GET of a BIG_MIB MiB file (MiB/s).

Everything started is removed when it ends: containers, dockerd (by PID) and what is left
of its children (by PID), its mounts and cgroups, the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shim.bench import engine_daemon as ed
from shim.bench.drivers import BenchError, default_cli, run

RTT_REQUESTS = 20
BIG_MIB = 32
HTTPD = (
    f"mkdir -p /www && echo hello > /www/small && dd if=/dev/zero of=/www/big bs=1M "
    f"count={BIG_MIB} 2>/dev/null && exec httpd -f -p 80 -h /www"
)
SUBJECT_RUNTIMES = {"oci": "vmshim", "runc": "runc"}
START_TIMEOUT = 60.0

CLIENT = r"""
import json, socket, statistics, sys, time
host = sys.argv[1]; n = int(sys.argv[2])
def get(path):
    start = time.perf_counter()
    with socket.create_connection((host, 80), timeout=30) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\n\r\n")
        size, head = 0, b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            if len(head) < 65536 and b"\r\n\r\n" not in head:
                head += chunk[:65536]
            size += len(chunk)
    header = head.find(b"\r\n\r\n")
    return time.perf_counter() - start, size - (header + 4 if header >= 0 else 0)
deadline = time.monotonic() + 60
while True:
    try:
        get("/small"); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.2)
rtt = statistics.median(get("/small")[0] for _ in range(n))
seconds, size = get("/big")
print(json.dumps({"rtt_ms": rtt * 1000, "mib_s": size / (1 << 20) / seconds, "bytes": size}))
"""


def unavailable() -> str | None:
    """Why this benchmark cannot run here (None: it can)."""
    why = ed.missing_dockerd("/usr/bin/nsenter")
    if why == "needs root":
        return "needs root (a private dockerd in a network namespace of its own)"
    return why


def _sh(argv: list[str], timeout: float = 60) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {(res.stderr or res.stdout).strip()[:300]}")


class BenchDockerd(ed.Resource):
    """dockerd with vmshim-runtime as ``vmshim``, in network namespace ``vmshim-bench-PID``
    (see the module doc). Context manager."""

    def __init__(self, workdir: Path, runtime: str):
        self.workdir = Path(tempfile.mkdtemp(prefix="dk-", dir=workdir))
        self.netns = f"vmshim-bench-{os.getpid()}"
        self.cgroup_parent = f"vmshim-bench-dockerd-{os.getpid()}"
        self.proc: subprocess.Popen | None = None
        wrapper = self.workdir / "vmshim-runtime"
        env = "".join(
            f"export {k}='{os.environ[k]}'\n" for k in ("VMSHIM_ROOT",) if k in os.environ and "'" not in os.environ[k]
        )
        wrapper.write_text(f"#!/bin/sh\n{env}exec '{runtime}' \"$@\"\n")
        wrapper.chmod(0o755)
        self.config = self.workdir / "daemon.json"
        self.config.write_text(ed.dockerd_config(self.workdir, wrapper, self.cgroup_parent))
        self.env = ed.docker_env(self.workdir)

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def docker(self, *args: str, timeout: float = 300) -> str:
        res = subprocess.run(
            [ed.DOCKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if res.returncode != 0:
            raise BenchError(f"docker {' '.join(args)}: {res.stderr.strip()[-300:]}")
        return res.stdout

    def _answers(self) -> bool:
        try:
            self.docker("version", timeout=20)
        except BenchError:
            return False
        return True

    def start(self) -> None:
        _sh(["ip", "netns", "add", self.netns])
        _sh(self.nsenter("ip", "link", "set", "lo", "up"))
        self.proc = ed.start_daemon(
            self.nsenter(ed.DOCKERD, "--config-file", str(self.config)),
            self.workdir / "dockerd.log",
            self._answers,
            what="dockerd",
            timeout=START_TIMEOUT,
        )
        image = self.workdir / "busybox.tar"
        run([*default_cli(), "save", "-o", str(image), "busybox"], timeout=300)
        self.docker("load", "-i", str(image))

    def close(self) -> None:
        ed.close_dockerd(self.proc, self.workdir, self.cgroup_parent)
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, timeout=60)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start_server(self, runtime: str) -> tuple[str, str]:
        """A detached busybox httpd with *runtime*; (container id, its bridge address)."""
        cid = self.docker("run", "-d", "--runtime", runtime, "busybox", "sh", "-c", HTTPD).strip()
        ip = self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid).strip()
        if not ip:
            raise BenchError(f"container {cid[:12]} has no address on the bridge")
        return cid, ip

    def measure(self, ip: str) -> dict:
        """Round trip and throughput to *ip* from inside the namespace."""
        res = subprocess.run(
            self.nsenter(sys.executable, "-c", CLIENT, ip, str(RTT_REQUESTS)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0:
            raise BenchError(f"the client failed: {res.stderr.strip()[-300:]}")
        data = json.loads(res.stdout)
        if data.get("bytes") != BIG_MIB << 20:
            raise BenchError(f"the download was {data.get('bytes')} bytes, not {BIG_MIB} MiB")
        return data
