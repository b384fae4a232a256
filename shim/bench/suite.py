"""The benchmarks of ``vmshim bench`` and the runner that takes them.

Each benchmark fills one or more :class:`~shim.bench.stats.Figure` with samples for the
subjects it applies to (vm, process, runc, floor), or with the reason a subject has no
figure. Samples of different subjects are interleaved run by run (vm, process, runc,
floor, vm, …) so drift on a busy host hits all of them alike. Whatever a benchmark
starts is removed when it ends, and the runner removes anything left on every exit path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shim.bench import host, procmem
from shim.bench.drivers import (
    BenchError,
    Capabilities,
    Floor,
    RuncSubject,
    VmshimSubject,
    default_cli,
    run,
    timed,
    timed_first_output,
)
from shim.bench.stats import SUBJECTS, Figure, Results
from shim.bench.workloads import (
    Sizes,
    WorkloadError,
    cpu_script,
    io_script,
    parse,
    syscall_script,
)
from shim.errors import UsageError
from shim.vm import memory

MIB = 1 << 20
SETTLE = 2.0
"""Seconds an idle container is left alone before its memory is read."""
EXEC_DEADLINE = 1.0
"""Density: a container that does not answer ``exec true`` within this is one too many."""

FAILURES = (BenchError, OSError, ValueError)
"""What makes one subject's figure fail (recorded as the reason), not the whole run."""

N_A_FLOOR = "n/a: the floor is a bare boot with no container in it"


@dataclass
class Context:
    runs: int
    max_density: int
    sizes: Sizes
    results: Results
    caps: Capabilities
    drivers: dict
    unavailable: dict[str, str]
    workdir: Path
    tag: str
    log: Callable[[str], None] = print
    volumes: set[str] = field(default_factory=set)
    density_budget_mib: int = 0
    """Density: stop once the containers' summed PSS reaches this (0: no budget)."""

    def available(self, figs: list[Figure], *subjects: str) -> list[str]:
        """The *subjects* that can be measured; the others get their reason in *figs*."""
        out = []
        for subject in subjects:
            reason = self.unavailable.get(subject)
            if reason:
                for fig in figs:
                    fig.skip(subject, reason)
            else:
                out.append(subject)
        return out

    def lifecycle(self, figs: list[Figure], subjects: list[str], *verbs: str) -> list[str]:
        """Drop vm/process from *subjects* (with the reason in *figs*) when the CLI lacks
        ``run -d``, ``rm`` or one of *verbs*."""
        missing = self.caps.lifecycle_missing(*verbs)
        if not missing:
            return subjects
        for subject in subjects:
            if subject in ("vm", "process"):
                for fig in figs:
                    fig.skip(subject, missing)
        return [s for s in subjects if s not in ("vm", "process")]


def _sample(ctx: Context, fig: Figure, measurers: dict[str, Callable[[], float]], warmup: bool = True) -> None:
    """Take ctx.runs samples of each measurer, interleaved; one unrecorded warm-up each
    first (it converts layers, fills the page cache). A failure ends that subject's
    figure with the reason; the others go on."""
    active: dict[str, Callable[[], float]] = {}
    for subject in [s for s in SUBJECTS if s in measurers] + [s for s in measurers if s not in SUBJECTS]:
        if warmup:
            try:
                _settled(measurers[subject])
            except FAILURES as exc:
                fig.skip(subject, f"failed: {exc}")
                continue
        active[subject] = measurers[subject]
    for i in range(ctx.runs):
        for subject, fn in list(active.items()):
            try:
                fig.add(subject, _settled(fn))
            except FAILURES as exc:
                fig.skip(subject, f"failed in run {i + 1}: {exc}")
                del active[subject]
        ctx.log(
            f"  {fig.name}: run {i + 1}/{ctx.runs} "
            + " ".join(f"{s}={fig.subjects[s].samples[-1]:.4g}" for s in active if fig.subjects[s].samples)
        )


@contextlib.contextmanager
def _detached(
    ctx: Context,
    figs: list[Figure],
    subjects: list[str],
    vm_extra: dict[str, tuple[str, ...]] | None = None,
    runc_mounts: tuple[tuple[str, str], ...] = (),
) -> Iterator[dict[str, str]]:
    """One idle detached container per subject, answering exec; subject → reference.
    A subject whose container fails gets the reason in *figs*. All removed on exit."""
    started: dict[str, str] = {}
    try:
        for subject in subjects:
            drv = ctx.drivers[subject]
            try:
                if subject == "runc":
                    ref = drv.start(mounts=runc_mounts)
                else:
                    ref = drv.start(extra=(vm_extra or {}).get(subject, ()))
                started[subject] = ref
                drv.wait_ready(ref)
            except FAILURES as exc:
                started.pop(subject, None)
                for fig in figs:
                    fig.skip(subject, f"failed to start an idle container: {exc}")
        yield started
    finally:
        for subject, ref in started.items():
            try:
                ctx.drivers[subject].remove(ref)
            except FAILURES as exc:
                ctx.log(f"  could not remove {ref} now ({exc}); retried at the end")


def _runc_foreground(drv: RuncSubject, first_output: bool, *cmd: str) -> float:
    argv = drv.run_argv(*cmd)
    name = argv[-1]
    try:
        return timed_first_output(argv) if first_output else timed(argv)
    finally:
        try:
            drv.remove(name)  # runc deleted it already when it exited; this tidies up
        except BenchError:
            pass


# ------------------------------------------------------------------------------------------
# the benchmarks


SETTLE_TIMEOUT = 10.0
"""Seconds a sample waits for the VMs it made to be gone before the next one starts."""


def _vmshim_runtime() -> str | None:
    """The vmshim-runtime next to this Python (the virtualenv's), else on PATH."""
    return shutil.which("vmshim-runtime", path=os.path.dirname(sys.executable)) or shutil.which("vmshim-runtime")


def _start_measures(ctx: Context, subjects, first_output: bool, *argv: str) -> dict[str, Callable[[], float]]:
    """One measurement per subject of starting a container that runs *argv*: to its exit,
    or with *first_output* to the first byte on its stdout; the floor: QEMU to the
    agent's first bytes."""
    clock = timed_first_output if first_output else timed
    m: dict[str, Callable[[], float]] = {}
    for s in ("vm", "process"):
        if s in subjects:
            m[s] = functools.partial(lambda drv: clock(drv.run_argv(*argv)), ctx.drivers[s])
    for s in ("runc", "oci"):
        if s in subjects:
            m[s] = functools.partial(_runc_foreground, ctx.drivers[s], first_output, *argv)
    if "floor" in subjects:
        m["floor"] = ctx.drivers["floor"].boot_time
    return m


