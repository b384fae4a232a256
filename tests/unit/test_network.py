"""Networking without touching the host's network: port specs, the network store and
its IPAM, request parsing, what a container's /etc files and boot config say, the guest
side's validation and struct packing, and the nftables rules as text."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from guest.runtime import network as guest_net
from guest.spec import BootConfig, ProcessSpec, check_network, is_ipv4, is_mac
from shim.errors import NetworkError, NetworkNotFound
from shim.network import firewall
from shim.containers.networking import ContainerNetwork, parse_request
from shim.network.ports import (
    PortMapping,
    assign_host_ports,
    exposed_ports,
    parse_expose,
    parse_publish,
    publish_all,
)
from shim.network.store import (
    DEFAULT_BRIDGE,
    DEFAULT_NETWORK,
    Endpoint,
    Network,
    NetworkStore,
    mac_for,
)


@pytest.fixture(autouse=True)
def own_state_root(tmp_path, monkeypatch):
    """Never the machine's state root (its default-network setting, its networks)."""
    from shim.containers import networking as container

    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("VMSHIM_DEFAULT_NETWORK", raising=False)
    monkeypatch.setattr(container, "HOST_CONFIG_DIR", tmp_path / "etc")


# ---- -p / --expose -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("8080", [PortMapping(container_port=8080)]),
        ("18080:8080", [PortMapping(container_port=8080, host_port=18080)]),
        ("127.0.0.1:18080:8080", [PortMapping(container_port=8080, host_ip="127.0.0.1", host_port=18080)]),
        ("127.0.0.1::8080", [PortMapping(container_port=8080, host_ip="127.0.0.1")]),
        ("53:53/udp", [PortMapping(container_port=53, protocol="udp", host_port=53)]),
        ("80/TCP", [PortMapping(container_port=80)]),
        (
            "9000-9001:8000-8001",
            [PortMapping(container_port=8000, host_port=9000), PortMapping(container_port=8001, host_port=9001)],
        ),
        ("8000-8001", [PortMapping(container_port=8000), PortMapping(container_port=8001)]),
        ("9000-9009:80", [PortMapping(container_port=80, host_range=(9000, 9009))]),
    ],
)
def test_parse_publish(spec, expected):
    assert parse_publish(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "expected"),
        ("0", "ports are 1-65535"),
        ("70000", "ports are 1-65535"),
        ("x:80", "host port"),
        ("80/sctp", "tcp or udp"),
        ("localhost:80:80", "IPv4 address"),
        ("[::1]:80:80", "IPv6"),
        ("9000-9002:8000-8001", "differ in length"),
        ("8001-8000", "before the start"),
    ],
)
def test_parse_publish_errors(spec, message):
    with pytest.raises(NetworkError, match=message):
        parse_publish(spec)


def test_port_mapping_round_trips_and_prints_like_docker():
    p = PortMapping(container_port=8080, host_ip="127.0.0.1", host_port=18080)
    assert PortMapping.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert str(p) == "127.0.0.1:18080->8080/tcp"


def test_clashes():
    any18 = PortMapping(container_port=1, host_port=18080)
    lo18 = PortMapping(container_port=2, host_ip="127.0.0.1", host_port=18080)
    other_ip = PortMapping(container_port=2, host_ip="127.0.0.2", host_port=18080)
    udp18 = PortMapping(container_port=2, host_port=18080, protocol="udp")
    assert any18.clashes_with(lo18) and lo18.clashes_with(any18)
    assert not lo18.clashes_with(other_ip)
    assert not any18.clashes_with(udp18)


def test_expose_and_publish_all():
    config = {"ExposedPorts": {"80/tcp": {}, "53/udp": {}}}
    assert parse_expose("8000-8001/udp") == [(8000, "udp"), (8001, "udp")]
    ports = exposed_ports(config, ["80", "443"])
    assert ports == [(80, "tcp"), (53, "udp"), (443, "tcp")]
    assert [str(p) for p in publish_all(ports)] == ["0.0.0.0:0->80/tcp", "0.0.0.0:0->53/udp", "0.0.0.0:0->443/tcp"]


