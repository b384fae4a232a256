"""Published-port latency: HTTP requests through ``-p 127.0.0.1:PORT:8080`` to busybox
httpd in a container (vm and process isolation), against the same busybox httpd on the
host's loopback (the baseline), and straight to the container's address (the bridge
without the DNAT), so the cost of each hop shows.

Usage — it makes a bridge and NAT rules, so run it in a network namespace of its own:

    scripts/lib/in-netns .venv/bin/python benchmarks/network.py [--requests N] [--json FILE]

Each request is a new TCP connection and an HTTP/1.0 GET of a 6-byte file (busybox
httpd closes after one answer), timed from connect() to the end of the reply. The
subjects take turns request by request, so drift on a noisy host hits all alike.
Figures: median, min and max (and p90) in milliseconds, and the median as a multiple
of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VMSHIM = [sys.executable, "-m", "shim.cli.main"]
BUSYBOX = "/bin/busybox"
HTTPD = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www"


def vmshim(*args: str) -> str:
    proc = subprocess.run(VMSHIM + list(args), check=False, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise SystemExit(f"vmshim {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(host: str, port: int) -> float:
    """One HTTP/1.0 GET on a new connection; seconds from connect to the last byte."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    elapsed = time.perf_counter() - start
    if not reply.startswith(b"HTTP/1.") or b" 200 " not in reply.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"bad reply from {host}:{port}: {reply[:80]!r}")
    return elapsed


def wait_answering(host: str, port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request(host, port)
            return
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise SystemExit(f"{host}:{port} did not answer within {timeout:.0f} s")
            time.sleep(0.2)


def summary(values: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3),
        "p90_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.9))], 3),
        "n": len(ms),
    }


def container_ip(name: str) -> str:
    doc = json.loads(vmshim("network", "inspect", "bridge"))[0]
    for entry in doc["Containers"].values():
        if entry["Name"] == name:
            return entry["IPv4Address"].split("/")[0]
    raise SystemExit(f"container {name} has no address on the default network")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="per subject (default 200)")
    parser.add_argument("--isolation", action="append", choices=["vm", "process"], help="default: both")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--in-this-namespace", action="store_true", help="run here although no namespace of our own is known"
    )
    args = parser.parse_args()
    ours = "1" in (os.environ.get("VMSHIM_PRIVATE_NETNS"), os.environ.get("VMSHIM_TEST_PRIVATE_LIBVIRTD"))
    if not ours and not args.in_this_namespace:
        raise SystemExit(
            "benchmarks/network.py makes a bridge and NAT rules: run it through "
            "scripts/lib/in-netns (or pass --in-this-namespace)"
        )
    isolations = args.isolation or ["vm", "process"]

    from shim.vm.accel import detect_accel

    accel = detect_accel().kind
    www = Path(tempfile.mkdtemp(prefix="vmshim-netbench-"))
    (www / "index.html").write_text("hello\n")
    base_port = free_port()
    baseline = subprocess.Popen([BUSYBOX, "httpd", "-f", "-p", f"127.0.0.1:{base_port}", "-h", str(www)])
    names = []
    subjects: dict[str, tuple[str, int]] = {"host loopback (baseline)": ("127.0.0.1", base_port)}
    try:
        wait_answering("127.0.0.1", base_port)
        for isolation in isolations:
            name = f"netbench-{isolation}-{os.getpid()}"
            port = free_port()
            names.append(name)
            vmshim(
                "run",
                "-d",
                "--name",
                name,
                "--isolation",
                isolation,
                "-p",
                f"127.0.0.1:{port}:8080",
                "busybox",
                "sh",
                "-c",
                HTTPD,
            )
            wait_answering("127.0.0.1", port)
            subjects[f"{isolation}: -p 127.0.0.1:{port}:8080"] = ("127.0.0.1", port)
            ip = container_ip(name)
            wait_answering(ip, 8080)
            subjects[f"{isolation}: container address {ip}:8080"] = (ip, 8080)
        for host, port in subjects.values():  # warm-up: ARP, conntrack, page cache
            for _ in range(10):
                request(host, port)
        samples: dict[str, list[float]] = {label: [] for label in subjects}
        for _ in range(args.requests):
            for label, (host, port) in subjects.items():
                samples[label].append(request(host, port))
    finally:
        for name in names:
            subprocess.run(VMSHIM + ["rm", "-f", name], check=False, capture_output=True, cwd=HERE.parent)
        baseline.kill()
        baseline.wait()

    results = {label: summary(values) for label, values in samples.items()}
    base = results["host loopback (baseline)"]["median_ms"]
    width = max(len(label) for label in results)
    print(f"published-port latency, {args.requests} requests per subject, accel {accel}")
    print(f"{'subject'.ljust(width)}   median    min      max      p90     x baseline")
    for label, r in results.items():
        print(
            f"{label.ljust(width)}   {r['median_ms']:6.3f}   {r['min_ms']:6.3f}   "
            f"{r['max_ms']:6.3f}   {r['p90_ms']:6.3f}   {r['median_ms'] / base:5.1f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"accel": accel, "requests": args.requests, "results": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