def bench_cold_start(ctx: Context) -> None:
    fig = ctx.results.figure(
        "cold_start",
        "Cold start to the exit of `true`",
        "s",
        note="whole command, spawn to exit: `vmshim run --rm [--isolation I] busybox true`; "
        "`runc run` of a fresh bundle; floor: bare QEMU launch to the agent's first bytes",
    )
    subjects = ctx.available([fig], *SUBJECTS)
    _sample(ctx, fig, _start_measures(ctx, subjects, False, "true"))


def bench_start_snapshot(ctx: Context) -> None:
    """Issue 15: `run --rm --network none busybox true` booted cold and restored from a
    snapshot template (shim.containers.template), interleaved."""
    fig = ctx.results.figure(
        "start_snapshot",
        "run --rm true: cold boot vs snapshot template",
        "s",
        note="whole `vmshim run --rm --network none busybox true`, spawn to exit; cold: "
        "VMSHIM_TEMPLATES=off; snapshot: a copy of a saved agent-ready VM "
        "(`vmshim template create busybox`), given its identity, then started",
    )
    if not ctx.available([fig], "vm"):
        return
    drv = ctx.drivers["vm"]
    argv = drv.run_argv("true", extra=("--network", "none"))
    key = run(drv.argv("template", "create", "busybox"), timeout=600).stdout.strip()
    try:
        _sample(
            ctx, fig, {"cold": lambda: timed(["env", "VMSHIM_TEMPLATES=off", *argv]), "snapshot": lambda: timed(argv)}
        )
    finally:
        run(drv.argv("template", "rm", key), check=False)


def bench_first_output(ctx: Context) -> None:
    fig = ctx.results.figure(
        "first_output",
        "Start to first output",
        "s",
        note="spawn of `vmshim run --rm [--isolation I] busybox echo ready` (or `runc run`) "
        "to the first byte on its stdout; floor: to the agent's first bytes",
    )
    subjects = ctx.available([fig], *SUBJECTS)
    _sample(ctx, fig, _start_measures(ctx, subjects, True, "echo", "ready"))


START_POOL_SIZE = 1
"""VMs the ``start`` benchmark keeps in the warm pool while it measures."""
POOL_READY_TIMEOUT = 300.0


def _pool_ready(drv: VmshimSubject, size: int, timeout: float = POOL_READY_TIMEOUT, network: str = "") -> set[str]:
    """Wait (untimed) until *size* pooled VMs are ready, none is booting and none is of
    another kind than asked (*network*: primed VMs with a NIC on it; "": plain ones), so
    that no sample shares the CPUs with a VM the pool keeper boots; return the ready VMs'
    ids. Raises BenchError."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(run(drv.argv("pool", "ls", "--format", "json"), timeout=60).stdout)
        vms = state.get("vms") or []
        ready = {str(v.get("id")) for v in vms if v.get("state") == "ready"}
        kind_ok = all(v.get("network", "") == network for v in vms)
        if len(ready) >= size and kind_ok and not any(v.get("state") == "booting" for v in vms):
            return ready
        if time.monotonic() > deadline:
            raise BenchError(f"the warm pool did not fill within {timeout:.0f} s")
        time.sleep(0.5)


SAMPLE_VMS_GONE_TIMEOUT = 60.0


def _vm_names() -> set[str]:
    """vmshim's libvirt domains now. Raises HypervisorError."""
    from shim.vm.libvirt_backend import LibvirtBackend

    return set(LibvirtBackend().list_domains())


def _sample_vms_gone(before: set[str], timeout: float = SAMPLE_VMS_GONE_TIMEOUT) -> None:
    """Wait (untimed) until no VM of an earlier sample is left: a ``--rm`` run's monitor
    powers its VM off and libvirt forgets it after the command returned, and that
    teardown would share the CPUs and libvirtd with the next sample. VMs that were there
    before the benchmark (*before*) and the warm pool's stay. Raises BenchError."""
    from shim.containers.pool import DOMAIN_PREFIX as POOL_PREFIX

    deadline = time.monotonic() + timeout
    while True:
        left = sorted(n for n in _vm_names() if n not in before and not n.startswith(POOL_PREFIX))
        if not left:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the VM of an earlier sample did not go away within {timeout:.0f} s: {', '.join(left)}")
        time.sleep(0.1)