def test_assign_host_ports_picks_free_ones_and_refuses_taken():
    taken = [PortMapping(container_port=80, host_ip="127.0.0.1", host_port=18081)]
    done = assign_host_ports([PortMapping(container_port=80, host_ip="127.0.0.1")], taken)
    assert done[0].host_port > 0 and done[0].host_ip == "127.0.0.1"
    with pytest.raises(NetworkError, match="already published"):
        assign_host_ports([PortMapping(container_port=1, host_port=18081)], taken)
    ranged = assign_host_ports([PortMapping(container_port=80, host_ip="127.0.0.1", host_range=(18081, 18082))], taken)
    assert ranged[0].host_port == 18082


def test_assign_host_ports_sees_a_listening_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(NetworkError, match="in use on this host"):
            assign_host_ports([PortMapping(container_port=80, host_ip="127.0.0.1", host_port=port)], [])


def test_assign_host_ports_refuses_a_foreign_address():
    with pytest.raises(NetworkError, match="not an address of this host"):
        assign_host_ports([PortMapping(container_port=80, host_ip="192.0.2.1", host_port=18080)], [])


# ---- the store and IPAM ------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    return NetworkStore(tmp_path / "networks")


def _endpoint(cid: str, ip: str, **kw) -> Endpoint:
    return Endpoint(container_id=cid, container_name=kw.pop("name", cid[:6]), ip=ip, mac=mac_for(ip), **kw)


def test_default_network_is_made_on_first_use(store):
    net = store.default()
    assert (net.name, net.subnet, net.gateway, net.bridge) == (
        DEFAULT_NETWORK,
        "10.88.0.0/16",
        "10.88.0.1",
        DEFAULT_BRIDGE,
    )
    assert not net.dns  # like docker's default bridge: no name resolution
    assert store.get("bridge").id == net.id
    assert [n.name for n in store.list()] == ["bridge"]


def test_user_networks_get_successive_subnets(store):
    a = store.create("a")
    b = store.create("b")
    assert (a.subnet, a.gateway) == ("10.89.0.0/24", "10.89.0.1")
    assert b.subnet == "10.89.1.0/24"
    assert a.bridge.startswith("vmsbr") and len(a.bridge) <= 15 and a.bridge != b.bridge
    assert a.dns and not a.internal
    assert store.get(a.id[:8]).name == "a"


def test_subnet_picking_avoids_host_routes(store):
    net = store.create("a", host_routes=["10.89.0.0/23", "10.89.2.0/25"])
    assert net.subnet == "10.89.3.0/24"


def test_explicit_subnet_and_gateway(store):
    net = store.create("a", subnet="192.168.77.0/24", gateway="192.168.77.254", internal=True, labels={"k": "v"})
    assert (net.subnet, net.gateway, net.internal, net.labels) == (
        "192.168.77.0/24",
        "192.168.77.254",
        True,
        {"k": "v"},
    )
    assert net.free_ip() == "192.168.77.1"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "bad name"}, "invalid network name"),
        ({"name": "host"}, "reserved"),
        ({"name": "bridge"}, "reserved"),
        ({"name": "x", "subnet": "10.88.1.0/24"}, "overlaps network bridge"),
        ({"name": "x", "subnet": "nonsense"}, "invalid --subnet"),
        ({"name": "x", "subnet": "10.1.2.0/31"}, "too small"),
        ({"name": "x", "subnet": "10.1.2.0/24", "gateway": "10.1.3.1"}, "not a host address"),
    ],
)
def test_create_errors(store, kwargs, message):
    store.default()
    with pytest.raises(NetworkError, match=message):
        store.create(**kwargs)


def test_duplicate_and_missing(store):
    store.create("a")
    with pytest.raises(NetworkError, match="already exists"):
        store.create("a")
    with pytest.raises(NetworkNotFound, match="'nope' not found"):
        store.get("nope")


def test_ip_allocation_lowest_first_and_requested(store):
    net = store.create("a", subnet="10.9.0.0/29")
    assert net.free_ip() == "10.9.0.2"  # .0 network, .1 gateway
    store.add_endpoint(net, _endpoint("c1" * 32, "10.9.0.2"))
    store.add_endpoint(net, _endpoint("c2" * 32, "10.9.0.3"))
    net = store.get("a")
    assert net.free_ip() == "10.9.0.4"
    assert net.free_ip("10.9.0.6") == "10.9.0.6"
    for bad, message in (
        ("10.9.0.3", "in use"),
        ("10.9.0.7", "not a host address"),
        ("10.9.1.2", "not a host address"),
        ("x", "not an IPv4"),
    ):
        with pytest.raises(NetworkError, match=message):
            net.free_ip(bad)
    store.remove_endpoint("a", "c1" * 32)
    assert store.get("a").free_ip() == "10.9.0.2"  # given back


