"""Networking as a user sees it: ``--network none``, the default NAT network with ``-p``
and outbound access, user networks with names, ``--network host``, and the ``network``
verbs, in both isolations. VM boots are marked ``vm`` and kept few.

Network rule: everything here talks only to 127.0.0.0/8 or to addresses inside network
namespaces the test run made. So the module refuses to run in the host's initial network
namespace (scripts/test runs the suite in a namespace of its own, where the bridges, NAT
rules and container addresses made here live), and "the internet" is a namespace this
module creates (198.51.100.1, TEST-NET-2, reached over a veth).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.e2e.conftest import err, http_get, ok, out, server_in_own_netns, vmshim, wait_no_new_domains

vm = pytest.mark.vm
ISOLATIONS = [pytest.param("vm", marks=vm), "process"]
SUFFIX = str(os.getpid())
INTERNET_IP = "198.51.100.1"
INTERNET_PEER_IP = "198.51.100.2"
INTERNET_PORT = 18099


def _in_a_namespace_of_our_own() -> bool:
    """scripts/lib/test-in-namespace (scripts/test) and scripts/lib/in-netns say so."""
    return "1" in (os.environ.get("VMSHIM_TEST_PRIVATE_LIBVIRTD"), os.environ.get("VMSHIM_PRIVATE_NETNS"))


pytestmark = pytest.mark.skipif(
    not _in_a_namespace_of_our_own() or os.geteuid() != 0,
    reason="networking tests run as root inside the test run's own network namespace "
    "(scripts/test); they create bridges and NAT rules",
)


HTTPD = "mkdir -p /www && echo hello-from-{name} > /www/index.html && exec httpd -f -p 8080 -h /www"


@pytest.fixture
def cleanup():
    """Names of containers and networks to remove after the test, whatever happened."""
    made = {"containers": [], "networks": []}
    yield made
    for name in made["containers"]:
        vmshim("rm", "-f", name)
    for name in made["networks"]:
        vmshim("network", "rm", name)


@pytest.fixture
def user_network(cleanup):
    name = f"tnet{SUFFIX}"
    ok("network", "create", name)
    cleanup["networks"].append(name)
    return name


@pytest.fixture
def internet():
    """A namespace standing in for the internet: an HTTP server on INTERNET_IP that
    answers with the address it sees the client at. The test namespace reaches it over a
    veth (INTERNET_PEER_IP here), so NAT'ed container traffic arrives from that address."""
    server = textwrap.dedent(f"""
        import http.server
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = self.client_address[0].encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("0.0.0.0", {INTERNET_PORT}), H).serve_forever()
    """)
    with server_in_own_netns([sys.executable, "-c", server], f"vmsinet{SUFFIX[-6:]}", INTERNET_IP, INTERNET_PEER_IP):
        yield f"http://{INTERNET_IP}:{INTERNET_PORT}/"


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on this namespace's 127.0.0.1 (the "host" of --network host)."""
    (tmp_path / "index.html").write_text("hello-from-the-host\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        http_get(f"http://127.0.0.1:{port}/", timeout=10)
        yield port
    finally:
        proc.kill()
        proc.wait()


def published_rules() -> str:
    proc = subprocess.run(
        ["nft", "list", "chain", "ip", "vmshim", "publish"], check=False, capture_output=True, text=True
    )
    return proc.stdout


# ---- --network none ----------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_network_none_has_only_lo(isolation, domains_before):
    text = ok(
        "run",
        "--rm",
        "--isolation",
        isolation,
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "ls /sys/class/net; ip route | wc -l",
    )
    *links, routes = text.split()
    assert links == ["lo"]
    assert routes == "0"
    assert not wait_no_new_domains(domains_before)


# ---- the default network: -p and NAT -----------------------------------------------------


@pytest.mark.parametrize("isolation, port", [pytest.param("vm", 18080, marks=vm), ("process", 18081)])
def test_published_port_reaches_httpd_and_nat_goes_out(isolation, port, cleanup, internet, domains_before):
    name = f"web-{isolation}-{SUFFIX}"
    cleanup["containers"].append(name)
    ok(
        "run",
        "-d",
        "--name",
        name,
        "--isolation",
        isolation,
        "-p",
        f"127.0.0.1:{port}:8080",
        "--hostname",
        "webhost",
        "--add-host",
        "db:192.0.2.7",
        "--add-host",
        "gw:host-gateway",
        "--mac-address",
        "02:42:ac:11:00:99",
        "busybox",
        "sh",
        "-c",
        HTTPD.format(name=name),
    )
    assert http_get(f"http://127.0.0.1:{port}/") == f"hello-from-{name}\n"
    assert ok("port", name).strip() == f"8080/tcp -> 127.0.0.1:{port}"
    assert ok("port", name, "8080").strip() == f"127.0.0.1:{port}"

    probe = ok(
        "exec",
        name,
        "sh",
        "-c",
        "hostname; cat /sys/class/net/eth0/address; grep -E 'db|gw|webhost' /etc/hosts; "
        f"timeout 20 wget -q -O - {internet}",
    )
    hostname, mac, *hosts, seen_as = probe.splitlines()
    bridge = json.loads(ok("network", "inspect", "bridge"))[0]
    gateway = bridge["IPAM"]["Config"][0]["Gateway"]
    assert gateway
    assert hostname == "webhost"
    assert mac == "02:42:ac:11:00:99"
    assert [h.split()[1] for h in hosts] == ["webhost", "db", "gw"]
    assert [h.split()[0] for h in hosts[1:]] == ["192.0.2.7", gateway]  # host-gateway
    # The container's own address never leaves the host: the internet sees the host's.
    assert seen_as == INTERNET_PEER_IP

    inspect = json.loads(ok("network", "inspect", "bridge"))[0]
    mine = [c for c in inspect["Containers"].values() if c["Name"] == name]
    assert mine and mine[0]["Ports"] == [f"127.0.0.1:{port}->8080/tcp"]
    assert mine[0]["MacAddress"] == "02:42:ac:11:00:99"
    settings = json.loads(ok("inspect", name))[0]["NetworkSettings"]
    assert settings["IPAddress"] == mine[0]["IPv4Address"].split("/")[0]
    assert settings["Gateway"] == gateway
    assert settings["Ports"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}

    ok("rm", "-f", name)
    assert f"dport {port} " not in published_rules()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    inspect = json.loads(ok("network", "inspect", "bridge"))[0]
    assert not [c for c in inspect["Containers"].values() if c["Name"] == name]
    assert not wait_no_new_domains(domains_before)


def test_publish_all_exposed_ports_and_udp(cleanup):
    name = f"pall-{SUFFIX}"
    cleanup["containers"].append(name)
    ok(
        "run",
        "-d",
        "--name",
        name,
        "--isolation",
        "process",
        "-P",
        "--expose",
        "8080",
        "-p",
        "127.0.0.1::5353/udp",
        "busybox",
        "sh",
        "-c",
        HTTPD.format(name=name),
    )
    host = ok("port", name, "8080").strip()
    assert host.startswith("0.0.0.0:")
    assert http_get(f"http://127.0.0.1:{host.split(':')[1]}/") == f"hello-from-{name}\n"
    udp = ok("port", name, "5353/udp").strip()
    assert udp.startswith("127.0.0.1:") and int(udp.split(":")[1]) > 0


def test_second_container_cannot_take_a_published_port(cleanup):
    first, second = f"p1-{SUFFIX}", f"p2-{SUFFIX}"
    cleanup["containers"] += [first, second]
    ok("run", "-d", "--name", first, "--isolation", "process", "-p", "127.0.0.1:18082:8080", "busybox", "sleep", "60")
    proc = vmshim("run", "-d", "--name", second, "--isolation", "process", "-p", "18082:80", "busybox", "sleep", "60")
    assert proc.returncode != 0
    assert "18082" in err(proc) and "already published" in err(proc)


def test_dns_flags_reach_resolv_conf():
    text = ok(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--dns",
        "192.0.2.53",
        "--dns-search",
        "example.test",
        "--dns-option",
        "ndots:2",
        "busybox",
        "cat",
        "/etc/resolv.conf",
    )
    assert text.splitlines() == ["nameserver 192.0.2.53", "search example.test", "options ndots:2"]


# ---- user networks -------------------------------------------------------------------------


@vm
def test_vm_containers_on_a_user_network_reach_each_other_by_name(user_network, cleanup, domains_before):
    server = f"srv-{SUFFIX}"
    cleanup["containers"].append(server)
    ok(
        "run",
        "-d",
        "--name",
        server,
        "--network",
        user_network,
        "--network-alias",
        "www",
        "busybox",
        "sh",
        "-c",
        HTTPD.format(name=server),
    )
    fetch = f'for n in {server} www; do timeout 30 sh -c "until wget -q -O - http://$n:8080/; do sleep 0.2; done"; done'
    # A VM client, and a process client on the same network (one bridge serves both).
    expected = f"hello-from-{server}\nhello-from-{server}\n"
    assert ok("run", "--rm", "--network", user_network, "busybox", "sh", "-c", fetch) == expected
    assert (
        ok("run", "--rm", "--isolation", "process", "--network", user_network, "busybox", "sh", "-c", fetch) == expected
    )

    doc = json.loads(ok("network", "inspect", user_network))[0]
    names = {c["Name"]: c for c in doc["Containers"].values()}
    assert names[server]["Aliases"] == ["www"] and names[server]["Isolation"] == "vm"
    proc = vmshim("network", "rm", user_network)
    assert proc.returncode != 0 and "containers attached" in err(proc) and server in err(proc)
    ok("rm", "-f", server)
    assert not wait_no_new_domains(domains_before)


def test_process_containers_on_a_user_network_and_connect(user_network, cleanup):
    other = f"tnet2{SUFFIX}"
    ok("network", "create", other)
    cleanup["networks"].append(other)
    server = f"psrv-{SUFFIX}"
    cleanup["containers"].append(server)
    ok(
        "run",
        "-d",
        "--name",
        server,
        "--isolation",
        "process",
        "--network",
        user_network,
        "busybox",
        "sh",
        "-c",
        HTTPD.format(name=server),
    )
    get = f"timeout 10 sh -c 'until wget -q -O - http://{server}:8080/; do sleep 0.2; done'"
    assert (
        ok("run", "--rm", "--isolation", "process", "--network", user_network, "busybox", "sh", "-c", get)
        == f"hello-from-{server}\n"
    )
    # From another network it is neither resolvable nor reachable (by its real address).
    address = json.loads(ok("inspect", server))[0]["NetworkSettings"]["Networks"][user_network]["IPAddress"]
    assert address
    proc = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        other,
        "busybox",
        "sh",
        "-c",
        f"nslookup {server} >/dev/null 2>&1 && echo resolved; "
        f"timeout 3 wget -q -O - http://{address}:8080/ || echo unreachable",
    )
    assert "resolved" not in out(proc) and "unreachable" in out(proc)
    # network connect: now it is on both.
    ok("network", "connect", "--alias", "api", other, server)
    assert (
        ok(
            "run",
            "--rm",
            "--isolation",
            "process",
            "--network",
            other,
            "busybox",
            "sh",
            "-c",
            get.replace(f"//{server}:", "//api:"),
        )
        == f"hello-from-{server}\n"
    )
    assert server in [c["Name"] for c in json.loads(ok("network", "inspect", other))[0]["Containers"].values()]
    ok("network", "disconnect", other, server)
    assert server not in [c["Name"] for c in json.loads(ok("network", "inspect", other))[0]["Containers"].values()]
    assert "eth1" not in ok("exec", server, "ls", "/sys/class/net")