def bench_start(ctx: Context) -> None:
    """``run --rm busybox true`` started five ways, one row each, interleaved in one run:
    ``cold`` (a VM booted for it), ``pooled`` (taken from the warm pool,
    shim.containers.pool: layer disk and NIC hot-plugged), ``primed`` (from a pool primed
    for busybox on the default network: ``pool set --image busybox --network NET``, the
    layers and NIC plugged in at boot), and with ``--network none`` (what a snapshot
    template takes) ``cold_nonet`` and ``restored`` (a copy of a snapshot template,
    shim.containers.template). Speedup: ``cold`` / ``pooled``, ``cold`` / ``primed``,
    ``cold_nonet`` / ``restored``. The pool is switched between plain and primed before
    a sample (untimed: the keeper boots the other kind). Before each sample, untimed, the
    pool is full and the VM of the sample before is gone."""
    fig = ctx.results.figure(
        "start",
        "Start of `run --rm busybox true`: cold, pooled, snapshot template",
        "s",
        note="whole command, spawn to exit; cold: VMSHIM_POOL=off; pooled: a pool of "
        f"{START_POOL_SIZE} kept full between samples (untimed); primed: the same with "
        "`pool set --image busybox --network <default>`; cold_nonet and "
        "restored: --network none, VMSHIM_TEMPLATES=off or a template made by "
        "`vmshim template create busybox`; each sample starts once the one before "
        "has left no VM (untimed); speedup = cold row / warm row",
    )
    if "vm" not in ctx.available([fig], "vm"):
        return
    missing = ctx.caps.lifecycle_missing("pool")
    no_template = ctx.caps.lifecycle_missing("template")
    drv = ctx.drivers["vm"]
    nonet = drv.run_argv("true", extra=("--network", "none"))
    from shim.containers.networking import default_network

    net = default_network()
    pool_network: str | None = None  # the pool's last setting ("": plain, else primed on it)

    vms_before = _vm_names()

    def use_pool(network: str) -> set[str]:
        nonlocal pool_network
        _sample_vms_gone(vms_before)
        if pool_network != network:
            primed = ("--image", "busybox", "--network", network) if network else ()
            run(drv.argv("pool", "set", "--size", str(START_POOL_SIZE), *primed), timeout=120)
            pool_network = network
        return _pool_ready(drv, START_POOL_SIZE, network=network)

    def settled() -> None:
        _sample_vms_gone(vms_before)
        if not missing:
            _pool_ready(drv, START_POOL_SIZE, network=pool_network or "")  # nothing boots meanwhile

    def cold() -> float:
        settled()
        return timed(["env", "VMSHIM_POOL=off", *drv.run_argv("true")])

    def from_pool(network: str) -> float:
        import json

        before = use_pool(network)
        value = timed(drv.run_argv("true"))
        state = json.loads(run(drv.argv("pool", "ls", "--format", "json"), timeout=60).stdout)
        if before <= {str(v.get("id")) for v in state.get("vms") or []}:
            raise BenchError("the run did not take a pooled VM (it booted cold)")
        return value

    def pooled() -> float:
        return from_pool("")

    def primed() -> float:
        return from_pool(net)

    def cold_nonet() -> float:
        settled()
        return timed(["env", "VMSHIM_POOL=off", "VMSHIM_TEMPLATES=off", *nonet])

    def restored() -> float:
        settled()
        return timed(["env", "VMSHIM_POOL=off", *nonet])

    m: dict[str, Callable[[], float]] = {"cold": cold}
    if missing:
        fig.skip("pooled", missing)
    else:
        m["pooled"] = pooled
        if net and net != "none":
            m["primed"] = primed
        else:
            fig.skip("primed", f"the default network is {net!r}: a primed pool needs a bridge network")
    if no_template:
        fig.skip("cold_nonet", no_template)
        fig.skip("restored", no_template)
    else:
        m["cold_nonet"], m["restored"] = cold_nonet, restored
    previous = None
    template = None
    try:
        if not missing:
            import json

            previous = json.loads(run(drv.argv("pool", "ls", "--format", "json"), timeout=60).stdout)
            use_pool("")
        if not no_template:
            template = run(drv.argv("template", "create", "busybox"), timeout=600).stdout.strip()
        _sample(ctx, fig, m)
    finally:
        if template:
            run(drv.argv("template", "rm", template), check=False)
        if previous is not None:
            if previous.get("size"):
                run(
                    drv.argv(
                        "pool",
                        "set",
                        "--size",
                        str(previous["size"]),
                        "--memory",
                        str(previous["memory_mib"]),
                        "--cpus",
                        str(previous["vcpus"]),
                        *(("--image", previous["image"]) if previous.get("image") else ()),
                        *(("--network", previous["network"]) if previous.get("network") else ()),
                    ),
                    timeout=120,
                    check=False,
                )
            else:
                run(drv.argv("pool", "rm"), timeout=120, check=False)
    for warm, base in (("pooled", "cold"), ("primed", "cold"), ("restored", "cold_nonet")):
        if warm in fig.subjects and base in fig.subjects:
            w, c = fig.subjects[warm].median, fig.subjects[base].median
            if w and c:
                fig.subjects[warm].extra[f"speedup_vs_{base}"] = round(c / w, 2)


def bench_exec(ctx: Context) -> None:
    fig = ctx.results.figure(
        "exec",
        "exec latency: `exec ID true` into an idle container",
        "s",
        note="whole `vmshim exec` (or `runc exec`) command, spawn to exit",
    )
    fig.skip("floor", N_A_FLOOR)
    subjects = ctx.lifecycle([fig], ctx.available([fig], "vm", "process", "runc"), "exec")
    with _detached(ctx, [fig], subjects) as refs:
        m: dict[str, Callable[[], float]] = {
            s: functools.partial(lambda s, ref: timed(ctx.drivers[s].exec_argv(ref, "true")), s, ref)
            for s, ref in refs.items()
        }
        _sample(ctx, fig, m)


def _guest_used(drv: VmshimSubject, ref: str) -> dict:
    meminfo = procmem.parse_meminfo(drv.exec(ref, "cat", "/proc/meminfo", timeout=60).stdout)
    total, avail = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
    if total is None or avail is None:
        raise BenchError("the guest's /proc/meminfo lacks MemTotal or MemAvailable")
    return {"total": total, "available": avail, "used": total - avail}


def qemu_breakdown_mib(owned, guest_ram_mib: int, proc: Path = procmem.PROC) -> dict[str, float]:
    """PSS of the container's QEMU by kind (procmem.breakdown), in MiB; {} when no QEMU pid
    is known or its smaps cannot be read."""
    qemu = next((pid for key, pid in owned.roots.items() if "qemupid" in key.lower()), None)
    if qemu is None:
        return {}
    try:
        parts = procmem.smaps_breakdown(qemu, max(guest_ram_mib, 1) * MIB, proc)
    except OSError:
        return {}
    return {k: round(v / MIB, 1) for k, v in parts.items()}