def test_ip_pool_exhaustion(store):
    net = store.create("a", subnet="10.9.0.0/30")  # one host address after the gateway
    store.add_endpoint(net, _endpoint("c1" * 32, net.free_ip()))
    with pytest.raises(NetworkError, match="no free address"):
        store.get("a").free_ip()


def test_endpoints_round_trip_with_ports(store):
    net = store.create("a")
    port = PortMapping(container_port=80, host_ip="127.0.0.1", host_port=18080)
    ep = _endpoint("ab" * 32, "10.89.0.2", name="web", aliases=["www"], ports=[port], netns="1:2", owner_pid=1)
    store.add_endpoint(net, ep)
    back = store.get("a").endpoints["ab" * 32]
    assert back == ep
    assert back.names() == ["web", "www", "ab" * 6]
    assert store.published_ports("1:2") == [port]
    assert store.published_ports("3:4") == []  # another namespace: no clash
    assert store.find_container("web") == "ab" * 32
    assert store.find_container("abab") == "ab" * 32
    assert [(n.name, e.ip) for n, e in store.endpoints_of("ab" * 32)] == [("a", "10.89.0.2")]


def test_stale_endpoints_are_those_whose_owner_is_gone(store):
    import os
    import subprocess

    from shim.network.store import process_start

    net = store.create("a")
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.add_endpoint(net, _endpoint("d" * 64, "10.89.0.2", owner_pid=dead.pid, owner_start="1"))
    store.add_endpoint(
        net, _endpoint("e" * 64, "10.89.0.3", owner_pid=os.getpid(), owner_start=process_start(os.getpid()))
    )
    assert [e.container_id for _, e in store.stale_endpoints()] == ["d" * 64]


def test_writes_are_atomic_and_locked(store):
    net = store.create("a", subnet="10.9.0.0/24")
    errors = []

    def grab(i):
        try:
            with store.__class__(store.root).locked() as s:
                fresh = s.get("a")
                s.add_endpoint(fresh, _endpoint(f"{i:064x}", fresh.free_ip()))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ips = [e.ip for e in store.get("a").endpoints.values()]
    assert len(ips) == 20 and len(set(ips)) == 20
    assert not list(store.root.glob(".*.tmp"))
    assert net.id == store.get("a").id


def test_mac_from_ip():
    assert mac_for("10.88.0.2") == "02:42:0a:58:00:02"
    assert is_mac(mac_for("255.255.255.255"))


# ---- run flags → request → container files -----------------------------------------------


def test_parse_request_defaults_and_modes():
    assert parse_request().networks == ["bridge"] and parse_request().mode == "bridge"
    assert parse_request(network="none").mode == "none"
    assert parse_request(network="host").mode == "host"
    assert parse_request(network=["a", "b"]).mode == "bridge"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"network": ["none", "a"]}, "cannot be combined"),
        ({"network": ["a", "a"]}, "named twice"),
        ({"network": "container:x"}, "not supported"),
        ({"network": "none", "publish": ["80"]}, "no effect with --network none"),
        ({"network": "host", "publish_all": True}, "no effect with --network host"),
        ({"aliases": ["web"]}, "needs a user-defined network"),
        ({"network": "a", "aliases": ["bad alias"]}, "invalid --network-alias"),
        ({"ip": "10.88.0.9"}, "--ip needs a user-defined network"),
        ({"network": "a", "ip": "nope"}, "invalid --ip"),
        ({"mac": "01:00:00:00:00:01"}, "invalid --mac-address"),
        ({"network": "none", "mac": "02:00:00:00:00:01"}, "no effect"),
        ({"dns_servers": ["x"]}, "invalid --dns"),
        ({"add_hosts": ["nocolon"]}, "invalid --add-host"),
        ({"add_hosts": ["h:999.1.1.1"]}, "not an IP"),
    ],
)
def test_parse_request_errors(kwargs, message):
    with pytest.raises(NetworkError, match=message):
        parse_request(**kwargs)