@vm
def test_network_connect_hot_plugs_a_nic_into_a_running_vm_and_disconnect_unplugs_it(
    user_network, cleanup, domains_before
):
    """One VM: it runs on *user_network*, gets a second network while it runs (a NIC
    plugged into it, configured by its agent) and is reached there by name from a
    process container; disconnect takes the NIC out again (bounded: ~5 s here)."""
    other = f"thot{SUFFIX}"
    ok("network", "create", other)
    cleanup["networks"].append(other)
    server = f"hsrv-{SUFFIX}"
    cleanup["containers"].append(server)
    ok("run", "-d", "--name", server, "--network", user_network, "busybox", "sh", "-c", HTTPD.format(name=server))
    assert ok("exec", server, "ls", "/sys/class/net").split() == ["eth0", "lo"]
    started = time.monotonic()
    ok("network", "connect", "--alias", "hot", other, server)
    plugged = time.monotonic() - started
    nics = ok("exec", server, "ls", "/sys/class/net").split()
    assert len(nics) == 3, nics
    settings = json.loads(ok("inspect", server))[0]["NetworkSettings"]["Networks"]
    address = settings[other]["IPAddress"]
    subnet = json.loads(ok("network", "inspect", other))[0]["IPAM"]["Config"][0]["Subnet"]
    assert address.startswith(subnet.rsplit(".", 1)[0] + ".")
    assert address in ok("exec", server, "ip", "-4", "-o", "addr", "show")
    # The default route stays the first network's, as at boot.
    routes = ok("exec", server, "ip", "route").splitlines()
    assert [r.split()[2] for r in routes if r.startswith("default")] == [settings[user_network]["Gateway"]], routes
    get = "timeout 60 sh -c 'until wget -q -O - http://{}:8080/; do sleep 0.2; done'"
    for name in (server, "hot"):
        assert (
            ok("run", "--rm", "--isolation", "process", "--network", other, "busybox", "sh", "-c", get.format(name))
            == f"hello-from-{server}\n"
        )
    started = time.monotonic()
    ok("network", "disconnect", other, server)
    unplugged = time.monotonic() - started
    print(f"network connect took {plugged:.1f} s, disconnect {unplugged:.1f} s")
    assert unplugged < 25
    assert ok("exec", server, "ls", "/sys/class/net").split() == ["eth0", "lo"]
    assert server not in [c["Name"] for c in json.loads(ok("network", "inspect", other))[0]["Containers"].values()]
    proc = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        other,
        "busybox",
        "sh",
        "-c",
        f"timeout 3 wget -q -O - http://{address}:8080/ || echo unreachable",
    )
    assert "unreachable" in out(proc)
    # Connected again, at the next start too (the record keeps it), and gone with rm.
    ok("network", "connect", other, server)
    assert len(ok("exec", server, "ls", "/sys/class/net").split()) == 3
    ok("rm", "-f", server)
    assert not wait_no_new_domains(domains_before)


