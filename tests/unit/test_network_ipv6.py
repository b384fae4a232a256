"""IPv6 on user networks (``network create --ipv6``), without touching the host's
network: the store's IPv6 IPAM and its refusals, what the guest is told, the AAAA entry
for dnsmasq, the anti-spoofing rules, and the guest's checks and struct packing."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from guest.runtime import network as guest_net
from guest.spec import check_network, is_ipv6_cidr
from shim.errors import NetworkError
from shim.network import dns, firewall
from shim.network.store import NetworkStore
from tests.unit.test_network import _connected, _endpoint, own_state_root  # noqa: F401
from tests.unit.test_network import parse_request


@pytest.fixture
def store(tmp_path):
    return NetworkStore(tmp_path / "networks")


def test_dual_stack_network_hands_out_both_families_lowest_first(store):
    net = store.create("six", ipv6=True, subnet6="fd00:89::/64")
    assert (net.subnet, net.subnet6, net.gateway6, net.prefixlen6) == ("10.89.0.0/24", "fd00:89::/64", "fd00:89::1", 64)
    assert store.get("six").subnet6 == "fd00:89::/64"  # stored
    first = net.free_ip6()
    assert first == "fd00:89::2"
    store.add_endpoint(net, _endpoint("a" * 64, "10.89.0.2", ip6=first))
    assert store.get("six").endpoints["a" * 64].ip6 == "fd00:89::2"
    assert store.get("six").free_ip6() == "fd00:89::3"
    # IPv4-only networks stay as they were.
    plain = store.create("four")
    assert (plain.ipv6, plain.free_ip6(), plain.prefixlen6) == (False, "", 0)


def test_ipv6_without_a_subnet_gets_a_random_unique_local_64(store):
    a, b = store.create("a", ipv6=True), store.create("b", ipv6=True)
    for net in (a, b):
        sub = ipaddress.IPv6Network(net.subnet6)
        assert sub.prefixlen == 64 and sub.network_address.packed[0] == 0xFD
    assert a.subnet6 != b.subnet6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ipv6": True, "subnet6": "fd00:89::/48"}, "/64 to /120"),
        ({"ipv6": True, "subnet6": "fe80::/64"}, "not a unicast IPv6 subnet"),
        ({"ipv6": True, "subnet6": "ff02::/64"}, "not a unicast IPv6 subnet"),
        ({"ipv6": True, "subnet6": "fd00:zz::/64"}, "invalid --subnet"),
        ({"subnet6": "fd00:89::/64"}, "add --ipv6"),
    ],
)
def test_ipv6_subnet_refusals(store, kwargs, message):
    with pytest.raises(NetworkError, match=message):
        store.create("x", **kwargs)


def test_ipv6_subnets_may_not_overlap(store):
    store.create("a", ipv6=True, subnet6="fd00:89::/64")
    with pytest.raises(NetworkError, match="overlaps network a"):
        store.create("b", ipv6=True, subnet6="fd00:89::100/120")


def test_the_guest_is_told_its_ipv6_address_and_checks_it():
    from tests.unit.test_network import _net

    net = _net("six", subnet6="fd00:89::/64", gateway6="fd00:89::1")
    cn = _connected(parse_request(network="six"), [(net, _endpoint("c" * 64, "10.89.0.2", ip6="fd00:89::2"))])
    assert cn.guest_network() == {
        "interfaces": [
            {"mac": "02:42:0a:59:00:02", "address": "10.89.0.2/24", "address6": "fd00:89::2/64", "gateway": "10.89.0.1"}
        ]
    }
    check_network(cn.guest_network())


@pytest.mark.parametrize(
    "text, ok",
    [
        ("fd00:89::2/64", True),
        ("2001:db8::1/128", True),
        ("fd00:89::2", False),
        ("fd00:89::2/0", False),
        ("fd00:89::2/129", False),
        ("fe80::1/64", False),
        ("ff02::1/64", False),
        ("::/64", False),
        ("fd00::1/６４", False),
        ("1.2.3.4/24", False),
        ("f" * 70 + "/64", False),
        (None, False),
        (7, False),
    ],
)
def test_guest_checks_ipv6_addresses(text, ok):
    assert is_ipv6_cidr(text) is ok


def test_guest_ipv6_ifreq_layout(monkeypatch):
    calls = []
    monkeypatch.setattr(guest_net.socket, "if_nametoindex", lambda name: 3)
    monkeypatch.setattr(guest_net.fcntl, "ioctl", lambda fd, req, arg: calls.append((req, arg)))
    guest_net.add_address6("eth1", "fd00:89::2/64")
    ((req, arg),) = calls
    assert req == guest_net.SIOCSIFADDR
    assert arg == struct.pack("16sIi", socket.inet_pton(socket.AF_INET6, "fd00:89::2"), 64, 3)


def test_dnsmasq_gets_an_aaaa_line(tmp_path, monkeypatch):
    from tests.unit.test_network import _net

    monkeypatch.setattr(dns, "hosts_dir", lambda net: tmp_path)
    net = _net("six", subnet6="fd00:89::/64", gateway6="fd00:89::1")
    dns.add(net, _endpoint("c" * 64, "10.89.0.2", name="web", ip6="fd00:89::2"))
    assert (tmp_path / ("c" * 64)).read_text() == (f"10.89.0.2\tweb {'c' * 12}\nfd00:89::2\tweb {'c' * 12}\n")


def test_antispoofing_covers_ipv6_on_a_dual_stack_port():
    assert firewall.link_local("02:42:0a:59:00:02") == "fe80::42:aff:fe59:2"
    text = firewall.antispoof_rules("vmtx0", "02:42:0a:59:00:02", "10.89.0.2", "fd00:89::2")
    assert "ether type != { ip, arp, ip6 } drop" in text
    assert "ip6 saddr != { ::, fd00:89::2, fe80::42:aff:fe59:2 } drop" in text
    # Neighbour advertisements (IPv6's ARP) only for its own addresses.
    assert (
        "icmpv6 type nd-neighbor-advert @th,64,128 != "
        "{ 0xfd000089000000000000000000000002, 0xfe8000000000000000420afffe590002 } drop" in text
    )
    # An IPv4-only port still drops every IPv6 frame.
    plain = firewall.antispoof_rules("vmtx0", "02:42:0a:59:00:02", "10.89.0.2")
    assert "ether type != { ip, arp } drop" in plain and "ip6" not in plain


def test_no_ipv6_leaves_a_dual_stack_network():
    text = firewall.network_rules6("six", "vmsbrsix")
    assert (
        'add rule ip6 vmshim forward iifname "vmsbrsix" oifname != "vmsbrsix" drop comment "vmshim-net:six"'
    ) in text
    assert (
        'add rule ip6 vmshim forward oifname "vmsbrsix" iifname != "vmsbrsix" drop comment "vmshim-net:six"'
    ) in text
    # Frames bridged between two containers (br_netfilter shows them here as in and out
    # of the bridge) are not dropped.
    assert 'iifname "vmsbrsix" drop' not in text
