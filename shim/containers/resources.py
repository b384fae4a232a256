"""Resource limits: docker's flags → a typed :class:`Resources` → what each placement
enforces. The one place that knows the units, ranges and docker's rules.

Both placements enforce the same cgroup limits (guest.spec.Limits, applied by
guest.runtime.cgroups): inside the guest on cgroup v2, on the host on v1 or v2. A VM is
also *sized* from them:

- memory: the limit plus :data:`GUEST_OVERHEAD_MIB`, what the guest itself needs (kernel,
  initramfs with python and the agent, page tables); so the container's cgroup hits its
  own limit (OOM kill inside the container, exit 137) long before the guest kernel runs
  short. Without ``--memory`` the VM gets :data:`DEFAULT_VM_MIB`.
- vCPUs: ``ceil(--cpus)`` (or the number of ``--cpuset-cpus``); the fraction is enforced
  by the guest's ``cpu.max``. ``--cpuset-cpus`` pins the VM's vCPU threads to those host
  CPUs instead of being a cpuset inside the guest.
- ``--device-read-bps``/``--device-write-bps``: a VM's container reads and writes only
  its own virtual disks, so the rate applies to each of them (guest ``io.max``).

Per process (both placements): ``--ulimit`` → ``ProcessSpec.rlimits``, ``--oom-score-adj``
→ ``ProcessSpec.oom_score_adj``. On a host without CAP_SYS_RESOURCE (this one) a ulimit
above the current hard limit cannot be set in process isolation: that is refused here,
early, with the reason.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from guest.spec import RLIMIT_NAMES, Limits
from shim.errors import UsageError
from shim.units import format_bytes, parse_bytes, parse_bytes_or_unlimited

MIB = 1 << 20
GUEST_OVERHEAD_MIB = 96
"""Guest memory the VM needs besides the container's limit. Measured (TCG, cloud kernel
6.1, benchmarks/limits.py): VM size minus the guest's MemAvailable with the container
idle is 82-86 MiB (the kernel's reservations 33-38 MiB, the initramfs held in RAM 18 MiB,
slab, the agent); 96 leaves 10-14 MiB of headroom, so a container filling its limit
meets its own cgroup's OOM killer, never the guest kernel's."""
DEFAULT_VM_MIB = 256
"""VM memory when no ``--memory`` is given (the container may use what the guest has)."""
MIN_MEMORY = 6 * MIB
"""docker's minimum ``--memory``."""
CPU_PERIOD = 100_000
"""µs: the CFS period for ``--cpus`` (docker's)."""
NANO = 1_000_000_000


# ---- units ---------------------------------------------------------------------------------


def host_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except OSError:
        return set(range(os.cpu_count() or 1))


