"""The DNS relay between a guest and a resolver that lives only in the container's network
namespace on the host (docker's 127.0.0.11): both ends, and what a hostile guest cannot
make the host do."""

from __future__ import annotations

import collections
import select
import socket

import pytest

from guest import protocol
from guest.runtime.dnsrelay import MAX_PENDING as GUEST_PENDING
from guest.runtime.dnsrelay import DnsRelay as GuestRelay
from guest.spec import check_network
from shim.containers import engine_network as en

QUERY = b"\x12\x34" + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x03web\x00\x00\x01\x00\x01"


@pytest.fixture
def resolver():
    """A UDP 'resolver' on 127.0.0.1 that answers each query with the query + b'A'."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def _serve_one(resolver):
    data, addr = resolver.recvfrom(65535)
    resolver.sendto(data + b"A", addr)


def _relay(resolver, clock=None):
    kw = {"now": clock} if clock else {}
    return en.DnsRelay(
        ["127.0.0.1"], lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), port=resolver.getsockname()[1], **kw
    )


def test_a_query_is_asked_and_answered(resolver):
    relay = _relay(resolver)
    assert relay.query(7, "127.0.0.1", QUERY)
    _serve_one(resolver)
    (fd,) = relay.fds()
    assert select.select([fd], [], [], 5)[0]
    assert relay.answer(fd) == (7, QUERY + b"A")
    assert relay.fds() == []


@pytest.mark.parametrize(
    "server, payload",
    [
        ("127.0.0.53", QUERY),  # not a relayed nameserver: the guest picks no target
        ("8.8.8.8", QUERY),
        ("127.0.0.1", b"short"),  # not even a DNS header
        ("127.0.0.1", QUERY * 400),  # too big
    ],
)
def test_the_guest_cannot_choose_where_or_what(resolver, server, payload):
    relay = _relay(resolver)
    assert not relay.query(1, server, payload)
    assert relay.fds() == [] and relay.dropped == 1


def test_queries_in_flight_and_rate_are_bounded(resolver):
    t = [0.0]
    relay = _relay(resolver, clock=lambda: t[0])
    sent = sum(relay.query(i, "127.0.0.1", QUERY) for i in range(200))
    assert sent == en.MAX_DNS_PENDING
    t[0] += en.DNS_TIMEOUT + 0.1
    relay.expire()
    assert relay.fds() == []
    # the burst is spent: about DNS_RATE a second from now on
    t[0] += 1.0
    sent = 0
    for i in range(200):
        sent += relay.query(i, "127.0.0.1", QUERY)
        relay.close()
    assert en.DNS_BURST - en.MAX_DNS_PENDING <= sent <= en.DNS_BURST - en.MAX_DNS_PENDING + en.DNS_RATE + 1


def test_an_oversized_answer_is_dropped(resolver):
    relay = _relay(resolver)
    relay.query(3, "127.0.0.1", QUERY)
    data, addr = resolver.recvfrom(65535)
    resolver.sendto(b"x" * (en.MAX_DNS_ANSWER + 1), addr)
    (fd,) = relay.fds()
    assert select.select([fd], [], [], 5)[0]
    assert relay.answer(fd) is None


def test_resolv_conf_nameservers_relayed():
    text = (
        "search x\nnameserver 127.0.0.11\nnameserver 10.0.0.1\nnameserver ::1\n"
        "nameserver 127.0.0.11\noptions ndots:0\nnameserver bogus\n"
    )
    assert en.dns_servers(text) == ["127.0.0.11"]
    assert en.dns_servers("nameserver 192.168.1.1\n") == []


def test_a_dns_query_frame_is_bounded():
    ok = protocol.Message(protocol.DNS_QUERY, {"id": 1, "server": "127.0.0.11"}, QUERY)
    protocol.check_from_guest(ok)
    for payload in (b"", b"x" * (protocol.MAX_DNS_QUERY + 1)):
        with pytest.raises(protocol.ProtocolError, match="DNS query"):
            protocol.check_from_guest(protocol.Message(protocol.DNS_QUERY, {"id": 1, "server": "127.0.0.11"}, payload))
    with pytest.raises(protocol.ProtocolError):
        protocol.check_from_guest(protocol.Message(protocol.DNS_QUERY, {"id": 1}, QUERY))


@pytest.mark.parametrize("relay", [["10.0.0.1"], ["127.0.0.11"] * 4, "127.0.0.11", [5]])
def test_boot_config_relay_addresses_are_loopback_only(relay):
    with pytest.raises(ValueError, match="dns_relay"):
        check_network({"interfaces": [], "dns_relay": relay})


def test_guest_relay_passes_queries_up_and_answers_back(resolver):
    guest = GuestRelay.__new__(GuestRelay)
    # bound on 127.0.0.1 port 0 instead of :53
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    guest.sockets = {sock.fileno(): (sock, "127.0.0.11")}
    guest._pending = collections.OrderedDict()
    guest._next = 1
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    for _ in range(GUEST_PENDING + 5):
        client.sendto(QUERY, sock.getsockname())
    got = []
    while select.select([sock], [], [], 1)[0]:
        batch = guest.receive(sock.fileno())
        if not batch:
            break
        got += batch
    assert len(got) == GUEST_PENDING + 5
    assert len(guest._pending) == GUEST_PENDING  # the oldest were forgotten
    qid, server, payload = got[-1]
    assert (server, payload) == ("127.0.0.11", QUERY)
    guest.answer(qid, b"answer")
    assert client.recvfrom(100)[0] == b"answer"
    guest.answer(got[0][0], b"late")  # forgotten: nothing is sent
    guest.answer(999999, b"made up")
    client.settimeout(0.2)
    with pytest.raises(socket.timeout):
        client.recvfrom(100)
    guest.close()
    client.close()
