"""Name resolution on user-defined networks: one dnsmasq per network, on its gateway.

Containers on a user network get ``nameserver <gateway>`` in their resolv.conf. The
network's dnsmasq answers their names (container name, ``--network-alias``es, short id)
from a hosts directory with one file per container, which dnsmasq watches with inotify
(``--hostsdir``): a container that starts or stops is seen at once, no signal, no
restart, nothing to push into running VMs. Names with a dot go to the host's resolvers
(dnsmasq reads the host's /etc/resolv.conf); names without one are never forwarded
(``--domain-needed``), so a typo does not leave the host.

Why dnsmasq rather than /etc/hosts entries or a resolver of our own: hosts files are
written at boot, and updating them in running VMs needs a guest round trip per peer per
change; a resolver of our own would be a daemon to write and keep running anyway.
dnsmasq is small (~1 MiB), already on these hosts (libvirt uses it) and does exactly
this. Docker's embedded DNS and podman's aardvark-dns play the same part.

Run state: ``paths.run_dir()/networks/<name>/`` holds ``hosts/`` and, per network
namespace (the same network can be live in several, e.g. parallel test runs),
``dnsmasq-<netns>.pid`` and ``.log``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from shim import paths
from shim.errors import NetworkError
from shim.network.store import Endpoint, Network, netns_key

DNSMASQ = "dnsmasq"
START_TIMEOUT = 5.0


def state_dir(net: Network) -> Path:
    return paths.run_dir() / "networks" / net.name


def hosts_dir(net: Network) -> Path:
    return state_dir(net) / "hosts"


def _pid_file(net: Network, netns: str) -> Path:
    return state_dir(net) / f"dnsmasq-{netns.replace(':', '-')}.pid"


def running_pid(net: Network, netns: str | None = None) -> int | None:
    """The pid of the network's dnsmasq in namespace *netns* (default: ours), if it runs."""
    netns = netns or netns_key()
    try:
        pid = int(_pid_file(net, netns).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "dnsmasq":
                return None
        if netns_key(pid) != netns:
            return None
    except OSError:
        return None
    return pid


def ensure(net: Network) -> None:
    """Start the network's dnsmasq in this namespace unless it runs. Precondition: the
    bridge is up with the gateway address. Raises NetworkError."""
    if running_pid(net) is not None:
        return
    if shutil.which(DNSMASQ) is None:
        raise NetworkError("dnsmasq is not installed (it resolves container names on user networks); run scripts/setup")
    hosts = hosts_dir(net)
    hosts.mkdir(parents=True, exist_ok=True)
    os.chmod(hosts, 0o755)
    netns = netns_key()
    pid_file = _pid_file(net, netns)
    pid_file.unlink(missing_ok=True)
    log = pid_file.with_suffix(".log")
    args = [
        DNSMASQ,
        "--conf-file=/dev/null",
        f"--pid-file={pid_file}",
        f"--listen-address={net.gateway}",
        "--bind-interfaces",
        "--port=53",
        "--no-hosts",
        f"--hostsdir={hosts}",
        "--domain-needed",
        "--bogus-priv",
        "--no-negcache",
        "--local-ttl=0",
        f"--log-facility={log}",
    ]
    if not _has_upstream():
        args.append("--no-resolv")
    proc = subprocess.run(args, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise NetworkError(
            f"cannot start dnsmasq for network {net.name} on {net.gateway}: {proc.stderr.strip() or proc.returncode}"
        )
    deadline = time.monotonic() + START_TIMEOUT
    while running_pid(net, netns) is None:
        if time.monotonic() > deadline:
            raise NetworkError(f"dnsmasq for network {net.name} did not start; see {log}")
        time.sleep(0.01)


def stop(net: Network, netns: str | None = None) -> None:
    """Stop the network's dnsmasq in namespace *netns* (default: ours). Idempotent."""
    netns = netns or netns_key()
    pid = running_pid(net, netns)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 2.0
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    pid_file = _pid_file(net, netns)
    pid_file.unlink(missing_ok=True)
    pid_file.with_suffix(".log").unlink(missing_ok=True)


def remove_state(net: Network) -> None:
    """Remove the network's run directory (when the network itself is removed)."""
    shutil.rmtree(state_dir(net), ignore_errors=True)


def add(net: Network, endpoint: Endpoint) -> None:
    """Publish *endpoint*'s names on *net* (atomically replaces an earlier entry)."""
    hosts = hosts_dir(net)
    hosts.mkdir(parents=True, exist_ok=True)
    path = hosts / endpoint.container_id
    tmp = hosts / f".{endpoint.container_id}.tmp"
    names = " ".join(endpoint.names())
    # An IPv6 line too on a dual-stack network: dnsmasq answers AAAA queries from it.
    tmp.write_text(f"{endpoint.ip}\t{names}\n" + (f"{endpoint.ip6}\t{names}\n" if endpoint.ip6 else ""))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remove(net: Network, container_id: str) -> None:
    (hosts_dir(net) / container_id).unlink(missing_ok=True)


def resolv_conf(
    net: Network, *, servers: Sequence[str] = (), search: Sequence[str] = (), options: Sequence[str] = ()
) -> str:
    """resolv.conf for a container whose first network is *net* (with DNS): the
    network's resolver first, then ``--dns`` servers."""
    lines = [f"nameserver {net.gateway}"] + [f"nameserver {s}" for s in servers if s != net.gateway]
    if search:
        lines.append("search " + " ".join(search))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def _host_resolv_lines() -> list[str] | None:
    """The host's /etc/resolv.conf, line by line; None when unreadable."""
    try:
        return Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return None


def host_resolv_conf() -> str:
    """The host's resolv.conf without loopback resolvers (unreachable from a container)."""
    lines = _host_resolv_lines()
    if lines is None:
        return ""
    keep = [ln for ln in lines if not (ln.startswith("nameserver") and (" 127." in ln or " ::1" in ln))]
    return "\n".join(keep) + "\n"


def _has_upstream() -> bool:
    return any(line.split()[:1] == ["nameserver"] for line in _host_resolv_lines() or [])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours would still answer; dnsmasq daemonizes, so it is not our child
    return True