def bench_memory(ctx: Context) -> None:
    fig = ctx.results.figure(
        "memory",
        "Host memory per idle container (PSS)",
        "MiB",
        note=f"PSS summed over every host process the container owns (monitor, agent, QEMU "
        f"and their children), {SETTLE:g} s after it first answered exec; floor: the "
        f"bare QEMU {SETTLE:g} s after the agent's hello",
    )
    guest = ctx.results.figure(
        "memory_guest",
        "Memory in use as the guest sees it (MemTotal - MemAvailable)",
        "MiB",
        note="`exec cat /proc/meminfo` in the idle container",
    )
    for s in ("process", "runc"):
        guest.skip(s, "n/a: shares the host kernel; its /proc/meminfo is the host's")
    guest.skip("floor", "n/a: no exec into the floor's guest")
    subjects = ctx.available([fig], "vm", "process", "runc", "floor")
    if "vm" not in subjects:
        guest.skip("vm", fig.subjects["vm"].skipped or "vm unavailable")
    subjects = ctx.lifecycle([fig, guest], subjects, "exec", "inspect")
    active = list(subjects)
    for i in range(ctx.runs):
        for s in list(active):
            try:
                if s == "floor":
                    floor: Floor = ctx.drivers["floor"]
                    vm = floor.boot()
                    try:
                        time.sleep(SETTLE)
                        owned = floor.owned(vm)
                        use = procmem.usage(owned.pids)
                    finally:
                        floor.stop(vm)
                else:
                    with _detached(ctx, [fig], [s]) as refs:
                        if s not in refs:
                            active.remove(s)
                            if s == "vm":
                                guest.skip("vm", fig.subjects["vm"].skipped or "failed")
                            continue
                        time.sleep(SETTLE)
                        owned = ctx.drivers[s].owned(refs[s])
                        use = procmem.usage(owned.pids)
                        if s == "vm":
                            try:
                                g = _guest_used(ctx.drivers[s], refs[s])
                                guest.add("vm", g["used"] / MIB)
                                guest.result("vm").extra["guest_total_mib"] = g["total"] / MIB
                                # the guest's RAM mapping is at least MemTotal long
                                parts = qemu_breakdown_mib(owned, g["total"] // MIB)
                                if parts:
                                    fig.result("vm").extra.setdefault("qemu_breakdown_mib", []).append(parts)
                            except FAILURES as exc:
                                guest.skip("vm", f"failed: {exc}")
                if not use.pids:
                    raise BenchError("none of its processes could be read")
                fig.add(s, use.pss / MIB)
                extra = fig.result(s).extra
                extra.setdefault("rss_mib", []).append(use.rss / MIB)
                extra.setdefault("processes", []).append(len(use.pids))
                extra["found_by"] = owned.roots
                extra["by_command_mib"] = {c: round(v / MIB, 1) for c, v in use.by_command.items()}
            except FAILURES as exc:
                fig.skip(s, f"failed in run {i + 1}: {exc}")
                active.remove(s)
        ctx.log(
            f"  memory: run {i + 1}/{ctx.runs} "
            + " ".join(f"{s}={fig.subjects[s].samples[-1]:.0f}MiB" for s in active if fig.subjects[s].samples)
        )


DENSITY_PSS_AT = 20
"""Density reports the PSS per container with this many running (issue 15's figure)."""


def pss_per_container(steps: list[dict]) -> dict:
    """``pss_per_container_mib_at_20`` and ``…_at_max`` (with ``max_running``) from a
    density run's steps, where measured."""
    out: dict = {}
    measured = [st for st in steps if st.get("pss_total_mib")]
    for st in measured:
        if st["running"] == DENSITY_PSS_AT:
            out[f"pss_per_container_mib_at_{DENSITY_PSS_AT}"] = round(st["pss_total_mib"] / st["running"], 1)
    if measured:
        last = measured[-1]
        out["max_running"] = last["running"]
        out["pss_per_container_mib_at_max"] = round(last["pss_total_mib"] / last["running"], 1)
    return out


def bench_density(ctx: Context) -> None:
    fig = ctx.results.figure(
        "density",
        f"Idle containers running while each answers exec within {EXEC_DEADLINE:g} s",
        "containers",
        higher_is_better=True,
        note=f"started one by one (`run -d ... sleep`), each start followed by `exec true` "
        f"into every one; stops at the first that misses {EXEC_DEADLINE:g} s, or at --max "
        f"{ctx.max_density}"
        + (f", or when their PSS reaches --budget {ctx.density_budget_mib} MiB" if ctx.density_budget_mib else "")
        + "; one pass, not --runs; PSS per container at "
        f"{DENSITY_PSS_AT} and at the last step in the extra data",
    )
    fig.skip("floor", N_A_FLOOR)
    subjects = ctx.lifecycle([fig], ctx.available([fig], "vm", "process", "runc"), "exec")
    # KSM is the memory setting (`vmshim memory set --ksm on`), not a bench switch; when it
    # is on, PSS at 20 and at --max is read after ksmd settled (bounded, untimed wait).
    ksm_on = memory.load().ksm and memory.ksm_host()["running"]
    for s in subjects:
        drv = ctx.drivers[s]
        refs: list[str] = []
        steps: list[dict] = []
        stop = None
        try:
            for k in range(1, ctx.max_density + 1):
                t0 = time.perf_counter()
                try:
                    ref = drv.start()
                    refs.append(ref)
                    drv.wait_ready(ref, timeout=180)
                except FAILURES as exc:
                    stop = f"container {k} did not start: {exc}"
                    break
                started = time.perf_counter() - t0
                latencies = []
                slow = None
                for j, r in enumerate(refs):
                    t = time.perf_counter()
                    try:
                        drv.exec(r, "true", timeout=EXEC_DEADLINE)
                    except FAILURES:
                        slow = j + 1
                        break
                    latencies.append(time.perf_counter() - t)
                step: dict[str, object] = {
                    "running": k,
                    "start_s": round(started, 3),
                    "exec_max_s": round(max(latencies), 3) if latencies else None,
                }
                if ksm_on and s == "vm" and k in (DENSITY_PSS_AT, ctx.max_density):
                    settle = memory.ksm_settle()  # untimed: start_s is already taken
                    step["ksm_settle_s"] = settle.waited_s
                    step["ksm_settled"] = settle.settled
                    step["ksm_pages_sharing"] = settle.pages_sharing
                    ctx.log(
                        f"  density {s}: waited {settle.waited_s:.0f} s for KSM "
                        + ("to settle" if settle.settled else "(timed out, read anyway)")
                    )
                pss_total_mib = 0.0
                if s != "vm" or "inspect" in ctx.caps.commands:
                    try:
                        pids: set[int] = set()
                        for r in refs:
                            pids |= drv.owned(r).pids
                        use = procmem.usage(pids)
                        pss_total_mib = step["pss_total_mib"] = round(use.pss / MIB, 1)
                        step["pss_by_command_mib"] = {c: round(v / MIB, 1) for c, v in use.by_command.items()}
                    except FAILURES:
                        pass
                step["host_available_mib"] = round(procmem.host_meminfo().get("MemAvailable", 0) / MIB)
                steps.append(step)
                ctx.log(f"  density {s}: {k} running, start {started:.2f} s, slowest exec {step['exec_max_s']}")
                if slow is not None:
                    stop = f"container {slow} missed {EXEC_DEADLINE:g} s with {k} running"
                    break
                if ctx.density_budget_mib and pss_total_mib >= ctx.density_budget_mib:
                    stop = f"PSS reached the budget of {ctx.density_budget_mib} MiB with {k} running"
                    break
            else:
                stop = f"reached --max {ctx.max_density}"
        finally:
            for r in refs:
                try:
                    drv.remove(r)
                except FAILURES as exc:
                    ctx.log(f"  could not remove {r} now ({exc}); retried at the end")
        answered = len(steps) - (1 if stop and "missed" in stop else 0)
        fig.add(s, max(answered, 0))
        fig.result(s).extra.update(
            {"stopped": stop, "steps": steps, "ksm": bool(ksm_on and s == "vm"), **pss_per_container(steps)}
        )


def _workload(
    ctx: Context,
    figs: list[Figure],
    script: str,
    expect: tuple[str, ...],
    record: Callable[[str, dict[str, float], dict[str, str]], None],
    volume: bool = False,
) -> None:
    """Run *script* ctx.runs times per subject, interleaved: ``exec`` into one idle
    detached container per subject, or — without ``run -d``/``exec`` — one
    ``run --rm`` per sample. *record(subject, phases, modes)* turns output into figures."""
    for fig in figs:
        fig.skip("floor", N_A_FLOOR)
    subjects = ctx.available(figs, "vm", "process", "runc")
    fallback = ctx.caps.lifecycle_missing("exec")
    vm_extra: dict[str, tuple[str, ...]] = {}
    runc_mounts: tuple[tuple[str, str], ...] = ()
    if volume:
        missing = ctx.caps.volumes_missing() or fallback
        if missing:
            for fig in figs:
                for s in subjects:
                    fig.skip(s, missing)
            return
        for s in [s for s in subjects if s in ("vm", "process")]:
            name = f"{ctx.tag}-vol-{s}"
            try:
                ctx.volumes.add(name)
                run(ctx.drivers[s].argv("volume", "create", name), timeout=120)
                vm_extra[s] = ("-v", f"{name}:/data")
            except FAILURES as exc:
                for fig in figs:
                    fig.skip(s, f"failed to create a volume: {exc}")
                subjects.remove(s)
        if "runc" in subjects:
            host_dir = ctx.workdir / "runc-volume"
            host_dir.mkdir(exist_ok=True)
            runc_mounts = ((str(host_dir), "/data"),)
    detached = [s for s in subjects if s == "runc" or not fallback]
    with _detached(ctx, figs, detached, vm_extra, runc_mounts) as refs:
        runners: dict[str, Callable[[], str]] = {}
        method: dict[str, str] = {}
        for s in subjects:
            drv = ctx.drivers[s]
            if s in refs:
                runners[s] = functools.partial(
                    lambda drv, ref: drv.exec(ref, "sh", "-c", script, timeout=900).stdout, drv, refs[s]
                )
                method[s] = "exec into an idle detached container"
            elif s not in detached:
                runners[s] = functools.partial(
                    lambda drv, s: run(drv.run_argv("sh", "-c", script, extra=vm_extra.get(s, ())), timeout=900).stdout,
                    drv,
                    s,
                )
                method[s] = f"one `run --rm` per sample ({fallback})"
        for fig in figs:
            for s, how in method.items():
                fig.result(s).extra["method"] = how
        for i in range(ctx.runs):
            for s, fn in list(runners.items()):
                try:
                    out = parse(fn(), expect)
                    record(s, out.phases, out.modes)
                except (WorkloadError, *FAILURES) as exc:
                    for fig in figs:
                        fig.skip(s, f"failed in run {i + 1}: {exc}")
                    del runners[s]
            ctx.log(
                f"  {figs[0].name}: run {i + 1}/{ctx.runs} "
                + " ".join(f"{s}={figs[0].subjects[s].samples[-1]:.4g}" for s in runners if figs[0].subjects[s].samples)
            )
    if volume:
        _remove_volumes(ctx)


def _remove_volumes(ctx: Context) -> list[str]:
    """``vmshim volume rm -f`` every volume made (after their containers); a volume that
    does not exist (its create failed) counts as removed. Returns what is left."""
    left = []
    for name in sorted(ctx.volumes):
        try:
            run(ctx.drivers["vm"].argv("volume", "rm", "-f", name), timeout=120)
        except BenchError as exc:
            stderr = getattr(exc, "stderr", "").lower()
            if "no such" not in stderr and "not found" not in stderr:
                left.append(f"volume {name}: {exc}")
                continue
        ctx.volumes.discard(name)
    return left


def bench_cpu(ctx: Context) -> None:
    n = ctx.sizes.cpu_mib
    fig = ctx.results.figure(
        "cpu", f"CPU: sha256sum of {n} MiB of zeros", "s", note="timed inside the container (busybox adjtimex)"
    )

    def record(s, phases, modes):
        fig.add(s, phases["cpu"])
        fig.result(s).extra["clock"] = modes.get("clock")

    _workload(ctx, [fig], cpu_script(ctx.sizes), ("cpu",), record)


def bench_syscall(ctx: Context) -> None:
    n = ctx.sizes.syscall_count
    fig = ctx.results.figure(
        "syscall",
        f"Syscalls: dd bs=1 count={n} (/dev/zero to /dev/null)",
        "s",
        note=f"{2 * n} read/write syscalls, timed inside the container",
    )

    def record(s, phases, modes):
        fig.add(s, phases["syscall"])
        fig.result(s).extra["clock"] = modes.get("clock")

    _workload(ctx, [fig], syscall_script(ctx.sizes), ("syscall",), record)


def _io(ctx: Context, prefix: str, where: str, directory: str, volume: bool) -> None:
    sz = ctx.sizes
    seq_w = ctx.results.figure(
        f"{prefix}_seq_write",
        f"{where}: sequential write, {sz.seq_mib} MiB (1 MiB blocks, fsync)",
        "MiB/s",
        higher_is_better=True,
    )
    seq_r = ctx.results.figure(
        f"{prefix}_seq_read",
        f"{where}: sequential read, {sz.seq_mib} MiB (1 MiB blocks, O_DIRECT where supported)",
        "MiB/s",
        higher_is_better=True,
    )
    rnd_w = ctx.results.figure(
        f"{prefix}_rand_write",
        f"{where}: random 4 KiB writes, each fsynced (one busybox dd per op)",
        "ops/s",
        higher_is_better=True,
    )
    rnd_r = ctx.results.figure(
        f"{prefix}_rand_read",
        f"{where}: random 4 KiB reads (one busybox dd per op, O_DIRECT where supported)",
        "ops/s",
        higher_is_better=True,
    )
    figs = [seq_w, seq_r, rnd_w, rnd_r]
    for f in (rnd_w, rnd_r):
        f.note = "extra.spawn_ops_s: the same number of dd runs doing no I/O, for scale"

    def record(s, p, modes):
        seq_w.add(s, sz.seq_mib / max(p["seq_write"], 1e-9))
        seq_r.add(s, sz.seq_mib / max(p["seq_read"], 1e-9))
        rnd_w.add(s, sz.rand_ops / max(p["rand_write"], 1e-9))
        rnd_r.add(s, sz.rand_ops / max(p["rand_read"], 1e-9))
        for f in figs:
            f.result(s).extra.update({k: v for k, v in modes.items() if k != "read"})
        for f in (seq_r, rnd_r):
            f.result(s).extra["read"] = modes.get("read", "?")
        for f in (rnd_w, rnd_r):
            f.result(s).extra.setdefault("spawn_ops_s", []).append(round(sz.rand_ops / max(p["spawn"], 1e-9), 1))

    _workload(
        ctx,
        figs,
        io_script(sz, directory),
        ("seq_write", "seq_read", "rand_write", "rand_read", "spawn"),
        record,
        volume=volume,
    )


def bench_io(ctx: Context) -> None:
    _io(ctx, "io", "Writable layer", "/", volume=False)


def bench_io_volume(ctx: Context) -> None:
    _io(ctx, "vol", "Volume", "/data", volume=True)


KERNELS = ("minimal", "distro")


def bench_kernels(ctx: Context) -> None:
    """The minimal kernel against the distro kernel: the bare boot to the agent's hello,
    `run --rm busybox true` and the guest's memory in use, both kernels in the same run
    (each `vmshim` command gets $VMSHIM_GUEST_KERNEL, each floor that kernel's image)."""
    from shim.errors import VmshimError
    from shim.guestimage import KERNEL_ENV, ensure_guest_image

    boot = ctx.results.figure(
        "kernel_boot",
        "Bare QEMU boot to the agent's hello, per guest kernel",
        "s",
        note="the floor of cold_start booted with each kernel's guest image",
    )
    start = ctx.results.figure(
        "kernel_run",
        "`vmshim run --rm busybox true`, per guest kernel",
        "s",
        note=f"whole command, spawn to exit, with {KERNEL_ENV}=minimal|distro",
    )
    memory = ctx.results.figure(
        "kernel_guest_memory",
        "Guest memory in use (MemTotal - MemAvailable), per guest kernel",
        "MiB",
        note=f"`exec cat /proc/meminfo` in an idle container, {SETTLE:g} s after it answered exec",
    )
    figs = [boot, start, memory]
    if "vm" in ctx.unavailable or "floor" in ctx.unavailable:
        for fig in figs:
            for k in KERNELS:
                fig.skip(k, ctx.unavailable.get("vm") or ctx.unavailable["floor"])
        return
    floors: dict[str, Floor] = {}
    subjects: dict[str, VmshimSubject] = {}
    cli = ctx.drivers["vm"].cli
    for k in KERNELS:
        try:
            image = ensure_guest_image(
                kernel=k, progress=functools.partial(lambda k, m: ctx.log(f"  {k} image: {m}"), k)
            )
        except VmshimError as exc:
            for fig in figs:
                fig.skip(k, f"no {k} guest image: {exc}")
            continue
        for fig in figs:
            fig.result(k).extra["kernel_release"] = image.kernel_release
        floors[k] = Floor(ctx.workdir, ctx.results.meta["host"]["accel"]["kind"], kernel=k)
        subjects[k] = VmshimSubject(["env", f"{KERNEL_ENV}={k}", *cli], "vm", f"{ctx.tag}k")
    try:
        _sample(ctx, boot, {k: f.boot_time for k, f in floors.items()})
        _sample(ctx, start, {k: functools.partial(lambda d: timed(d.run_argv("true")), d) for k, d in subjects.items()})
        for _ in range(ctx.runs):
            for k, drv in subjects.items():
                if memory.result(k).skipped:
                    continue
                try:
                    ref = drv.start()
                    try:
                        drv.wait_ready(ref)
                        time.sleep(SETTLE)
                        memory.add(k, _guest_used(drv, ref)["used"] / MIB)
                    finally:
                        drv.remove(ref)
                except FAILURES as exc:
                    memory.skip(k, f"failed: {exc}")
        for fig in (boot, start):
            speedup = ratio_of(fig, "distro", "minimal")
            if speedup is not None:
                fig.result("minimal").extra["distro_over_minimal"] = round(speedup, 2)
                ctx.log(f"  {fig.name}: the minimal kernel is {speedup:.2f}x as fast as the distro kernel")
    finally:
        for k, drv in subjects.items():
            for line in drv.cleanup():
                ctx.log(f"warning: left behind: {line}")
            for vm in list(floors[k].live):
                floors[k].stop(vm)


def ratio_of(fig: Figure, subject: str, baseline: str) -> float | None:
    """*subject*'s median over *baseline*'s in *fig*, when both were measured."""
    a, b = fig.result(subject).median, fig.result(baseline).median
    return a / b if a is not None and b else None


EXPRESS = Path(__file__).resolve().parents[2] / "examples" / "node-hello"
PODMAN_TAG = "localhost/vmshim-bench/express-podman"


def build_argv(subject: str, context: Path, registry_port: int, tag: str) -> list[str]:
    """The command that builds the Express example for *subject* with no cache: ``vmshim
    build`` (vm, process; the steps reach the mirror through host-gateway) or ``podman
    build`` with runc (host network: the mirror is on 127.0.0.1)."""
    if subject == "runc":
        return [
            "podman",
            "build",
            "--runtime",
            "runc",
            "--network",
            "host",
            "--pull=never",
            "--no-cache",
            "--ulimit",
            "nofile=20000:20000",
            "--build-arg",
            f"NPM_REGISTRY=http://127.0.0.1:{registry_port}/",
            "-t",
            PODMAN_TAG,
            str(context),
        ]
    return [
        *default_cli(),
        "build",
        "--no-cache",
        "-q",
        "--isolation",
        subject,
        "--add-host",
        "npm:host-gateway",
        "--build-arg",
        f"NPM_REGISTRY=http://npm:{registry_port}/",
        "-t",
        f"{tag}-express",
        str(context),
    ]


def _podman_node() -> str | None:
    """Why podman cannot build the example (None: it can): podman and runc installed, and
    the node image given to podman (``vmshim save node | podman load``) once."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        return "podman or runc is not installed"
    if run(["podman", "image", "exists", "docker.io/library/node:latest"], check=False, timeout=60).returncode == 0:
        return None
    import subprocess

    save = subprocess.Popen([*default_cli(), "save", "node:latest"], stdout=subprocess.PIPE)
    load = subprocess.run(["podman", "load"], stdin=save.stdout, capture_output=True, timeout=900)
    if save.stdout is not None:  # stdout=PIPE: always
        save.stdout.close()
    if save.wait(timeout=60) != 0 or load.returncode != 0:
        return f"podman load of the node image failed: {load.stderr.decode()[-200:]}"
    return None


def bench_build_express(ctx: Context) -> None:
    """``vmshim build`` of examples/node-hello (npm install express from the npm mirror of
    shim/bench/npm_mirror.py, served on this host) next to ``podman build`` with runc."""
    from shim import paths
    from shim.bench import npm_mirror

    fig = ctx.results.figure(
        "build_express",
        "Build of the Express example, no cache",
        "s",
        note="`vmshim build --no-cache --isolation I examples/node-hello` (npm install "
        "express from a local npm mirror); runc: `podman build --runtime runc` of "
        "the same context",
    )
    for s in ("oci", "floor"):
        fig.skip(s, "n/a: builds are measured for vm, process and podman (runc)")
    mirror = paths.root() / "cache" / "npm"
    if not npm_mirror.ready(EXPRESS / "package.json", mirror):
        for s in ("vm", "process", "runc"):
            fig.skip(
                s, f"no npm mirror: python -m shim.bench.npm_mirror fetch examples/node-hello/package.json {mirror}"
            )
        return
    subjects = [s for s in ctx.available([fig], "vm", "process") if s in ("vm", "process")]
    reason = _podman_node()
    if reason:
        fig.skip("runc", reason)
    else:
        subjects.append("runc")
    from shim.network.store import NetworkStore

    # Only where the builds look: loopback (podman, host network) and the default
    # network's gateway (host-gateway in vmshim builds), never every address.
    server = npm_mirror.serve_in_thread(mirror, "127.0.0.1", 0)
    port = server.server_address[1]
    servers = [server, npm_mirror.serve_in_thread(mirror, NetworkStore().default().gateway, port)]
    try:
        context = ctx.workdir / "express"
        shutil.rmtree(context, ignore_errors=True)
        shutil.copytree(EXPRESS, context)
        m: dict[str, Callable[[], float]] = {
            s: functools.partial(lambda s: timed(build_argv(s, context, port, ctx.tag), timeout=3600), s)
            for s in subjects
        }
        _sample(ctx, fig, m)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def bench_engine_network(ctx: Context) -> None:
    """dockerd's default bridge: round trip and throughput to a busybox httpd run with
    ``--runtime vmshim`` (oci) and ``--runtime runc`` (shim.bench.engine_net)."""
    from shim.bench import engine_net

    note = (
        "a private dockerd in a network namespace of its own; client in that namespace, "
        "server: busybox httpd on docker's default bridge, `docker run --runtime R`"
    )
    rtt = ctx.results.figure(
        "engine_rtt",
        "dockerd bridge: HTTP round trip (new connection)",
        "ms",
        note=f"median of {engine_net.RTT_REQUESTS} GETs of 6 bytes per sample; {note}",
    )
    tput = ctx.results.figure(
        "engine_throughput",
        f"dockerd bridge: download of {engine_net.BIG_MIB} MiB",
        "MiB/s",
        higher_is_better=True,
        note=note,
    )
    figs = [rtt, tput]
    for fig in figs:
        for s in ("vm", "process", "floor"):
            fig.skip(s, "n/a: measured for docker run --runtime vmshim (oci) and runc")
    reason = engine_net.unavailable() or ("" if _vmshim_runtime() else "vmshim-runtime is not installed")
    if reason:
        for fig in figs:
            for s in ("oci", "runc"):
                fig.skip(s, reason)
        return
    with engine_net.BenchDockerd(ctx.workdir, _vmshim_runtime() or "") as dockerd:
        servers: dict[str, str] = {}
        for subject, runtime in engine_net.SUBJECT_RUNTIMES.items():
            try:
                _cid, servers[subject] = dockerd.start_server(runtime)
                dockerd.measure(servers[subject])  # warm-up: waits for it to answer
            except FAILURES as exc:
                servers.pop(subject, None)
                for fig in figs:
                    fig.skip(subject, f"failed: {exc}")
        for i in range(ctx.runs):
            for subject, ip in list(servers.items()):
                try:
                    data = dockerd.measure(ip)
                except FAILURES as exc:
                    for fig in figs:
                        fig.skip(subject, f"failed in run {i + 1}: {exc}")
                    del servers[subject]
                    continue
                rtt.add(subject, data["rtt_ms"])
                tput.add(subject, data["mib_s"])
            ctx.log(
                f"  engine_network: run {i + 1}/{ctx.runs} "
                + " ".join(
                    f"{s}={rtt.subjects[s].samples[-1]:.3g}ms/{tput.subjects[s].samples[-1]:.3g}MiB/s" for s in servers
                )
            )


BENCHMARKS: dict[str, tuple[Callable[[Context], None], str]] = {
    "cold_start": (bench_cold_start, "run --rm true, spawn to exit (and the floor)"),
    "first_output": (bench_first_output, "run --rm echo, spawn to first stdout byte"),
    "start": (bench_start, "run --rm true: cold vs a pooled VM (warm pool) vs a snapshot template, and the ratios"),
    "exec": (bench_exec, "exec true into an idle container"),
    "start_snapshot": (bench_start_snapshot, "run --rm true: cold vs from a snapshot template"),
    "memory": (bench_memory, "host PSS per idle container, and the guest's view"),
    "density": (bench_density, "idle containers until exec misses 1 s (or --max)"),
    "cpu": (bench_cpu, "sha256sum of N MiB inside the container"),
    "syscall": (bench_syscall, "dd bs=1: read/write syscalls inside the container"),
    "io": (bench_io, "sequential and random I/O in the writable layer"),
    "io_volume": (bench_io_volume, "sequential and random I/O in a volume"),
    "kernels": (bench_kernels, "minimal vs distro guest kernel: boot, run --rm true, guest memory"),
    "build_express": (bench_build_express, "build of the Express example: vm, process, podman+runc"),
    "engine_network": (bench_engine_network, "dockerd bridge round trip and throughput: --runtime vmshim vs runc"),
}


def select(only: list[str]) -> list[str]:
    """Benchmark names from ``--only`` values (repeated or comma-separated; empty: all).
    Raises UsageError naming an unknown one."""
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UsageError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if not names:
        return list(BENCHMARKS)
    return [n for n in BENCHMARKS if n in names]


def _state_root() -> Path:
    from shim import paths

    return paths.root()


def _domain_names() -> set[str] | None:
    """The names of the domains libvirt lists, or None when it cannot be asked."""
    try:
        import libvirt

        from shim import paths

        libvirt.registerErrorHandler(lambda *_: None, None)
        conn = libvirt.openReadOnly(paths.libvirt_uri())
    except Exception:  # noqa: BLE001 - nothing to wait for
        return None
    try:
        return {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()


def _settled(measure: Callable[[], float], timeout: float = SETTLE_TIMEOUT) -> float:
    """Run *measure*, then wait (untimed) until the VMs it made are gone again:
    ``vmshim run --rm`` returns when the process exits while its monitor tears the VM
    down, and libvirt serialises a new domain's creation behind that clean-up (~2 s
    here), so the next subject would pay for this one's teardown."""
    before = _domain_names()
    value = measure()
    if before is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = _domain_names()
            if now is None or now <= before:
                break
            time.sleep(0.1)
    return value