def parse_cpuset(text: str, flag: str = "--cpuset-cpus") -> list[int]:
    """``0-2,5`` → [0, 1, 2, 5]. Raises UsageError."""
    cpus: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise UsageError(f"invalid {flag} {text!r}: expected CPU numbers such as 0-2,5")
        low, high = int(first), int(last) if sep else int(first)
        if high < low or high > 4095:
            raise UsageError(f"invalid {flag} {text!r}: bad range {part}")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def format_cpuset(cpus: list[int]) -> str:
    """[0, 1, 2, 5] → ``0-2,5``."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_device_rate(text: str, flag: str) -> tuple[str, int]:
    """``/dev/sda:10mb`` → (``/dev/sda``, 10485760). Raises UsageError."""
    path, sep, rate = str(text).rpartition(":")
    if not sep or not path.startswith("/dev/"):
        raise UsageError(f"invalid {flag} {text!r}: expected /dev/DEVICE:RATE, e.g. /dev/vda:10mb")
    return path, parse_bytes(rate, flag)


def parse_ulimit(text: str) -> tuple[str, int, int]:
    """``nofile=1024:2048`` or ``nproc=512`` (soft = hard) → (name, soft, hard); -1 or
    ``unlimited`` = no limit. Raises UsageError."""
    name, sep, values = str(text).partition("=")
    if not sep or name not in RLIMIT_NAMES:
        raise UsageError(
            f"invalid --ulimit {text!r}: expected NAME=SOFT[:HARD] with NAME one of {', '.join(RLIMIT_NAMES)}"
        )
    soft_text, _, hard_text = values.partition(":")
    hard_text = hard_text or soft_text

    def number(part: str) -> int:
        if part in ("-1", "unlimited"):
            return -1
        if not part.isdigit():
            raise UsageError(f"invalid --ulimit {text!r}: {part!r} is not a number")
        return int(part)

    soft, hard = number(soft_text), number(hard_text)
    if hard >= 0 and (soft < 0 or soft > hard):
        raise UsageError(f"invalid --ulimit {text!r}: the soft limit exceeds the hard limit")
    return name, soft, hard


# ---- the typed resources -------------------------------------------------------------------


@dataclass
class Resources:
    """A container's limits as the user gave them (0 / "" / [] / None: not given; -1:
    explicitly unlimited where docker allows it). Stored in the container's record."""

    memory: int = 0
    memory_swap: int = 0
    memory_reservation: int = 0
    nano_cpus: int = 0
    """``--cpus`` × 10⁹ (docker's NanoCpus)."""
    cpu_shares: int = 0
    cpuset_cpus: str = ""
    pids_limit: int = 0
    blkio_weight: int = 0
    device_read_bps: list = field(default_factory=list)
    device_write_bps: list = field(default_factory=list)
    ulimits: list = field(default_factory=list)
    """[[name, soft, hard]]"""
    oom_score_adj: int | None = None

    def to_dict(self) -> dict:
        """Only what is set (for the record and ``inspect``)."""
        empty = Resources()
        return {k: v for k, v in asdict(self).items() if v != getattr(empty, k)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Resources":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def is_empty(self) -> bool:
        return self == Resources()

    @property
    def cpus(self) -> float:
        return self.nano_cpus / NANO

    # ---- what the placements apply ----------------------------------------------------

    def limits(self, isolation: str) -> Limits:
        """The cgroup limits for *isolation* (``vm``: the guest's cgroup, with cpusets
        and devices translated as the module doc says)."""
        quota = self.nano_cpus * CPU_PERIOD // NANO if self.nano_cpus else 0
        read, write = self._device_rates(isolation)
        return Limits(
            memory=self.memory,
            memory_swap=self.memory_swap,
            memory_reservation=self.memory_reservation,
            cpu_quota=quota,
            cpu_period=CPU_PERIOD if quota else 0,
            cpu_shares=self.cpu_shares,
            cpuset_cpus="" if isolation == "vm" else self.cpuset_cpus,
            pids=self.pids_limit,
            blkio_weight=self.blkio_weight,
            device_read_bps=read,
            device_write_bps=write,
        )

    def _device_rates(self, isolation: str) -> tuple[list, list]:
        if isolation != "vm":
            return ([[d, r] for d, r in self.device_read_bps], [[d, r] for d, r in self.device_write_bps])
        # In a VM every rate applies to all of the container's disks: the smallest wins.
        read = [["*", min(r for _, r in self.device_read_bps)]] if self.device_read_bps else []
        write = [["*", min(r for _, r in self.device_write_bps)]] if self.device_write_bps else []
        return read, write

    def rlimits(self) -> list:
        return [list(u) for u in self.ulimits]

    def vm_memory_mib(self, default: int = DEFAULT_VM_MIB) -> int:
        """The VM's memory: the limit plus the guest's own overhead, or *default*."""
        if self.memory > 0:
            return math.ceil(self.memory / MIB) + GUEST_OVERHEAD_MIB
        return default

    def vm_vcpus(self) -> int:
        """``ceil(--cpus)``, capped by the number of ``--cpuset-cpus``; else the cpuset's
        size; else 1."""
        pinned = len(parse_cpuset(self.cpuset_cpus)) if self.cpuset_cpus else 0
        if self.nano_cpus:
            wanted = math.ceil(self.nano_cpus / NANO)
            return min(wanted, pinned) if pinned else wanted
        return pinned or 1

    def vm_cpuset(self) -> str | None:
        """Host CPUs the VM's vCPUs are pinned to (libvirt ``<vcpu cpuset=…>``), or None."""
        return self.cpuset_cpus or None

    # ---- checks ---------------------------------------------------------------------------

    def check(self, isolation: str) -> list[str]:
        """Check against docker's rules and this host; return warnings (limits that were
        dropped, as docker does). Raises UsageError."""
        warnings = []
        if self.memory and 0 < self.memory < MIN_MEMORY:
            raise UsageError("minimum memory limit allowed is 6MiB")
        if self.memory_swap and self.memory_swap != -1:
            if self.memory <= 0:
                raise UsageError(
                    "you should always set the memory limit when using the memory+swap limit (--memory-swap)"
                )
            if self.memory_swap < self.memory:
                raise UsageError(
                    "--memory-swap must be at least --memory (it is memory plus swap); use -1 for unlimited swap"
                )
        if self.memory > 0 and self.memory_reservation > self.memory:
            raise UsageError("--memory-reservation must be smaller than --memory")
        available = host_cpus()
        if self.nano_cpus:
            if self.nano_cpus < NANO // 100:
                raise UsageError("--cpus must be at least 0.01")
            if self.nano_cpus > len(available) * NANO:
                raise UsageError(
                    f"range of CPUs is from 0.01 to {len(available)}.00, as there "
                    f"are only {len(available)} CPUs available"
                )
        if self.cpu_shares and not 2 <= self.cpu_shares <= 262144:
            raise UsageError("--cpu-shares must be between 2 and 262144")
        if self.cpuset_cpus:
            wanted = parse_cpuset(self.cpuset_cpus)
            missing = sorted(set(wanted) - available)
            if missing:
                raise UsageError(
                    f"--cpuset-cpus {self.cpuset_cpus}: CPU "
                    f"{format_cpuset(missing)} is not available here "
                    f"(available: {format_cpuset(sorted(available))})"
                )
        if self.blkio_weight and not 10 <= self.blkio_weight <= 1000:
            raise UsageError("--blkio-weight must be between 10 and 1000")
        if self.oom_score_adj is not None and not -1000 <= self.oom_score_adj <= 1000:
            raise UsageError("--oom-score-adj must be between -1000 and 1000")
        if isolation == "process":
            warnings += self._check_host()
        return warnings

    def _check_host(self) -> list[str]:
        """Process isolation: what this host's kernel and privileges allow."""
        import resource
        import stat

        warnings = []
        for name, soft, hard in self.ulimits:
            number = getattr(resource, "RLIMIT_" + name.upper())
            _, current_hard = resource.getrlimit(number)
            infinite = resource.RLIM_INFINITY
            if current_hard != infinite and (hard < 0 or hard > current_hard) and not _has_cap_sys_resource():
                shown = "unlimited" if hard < 0 else hard
                raise UsageError(
                    f"--ulimit {name}: cannot raise the hard limit to {shown} "
                    f"(it is {current_hard} here, and raising it needs "
                    "CAP_SYS_RESOURCE, which this host lacks); use at most "
                    f"{current_hard}, or --isolation vm"
                )
        for flag, entries in (
            ("--device-read-bps", self.device_read_bps),
            ("--device-write-bps", self.device_write_bps),
        ):
            for path, _ in entries:
                try:
                    mode = os.stat(path).st_mode
                except OSError as exc:
                    raise UsageError(f"{flag} {path}: {(exc.strerror or str(exc)).lower()}") from None
                if not stat.S_ISBLK(mode):
                    raise UsageError(f"{flag} {path}: not a block device")
        if self.blkio_weight and not _host_supports_io_weight():
            warnings.append(
                "this kernel does not support block I/O weight (no I/O "
                "scheduler with weights is active): --blkio-weight discarded"
            )
            self.blkio_weight = 0
        return warnings

    # ---- update ---------------------------------------------------------------------------

    def merged(self, change: "Resources") -> "Resources":
        """These resources with every field *change* sets replaced (``update``)."""
        values = asdict(self)
        for key, value in asdict(change).items():
            if value != getattr(Resources(), key):
                values[key] = value
        return Resources(**values)


def check_update(
    current: Resources, change: Resources, *, isolation: str, vm_memory_mib: int = 0, vm_vcpus: int = 1
) -> Resources:
    """What ``update`` may change on a running container; returns the merged resources.
    A VM cannot grow: its memory (``vm_memory_mib``) and vCPUs are fixed while it runs.
    Raises UsageError."""
    for name in ("ulimits", "oom_score_adj"):
        if getattr(change, name) not in (None, []):
            raise UsageError(f"--{name.replace('_', '-')} cannot be changed on a running container")
    merged = current.merged(change)
    merged.check(isolation)
    if isolation == "vm":
        room = (vm_memory_mib - GUEST_OVERHEAD_MIB) * MIB
        if change.memory and (change.memory < 0 or change.memory > room):
            raise UsageError(
                f"--memory: the container's VM has room for {format_bytes(room)}; "
                "a running VM cannot grow (stop it, update, start it again)"
            )
        if change.nano_cpus and math.ceil(change.nano_cpus / NANO) > vm_vcpus:
            raise UsageError(f"--cpus: the container's VM has {vm_vcpus} vCPU(s); a running VM cannot get more")
        if change.cpuset_cpus:
            raise UsageError("--cpuset-cpus cannot be changed on a running VM")
    return merged


def _has_cap_sys_resource() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 24))
    except (OSError, ValueError):
        pass
    return False


