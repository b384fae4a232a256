"""What ``--isolation`` chooses: the interface every isolation implements for the monitor.

Users say ``--isolation vm|process``; the implementations are
:class:`shim.containers.vm_placement.VmPlacement` (its own microVM) and
:class:`shim.containers.process_placement.ProcessPlacement` (namespaces on the host), and
the unit tests use :class:`shim.containers.fake_isolation.FakeIsolation`. The monitor
(:mod:`shim.containers.monitor`) is the only caller; it gets one from
:func:`shim.containers.monitor.make_placement` and drives it through this surface alone.

The life of one: ``boot`` (or ``reattach`` after a monitor restart) gives an agent channel;
``pause``/``resume``/``kill`` while it runs; ``teardown`` once the container ended (the
run directory is gone after it); ``forget`` when the container is removed, so nothing of
it is still listed when ``rm`` returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from shim.containers.netrequest import NetworkRequest
from shim.errors import VmshimError
from shim.vm.agent_client import AgentClient


@runtime_checkable
class Isolation(Protocol):
    kind: str
    """``vm``, ``process`` (or ``fake`` in unit tests): what ``inspect`` reports."""

    def boot(self, alive: Callable[[], str | None] | None = None) -> AgentClient:
        """Make the container's sandbox and return the agent's channel after its hello.
        *alive* is polled while waiting; a string it returns aborts the boot with that
        text. On failure nothing is left behind. Raises VmshimError subclasses."""
        ...

    def reattach(self) -> AgentClient | None:
        """The channel of a sandbox a previous monitor booted; None when it is gone."""
        ...

    def running(self) -> bool:
        """Whether the sandbox still exists (running or paused)."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def kill(self) -> None:
        """End the sandbox now, without a clean shutdown. Never raises."""
        ...

    def teardown(self, grace: float = 3.0, timeout: float = 15.0) -> None:
        """After the container ended: *grace* s for a clean exit, then kill; wait up to
        *timeout* s; remove the run directory."""
        ...

    def forget(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the host has forgotten the sandbox (libvirt's domain)."""
        ...

    def info(self) -> dict:
        """What ``inspect`` shows about the sandbox."""
        ...

    def usage(self) -> dict:
        """Live figures for ``stats``: cpu_ns, memory, memory_limit, pids."""
        ...


@runtime_checkable
class VmIsolation(Isolation, Protocol):
    """What only a VM can do: restore a saved memory image, migrate live, and follow an
    engine's network namespace (shim.containers.vm_placement.VmPlacement)."""

    def restore(self, image: Path, alive: Callable[[], str | None] | None = None) -> AgentClient:
        """Start the container's VM from *image* (a checkpoint or template save image)."""
        ...

    def migrate(self, uri: str) -> None:
        """Move the running VM to the libvirt at *uri*."""
        ...

    def follow_engine_links(self) -> list[dict]:
        """Plug the engine's new interfaces into the VM; their netconf entries."""
        ...


def reattach_agent(
    isolation: Isolation, container_id: str, network_request: NetworkRequest | None, agent_socket: Path
) -> AgentClient | None:
    """The shared body of ``reattach``: if the sandbox runs, take over its network lease
    (this monitor now holds it) and connect to the agent's socket; None when it is gone or
    does not answer."""
    if not isolation.running():
        return None
    if network_request is not None:
        from shim.containers.networking import claim

        claim(container_id, os.getpid())
    try:
        return AgentClient.connect_unix(str(agent_socket), timeout=2)
    except VmshimError:
        return None
