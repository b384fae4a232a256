"""The lifecycle state machine: the transition table, the predicates, the errors."""

import pytest

from shim.containers import state
from shim.containers.state import Status
from shim.errors import ContainerStateError

ALL = list(Status)


S = Status
ALLOWED = {  # operation: (the states it may start from, the state it leads to)
    "start": ((S.CREATED, S.EXITED), S.RUNNING),
    "pause": ((S.RUNNING,), S.PAUSED),
    "unpause": ((S.PAUSED,), S.RUNNING),
    "exit": ((S.RUNNING, S.PAUSED), S.EXITED),
    "remove": ((S.CREATED, S.EXITED, S.REMOVING, S.CHECKPOINTED), S.REMOVING),
    "checkpoint": ((S.RUNNING, S.PAUSED), S.CHECKPOINTED),
    "restore": ((S.CHECKPOINTED,), S.RUNNING),
}


@pytest.mark.parametrize(
    "op,start,end", [(op, start, end) for op, (starts, end) in ALLOWED.items() for start in starts]
)
def test_allowed_transitions(op, start, end):
    assert state.transition(op, start) is end
    assert state.transition(op, start.value) is end  # plain strings from the store work too


def test_every_other_transition_is_refused_with_a_clear_error():
    for op, table in state.TRANSITIONS.items():
        for current in ALL:
            if current in table:
                continue
            with pytest.raises(ContainerStateError) as info:
                state.transition(op, current, "web")
            err = info.value
            assert err.operation == op and err.actual == current.value
            assert str(err).startswith(f"cannot {op} container web: it is {current.value}")
            assert all(s.value in err.expected for s in table)


def test_error_text_names_operation_expected_and_actual():
    with pytest.raises(
        ContainerStateError,
        match=r"cannot pause container db: it is exited, "
        r"must be running",
    ):
        state.transition("pause", "exited", "db")


def test_operations_without_a_state_change():
    assert state.transition("exec", Status.RUNNING) is Status.RUNNING
    for op in ("exec", "attach", "top", "cp"):
        for current in (Status.CREATED, Status.PAUSED, Status.EXITED, Status.REMOVING):
            with pytest.raises(ContainerStateError):
                state.check(op, current)
    state.check("stop", Status.PAUSED)
    state.check("kill", Status.PAUSED)


def test_predicates_agree_with_the_table():
    assert [s for s in ALL if state.can("remove", s)] == [
        Status.CREATED,
        Status.EXITED,
        Status.REMOVING,
        Status.CHECKPOINTED,
    ]
    assert [s for s in ALL if state.can("restore", s)] == [Status.CHECKPOINTED]
    assert [s for s in ALL if state.can("pause", s)] == [Status.RUNNING]
    assert [s for s in ALL if state.can("unpause", s)] == [Status.PAUSED]
    assert [s for s in ALL if state.can("start", s)] == [Status.CREATED, Status.EXITED]
    assert [s for s in ALL if state.can("exec", s)] == [Status.RUNNING]
    assert [s for s in ALL if state.is_active(s)] == [Status.RUNNING, Status.PAUSED]


def test_unknown_state_is_a_value_error():
    with pytest.raises(ValueError):
        state.transition("start", "sleeping")