def _host_supports_io_weight() -> bool:
    from guest.runtime.cgroups import CGROUP_ROOT, detect_version

    if detect_version(CGROUP_ROOT) == 2:
        try:
            with open(os.path.join(CGROUP_ROOT, "cgroup.controllers")) as f:
                return "io" in f.read().split()
        except OSError:
            return False
    # The root group may lack the knob that child groups have (bfq): look at ours.
    return any(
        os.path.exists(os.path.join(CGROUP_ROOT, "blkio", where, knob))
        for where in ("", "vmshim")
        for knob in ("blkio.weight", "blkio.bfq.weight")
    )


# ---- flags ---------------------------------------------------------------------------------


def from_flags(
    *,
    memory=None,
    memory_swap=None,
    memory_reservation=None,
    cpus=None,
    cpu_shares=None,
    cpuset_cpus=None,
    pids_limit=None,
    blkio_weight=None,
    device_read_bps=(),
    device_write_bps=(),
    ulimit=(),
    oom_score_adj=None,
    **_ignored,
) -> Resources:
    """Build Resources from the CLI's raw values (None / () when a flag was not given).
    Raises UsageError naming the bad flag."""
    res = Resources()
    if memory is not None:
        res.memory = parse_bytes_or_unlimited(memory, "--memory")
    if memory_swap is not None:
        res.memory_swap = parse_bytes_or_unlimited(memory_swap, "--memory-swap")
    if memory_reservation is not None:
        res.memory_reservation = parse_bytes(memory_reservation, "--memory-reservation")
    if cpus is not None:
        try:
            value = float(cpus)
        except ValueError:
            raise UsageError(f"invalid --cpus {cpus!r}: expected a number such as 0.5") from None
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"invalid --cpus {cpus!r}")
        res.nano_cpus = round(value * NANO)
    if cpu_shares is not None:
        res.cpu_shares = int(cpu_shares)
    if cpuset_cpus is not None:
        res.cpuset_cpus = format_cpuset(parse_cpuset(cpuset_cpus))
    if pids_limit is not None:
        res.pids_limit = -1 if int(pids_limit) <= 0 else int(pids_limit)
    if blkio_weight is not None:
        res.blkio_weight = int(blkio_weight)
    res.device_read_bps = [list(parse_device_rate(t, "--device-read-bps")) for t in device_read_bps]
    res.device_write_bps = [list(parse_device_rate(t, "--device-write-bps")) for t in device_write_bps]
    seen = {}
    for text in ulimit:
        name, soft, hard = parse_ulimit(text)
        seen[name] = [name, soft, hard]  # a later --ulimit of the same name wins
    res.ulimits = list(seen.values())
    if oom_score_adj is not None:
        res.oom_score_adj = int(oom_score_adj)
    return res


