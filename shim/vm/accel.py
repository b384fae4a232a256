"""Which accelerator the microVMs use: KVM where a KVM guest really runs, else TCG.

A ``/dev/kvm`` node proves little. On the machines vmshim is developed on it exists and
answers ``KVM_GET_API_VERSION`` with 12, and it even runs real-mode code, but it is a
nested PVM hypervisor: QEMU ``-accel kvm`` hangs (or aborts, with ``-cpu host``) the moment a
normal kernel leaves real mode. So the check here does what a booting kernel does first:

1. ``/dev/kvm`` exists and opens read-write;
2. ``KVM_GET_API_VERSION`` is 12;
3. a test guest runs under it: a 142-byte program (:data:`TEST_GUEST`, source below) starts
   in 16-bit real mode, switches to 32-bit protected mode, then enables PAE, EFER.LME and
   paging to reach 64-bit long mode, writes the stage it reached (1, 2, 3) to I/O port
   0xE9 at each step and halts. KVM must report ``KVM_EXIT_IO`` for 1, 2 and 3 then
   ``KVM_EXIT_HLT``. It is driven in pure Python (``fcntl.ioctl`` + ``mmap`` + ``ctypes``).

The guest runs in a child Python process (``python -I -S``) with a 3 s timeout, so a
hypervisor that spins inside ``KVM_RUN`` cannot hang or crash the caller, whatever thread it
is on. All of it takes ~40 ms, and the result is cached in ``paths.root()/accel.json``,
keyed by the kernel release, the /dev/kvm node (inode, rdev, ctime: a chmod or a reboot
re-probes) and the user. ``VMSHIM_ACCEL=kvm|tcg`` overrides everything.

On the PVM machines the guest reaches stage 2 and then KVM reports ``KVM_EXIT_SHUTDOWN``
(a triple fault) at the ``wrmsr`` that sets EFER.LME. The same bytes run to stage 3 under
QEMU TCG (checked with ``qemu-system-x86_64 -accel tcg`` and an isa-debugcon on 0xE9).

Test guest source (GNU as; loaded at guest-physical 0x1000, page tables at 0x2000-0x4fff
identity-map the first 2 MiB with one 2 MiB page)::

        .code16
    start:  mov  $1, %al;  out %al, $0xE9        # stage 1: real mode
            cli
            lgdtl (0x1000 + gdtr - start)
            mov  %cr0, %eax; or $1, %eax; mov %eax, %cr0
            ljmpl $0x08, $(0x1000 + pm32 - start)
        .code32
    pm32:   mov  $0x10, %ax; mov %ax, %ds; mov %ax, %es; mov %ax, %ss
            mov  $2, %al;  out %al, $0xE9        # stage 2: protected mode
            mov  %cr4, %eax; or $0x20, %eax; mov %eax, %cr4          # PAE
            mov  $0x2000, %eax; mov %eax, %cr3                       # PML4
            mov  $0xC0000080, %ecx; rdmsr; or $0x100, %eax; wrmsr    # EFER.LME
            mov  %cr0, %eax; or $0x80000000, %eax; mov %eax, %cr0    # PG
            ljmp $0x18, $(0x1000 + lm64 - start)
        .code64
    lm64:   mov  $3, %al;  out %al, $0xE9        # stage 3: long mode
            hlt
            .align 8
    gdt:    .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF
    gdtr:   .word gdtr - gdt - 1; .long 0x1000 + gdt - start
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shim import paths
from shim.errors import UsageError

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12
PROBE_VERSION = 1
"""Bump when the probe changes, so cached results from an older probe are dropped."""
PROBE_TIMEOUT = 3.0
"""Seconds the child process may take; a healthy KVM needs ~40 ms, most of it python."""
CACHE_NAME = "accel.json"

# ioctl numbers, from <linux/kvm.h> (_IO/_IOR/_IOW with type 0xAE).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(0xAE, 0x46, 32-byte region)
KVM_RUN = 0xAE80
KVM_GET_SREGS = 0x8138AE83  # _IOR(0xAE, 0x83, struct kvm_sregs = 312 bytes)
KVM_SET_SREGS = 0x4138AE84
KVM_SET_REGS = 0x4090AE82  # _IOW(0xAE, 0x82, struct kvm_regs = 144 bytes)
SREGS_SIZE = 312
REGS_SIZE = 144

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
EXIT_NAMES = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    8: "KVM_EXIT_SHUTDOWN (a triple fault)",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    17: "KVM_EXIT_NMI",
    18: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
}

GUEST_MEMORY = 0x200000
GUEST_LOAD = 0x1000
GUEST_PML4, GUEST_PDPT, GUEST_PD = 0x2000, 0x3000, 0x4000
PROBE_PORT = 0xE9
FINAL_STAGE = 3
STAGE_NAMES = {
    0: "before its first instruction",
    1: "in 16-bit real mode",
    2: "after entering 32-bit protected mode, on the way to long mode",
    3: "in 64-bit long mode",
}

TEST_GUEST = bytes.fromhex(
    "".join(
        (
            "b001",
            "e6e9",  # 0x00 mov al,1; out 0xe9,al
            "fa",  # 0x04 cli
            "660f01168810",  # 0x05 lgdt [0x1088]
            "0f20c0",
            "6683c801",
            "0f22c0",  # 0x0b cr0 |= PE
            "66ea1d1000000800",  # 0x15 jmp far 0x08:0x101d
            "66b81000",
            "8ed8",
            "8ec0",
            "8ed0",  # 0x1d 32-bit: ds = es = ss = 0x10
            "b002",
            "e6e9",  # 0x27 mov al,2; out 0xe9,al
            "0f20e0",
            "83c820",
            "0f22e0",  # 0x2b cr4 |= PAE
            "b800200000",
            "0f22d8",  # 0x34 cr3 = 0x2000
            "b9800000c0",
            "0f32",
            "0d00010000",
            "0f30",  # 0x3c EFER |= LME
            "0f20c0",
            "0d00000080",
            "0f22c0",  # 0x4a cr0 |= PG
            "ea5c1000001800",  # 0x55 jmp far 0x18:0x105c
            "b003",
            "e6e9",  # 0x5c 64-bit: mov al,3; out 0xe9,al
            "f4",  # 0x60 hlt
            "0f1f8000000000",  # 0x61 nop (align 8)
            "0000000000000000",  # 0x68 gdt: null
            "ffff0000009acf00",  # 0x70 0x08: code32
            "ffff00000092cf00",  # 0x78 0x10: data
            "ffff0000009aaf00",  # 0x80 0x18: code64
            "1f006810",
            "0000",  # 0x88 gdtr: limit 31, base 0x1068
        )
    )
)


@dataclass(frozen=True)
class AccelInfo:
    """The accelerator to use and, in one line, why (shown by ``vmshim info``)."""

    kind: str
    """``"kvm"`` or ``"tcg"``."""
    reason: str

    @property
    def domain_type(self) -> str:
        """The libvirt ``<domain type=…>`` for this accelerator."""
        return "kvm" if self.kind == "kvm" else "qemu"


@dataclass(frozen=True)
class GuestRun:
    """What the test guest did: the last stage it reported and how KVM stopped it."""

    stage: int
    exit: str
    """``"KVM_EXIT_HLT"`` when it ran to the end; another exit name, or an error text."""

    @property
    def ok(self) -> bool:
        return self.stage == FINAL_STAGE and self.exit == "KVM_EXIT_HLT"


# --- the pieces of the probe (each replaceable in tests) ----------------------------------


def open_kvm(path: str) -> int:
    """Open the KVM device read-write; raises OSError."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def api_version(fd: int) -> int:
    """``KVM_GET_API_VERSION``; raises OSError (ENOTTY when ``fd`` is not a KVM device)."""
    return fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)


