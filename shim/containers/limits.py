"""``update`` and the cgroup side of ``stats`` for stored containers: through the
container's monitor, which asks the agent (guest.agent ``update``/``stats``), so a VM's
figures are the container cgroup's inside the guest, measured where the limits are.

:func:`stats` is what ``vmshim stats`` can call for either isolation; its dict has the
keys of guest.runtime.cgroups.Cgroup.usage (``memory``, ``memory_limit``, ``cpu_ns``,
``pids``) plus ``oom_kills`` and Cgroup.details' figures.
"""

from __future__ import annotations

from shim.containers import state as lifecycle
from shim.containers.resources import Resources, check_update
from shim.containers.store import Container, ContainerStore
from shim.errors import ContainerStateError

STATS_TIMEOUT = 10.0
UPDATE_TIMEOUT = 30.0


def stats(record: Container, store: ContainerStore | None = None,
          timeout: float = STATS_TIMEOUT) -> dict:
    """The running container's cgroup usage (see the module doc). Raises
    ContainerStateError when it does not run, AgentError / VmshimError from the agent
    (e.g. a paused VM does not answer within *timeout*)."""
    from shim.containers.manage import _request

    store = store or ContainerStore()
    reply = _request(store, record, "stats", timeout)
    usage = reply.fields.get("usage")
    return usage if isinstance(usage, dict) else {}


def update(ref: str, change: Resources, store: ContainerStore | None = None) -> Container:
    """Change *ref*'s limits: applied at once to a running container (its cgroup), kept
    in its record for the next start (a stopped VM container also gets its VM resized
    then). A running VM cannot grow beyond its memory and vCPUs (UsageError saying so).
    Returns the updated record. Raises ContainerNotFound, UsageError, AgentError."""
    from shim.containers.manage import _request

    store = store or ContainerStore()
    record = store.find(ref)
    current = Resources.from_dict(record.resources)
    running = lifecycle.is_active(record.status)
    if running:
        merged = check_update(current, change, isolation=record.isolation,
                              vm_memory_mib=record.memory_mib, vm_vcpus=current.vm_vcpus())
        try:
            _request(store, record, "update", UPDATE_TIMEOUT,
                     limits=change.limits(record.isolation).to_dict())
        except ContainerStateError:
            running = False  # it stopped meanwhile: only the record changes
    else:
        for name in ("ulimits", "oom_score_adj"):
            if getattr(change, name) not in (None, []):
                from shim.errors import UsageError

                raise UsageError(f"--{name.replace('_', '-')} cannot be changed by update")
        merged = current.merged(change)
        merged.check(record.isolation)

    def save(fresh: Container) -> None:
        fresh.resources = merged.to_dict()
        if not lifecycle.is_active(fresh.status) and fresh.isolation == "vm":
            fresh.memory_mib = merged.vm_memory_mib()

    return store.update(record.id, save)