def resource_options(func, *, for_update: bool = False):
    """Add the limit flags (docker's names) to a click command; its function receives
    them as keyword arguments that :func:`from_flags` takes. ``for_update`` leaves out
    the ones a running container cannot change (``--ulimit``, ``--oom-score-adj``)."""
    import click

    options = [
        click.option(
            "-m",
            "--memory",
            metavar="BYTES",
            help="Memory limit (e.g. 64m, 1g). A VM gets this plus the guest's "
            f"own {GUEST_OVERHEAD_MIB} MiB (default VM: {DEFAULT_VM_MIB} MiB).",
        ),
        click.option("--memory-swap", metavar="BYTES", help="Memory plus swap limit; -1: unlimited swap."),
        click.option("--memory-reservation", metavar="BYTES", help="Memory soft limit."),
        click.option("--cpus", metavar="N", help="Number of CPUs (e.g. 0.5); a VM gets ceil(N) vCPUs."),
        click.option("-c", "--cpu-shares", type=int, metavar="N", help="CPU shares (relative weight)."),
        click.option(
            "--cpuset-cpus", metavar="LIST", help="Host CPUs to run on (0-3, 0,1); a VM's vCPUs are pinned there."
        ),
        click.option("--pids-limit", type=int, metavar="N", help="Process limit (-1: unlimited)."),
        click.option("--blkio-weight", type=int, metavar="N", help="Block I/O relative weight, 10 to 1000."),
        click.option(
            "--device-read-bps",
            multiple=True,
            metavar="DEV:RATE",
            help="Limit read rate from a device (e.g. /dev/vda:10mb); in a VM: from each of the container's disks.",
        ),
        click.option(
            "--device-write-bps",
            multiple=True,
            metavar="DEV:RATE",
            help="Limit write rate to a device; in a VM: to each of its disks.",
        ),
    ]
    if not for_update:
        options += [
            click.option("--ulimit", multiple=True, metavar="NAME=SOFT[:HARD]", help="Ulimit (e.g. nofile=1024:2048)."),
            click.option("--oom-score-adj", type=int, metavar="N", help="OOM score adjustment, -1000 to 1000."),
        ]
    for option in reversed(options):
        func = option(func)
    return func


