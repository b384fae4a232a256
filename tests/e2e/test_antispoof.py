"""Containers on a bridge network cannot spoof each other's addresses: a container that
takes another IP or another MAC address reaches nobody with it (the bridge port's
nftables rules, ``table bridge vmshim``). Runs inside the test run's own network
namespace only (scripts/test); every address here lives in a network made by the test."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.conftest import ok, vmshim

SUFFIX = str(os.getpid())

pytestmark = pytest.mark.skipif(
    "1" not in (os.environ.get("VMSHIM_TEST_PRIVATE_LIBVIRTD"), os.environ.get("VMSHIM_PRIVATE_NETNS"))
    or os.geteuid() != 0,
    reason="runs as root inside the test run's own network namespace (scripts/test)",
)


def _net_admin_flags() -> list[str]:
    """The attacker needs CAP_NET_ADMIN to change its addresses: ask for it where the CLI
    knows --cap-add (containers are unprivileged by default there)."""
    helptext = vmshim("run", "--help").stdout.decode(errors="replace")
    return ["--cap-add", "NET_ADMIN"] if "--cap-add" in helptext else []


@pytest.fixture
def network():
    name = f"spoof{SUFFIX}"
    ok("network", "create", "--subnet", "10.93.0.0/24", name)
    made = []
    yield name, made
    for c in made:
        vmshim("rm", "-f", c)
    vmshim("network", "rm", name)


ATTACK = """
set -u
get() {{ timeout 4 wget -q -O - http://{server}:8080/ 2>/dev/null || echo unreachable; }}
me=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}')
mac=$(cat /sys/class/net/eth0/address)
timeout 30 sh -c 'until wget -q -O /dev/null http://{server}:8080/; do sleep 0.2; done'
echo "control: $(get)"
ip addr del $me dev eth0 && ip addr add {stolen}/24 dev eth0
arping -U -c 1 -I eth0 {stolen} >/dev/null 2>&1
echo "other ip: $(get)"
ip addr del {stolen}/24 dev eth0 && ip addr add $me dev eth0
ip route add default via {gateway} 2>/dev/null
timeout 30 sh -c 'until wget -q -O /dev/null http://{server}:8080/; do sleep 0.2; done'
echo "own ip again: $(get)"
ip link set eth0 down && ip link set eth0 address 02:42:de:ad:be:ef && ip link set eth0 up
ip route add default via {gateway} 2>/dev/null
arping -U -c 1 -I eth0 ${{me%/*}} >/dev/null 2>&1
echo "other mac: $(get)"
"""


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=pytest.mark.vm), "process"])
def test_a_container_cannot_use_another_address(network, isolation):
    name, made = network
    server = f"spoofsrv{SUFFIX}"
    made.append(server)
    ok(
        "run",
        "-d",
        "--name",
        server,
        "--isolation",
        "process",
        "--network",
        name,
        "busybox",
        "sh",
        "-c",
        "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
    )
    ipam = json.loads(ok("network", "inspect", name))[0]["IPAM"]["Config"][0]
    taken = json.loads(ok("inspect", server))[0]["NetworkSettings"]["Networks"][name]
    stolen = "10.93.0.200"  # in the subnet the fixture asked for, and nobody's
    assert ipam["Subnet"] == "10.93.0.0/24" and stolen != taken["IPAddress"]
    script = ATTACK.format(server=server, stolen=stolen, gateway=ipam["Gateway"])
    proc = vmshim(
        "run",
        "--rm",
        "--isolation",
        isolation,
        "--network",
        name,
        *_net_admin_flags(),
        "busybox",
        "sh",
        "-c",
        script,
        timeout=600,
    )
    lines = dict(line.split(": ", 1) for line in proc.stdout.decode(errors="replace").splitlines() if ": " in line)
    assert lines.get("control") == "hello", proc.stdout + proc.stderr
    assert lines.get("other ip") == "unreachable", proc.stdout + proc.stderr
    assert lines.get("own ip again") == "hello", proc.stdout + proc.stderr
    assert lines.get("other mac") == "unreachable", proc.stdout + proc.stderr


def test_the_rules_come_and_go_with_the_container(network):
    import subprocess

    name, made = network
    box = f"spoofbox{SUFFIX}"
    made.append(box)
    ok("run", "-d", "--name", box, "--isolation", "process", "--network", name, "busybox", "sleep", "600")
    rules = subprocess.run(
        ["nft", "list", "chain", "bridge", "vmshim", "antispoof"], capture_output=True, text=True
    ).stdout
    assert "vmshim-port:" in rules and "ether saddr !=" in rules
    ok("rm", "-f", box)
    rules = subprocess.run(
        ["nft", "list", "chain", "bridge", "vmshim", "antispoof"], capture_output=True, text=True
    ).stdout
    assert "vmshim-port:" not in rules


ATTACK6 = """
set -u
get() {{ timeout 4 wget -q -O - http://[{server6}]:8080/ 2>/dev/null || echo unreachable; }}
me=$(ip -6 -o addr show dev eth0 scope global | awk '{{print $4}}')
timeout 30 sh -c 'until wget -q -O /dev/null http://[{server6}]:8080/; do sleep 0.2; done'
echo "control6: $(get)"
ip -6 addr add {stolen6}/64 dev eth0
timeout 10 sh -c 'while ip -6 addr show dev eth0 | grep -q tentative; do sleep 0.1; done'
ip -6 addr del $me dev eth0
echo "addresses: $(ip -6 -o addr show dev eth0 scope global | awk '{{print $4}}')"
echo "other ip6: $(get)"
"""


def test_a_container_cannot_use_another_ipv6_address():
    """The same for IPv6 on a dual-stack network (process isolation: the bridge port's
    rules are the same for a VM's tap)."""
    name = f"spoof6{SUFFIX}"
    ok("network", "create", "--ipv6", "--subnet", "10.96.0.0/24", "--subnet", "fd00:96::/64", name)
    server = f"spoof6srv{SUFFIX}"
    try:
        ok(
            "run",
            "-d",
            "--name",
            server,
            "--isolation",
            "process",
            "--network",
            name,
            "busybox",
            "sh",
            "-c",
            "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
        )
        import json

        server6 = json.loads(ok("inspect", server))[0]["NetworkSettings"]["Networks"][name]["GlobalIPv6Address"]
        proc = vmshim(
            "run",
            "--rm",
            "--isolation",
            "process",
            "--network",
            name,
            *_net_admin_flags(),
            "busybox",
            "sh",
            "-c",
            ATTACK6.format(server6=server6, stolen6="fd00:96::c8"),
            timeout=600,
        )
        lines = dict(line.split(": ", 1) for line in proc.stdout.decode(errors="replace").splitlines() if ": " in line)
        assert lines.get("control6") == "hello", proc.stdout + proc.stderr
        assert lines.get("addresses") == "fd00:96::c8/64", proc.stdout + proc.stderr
        assert lines.get("other ip6") == "unreachable", proc.stdout + proc.stderr
    finally:
        vmshim("rm", "-f", server)
        vmshim("network", "rm", name)
