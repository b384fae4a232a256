"""The monitor's own life (shim.containers.monitor_life): the transition table, and the
Monitor changing it only through ``_enter``."""

from __future__ import annotations

import itertools

import pytest

from shim.containers import monitor_life as life
from shim.containers.monitor_life import (
    Booting,
    Checkpointed,
    Exited,
    Idle,
    IllegalTransition,
    Removing,
    RestartWaiting,
    Running,
    Stopping,
)

EXAMPLES = [
    Idle(),
    Booting(),
    Running(pid=7, up_since=1.0),
    Stopping(pid=7, deadline=2.0),
    Removing(pid=7, conn=object()),
    RestartWaiting(code=1),
    Exited(code=0),
    Checkpointed(),
]

LEGAL = {
    (Idle, Booting),
    (Idle, Running),
    (Idle, Exited),
    (Booting, Running),
    (Booting, Exited),
    (Running, Stopping),
    (Running, Removing),
    (Running, RestartWaiting),
    (Running, Exited),
    (Running, Checkpointed),
    (Stopping, Removing),
    (Stopping, Exited),
    (Removing, Exited),
    (RestartWaiting, Booting),
    (RestartWaiting, Exited),
    (Exited, Exited),
}


@pytest.mark.parametrize("current,new", list(itertools.product(EXAMPLES, EXAMPLES)), ids=lambda s: type(s).__name__)
def test_every_pair_is_allowed_exactly_when_the_table_lists_it(current, new):
    if (type(current), type(new)) in LEGAL:
        life.check_transition(current, new)
    else:
        with pytest.raises(IllegalTransition, match=f"from {type(current).__name__} to {type(new).__name__}"):
            life.check_transition(current, new)


def test_the_table_names_every_state():
    assert set(life.TRANSITIONS) == {type(s) for s in EXAMPLES}


def test_final_states_lead_nowhere_but_to_a_late_removal():
    assert life.TRANSITIONS[Checkpointed] == frozenset()
    assert life.TRANSITIONS[Exited] == frozenset({Exited})
    for state in EXAMPLES:
        assert life.is_final(state) == isinstance(state, (Exited, Checkpointed))


def test_live_states_are_the_ones_with_a_main_process():
    live = [type(s).__name__ for s in EXAMPLES if life.is_live(s)]
    assert live == ["Running", "Stopping", "Removing"]


def test_carry_keeps_the_main_process():
    channel = object()
    running = Running(pid=42, up_since=3.5, agent=channel)
    stopping = life.carry(running, Stopping, deadline=9.0)
    assert (stopping.pid, stopping.up_since, stopping.agent, stopping.deadline) == (42, 3.5, channel, 9.0)
    marker = object()
    removing = life.carry(stopping, Removing, conn=marker)
    assert (removing.pid, removing.conn) == (42, marker)


@pytest.fixture
def store(tmp_path, monkeypatch):
    from shim.containers.fake_isolation import fake_record
    from shim.containers.store import ContainerStore

    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path))
    monkeypatch.setenv("VMSHIM_RUN", str(tmp_path / "run"))
    store = ContainerStore()
    cid = store.create(fake_record("life", ["true"])).id
    return store, cid


def test_the_monitor_refuses_an_illegal_change_and_keeps_its_state(store):
    from shim.containers.monitor import Monitor

    mon = Monitor(*store)
    try:
        assert isinstance(mon.state, Idle) and not mon.main_running
        with pytest.raises(IllegalTransition):
            mon._enter(Stopping())  # nothing runs that could stop
        assert isinstance(mon.state, Idle)
        mon._enter(Running(pid=5))
        assert mon.main_running and mon.agent is None
        mon._enter(Exited(3))
        assert mon._last_code() == 3 and not mon.main_running
        with pytest.raises(IllegalTransition):
            mon._enter(Booting())  # an ended monitor never boots again
    finally:
        mon.log.close()


def test_a_start_to_a_busy_monitor_is_refused_without_a_boot(store):
    """A start request reaches only a fresh (Idle) monitor; one waiting to restart says so."""
    from guest import protocol
    from shim.containers import monitor as monmod
    from shim.containers import monitor_api as api
    from shim.errors import ContainerStateError

    mon = monmod.Monitor(*store)
    try:
        mon._enter(Running(pid=5))
        mon._enter(RestartWaiting(code=1))
        msg = protocol.Message(api.REQUEST, {"op": "start"}, b"")
        with pytest.raises(ContainerStateError, match="restarting"):
            mon._op_start(None, msg)
        assert isinstance(mon.state, RestartWaiting) and mon.placement is None
    finally:
        mon.log.close()


class _Sandbox:
    """Stands in for the placement of a monitor driven by hand (no process runs)."""

    killed = 0

    def kill(self):
        self.killed += 1

    def resume(self):
        pass

    def teardown(self, grace=0.0, timeout=0.0):
        pass

    def forget(self, timeout=0.0):
        pass


def _request(mon, op: str, **fields):
    """Send *op* to the monitor as a client would; the client's end of the connection."""
    import socket

    from guest import protocol
    from shim.containers import monitor as monmod
    from shim.containers import monitor_api as api

    mine, theirs = socket.socketpair()
    conn = monmod.Conn(mine)
    mon.conns.append(conn)
    mon._on_client_message(conn, protocol.Message(api.REQUEST, {"op": op, **fields}, b""))
    return theirs


def _replies(sock) -> list:
    from shim.containers import monitor_api as api
    from guest import protocol

    sock.setblocking(False)
    try:
        return protocol.FrameReader(api.TYPES).feed(sock.recv(65536))
    except BlockingIOError:
        return []


def test_rm_f_twice_and_a_stop_meanwhile_all_get_the_exit_code(store):
    """The second rm -f and a stop during a removal wait for the end the first started
    (before, the second rm -f replaced the first, which was never answered)."""
    from shim.containers import monitor as monmod

    mon = monmod.Monitor(*store)
    mon.placement = _Sandbox()
    clients = []
    try:
        mon._enter(Running(pid=5))
        clients.append(_request(mon, "remove", force=True))
        assert isinstance(mon.state, Removing) and mon.placement.killed == 1
        clients.append(_request(mon, "remove", force=True))
        clients.append(_request(mon, "stop", timeout=0))
        assert isinstance(mon.state, Removing) and mon.placement.killed == 1
        mon._agent_gone()  # the killed sandbox's channel closed
        assert isinstance(mon.state, Exited) and mon.state.code == monmod.EXIT_CODE_LOST
        assert mon.state.removal is not None
        first = _replies(clients[0])
        assert first == []  # the removal is answered when the monitor leaves (_finish)
        for sock in clients[1:]:
            (reply,) = _replies(sock)
            assert reply.fields["exit_code"] == monmod.EXIT_CODE_LOST
    finally:
        for sock in clients:
            sock.close()
        mon.log.close()


def test_no_user_input_can_ask_for_the_fake_isolation():
    """make_placement gives the unit tests' fake to records that say isolation="fake";
    neither run/create flags nor a compose file can write one."""
    from shim.compose.schema import isolation as compose_isolation
    from shim.containers.options import RunOptions
    from shim.errors import UsageError, VmshimError

    with pytest.raises(UsageError, match="invalid --isolation 'fake'"):
        RunOptions(image="busybox", isolation="fake")
    with pytest.raises(VmshimError, match="must be vm or process"):
        compose_isolation("fake", "services.web.isolation")