@vm
def test_a_vm_on_an_ipv6_network_is_reached_over_ipv6_by_name(cleanup, domains_before):
    """Dual stack: the VM's agent gives its NIC the IPv6 address, the network's dnsmasq
    answers AAAA for its name, and a process container reaches it over IPv6."""
    net = f"tsix{SUFFIX}"
    subnet6 = f"fd00:89:{int(SUFFIX) % 65536:x}::/64"
    ok("network", "create", "--ipv6", "--subnet", subnet6, net)
    cleanup["networks"].append(net)
    doc = json.loads(ok("network", "inspect", net))[0]
    assert doc["EnableIPv6"] is True
    assert [c["Subnet"] for c in doc["IPAM"]["Config"]][1:] == [subnet6]
    server = f"six-{SUFFIX}"
    cleanup["containers"].append(server)
    ok("run", "-d", "--name", server, "--network", net, "busybox", "sh", "-c", HTTPD.format(name=server))
    settings = json.loads(ok("inspect", server))[0]["NetworkSettings"]["Networks"][net]
    address6 = settings["GlobalIPv6Address"]
    assert address6.startswith(subnet6.split("::")[0] + "::")
    assert settings["GlobalIPv6PrefixLen"] == 64
    members = json.loads(ok("network", "inspect", net))[0]["Containers"].values()
    assert [c["IPv6Address"] for c in members] == [f"{address6}/64"]
    script = (
        f"timeout 60 sh -c 'until ping -6 -c 1 -W 2 {server} >/dev/null; do sleep 0.2; "
        f"done' && echo ping6-ok; nslookup -type=aaaa {server} | grep -o '{address6}'; "
        f"timeout 30 sh -c 'until wget -q -O - http://[{address6}]:8080/; "
        f"do sleep 0.2; done'"
    )
    text = ok("run", "--rm", "--isolation", "process", "--network", net, "busybox", "sh", "-c", script)
    assert text.splitlines() == ["ping6-ok", address6, f"hello-from-{server}"], text
    assert f"{address6}/64" in ok("exec", server, "ip", "-6", "-o", "addr", "show")
    ok("rm", "-f", server)
    assert not wait_no_new_domains(domains_before)