def _connected(request, nets_eps, isolation="vm") -> ContainerNetwork:
    return ContainerNetwork(container_id="c" * 64, name="web", isolation=isolation, request=request, endpoints=nets_eps)


def _net(name="a", subnet="10.89.0.0/24", gateway="10.89.0.1", **kw) -> Network:
    return Network(name=name, id="f" * 64, subnet=subnet, gateway=gateway, bridge="vmsbr" + name, **kw)


def test_guest_network_and_interfaces():
    default = _net("bridge", "10.88.0.0/16", "10.88.0.1", dns=False)
    user = _net("a")
    cn = _connected(
        parse_request(network=["bridge", "a"]),
        [
            (default, _endpoint("c" * 64, "10.88.0.2", host_ifname="vmtccccccccccc0")),
            (user, _endpoint("c" * 64, "10.89.0.2", host_ifname="vmtccccccccccc1")),
        ],
    )
    assert cn.guest_network() == {
        "interfaces": [
            {"mac": "02:42:0a:58:00:02", "address": "10.88.0.2/16", "gateway": "10.88.0.1"},
            {"mac": "02:42:0a:59:00:02", "address": "10.89.0.2/24"},
        ]
    }
    check_network(cn.guest_network())
    ifaces = cn.domain_interfaces()
    assert [(i.bridge, i.mac, i.tap) for i in ifaces] == [
        ("vmsbrbridge", "02:42:0a:58:00:02", "vmtccccccccccc0"),
        ("vmsbra", "02:42:0a:59:00:02", "vmtccccccccccc1"),
    ]
    assert _connected(parse_request(network="none"), []).guest_network() == {}


def test_internal_network_gets_no_default_route():
    internal = _net("i", internal=True)
    cn = _connected(parse_request(network="i"), [(internal, _endpoint("c" * 64, "10.89.0.2"))])
    assert "gateway" not in cn.guest_network()["interfaces"][0]
    assert cn.gateway() is None


def test_hosts_file_with_add_host():
    req = parse_request(network="a", add_hosts=["db:10.1.2.3", "gw:host-gateway", "v6=[::1]"])
    cn = _connected(req, [(_net("a"), _endpoint("c" * 64, "10.89.0.5"))])
    assert cn.hosts_file("box").splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "10.89.0.5\tbox",
        "10.1.2.3\tdb",
        "10.89.0.1\tgw",
        "::1\tv6",
    ]
    none = _connected(parse_request(network="none"), [])
    assert "127.0.1.1\tbox" in none.hosts_file("box")


def test_resolv_conf():
    host = "search example.org\nnameserver 192.0.2.53\n"
    user = _connected(
        parse_request(network="a", dns_servers=["192.0.2.1"], dns_options=["ndots:2"]),
        [(_net("a"), _endpoint("c" * 64, "10.89.0.5"))],
    )
    assert user.resolv_conf(host) == ("nameserver 10.89.0.1\nnameserver 192.0.2.1\noptions ndots:2\n")
    default = _net("bridge", "10.88.0.0/16", "10.88.0.1", dns=False)
    plain = _connected(parse_request(), [(default, _endpoint("c" * 64, "10.88.0.2"))])
    assert plain.resolv_conf(host) == host
    custom = _connected(
        parse_request(dns_servers=["192.0.2.9"], dns_search=["corp"]), [(default, _endpoint("c" * 64, "10.88.0.2"))]
    )
    assert custom.resolv_conf(host) == "nameserver 192.0.2.9\nsearch corp\n"


# ---- boot config and guest side ----------------------------------------------------------


def _boot(**kw) -> BootConfig:
    return BootConfig(
        container_id="c" * 64, token="t", hostname="h", process=ProcessSpec(args=["true"]), layer_count=1, **kw
    )


def test_boot_config_network_round_trip_and_compat():
    net = {"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.88.0.2/16", "gateway": "10.88.0.1", "mtu": 1400}]}
    boot = _boot(network=net)
    assert BootConfig.from_dict(json.loads(json.dumps(boot.to_dict()))) == boot
    assert "network" not in _boot().to_dict()  # old agents never see the field
    assert BootConfig.from_dict(_boot().to_dict()).network == {}