def _leftover_domains(ids: list[str], timeout: float = 20.0) -> list[str]:
    """Domains of our containers that libvirt still lists (teardown is asynchronous)."""
    wanted = {f"vmshim-{i[:12]}" for i in ids if len(i) >= 12}
    if not wanted:
        return []
    try:
        import libvirt

        from shim import paths

        libvirt.registerErrorHandler(lambda *_: None, None)
        conn = libvirt.openReadOnly(paths.libvirt_uri())
    except Exception:  # noqa: BLE001 - nothing to check against
        return []
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = sorted(wanted & {d.name() for d in conn.listAllDomains()})
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)
    finally:
        conn.close()


LEFT_OUT = "not measured: left out by --subjects"


def left_out(subjects: list[str] | None) -> dict[str, str]:
    """The subjects not in *subjects* (None: all are measured), each with its reason."""
    if subjects is None:
        return {}
    return {s: LEFT_OUT for s in SUBJECTS if s not in subjects}


def run_suite(
    names: list[str],
    runs: int,
    max_density: int,
    log: Callable[[str], None] = print,
    sizes: Sizes | None = None,
    cli: list[str] | None = None,
    density_budget_mib: int = 0,
    subjects: list[str] | None = None,
) -> Results:
    """Take the benchmarks *names* and return the Results (meta filled in); *subjects*
    (None: all) limits who is measured, the others are skipped with the reason. Everything
    started is removed before this returns, also on errors and interrupts."""
    started = time.time()
    t0 = time.perf_counter()
    sizes = sizes or Sizes()
    cli = cli or default_cli()
    results = Results()
    meta = results.meta
    meta.update(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "runs": runs,
            "max_density": max_density,
            "benchmarks": names,
            "density_budget_mib": density_budget_mib,
            "subjects": subjects,
            "sizes": sizes.to_dict(),
            "cli": cli,
            "image": "busybox",
            "host": host.describe(),
        }
    )
    caps = Capabilities.probe(cli)
    meta["cli_commands"] = sorted(caps.commands)
    tag = f"vbench{os.getpid()}"
    root = _state_root()
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=root))
    drivers: dict = {  # as Context.drivers: one driver class per kind of subject
        "vm": VmshimSubject(cli, "vm", tag),
        "process": VmshimSubject(cli, "process", tag),
        "runc": RuncSubject(workdir, tag),
        "oci": RuncSubject(workdir, tag, name="oci", binary=_vmshim_runtime()),
        "floor": Floor(workdir, meta["host"]["accel"]["kind"]),
    }
    unavailable = left_out(subjects)
    for s in ("runc", "oci", "floor"):
        if s in unavailable:
            continue
        reason = drivers[s].unavailable()
        if reason:
            unavailable[s] = reason
    ctx = Context(
        runs,
        max_density,
        sizes,
        results,
        caps,
        drivers,
        unavailable,
        workdir,
        tag,
        log,
        density_budget_mib=density_budget_mib,
    )
    durations = meta.setdefault("durations_s", {})
    errors = meta.setdefault("errors", {})
    try:
        for name in names:
            fn, what = BENCHMARKS[name]
            log(f"{name}: {what}")
            b0 = time.perf_counter()
            try:
                fn(ctx)
            except FAILURES as exc:
                errors[name] = str(exc)
                log(f"  {name} failed: {exc}")
            durations[name] = round(time.perf_counter() - b0, 1)
    finally:
        leftovers = []
        for s in ("vm", "process", "runc", "oci", "floor"):
            leftovers += drivers[s].cleanup()
        leftovers += _remove_volumes(ctx)
        ids = [i for s in ("vm",) for i in drivers[s].ids.values()]
        leftovers += [f"domain {d} still listed by libvirt" for d in _leftover_domains(ids)]
        shutil.rmtree(workdir, ignore_errors=True)
        meta["leftovers"] = leftovers
        meta["host"]["guest_kernel"] = host.guest_kernel() or meta["host"].get("guest_kernel")
        meta["duration_s"] = round(time.perf_counter() - t0, 1)
        for line in leftovers:
            log(f"warning: left behind: {line}")
    return results
