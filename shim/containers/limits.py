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


def stats(record: Container, store: ContainerStore | None = None, timeout: float = STATS_TIMEOUT) -> dict:
    """The running container's cgroup usage (see the module doc). Raises
    ContainerStateError when it does not run, AgentError / VmshimError from the agent
    (e.g. a paused VM does not answer within *timeout*)."""
    from shim.containers.manage import _request

    store = store or ContainerStore()
    reply = _request(store, record, "stats", timeout)
    usage = reply.fields.get("usage")
    return usage if isinstance(usage, dict) else {}


GUEST_FIGURES = (
    "memory",
    "memory_limit",
    "cpu_ns",
    "pids",
    "oom_kills",
    "cpu_user_ns",
    "cpu_system_ns",
    "memory_anon",
    "memory_file",
    "memory_peak",
    "pids_limit",
    "block_read_bytes",
    "block_write_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
)
"""What the agent's stats may carry; anything else it sends is dropped."""


def checked_figures(usage) -> dict:
    """The agent's stats reduced to known figures that are non-negative integers below
    2**63 (the guest is not trusted: anything else is dropped, never raised on)."""
    if not isinstance(usage, dict):
        return {}
    return {
        key: value
        for key, value in usage.items()
        if key in GUEST_FIGURES and type(value) is int and 0 <= value < 1 << 63
    }


def sample(record: Container, store: ContainerStore | None = None) -> dict:
    """One ``stats`` sample: ``{"guest": figures or None, "host": usage or None}``. guest:
    the container's own cgroup, from the agent (checked_figures; None when it does not
    answer, e.g. paused). host: what the container costs the host (a VM's QEMU process;
    for process isolation the same cgroup). Never raises."""
    from shim.containers.manage import usage

    guest = None
    if record.status.value == "running":
        try:
            guest = checked_figures(stats(record, store, timeout=3.0))
        except Exception:  # noqa: BLE001 - it stopped, or the agent is busy: no figures
            guest = None
    try:
        host = usage(record)
    except Exception:  # noqa: BLE001
        host = None
    return {"guest": guest, "host": host}


def update(ref: str, change: Resources, store: ContainerStore | None = None) -> Container:
    """Change *ref*'s limits: applied at once to a running container (its cgroup), kept
    in its record for the next start (a stopped VM container also gets its VM resized
    then). A running VM cannot grow beyond its memory and vCPUs (UsageError saying so).
    Returns the updated record. Raises ContainerNotFound, UsageError, AgentError."""
    from shim.containers.manage import _request

    store = store or ContainerStore()
    record = store.find(ref)
    current = record.resources
    running = lifecycle.is_active(record.status)
    if running:
        merged = check_update(
            current, change, isolation=record.isolation, vm_memory_mib=record.vm_memory_mib, vm_vcpus=record.vm_vcpus
        )
        try:
            _request(store, record, "update", UPDATE_TIMEOUT, limits=change.limits(record.isolation).to_dict())
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
        fresh.resources = merged  # a stopped VM container's VM is sized by it at its next start

    return store.update(record.id, save)