def run_test_guest(path: str, timeout: float = PROBE_TIMEOUT) -> GuestRun:
    """Run :data:`TEST_GUEST` under ``path`` in a child process, at most ``timeout`` s."""
    package_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {package_root!r}); from shim.vm.accel import _child_main; _child_main()"
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code, path], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return GuestRun(stage=-1, exit=f"no exit within {timeout:g} s")
    except OSError as exc:
        return GuestRun(stage=-1, exit=f"cannot start the probe process: {exc}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return GuestRun(stage=int(data["stage"]), exit=str(data["exit"]))
    except (IndexError, ValueError, KeyError, TypeError):
        err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return GuestRun(stage=-1, exit=f"probe process failed: {err}")


def _guest_in_this_process(path: str) -> GuestRun:
    """Create a VM with one vCPU, load :data:`TEST_GUEST` and run it. Call only in a
    throw-away process: it may block inside ``KVM_RUN`` on a broken hypervisor."""
    kvm = open_kvm(path)
    vm = _ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
    mem = mmap.mmap(-1, GUEST_MEMORY, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    mem[GUEST_LOAD : GUEST_LOAD + len(TEST_GUEST)] = TEST_GUEST
    # Identity map of the first 2 MiB: PML4[0] -> PDPT[0] -> PD[0] = one 2 MiB page.
    present_rw, huge = 0x3, 0x80
    struct.pack_into("=Q", mem, GUEST_PML4, GUEST_PDPT | present_rw)
    struct.pack_into("=Q", mem, GUEST_PDPT, GUEST_PD | present_rw)
    struct.pack_into("=Q", mem, GUEST_PD, 0 | present_rw | huge)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    _ioctl(
        vm,
        KVM_SET_USER_MEMORY_REGION,
        struct.pack("=IIQQQ", 0, 0, 0, GUEST_MEMORY, address),
        "KVM_SET_USER_MEMORY_REGION",
    )
    vcpu = _ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
    run_size = _ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    sregs = bytearray(SREGS_SIZE)
    _ioctl(vcpu, KVM_GET_SREGS, sregs, "KVM_GET_SREGS", mutate=True)
    struct.pack_into("=Q", sregs, 0, 0)  # cs.base = 0 (real mode, reset state otherwise)
    struct.pack_into("=H", sregs, 12, 0)  # cs.selector = 0
    _ioctl(vcpu, KVM_SET_SREGS, bytes(sregs), "KVM_SET_SREGS")
    regs = bytearray(REGS_SIZE)
    struct.pack_into("=Q", regs, 16 * 8, GUEST_LOAD)  # rip
    struct.pack_into("=Q", regs, 17 * 8, 0x2)  # rflags (bit 1 is always set)
    _ioctl(vcpu, KVM_SET_REGS, bytes(regs), "KVM_SET_REGS")

    stage = 0
    for _ in range(FINAL_STAGE + 2):
        _ioctl(vcpu, KVM_RUN, 0, "KVM_RUN")
        reason = struct.unpack_from("=I", run, 8)[0]
        if reason != KVM_EXIT_IO:
            return GuestRun(stage=stage, exit=EXIT_NAMES.get(reason, f"exit reason {reason}"))
        direction, size, port, count, offset = struct.unpack_from("=BBHIQ", run, 32)
        value = run[offset]
        if direction != 1 or size != 1 or port != PROBE_PORT or value != stage + 1:
            return GuestRun(stage=stage, exit=f"unexpected I/O to port {port:#x} ({value})")
        stage = value
    return GuestRun(stage=stage, exit="the guest did not halt")


def _child_main() -> None:
    """Entry point of the probe's child process: prints one JSON line."""
    import signal

    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(PROBE_TIMEOUT) + 1)  # belt and braces: the parent also times out
    try:
        result = _guest_in_this_process(sys.argv[1])
        out = {"stage": result.stage, "exit": result.exit}
    except OSError as exc:
        out = {"stage": 0, "exit": f"setting up the test VM failed: {exc.strerror or exc}"}
    print(json.dumps(out), flush=True)


def _ioctl(fd: int, request: int, arg, name: str, mutate: bool = False):
    """``fcntl.ioctl`` whose OSError names the request (``KVM_CREATE_VM: …``)."""
    try:
        return fcntl.ioctl(fd, request, arg, mutate)
    except OSError as exc:
        raise OSError(exc.errno, f"{name}: {exc.strerror}") from None


@dataclass(frozen=True)
class Probes:
    """The steps of :func:`probe_kvm`; tests pass fakes."""

    open_device: Callable[[str], int] = open_kvm
    api_version: Callable[[int], int] = api_version
    run_guest: Callable[[str], GuestRun] = run_test_guest


def probe_kvm(path: str = KVM_DEVICE, probes: Probes = Probes()) -> AccelInfo:
    """Decide KVM or TCG for ``path`` by running the checks in the module docstring.
    Never raises: every failure becomes a TCG result whose reason says what failed."""
    try:
        fd = probes.open_device(path)
    except FileNotFoundError:
        return AccelInfo("tcg", f"{path} does not exist (no KVM on this host)")
    except OSError as exc:
        hint = "; add your user to the kvm group" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return AccelInfo("tcg", f"{path} exists but cannot be opened ({os.strerror(exc.errno or 0)}){hint}")
    try:
        try:
            version = probes.api_version(fd)
        except OSError as exc:
            return AccelInfo("tcg", f"{path} does not answer KVM_GET_API_VERSION ({os.strerror(exc.errno or 0)})")
        if version != KVM_API_VERSION:
            return AccelInfo("tcg", f"{path} has KVM API version {version}, expected {KVM_API_VERSION}")
    finally:
        os.close(fd)
    run = probes.run_guest(path)
    if run.ok:
        return AccelInfo("kvm", f"{path} works: a test guest reached 64-bit long mode")
    where = STAGE_NAMES.get(run.stage, "")
    detail = f"{run.exit} {where}" if where else run.exit
    return AccelInfo("tcg", f"{path} exists but a test guest did not run under it ({detail})")


# --- the cached, overridable entry point --------------------------------------------------


def cache_key(path: str = KVM_DEVICE) -> str | None:
    """What the cached result depends on, or None when ``path`` is absent (no caching:
    that answer is instant)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"v{PROBE_VERSION}|{os.uname().release}|{path}|{st.st_ino}|{st.st_rdev}|{st.st_ctime_ns}|{os.geteuid()}"


def _read_cache(cache: Path, key: str) -> AccelInfo | None:
    try:
        data = json.loads(cache.read_text())
        if data.get("key") == key and data.get("kind") in ("kvm", "tcg"):
            return AccelInfo(data["kind"], str(data["reason"]))
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    return None


def _write_cache(cache: Path, key: str, info: AccelInfo) -> None:
    """Best effort: an unwritable state directory only costs a re-probe next time."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "kind": info.kind, "reason": info.reason}))
        os.replace(tmp, cache)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def detect_accel(
    *, path: str = KVM_DEVICE, cache: Path | None = None, env: dict | None = None, probes: Probes = Probes()
) -> AccelInfo:
    """KVM or TCG for this host. ``VMSHIM_ACCEL`` (kvm|tcg) wins; else a cached result
    for the same kernel and /dev/kvm node; else :func:`probe_kvm` (then cached).

    Raises UsageError when ``VMSHIM_ACCEL`` has another value.
    """
    environ = os.environ if env is None else env
    forced = environ.get("VMSHIM_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise UsageError(f"VMSHIM_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return AccelInfo(forced, "forced by VMSHIM_ACCEL")
    key = cache_key(path)
    if key is None:
        return AccelInfo("tcg", f"{path} does not exist (no KVM on this host)")
    cache = cache if cache is not None else paths.root() / CACHE_NAME
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached
    info = probe_kvm(path, probes)
    _write_cache(cache, key, info)
    return info


def cpu_readback(env: dict | None = None) -> str:
    """How libvirt reads back the guest CPU at each start (shim.vm.domain.CPU_READBACKS):
    ``VMSHIM_CPU_READBACK``, else ``words``. Raises UsageError for another value."""
    from shim.vm.domain import CPU_READBACKS, DEFAULT_CPU_READBACK

    environ = os.environ if env is None else env
    value = environ.get("VMSHIM_CPU_READBACK", "").strip().lower() or DEFAULT_CPU_READBACK
    if value not in CPU_READBACKS:
        raise UsageError(f"VMSHIM_CPU_READBACK must be one of {', '.join(CPU_READBACKS)}, not {value!r}")
    return value


def libvirt_kvm_problem(path: str = KVM_DEVICE) -> str | None:
    """A one-line warning when /dev/kvm has permissions that make libvirtd slow, else None.

    libvirtd checks /dev/kvm as the QEMU user (libvirt-qemu, group kvm) but probes QEMU
    with CAP_DAC_OVERRIDE. When the node is ``root:root 0600`` (no udev rule applied) the
    probe finds KVM, the check does not, libvirt drops its capability cache and re-probes
    QEMU on every domain start: ``createXML`` took 52 s instead of 0.3 s here.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    if st.st_mode & 0o006 == 0o006:
        return None
    try:
        import grp

        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (KeyError, ImportError):
        kvm_gid = None
    if kvm_gid is not None and st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060:
        return None
    return (
        f"{path} is not read-writable by group kvm (mode {stat.S_IMODE(st.st_mode):04o}); "
        f"libvirtd then re-probes QEMU on every VM start (~50 s): run "
        f"`chgrp kvm {path} && chmod 0660 {path}` (scripts/setup does this)"
    )


# --------------------------------------------------------------------------------------
# guest kernel arguments that depend on the accelerator

CPUINFO = "/proc/cpuinfo"
CPUFREQ_DIR = "/sys/devices/system/cpu/cpu0/cpufreq"


def host_tsc_khz(cpuinfo: str = CPUINFO, cpufreq_dir: str = CPUFREQ_DIR) -> int | None:
    """The host TSC's rate in kHz when the host knows it exactly, else None.

    Under TCG the guest's ``rdtsc`` reads the host's TSC, so the guest can be told its rate
    instead of calibrating it against emulated timers (which, slowed by emulation, give a
    wrong rate or none: the guest then calls its TSC unstable and keeps time in jiffies).
    ``cpu MHz`` in /proc/cpuinfo is the kernel's ``cpu_khz`` only when neither aperfmperf
    nor cpufreq supplies a live frequency, and ``cpu_khz`` is the TSC rate when the CPU
    reports ``tsc_known_freq`` and ``constant_tsc``; in every other case this says None.
    """
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            text = f.read(1 << 20)  # bounded: one CPU's block comes first
    except OSError:
        return None
    block = text.split("\n\n", 1)[0]
    fields = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    if not {"tsc_known_freq", "constant_tsc"} <= flags or "aperfmperf" in flags:
        return None
    if os.path.isdir(cpufreq_dir):
        return None
    try:
        khz = round(float(fields["cpu MHz"]) * 1000)
    except (KeyError, ValueError):
        return None
    return khz if 100_000 <= khz <= 20_000_000 else None


def kernel_args(accel_kind: str, tsc_khz: int | None) -> list[str]:
    """Extra guest kernel arguments for *accel_kind* (``kvm`` or ``tcg``).

    Under TCG: ``noapictimer`` (the emulated local APIC timer fails the kernel's
    verification after ~0.3 s of calibrating; the PIT/HPET broadcast serves instead) and,
    when the host's TSC rate is known, ``tsc_early_khz`` so the guest keeps the TSC as its
    clocksource without calibrating. Under KVM the kernel's own probes are fast and right.
    """
    if accel_kind != "tcg":
        return []
    args = ["noapictimer"]
    if tsc_khz:
        args.append(f"tsc_early_khz={int(tsc_khz)}")
    return args


def guest_cmdline(base: str, accel_kind: str, tsc_khz: int | None = None) -> str:
    """*base* (the guest image's command line) with :func:`kernel_args` appended; the host's
    TSC rate is read when *tsc_khz* is not given. Arguments already in *base* are kept once."""
    if tsc_khz is None and accel_kind == "tcg":
        tsc_khz = host_tsc_khz()
    words = base.split()
    extra = [
        a for a in kernel_args(accel_kind, tsc_khz) if a.split("=", 1)[0] not in {w.split("=", 1)[0] for w in words}
    ]
    return " ".join(words + extra)
