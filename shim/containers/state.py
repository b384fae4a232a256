"""The container lifecycle: the one state machine every verb goes through.

States (``Status``)::

    created ──start──▶ running ──pause──▶ paused
       ▲                │  ▲   ◀─unpause─   │
       │                │  └──start──┐      │
       │              exit           │    exit
       │                ▼            │      │
       │             exited ◀────────┼──────┘
       │                │            │
       └────────────────┴─remove──▶ removing ──▶ (gone)

    running|paused ──checkpoint──▶ checkpointed ──restore──▶ running
    checkpointed ──remove──▶ removing


``exit`` is what the monitor records when the container's main process ends, for any
reason (it returned, stop, kill, the VM died). ``start`` from ``exited`` is a restart
(docker's ``start`` of a stopped container, or a ``--restart`` policy). ``remove`` is
allowed from ``created`` and ``exited`` (``rm -f`` stops first), and from ``removing``
so an interrupted removal can be finished. ``checkpoint`` saves the VM's memory and
writable layer (shim.containers.checkpoint) and ends the VM; ``restore`` brings the same
container back from that point. ``checkpoint --leave-running`` keeps it ``running``.

Every transition goes through :func:`transition`, which raises
:class:`~shim.errors.ContainerStateError` naming the operation, the states it needs and the
state the container is in. The predicate :func:`can` (``can("remove", status)``) asks the
same table.
"""

from __future__ import annotations

import enum

from shim.errors import ContainerStateError


class Status(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    REMOVING = "removing"
    CHECKPOINTED = "checkpointed"

    def __str__(self) -> str:
        return self.value


S = Status
TRANSITIONS: dict[str, dict[Status, Status]] = {
    "start": {S.CREATED: S.RUNNING, S.EXITED: S.RUNNING},
    "pause": {S.RUNNING: S.PAUSED},
    "unpause": {S.PAUSED: S.RUNNING},
    "exit": {S.RUNNING: S.EXITED, S.PAUSED: S.EXITED},
    "remove": {S.CREATED: S.REMOVING, S.EXITED: S.REMOVING, S.REMOVING: S.REMOVING, S.CHECKPOINTED: S.REMOVING},
    "checkpoint": {S.RUNNING: S.CHECKPOINTED, S.PAUSED: S.CHECKPOINTED},
    "restore": {S.CHECKPOINTED: S.RUNNING},
}
"""operation → {state it is allowed in: state it leads to}. A start that fails (the
command was not found, the VM did not boot) changes no state: like docker, the container
stays ``created`` (or ``exited``) with the exit code and error recorded."""

STATE_REQUIREMENTS: dict[str, tuple[Status, ...]] = {
    # Operations that need a state but do not change it.
    "stop": (S.RUNNING, S.PAUSED),
    "kill": (S.RUNNING, S.PAUSED),
    "exec": (S.RUNNING,),
    "attach": (S.RUNNING,),
    "top": (S.RUNNING,),
    "cp": (S.RUNNING,),
    "stats": (S.RUNNING, S.PAUSED),
    "network connect": (S.RUNNING,),
    "migrate": (S.RUNNING, S.PAUSED),
}


def allowed_from(operation: str) -> tuple[Status, ...]:
    """The states *operation* is allowed in."""
    if operation in TRANSITIONS:
        return tuple(TRANSITIONS[operation])
    return STATE_REQUIREMENTS[operation]


def check(operation: str, current: Status | str, name: str = "") -> None:
    """Raise ContainerStateError unless *operation* is allowed in state *current*."""
    current = Status(current)
    allowed = allowed_from(operation)
    if current not in allowed:
        raise ContainerStateError(operation, " or ".join(s.value for s in allowed), current.value, name)


def transition(operation: str, current: Status | str, name: str = "") -> Status:
    """The state *operation* leads to from *current*. Raises ContainerStateError when the
    table has no such transition (text: "cannot start container web: it is paused, must
    be created or exited")."""
    check(operation, current, name)
    if operation in TRANSITIONS:
        return TRANSITIONS[operation][Status(current)]
    return Status(current)


def can(operation: str, current: Status | str) -> bool:
    """Whether *operation* is allowed from *current* (``can("remove", "exited")``)."""
    return Status(current) in allowed_from(operation)


def is_active(current) -> bool:
    """Whether a monitor owns the container now (its VM or host processes exist)."""
    return Status(current) in (S.RUNNING, S.PAUSED)
