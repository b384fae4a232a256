"""Fuzzing the host end of the agent channel: whatever bytes a hostile guest writes, the
frame parser and the monitor's message handlers raise nothing (issue 12).

The monitor is the real one (shim.containers.monitor.Monitor) on a real store, with its
agent end on a socketpair the test writes into and a stub placement (kill/teardown only
record that they were called). Bounded: a fixed number of examples, no deadline per
example, about 10-20 s in all.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest import protocol
from shim.containers import monitor as monmod
from shim.containers import monitor_life
from shim.containers.fake_isolation import fake_record
from shim.containers.store import ContainerStore

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class StubPlacement:
    def __init__(self):
        self.killed = 0

    def kill(self):
        self.killed += 1

    def teardown(self, grace=0.0, timeout=0.0):
        pass

    def forget(self, timeout=0.0):
        pass


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    run = tmp_path_factory.mktemp("run")
    old = {k: os.environ.get(k) for k in ("VMSHIM_ROOT", "VMSHIM_RUN")}
    os.environ["VMSHIM_ROOT"], os.environ["VMSHIM_RUN"] = str(root), str(run)
    store = ContainerStore()
    cid = store.create(fake_record("fuzz", ["true"])).id
    yield store, cid
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def running_monitor(store, cid):
    """A Monitor whose main process runs, with one exec (id 5) and one exec waiting for
    'started' (id 6), each with a client connection."""
    mon = monmod.Monitor(store, cid)
    mon.placement = StubPlacement()
    host, guest = socket.socketpair()
    agent = monmod.AgentChannel(host, protocol.FrameReader(lenient=True), greeted=True)
    mon._enter(monitor_life.Running(pid=1, agent=agent))
    peers = []
    for proc_id, table in ((5, mon.procs), (6, mon.pending)):
        mine, theirs = socket.socketpair()
        conn = monmod.Conn(mine, kind="proc")
        conn.proc_id = proc_id
        table[proc_id] = conn
        mon.conns.append(conn)
        peers.append(theirs)
    return mon, guest, peers


def close(mon, guest, peers) -> None:
    """Close what :func:`running_monitor` opened."""
    guest.close()
    for peer in peers:
        peer.close()
    if mon.agent is not None:
        mon.agent.close()
    mon.log.close()


def feed(mon, guest, data: bytes) -> None:
    """Write *data* as the guest and let the monitor handle all of it."""
    view = memoryview(data)
    while view and mon.agent is not None:
        sent = guest.send(view[: 1 << 16])
        view = view[sent:]
        while mon.agent is not None and select.select([mon.agent], [], [], 0)[0]:
            mon._on_agent(select.POLLIN)


def frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["id", "code", "pid", "signal", "message", "usage", "protocol", "oom_killed", "agent", "uptime", "t"]
)
types = st.sampled_from(sorted(protocol.MESSAGE_TYPES) + ["", "bogus"]) | st.text(max_size=6)
headers = st.builds(
    lambda t, fields: {**fields, "t": t},
    types,
    st.dictionaries(field_names, json_values | st.sampled_from([1, 5, 6, 0]), max_size=5),
)
frames = st.one_of(
    st.builds(lambda h, p: frame(json.dumps(h).encode(), p), headers, st.binary(max_size=64)),
    st.builds(
        lambda depth, t: frame(b'{"t":"%s","id":' % t.encode() + b"[" * depth + b"]" * depth + b"}"),
        st.integers(1, 20000),
        st.sampled_from(["stdout", "exit", "started", "error"]),
    ),
    st.builds(frame, st.binary(max_size=200), st.binary(max_size=32)),
)


@FUZZ
@given(st.lists(frames, max_size=12))
def test_framed_garbage_never_raises(store, chunks):
    mon, guest, peers = running_monitor(*store)
    try:
        feed(mon, guest, b"".join(chunks))
        assert mon.agent is not None or mon.placement.killed or not mon.main_running
    finally:
        close(mon, guest, peers)


@FUZZ
@given(st.binary(max_size=4096))
def test_raw_bytes_never_raise(store, data):
    mon, guest, peers = running_monitor(*store)
    try:
        feed(mon, guest, data)
    finally:
        close(mon, guest, peers)


@FUZZ
@given(st.lists(frames, max_size=12))
def test_agent_client_drops_what_breaks_the_contract(chunks):
    from shim.errors import AgentError
    from shim.vm.agent_client import AgentClient

    host, guest = socket.socketpair()
    client = AgentClient(host)
    try:
        guest.sendall(b"".join(chunks))
        guest.shutdown(socket.SHUT_WR)
        while True:
            try:
                for msg in client.read_available():
                    protocol.check_from_guest(msg)  # only valid messages come out
            except AgentError:
                break
    finally:
        host.close()
        guest.close()


def test_the_issue_scenario_wrong_id_type_is_dropped_not_fatal(store):
    """stdout with id [1] after started (issue 12, attack 5): dropped and logged; the
    monitor goes on and still handles the next valid message."""
    mon, guest, peers = running_monitor(*store)
    try:
        feed(
            mon,
            guest,
            frame(b'{"t":"stdout","id":[1]}', b"x")
            + frame(b'{"t":"stdout","id":' + b"[" * 30000 + b"]" * 30000 + b"}", b"y")
            + protocol.encode("stdout", b"ok", id=5),
        )
        assert mon.agent is not None and mon.bad_messages == 2
        peers[0].setblocking(False)
        assert b"ok" in peers[0].recv(4096)
    finally:
        close(mon, guest, peers)


def test_a_stream_of_bad_messages_kills_the_container(store):
    mon, guest, peers = running_monitor(*store)
    try:
        feed(mon, guest, frame(b'{"t":"stdout","id":"1"}') * (monmod.MAX_BAD_MESSAGES + 5))
        assert mon.placement.killed == 1
        assert "messages that break the protocol" in mon.last_agent_error
    finally:
        close(mon, guest, peers)


def test_an_agent_that_never_answers_gets_a_deadline(store, monkeypatch):
    """An exec the agent never answers ends with a clear error, not a hung CLI; a late
    answer is then ignored."""
    monkeypatch.setattr(monmod, "REPLY_TIMEOUT", 0.0)
    mon, guest, peers = running_monitor(*store)
    mine, theirs = socket.socketpair()
    try:
        conn = monmod.Conn(mine, kind="proc")
        mon.conns.append(conn)
        mon._await_reply(9, conn)
        mon._run_timers()
        assert 9 not in mon.pending
        reply = protocol.FrameReader(monmod.api.TYPES).feed(theirs.recv(65536))
        assert reply[0].type == "error" and "did not answer" in reply[0].fields["message"]
        feed(mon, guest, protocol.encode("started", id=9, pid=3) + protocol.encode("stdout", b"late", id=9))
        assert mon.agent is not None and mon.bad_messages == 0
    finally:
        for s in [guest, theirs, *peers]:
            s.close()
        mon.log.close()


def test_every_skipped_frame_counts_toward_the_kill(store):
    mon, guest, peers = running_monitor(*store)
    try:
        feed(mon, guest, frame(b"not json") * (monmod.MAX_BAD_MESSAGES + 1))
        assert mon.placement.killed == 1 and mon.bad_messages >= monmod.MAX_BAD_MESSAGES
    finally:
        for s in [guest, *peers]:
            s.close()
        mon.log.close()
