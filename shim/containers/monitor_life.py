"""The monitor's own life: the inner state machine of one monitor process.

Not the container's lifecycle. That one (:mod:`shim.containers.state`,
docs/lifecycle.md: created, running, paused, exited, checkpointed, removing) is what the
record says and what every verb checks, across monitors and CLI calls. This one is what a
single monitor (:class:`shim.containers.monitor.Monitor`) is doing with its container
right now; it lives in that process only and ends with it (a monitor spawned after a
kill -9 starts ``Idle`` and re-attaches). Each state carries what belongs to that moment
(the main pid, the agent's channel, the stop's deadline, the client of a removal, the
exit code), so there are no flags to keep consistent::

    Idle ──start, restore──▶ Booting ──started──▶ Running ──stop──▶ Stopping
    Idle ──re-attach──────────────────────────▶ Running
    Running, Stopping ──rm -f──▶ Removing
    Running ──exit──▶ RestartWaiting (its --restart policy says so) or Exited
    Stopping, Removing ──exit──▶ Exited
    RestartWaiting ──back-off passed──▶ Booting        RestartWaiting ──stop, rm──▶ Exited
    Running ──checkpoint──▶ Checkpointed
    Booting ──failed──▶ Exited                           Idle ──nothing to serve, rm──▶ Exited
    Exited ──rm while the monitor leaves──▶ Exited (with the removal)

``Running``, ``Stopping`` and ``Removing`` are the *live* states: the container's main
process runs (in the VM or the host placement). ``Exited`` and ``Checkpointed`` are
final: the monitor's loop ends and it leaves (removing the container when ``Exited``
holds a removal). Every change goes through :func:`check_transition`, which raises
:class:`IllegalTransition` for a pair :data:`TRANSITIONS` does not list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class IllegalTransition(RuntimeError):
    """A bug in the monitor: it tried a change its life does not have."""


@dataclass
class Idle:
    """Nothing of ours runs yet: a fresh monitor, before start, restore or re-attach."""


@dataclass
class Booting:
    """The placement boots and the main process is being started (synchronous: the
    loop does not run meanwhile). *last_code*: the exit code of the previous run of this
    monitor (a restart), what waiters get if this boot fails."""

    last_code: int | None = None


@dataclass
class Running:
    """The main process runs. *pid*: its pid as the agent reported it; *up_since*:
    monotonic time it started (0.0 after a re-attach: unknown, long ago); *agent*: the
    agent's channel (shim.containers.monitor.AgentChannel), None while it is away (a
    checkpoint or migration in progress, or the sandbox just ended)."""

    pid: int = 0
    up_since: float = 0.0
    agent: Any = None


@dataclass
class Stopping(Running):
    """A stop was asked: the stop signal went out, SIGKILL follows at monotonic
    *deadline*, the sandbox is killed KILL_GRACE later."""

    deadline: float = 0.0


@dataclass
class Removing(Running):
    """``rm -f`` of a live container: the sandbox was killed; its end is awaited, then
    the container is removed and *conn* (the removal's client) answered."""

    conn: Any = None


@dataclass
class RestartWaiting:
    """The main process ended with *code*; a restart policy boots it again once its
    back-off passed (the ``restart`` timer, armed after the teardown)."""

    code: int


@dataclass
class Exited:
    """Ended for good with *code* (None: nothing ran in this monitor). The loop ends; with
    *removal* (a client connection) the container is removed and that client answered."""

    code: int | None = None
    removal: Any = None


@dataclass
class Checkpointed:
    """The VM was saved to a checkpoint and is gone; the monitor leaves."""


Life = Idle | Booting | Running | Stopping | Removing | RestartWaiting | Exited | Checkpointed

LIVE = (Running, Stopping, Removing)
"""The states in which the container's main process runs (isinstance of Running)."""
FINAL = (Exited, Checkpointed)
"""The states after which the monitor's loop ends."""

TRANSITIONS: dict[type, frozenset[type]] = {
    Idle: frozenset(
        {
            Booting,  # start, restore
            Running,  # re-attach to what a dead monitor left running
            Exited,
        }
    ),  # re-attach found nothing to serve; rm
    Booting: frozenset({Running, Exited}),
    Running: frozenset({Stopping, Removing, RestartWaiting, Exited, Checkpointed}),
    Stopping: frozenset({Removing, Exited}),  # a stop never leads to a restart
    Removing: frozenset({Exited}),
    RestartWaiting: frozenset({Booting, Exited}),  # the delay passed; stop or rm
    Exited: frozenset({Exited}),  # a removal asked while the monitor leaves
    Checkpointed: frozenset(),
}
"""state → the states it may change to. The agent's channel coming and going inside a
live state is not a transition."""


def check_transition(current: Life, new: Life) -> None:
    """Raise IllegalTransition unless the monitor may go from *current* to *new*."""
    if type(new) not in TRANSITIONS.get(type(current), frozenset()):
        raise IllegalTransition(f"the monitor cannot go from {type(current).__name__} to {type(new).__name__}")


def carry(live: Life, to: type[Running], **fields: Any) -> Running:
    """*live*'s main process in live state *to* (Stopping, Removing), with *fields*.
    Precondition: *live* is a live state (IllegalTransition otherwise)."""
    if not isinstance(live, Running):
        raise IllegalTransition(f"{type(live).__name__} has no main process to carry into {to.__name__}")
    return to(pid=live.pid, up_since=live.up_since, agent=live.agent, **fields)


def is_live(life: Life) -> bool:
    """Whether the container's main process runs in *life*."""
    return isinstance(life, Running)


def is_final(life: Life) -> bool:
    """Whether the monitor's loop ends in *life*."""
    return isinstance(life, FINAL)