@pytest.mark.parametrize(
    "network, message",
    [
        ([], "must be an object"),
        ({"interfaces": {}}, "list"),
        ({"extra": 1}, "unknown key"),
        ({"interfaces": [{"mac": "zz:42:0a:58:00:02", "address": "10.0.0.2/8"}]}, "mac"),
        ({"interfaces": [{"mac": "03:42:0a:58:00:02", "address": "10.0.0.2/8"}]}, "mac"),
        ({"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.0.0.2"}]}, "address"),
        ({"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.0.0.256/8"}]}, "address"),
        ({"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.0.0.2/33"}]}, "address"),
        ({"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.0.0.2/8", "gateway": "x"}]}, "gateway"),
        ({"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.0.0.2/8", "mtu": 9}]}, "mtu"),
        ({"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.0.0.2/8", "x": 1}]}, "unknown key"),
        (
            {
                "interfaces": [
                    {"mac": "02:42:0a:58:00:02", "address": "10.0.0.2/8", "gateway": "10.0.0.1"},
                    {"mac": "02:42:0a:58:00:03", "address": "10.0.0.3/8", "gateway": "10.0.0.1"},
                ]
            },
            "only one interface",
        ),
    ],
)
def test_boot_config_network_validation(network, message):
    data = _boot().to_dict()
    data["network"] = network
    with pytest.raises(ValueError, match=message):
        BootConfig.from_dict(data)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("10.0.0.1", True),
        ("0.0.0.0", True),
        ("010.0.0.1", False),
        ("1.2.3", False),
        ("1.2.3.4.5", False),
        ("a.b.c.d", False),
        ("1.2.3.256", False),
        (None, False),
    ],
)
def test_is_ipv4(text, ok):
    assert is_ipv4(text) is ok


def test_guest_struct_layouts():
    assert guest_net.prefix_to_netmask(16) == "255.255.0.0"
    assert guest_net.prefix_to_netmask(32) == "255.255.255.255"
    assert guest_net.prefix_to_netmask(0) == "0.0.0.0"
    req = guest_net._ifreq_addr("eth0", "10.88.0.2")
    assert len(req) == 40 and req[:4] == b"eth0"
    assert req[16:18] == struct.pack("=H", socket.AF_INET)
    assert req[20:24] == socket.inet_aton("10.88.0.2")
    route = guest_net._rtentry_default("10.88.0.1")
    assert len(route) == 120  # sizeof(struct rtentry) on x86_64
    assert route[24 + 4 : 24 + 8] == socket.inet_aton("10.88.0.1")  # rt_gateway.sin_addr


def test_guest_find_interface_by_mac(tmp_path, monkeypatch):
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "02:42:0a:58:00:02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    monkeypatch.setattr(guest_net, "SYS_NET", str(tmp_path))
    assert guest_net.find_interface("02:42:0A:58:00:02") == "eth0"
    with pytest.raises(guest_net.NetworkError, match="found: eth0 02:42"):
        guest_net.find_interface("02:42:0a:58:00:09", timeout=0.01)


# ---- nftables rules as text --------------------------------------------------------------


def test_network_rules_nat_and_isolation():
    text = firewall.network_rules("a", "vmsbra", "10.89.0.0/24", internal=False)
    assert 'ip saddr 10.89.0.0/24 oifname != "vmsbra" masquerade comment "vmshim-net:a"' in text
    assert 'ip saddr 127.0.0.0/8 oifname "vmsbra" masquerade' in text
    assert "oifname @bridges drop" in text
    internal = firewall.network_rules("i", "vmsbri", "10.89.1.0/24", internal=True)
    assert 'oifname != "vmsbri" masquerade' not in internal
    assert 'iifname "vmsbri" oifname != "vmsbri" drop' in internal


def test_port_rules():
    text = firewall.port_rules(
        "ab" * 32,
        "10.88.0.2",
        [
            PortMapping(container_port=8080, host_ip="127.0.0.1", host_port=18080),
            PortMapping(container_port=53, protocol="udp", host_port=5353),
        ],
    )
    assert text.splitlines() == [
        (
            "add rule ip vmshim publish ip daddr 127.0.0.1 tcp dport 18080 dnat to "
            '10.88.0.2:8080 comment "vmshim-ctr:abababababab"'
        ),
        ('add rule ip vmshim publish udp dport 5353 dnat to 10.88.0.2:53 comment "vmshim-ctr:abababababab"'),
    ]