RESOURCE_FLAGS = (
    "memory",
    "memory_swap",
    "memory_reservation",
    "cpus",
    "cpu_shares",
    "cpuset_cpus",
    "pids_limit",
    "blkio_weight",
    "device_read_bps",
    "device_write_bps",
    "ulimit",
    "oom_score_adj",
)
"""The keyword names :func:`resource_options` adds (pop them before other processing)."""


# ---- talking to the agent: update and stats --------------------------------------------------


def agent_request(client, type: str, token: str, request_id: int, timeout: float = 10.0, **fields):
    """Send an ``update`` or ``stats`` request on an agent channel (shim.vm.agent_client
    AgentClient, or anything with send/recv) and wait for its answer, setting aside the
    other messages (they are left in the client's inbox, in order). Returns the reply
    Message. Raises AgentError (the agent refused: its text)."""
    from guest import protocol
    from shim.errors import AgentError

    client.send(type, token=token, id=request_id, **fields)
    skipped = []
    try:
        while True:
            msg = client.recv(timeout)
            if msg.fields.get("id") == request_id and msg.type in (protocol.UPDATED, protocol.STATS, protocol.ERROR):
                if msg.type == protocol.ERROR:
                    raise AgentError(msg.get("message", str, f"the agent refused {type}"))
                return msg
            skipped.append(msg)
    finally:
        if skipped:
            client.unread(skipped)


def update_limits(client, token: str, limits: Limits, request_id: int = 900001) -> None:
    """Apply *limits* to the running container behind *client* (see agent_request)."""
    from guest import protocol

    agent_request(client, protocol.UPDATE, token, request_id, limits=limits.to_dict())


def read_stats(client, token: str, request_id: int = 900002) -> dict:
    """The container cgroup's usage (guest.runtime.container.Container.stats) through the
    agent: ``memory``, ``memory_limit``, ``cpu_ns``, ``pids``, ``oom_kills``, …"""
    from guest import protocol

    reply = agent_request(client, protocol.STATS, token, request_id)
    return reply.get("usage", dict)
