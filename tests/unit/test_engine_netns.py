"""shim.network.engine_netns and shim.containers.engine_network: reading the interfaces an
engine configured in a container's network namespace, and the commands that plug a VM's
tap into it (no namespace is touched: the commands are recorded)."""

from __future__ import annotations

import pytest

from shim.errors import NetworkError
from shim.network import engine_netns as ens

# `ip -j -d address show` in a namespace dockerd configured (trimmed), plus a tap of ours.
LINKS = [
    {
        "ifname": "lo",
        "mtu": 65536,
        "link_type": "loopback",
        "address": "00:00:00:00:00:00",
        "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}],
    },
    {
        "ifname": "eth0",
        "mtu": 1450,
        "link_type": "ether",
        "address": "02:42:AC:11:00:02",
        "linkinfo": {"info_kind": "veth"},
        "addr_info": [
            {"family": "inet", "local": "172.17.0.2", "prefixlen": 16, "scope": "global"},
            {"family": "inet6", "local": "fe80::42:acff:fe11:2", "prefixlen": 64, "scope": "link"},
            {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global"},
        ],
    },
    {
        "ifname": "eth1",
        "mtu": 1500,
        "link_type": "ether",
        "address": "02:42:0a:00:01:05",
        "linkinfo": {"info_kind": "veth"},
        "addr_info": [{"family": "inet", "local": "10.0.1.5", "prefixlen": 24, "scope": "global"}],
    },
    {
        "ifname": "vmnabc0",
        "mtu": 1500,
        "link_type": "ether",
        "address": "7e:e3:64:2b:96:c0",
        "linkinfo": {"info_kind": "tun", "info_data": {"type": "tap"}},
        "addr_info": [],
    },
    {"ifname": "noaddr", "mtu": 1500, "link_type": "ether", "address": "02:00:00:00:00:09", "addr_info": []},
]
ROUTES = [{"dst": "default", "gateway": "172.17.0.1", "dev": "eth0", "flags": ["linkdown"]}]


def test_parse_links_takes_the_engines_interfaces():
    links = ens.parse_links(LINKS, ROUTES)
    assert [link.name for link in links] == ["eth0", "eth1"]
    assert links[0].guest_interface() == {
        "mac": "02:42:ac:11:00:02",
        "address": "172.17.0.2/16",
        "mtu": 1450,
        "address6": "fd00::2/64",
        "gateway": "172.17.0.1",
    }
    assert links[1].guest_interface() == {"mac": "02:42:0a:00:01:05", "address": "10.0.1.5/24", "mtu": 1500}


def test_parse_links_of_an_empty_namespace():
    assert ens.parse_links(LINKS[:1], []) == []


@pytest.mark.parametrize(
    "links, error",
    [
        ([dict(LINKS[1], ifname=f"e{i}", address=f"02:00:00:00:00:{i:02x}") for i in range(9)], "more than 8"),
        ([dict(LINKS[1], mtu=10)], "MTU"),
        ([dict(LINKS[1], mtu=True)], "MTU"),
        ([dict(LINKS[1], address="01:00:5e:00:00:01")], "mac"),
        ([dict(LINKS[1], address="nonsense")], "mac"),
    ],
)
def test_parse_links_refuses_what_the_guest_cannot_take(links, error):
    with pytest.raises(NetworkError, match=error):
        ens.parse_links(links, [])


def test_parse_links_ignores_garbage():
    garbage = [
        None,
        3,
        {"ifname": 5},
        {
            "ifname": "x",
            "link_type": "ether",
            "mtu": 1500,
            "address": "02:00:00:00:00:01",
            "addr_info": [None, {"local": "not-an-ip", "prefixlen": 3}],
        },
    ]
    assert ens.parse_links(garbage, [None, {"dst": "default"}]) == []


def test_tap_names_fit_and_avoid_libvirts_prefixes():
    name = ens.tap_name("c0ffee" * 10, 3)
    assert len(name) == 15 and name.startswith("vmn") and name.endswith("3")


def test_wire_moves_the_tap_and_redirects_both_ways(monkeypatch):
    calls = []
    monkeypatch.setattr(ens, "_run", lambda argv, what, input=None: calls.append((argv, input)))
    link = ens.parse_links(LINKS, ROUTES)[0]
    ens.wire("/proc/1/fd/5", "/proc/1/fd/6", link, "vmnabc0")
    assert calls[0][0] == [
        "nsenter",
        "--net=/proc/1/fd/5",
        "--",
        "ip",
        "link",
        "set",
        "dev",
        "vmnabc0",
        "netns",
        "/proc/1/fd/6",
    ]
    assert calls[1][1] == "link set dev vmnabc0 mtu 1450 up\n"
    tc = calls[2][1]
    assert calls[2][0][:3] == ["nsenter", "--net=/proc/1/fd/6", "--"]
    assert "qdisc add dev eth0 ingress" in tc and "qdisc add dev vmnabc0 ingress" in tc
    assert "dev eth0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev vmnabc0" in tc
    assert "dev vmnabc0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev eth0" in tc


def test_engine_network_prepares_taps_and_cleans_up(monkeypatch, tmp_path):
    from shim.containers.engine_network import EngineNetwork

    made, removed = [], []
    monkeypatch.setattr(ens, "read_links", lambda netns: ens.parse_links(LINKS, ROUTES))
    monkeypatch.setattr(ens, "create_tap", lambda host, tap: made.append(tap))
    monkeypatch.setattr(ens, "remove_tap", lambda ns, tap: removed.append(tap))
    a, b = tmp_path / "ns", tmp_path / "host"
    a.write_text("")
    b.write_text("")
    net = EngineNetwork({"netns": str(a), "host_netns": str(b)}, "c0ffee" * 10)
    config = net.prepare()
    assert [i["mac"] for i in config["interfaces"]] == ["02:42:ac:11:00:02", "02:42:0a:00:01:05"]
    assert made == ["vmnc0ffeec0ffe0", "vmnc0ffeec0ffe1"]
    xml = net.interfaces()[0].to_xml()
    assert '<target dev="vmnc0ffeec0ffe0" managed="no" />' in xml and 'size="1450"' in xml
    net.close()
    assert sorted(removed) == sorted(made * 2)


def test_engine_network_refuses_relative_paths():
    from shim.containers.engine_network import EngineNetwork

    with pytest.raises(NetworkError, match="not a path"):
        EngineNetwork({"netns": "proc/1/ns/net", "host_netns": "/x"}, "c0ffee").prepare()


def test_engine_network_plugs_a_link_the_engine_added(monkeypatch, tmp_path):
    """docker network connect: a new interface gets a tap, a hot-plugged NIC and the
    redirect; the guest's entry has no gateway (the default route stays)."""
    from shim.containers.engine_network import EngineNetwork

    state = {"links": LINKS[:2]}
    calls = []
    monkeypatch.setattr(ens, "read_links", lambda netns: ens.parse_links(state["links"], ROUTES))
    monkeypatch.setattr(ens, "create_tap", lambda host, tap: calls.append(("tap", tap)))
    monkeypatch.setattr(ens, "remove_tap", lambda ns, tap: None)
    monkeypatch.setattr(ens, "wire", lambda host, ns, link, tap: calls.append(("wire", link.name)))
    for name in ("ns", "host"):
        (tmp_path / name).write_text("")
    net = EngineNetwork({"netns": str(tmp_path / "ns"), "host_netns": str(tmp_path / "host")}, "c0ffee" * 10)
    net.prepare()
    assert net.new_links() == []
    state["links"] = LINKS
    new = net.new_links()
    assert [link.name for link in new] == ["eth1"]
    plugged = []
    entry = net.plug(new[0], plugged.append)
    assert entry == {"mac": "02:42:0a:00:01:05", "address": "10.0.1.5/24", "mtu": 1500}
    assert plugged[0].type == "ethernet" and plugged[0].tap == "vmnc0ffeec0ffe1"
    assert ("wire", "eth1") in calls and net.new_links() == []
    net.close()


def test_engine_network_relays_the_loopback_nameservers_of_resolv_conf(monkeypatch, tmp_path):
    """docker's prestart hook writes nameserver 127.0.0.11 after create: it is read when
    the VM starts, and the guest is told to relay it."""
    from shim.containers.engine_network import EngineNetwork

    monkeypatch.setattr(ens, "read_links", lambda netns: ens.parse_links(LINKS[:2], ROUTES))
    monkeypatch.setattr(ens, "create_tap", lambda host, tap: None)
    monkeypatch.setattr(ens, "remove_tap", lambda ns, tap: None)
    for name in ("ns", "host"):
        (tmp_path / name).write_text("")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.11\noptions ndots:0\n")
    net = EngineNetwork(
        {"netns": str(tmp_path / "ns"), "host_netns": str(tmp_path / "host"), "resolv_conf": str(resolv)}, "c0ffee" * 10
    )
    assert net.prepare()["dns_relay"] == ["127.0.0.11"]
    assert net.dns is not None and net.dns.servers == ["127.0.0.11"]
    net.close()
    resolv.write_text("nameserver 10.0.0.1\n")
    net = EngineNetwork(
        {"netns": str(tmp_path / "ns"), "host_netns": str(tmp_path / "host"), "resolv_conf": str(resolv)}, "c0ffee" * 10
    )
    assert "dns_relay" not in net.prepare() and net.dns is None
    net.close()


def test_engine_network_unplugs_a_link_the_engine_removed(monkeypatch, tmp_path):
    """docker network disconnect: the NIC of the gone interface is taken out, its tap
    deleted, and its tap name can be used again."""
    from shim.containers.engine_network import EngineNetwork

    state = {"links": LINKS}
    removed, detached = [], []
    monkeypatch.setattr(ens, "read_links", lambda netns: ens.parse_links(state["links"], ROUTES))
    monkeypatch.setattr(ens, "create_tap", lambda host, tap: None)
    monkeypatch.setattr(ens, "remove_tap", lambda ns, tap: removed.append(tap))
    monkeypatch.setattr(ens, "wire", lambda host, ns, link, tap: None)
    for name in ("ns", "host"):
        (tmp_path / name).write_text("")
    net = EngineNetwork({"netns": str(tmp_path / "ns"), "host_netns": str(tmp_path / "host")}, "c0ffee" * 10)
    net.prepare()
    state["links"] = LINKS[:2]
    new, gone = net.changes()
    assert new == [] and [link.name for link in gone] == ["eth1"]
    net.unplug(gone[0], detached.append)
    assert detached == ["02:42:0a:00:01:05"] and removed == ["vmnc0ffeec0ffe1"]
    assert net.taps == ["vmnc0ffeec0ffe0"]
    state["links"] = LINKS
    plugged = []
    net.plug(net.new_links()[0], plugged.append)
    assert plugged[0].tap == "vmnc0ffeec0ffe1"


def test_a_namespace_plugged_into_another_vm_is_refused_in_words(monkeypatch):
    def run(argv, what, input=None):
        if argv[3] == "tc":
            raise NetworkError(f"{what}: Error: Exclusivity flag on, cannot modify.")

    monkeypatch.setattr(ens, "_run", run)
    link = ens.parse_links(LINKS, ROUTES)[0]
    with pytest.raises(NetworkError, match="plugged into another VM already"):
        ens.wire("/h", "/n", link, "vmnabc0")
