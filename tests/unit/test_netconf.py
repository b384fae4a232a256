"""``network connect`` into a running VM, without VMs or root: the host's half.

The real monitor and the real agent loop run as in tests/unit/test_monitor.py (a fake
placement, plain processes); the agent's runtime records the ``netconf`` it is asked for.
Then the agent turns hostile: whatever it answers to ``netconf`` must reach the CLI as
one bounded, printable line, and the monitor must go on serving. The plug itself runs
against the fake hypervisor backend.
"""

from __future__ import annotations

import json

import pytest

from guest import protocol
from guest.agent import Agent
from shim.containers import manage
from shim.errors import NetworkError, VmshimError
from shim.containers import netconnect as netc
from shim.network.store import Endpoint, Network
from shim.vm.fake_backend import FakeBackend
from tests.unit import test_monitor as tm
from tests.unit.test_monitor import make, store  # noqa: F401  (fixture)

IFACE = {"mac": "02:42:0a:59:00:03", "address": "10.89.0.3/24", "address6": "fd00:89::3/64"}


@pytest.fixture
def recording_runtime(tmp_path, monkeypatch):
    """The agent's runtime writes each netconf it gets to a file (the agent is a fork)."""
    seen = tmp_path / "netconf.json"

    def netconf(self, interfaces, resolv_conf=None):
        seen.write_text(json.dumps(interfaces))
        return ["eth1"]

    monkeypatch.setattr(tm.PlainRuntime, "netconf", netconf, raising=False)
    return seen


def _running(store):  # noqa: F811
    rec = make(store, "while :; do sleep 0.05; done")
    assert manage.start(rec.id, store=store) == 0
    return store.load(rec.id)


def test_netconf_reaches_the_agent_and_answers(store, recording_runtime):  # noqa: F811
    rec = _running(store)
    netc.netconf(rec, [IFACE])
    assert json.loads(recording_runtime.read_text()) == [IFACE]
    # The agent checks the entries again: a gateway (default route) is not for hotplug.
    with pytest.raises(NetworkError, match="cannot take the default route"):
        netc.netconf(rec, [dict(IFACE, gateway="10.89.0.1")])
    with pytest.raises(NetworkError, match="address6 must be an IPv6"):
        netc.netconf(rec, [dict(IFACE, address6="ff02::1/64")])
    manage.stop(rec.id, timeout=5, store=store)


@pytest.mark.parametrize(
    "answer",
    [
        # The answer type of another request, with a large made-up body.
        lambda agent, rid: agent._send(protocol.STATS, id=rid, usage={"x" * 50: 1} | {f"k{i}": i for i in range(5000)}),
        # An error whose text would fill the terminal with control sequences.
        lambda agent, rid: agent._send(protocol.ERROR, id=rid, message="\x1b[2J\x07" + "A" * 100_000),
        # A wrong-typed error.
        lambda agent, rid: agent._send(protocol.ERROR, id=rid, message=["not", "text"], code=-5),
    ],
)
def test_a_hostile_netconf_answer_is_one_bounded_line(store, monkeypatch, answer):  # noqa: F811
    def hostile(self, message):
        answer(self, message.get("id", int))

    monkeypatch.setattr(Agent, "_handle_netconf", hostile)
    rec = _running(store)
    with pytest.raises(VmshimError) as info:
        netc.netconf(rec, [IFACE])
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text and "\x07" not in text
    assert len(text) < 700
    # The monitor goes on serving the container.
    assert store.load(rec.id).state.status == "running"
    netc_status = manage._request(store, rec, "status", 10)
    assert netc_status.type == "reply"
    manage.stop(rec.id, timeout=5, store=store)


def test_plug_attaches_and_unplugs_again_when_the_guest_refuses(monkeypatch):
    backend = FakeBackend()
    from shim.vm.domain import HOTPLUG_MACHINE, Domain, Interface, KernelBoot

    cid = "c0ffee" * 10 + "abcd"
    domain = Domain(
        name=f"vmshim-{cid[:12]}",
        uuid="6f1c2a34-5b6d-4e7f-8091-a2b3c4d5e6f7",
        memory_mib=128,
        vcpus=1,
        domain_type="qemu",
        machine=HOTPLUG_MACHINE,
        hotplug_ports=1,
        boot=KernelBoot(kernel="/k", initrd="/i"),
        interfaces=[Interface(bridge="vmshim0", mac="02:42:0a:58:00:02")],
    )
    backend.create(domain)

    class Rec:
        id, name = cid, "web"

    net = Network(
        name="n",
        id="1" * 64,
        subnet="10.89.0.0/24",
        gateway="10.89.0.1",
        bridge="vmsbr1111111111",
        subnet6="fd00:89::/64",
        gateway6="fd00:89::1",
    )
    ep = Endpoint(
        container_id=cid,
        container_name="web",
        ip="10.89.0.3",
        mac="02:42:0a:59:00:03",
        ip6="fd00:89::2",
        host_ifname="vmtc0ffeec0ff1",
    )
    asked = []
    monkeypatch.setattr(netc, "netconf", lambda rec, ifaces: asked.append(ifaces))
    netc._plug(Rec, net, ep, backend=backend)
    assert asked == [[{"mac": ep.mac, "address": "10.89.0.3/24", "address6": "fd00:89::2/64"}]]
    assert backend.interface_macs(domain.name) == ["02:42:0a:58:00:02", ep.mac]
    # No free port left: one clear line that says what to do.
    other = Endpoint(
        container_id=cid, container_name="web", ip="10.89.0.4", mac="02:42:0a:59:00:04", host_ifname="vmtc0ffeec0ff2"
    )
    with pytest.raises(NetworkError, match="at most 4 NICs while it runs"):
        netc._plug(Rec, net, other, backend=backend)
    netc._unplug(Rec, net, ep, backend=backend)
    assert backend.interface_macs(domain.name) == ["02:42:0a:58:00:02"]

    def refuse(rec, ifaces):
        raise NetworkError("no network interface with MAC … appeared within 20 s")

    monkeypatch.setattr(netc, "netconf", refuse)
    with pytest.raises(NetworkError, match="appeared within"):
        netc._plug(Rec, net, ep, backend=backend)
    assert backend.interface_macs(domain.name) == ["02:42:0a:58:00:02"]


def test_nic_indexes_are_reused_and_bounded():
    cid = "ab" * 32
    net = Network(name="n", id="1" * 64, subnet="10.89.0.0/24", gateway="10.89.0.1", bridge="vmsbr1111111111")

    def ep(index):
        return net, Endpoint(
            container_id=cid,
            container_name="c",
            ip="10.89.0.2",
            mac="02:42:0a:59:00:02",
            host_ifname=netc._host_ifname("vmt", cid, index),
        )

    assert netc._free_index([ep(0), ep(2)], "vmt", cid) == 1
    with pytest.raises(NetworkError, match="at most 10 networks"):
        netc._free_index([ep(i) for i in range(10)], "vmt", cid)


def test_netconf_is_part_of_the_protocol_and_only_the_host_sends_it():
    frame = protocol.encode(protocol.NETCONF, token="t", id=9, interfaces=[IFACE])
    (msg,) = protocol.FrameReader().feed(frame)
    assert msg.type == protocol.NETCONF and msg.get("interfaces", list) == [IFACE]
    with pytest.raises(protocol.ProtocolError, match="may not send 'netconf'"):
        protocol.check_from_guest(msg)
    # Its answer is `updated {id}` (or `error`), as for `update`.
    (answer,) = protocol.FrameReader().feed(protocol.encode(protocol.UPDATED, id=9))
    assert protocol.check_from_guest(answer) is answer
