"""The agent's ``update`` and ``stats`` requests (guest.agent), over a socketpair with a
fake runtime, and the host helpers that send them (shim.containers.resources)."""

from __future__ import annotations

import socket

from guest import protocol
from guest.spec import Limits
from shim.containers.resources import read_stats, update_limits
from shim.errors import AgentError
from shim.vm.agent_client import AgentClient
from tests.unit.test_agent import TOKEN, FakeRuntime, make_host  # noqa: F401 - fixture


class LimitedRuntime(FakeRuntime):
    def __init__(self):
        super().__init__()
        self.applied = []

    def update(self, limits):
        if limits.memory == 13:
            raise RuntimeError("cannot set memory.max=13: Device or resource busy")
        self.applied.append(limits)

    def stats(self):
        return {"memory": 5, "memory_limit": 7, "cpu_ns": 11, "pids": 1, "oom_kills": 0}


def test_update_applies_limits_and_answers(make_host):  # noqa: F811
    runtime = LimitedRuntime()
    host = make_host(["sleep", "5"], runtime=runtime)
    assert host.recv().type == protocol.HELLO
    host.send(protocol.UPDATE, token=TOKEN, id=77, limits={"memory": 1 << 20, "pids": 20})
    reply = host.recv()
    assert reply.type == protocol.UPDATED and reply.get("id", int) == 77
    assert runtime.applied == [Limits(memory=1 << 20, pids=20)]


def test_update_errors_name_the_request(make_host):  # noqa: F811
    runtime = LimitedRuntime()
    host = make_host(["sleep", "5"], runtime=runtime)
    host.recv()
    host.send(protocol.UPDATE, token=TOKEN, id=5, limits={"memory": 13})
    reply = host.recv()
    assert reply.type == protocol.ERROR and reply.get("id", int) == 5
    assert "memory.max" in reply.get("message", str)
    host.send(protocol.UPDATE, token=TOKEN, id=6, limits={"bogus": 1})
    reply = host.recv()
    assert reply.type == protocol.ERROR and "unknown limit" in reply.get("message", str)
    host.send(protocol.UPDATE, token="wrong", id=7, limits={})
    assert "bad token" in host.recv().get("message", str)
    assert runtime.applied == []


def test_stats_reply(make_host):  # noqa: F811
    host = make_host(["sleep", "5"], runtime=LimitedRuntime())
    host.recv()
    host.send(protocol.STATS, token=TOKEN, id=9)
    reply = host.recv()
    assert reply.type == protocol.STATS and reply.get("id", int) == 9
    assert reply.get("usage", dict)["cpu_ns"] == 11


def test_a_runtime_without_limits_says_so(make_host):  # noqa: F811
    host = make_host(["sleep", "5"])
    host.recv()
    host.send(protocol.STATS, token=TOKEN, id=3)
    assert "no statistics" in host.recv().get("message", str)


def test_host_helpers_keep_other_messages(make_host):  # noqa: F811
    """read_stats / update_limits wait for their own answer and leave what else came
    (the main process's output, say) for the caller."""
    host = make_host(["sh", "-c", "echo early; sleep 5"], runtime=LimitedRuntime())
    client = AgentClient(host.sock)
    client.handshake(10)
    client.send(protocol.START, token=TOKEN, id=1, stdin=False, tty=False)
    assert client.recv(10).type == protocol.STARTED
    import select

    # The output is on its way before the request: the socket has bytes to read.
    assert select.select([client.fileno()], [], [], 10)[0], "no output from the process"
    assert read_stats(client, TOKEN)["memory"] == 5
    update_limits(client, TOKEN, Limits(pids=3))
    try:
        update_limits(client, TOKEN, Limits(memory=13))
    except AgentError as exc:
        assert "memory.max" in str(exc)
    else:
        raise AssertionError("the refusal was not raised")
    kinds = [m.type for m in client.take_pending()]
    assert protocol.STDOUT in kinds
    host.sock = socket.socket()  # the fixture closes this one; the client owns the real one
    client.close()