def test_internal_network_has_no_way_out(cleanup, internet):
    name = f"tint{SUFFIX}"
    ok("network", "create", "--internal", name)
    cleanup["networks"].append(name)
    text = ok(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        name,
        "busybox",
        "sh",
        "-c",
        f"ip route | grep -c default; timeout 3 wget -q -O - {internet} || echo no-way-out",
    )
    assert text.split() == ["0", "no-way-out"]


# ---- --network host ------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_network_host_reaches_the_hosts_loopback(isolation, loopback_server, domains_before):
    host = "host.vmshim.internal" if isolation == "vm" else "127.0.0.1"
    text = ok(
        "run",
        "--rm",
        "--isolation",
        isolation,
        "--network",
        "host",
        "busybox",
        "sh",
        "-c",
        f"timeout 30 wget -q -O - http://{host}:{loopback_server}/",
    )
    assert text == "hello-from-the-host\n"
    assert not wait_no_new_domains(domains_before)


def test_network_host_in_process_isolation_is_the_hosts_stack():
    text = ok("run", "--rm", "--isolation", "process", "--network", "host", "busybox", "ls", "/sys/class/net")
    here = sorted(os.listdir("/sys/class/net"))
    assert sorted(text.split()) == here


# ---- errors are one clear line -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--rm", "--network", "nosuchnet", "busybox", "true"], "not found"),
        (["run", "--rm", "-p", "99999:80", "busybox", "true"], "ports are 1-65535"),
        (["run", "--rm", "--network", "none", "-p", "80", "busybox", "true"], "no effect"),
        (["run", "--rm", "--network-alias", "x", "busybox", "true"], "user-defined network"),
        (["network", "rm", "bridge"], "cannot be removed"),
        (["network", "create", "host"], "reserved"),
        (["network", "inspect", "nosuchnet"], "not found"),
    ],
)
def test_errors_are_one_clear_line(args, message):
    proc = vmshim(*args)
    assert proc.returncode != 0
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err(proc)
    assert "Traceback" not in err(proc)


def test_network_ls_and_prune(cleanup):
    name = f"tprune{SUFFIX}"
    ok("network", "create", "--label", "purpose=test", name)
    cleanup["networks"].append(name)
    listed = ok("network", "ls")
    assert name in listed and "bridge" in listed and "none" in listed
    doc = json.loads(ok("network", "inspect", name))[0]
    assert doc["Labels"] == {"purpose": "test"} and doc["Vmshim"]["BridgeUp"]
    assert doc["Vmshim"]["DnsPid"] > 0
    pruned = ok("network", "prune", "-f")
    assert name in pruned.split()
    assert name not in ok("network", "ls")
    assert "bridge" in ok("network", "ls")