# ---- --network host, the default network, the stored request -----------------------------


def test_network_host_in_a_vm_is_user_mode_networking():
    cn = _connected(parse_request(network="host", add_hosts=["h:host-gateway"]), [])
    assert cn.guest_network() == {
        "interfaces": [{"mac": "02:42:0a:00:02:0f", "address": "10.0.2.15/24", "gateway": "10.0.2.2"}]
    }
    [iface] = cn.domain_interfaces()
    assert (iface.type, iface.bridge) == ("user", None)
    hosts = cn.hosts_file("box")
    assert "10.0.2.2\thost.vmshim.internal host.docker.internal" in hosts
    assert "10.0.2.2\th" in hosts
    assert cn.resolv_conf("search corp\nnameserver 192.0.2.1\n") == "search corp\nnameserver 10.0.2.3\n"


def test_network_host_in_process_isolation_uses_the_hosts_stack():
    cn = _connected(parse_request(network="host"), [], isolation="process")
    assert cn.guest_network() == {} or cn.isolation == "process"
    assert "127.0.0.1\thost.vmshim.internal" in cn.hosts_file("box")
    assert cn.resolv_conf("nameserver 127.0.0.53\n") == "nameserver 127.0.0.53\n"


def test_default_network_from_env_then_state_root_then_host(tmp_path, monkeypatch):
    from shim.containers import networking as container
    from shim.containers.networking import default_network

    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path))
    monkeypatch.setattr(container, "HOST_CONFIG_DIR", tmp_path / "etc")
    monkeypatch.delenv("VMSHIM_DEFAULT_NETWORK", raising=False)
    assert default_network() == "bridge" and parse_request().mode == "bridge"
    (tmp_path / "networks").mkdir()
    (tmp_path / "networks" / "default-network").write_text("none\n")
    assert default_network() == "none" and parse_request().mode == "none"
    (tmp_path / "networks" / "default-network").unlink()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "default-network").write_text("none\n")
    assert default_network() == "none"  # the host's setting, for every state root
    monkeypatch.setenv("VMSHIM_DEFAULT_NETWORK", "host")
    assert parse_request().mode == "host"
    assert parse_request(network="bridge").mode == "bridge"  # a flag always wins


def test_request_round_trips_and_resolves_exposed_ports():
    from shim.containers.networking import NetworkRequest

    req = parse_request(
        network=["a", "bridge"],
        aliases=["web"],
        ip="10.89.0.9",
        publish=["127.0.0.1:9000-9001:80-81", "53/udp", "7000-7009:22"],
        publish_all=True,
        expose=["8443"],
        mac="02:42:ac:11:00:02",
        dns_servers=["192.0.2.1"],
        dns_search=["corp"],
        dns_options=["ndots:1"],
        add_hosts=["db:10.0.0.5"],
    )
    assert req.endpoint_config == {"a": {"aliases": ["web"], "ip": "10.89.0.9"}}
    back = NetworkRequest.from_dict(json.loads(json.dumps(req.to_dict())))
    assert back == req
    resolved = back.resolve_exposed({"ExposedPorts": {"80/tcp": {}}})
    assert not resolved.publish_all
    assert [str(p) for p in resolved.publish[-2:]] == ["0.0.0.0:0->80/tcp", "0.0.0.0:0->8443/tcp"]
    assert resolved.publish[3].host_range == (7000, 7009)
    assert NetworkRequest.from_dict(resolved.to_dict()) == resolved


def test_store_lock_can_be_let_go_while_waiting(store):
    import subprocess
    import sys

    store.create("a")
    script = (
        "import sys; from shim.network.store import NetworkStore; "
        "s = NetworkStore(sys.argv[1]); "
        "s.locked().__enter__(); print('got it')"
    )
    with store.locked():
        with store.unlocked():
            proc = subprocess.run(
                [sys.executable, "-c", script, str(store.root)], check=False, capture_output=True, text=True, timeout=30
            )
        assert proc.stdout.strip() == "got it", proc.stderr
        assert store._depth == 1
