"""Device rules of a container's cgroup: docker's defaults (mknod of anything; read and
write only of the default devices and the ``--device`` ones). Stdlib only.

- cgroup v1 (hosts like this one): the ``devices`` controller, ``devices.deny`` ``a``
  then one ``devices.allow`` line per rule.
- cgroup v2 (the guest): there is no file interface; the kernel asks an eBPF program of
  type BPF_PROG_TYPE_CGROUP_DEVICE attached to the cgroup. It is assembled here (a few
  instructions per rule), loaded with bpf(BPF_PROG_LOAD) and attached with
  bpf(BPF_PROG_ATTACH). Needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF.

A rule is ``(type, major, minor, access)``: type ``c``, ``b`` or ``a``; major/minor -1 for
any; access some of ``rwm``.
"""

from __future__ import annotations

import ctypes
import os
import struct

from guest.runtime import syscalls

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

DEFAULT_RULES = (
    ("c", -1, -1, "m"),
    ("b", -1, -1, "m"),  # mknod is allowed; using the node is not
    ("c", 1, 3, "rwm"),
    ("c", 1, 5, "rwm"),
    ("c", 1, 7, "rwm"),  # null zero full
    ("c", 1, 8, "rwm"),
    ("c", 1, 9, "rwm"),  # random urandom
    ("c", 5, 0, "rwm"),
    ("c", 5, 1, "rwm"),
    ("c", 5, 2, "rwm"),  # tty console ptmx
    ("c", 136, -1, "rwm"),  # /dev/pts/*
    ("c", 10, 200, "rwm"),  # /dev/net/tun
)
"""Docker's default device rules."""


class DeviceRuleError(Exception):
    """The rules could not be applied; text is for the user."""


Rule = tuple[str, int, int, str]
"""``(type c|b|a, major, minor, access rwm)``; -1 for a number means any."""


def rules_for(devices: Iterable[dict[str, Any]]) -> list[Rule]:
    """The default rules plus one per BootConfig ``devices`` entry."""
    return list(DEFAULT_RULES) + [(d["type"], d["major"], d["minor"], d["permissions"]) for d in devices]


def v1_lines(rules: Iterable[Rule]) -> list[str]:
    """``devices.allow`` lines: ``c 1:3 rwm``, ``c *:* m``."""

    def number(value: int) -> str:
        return "*" if value < 0 else str(value)

    return [f"{kind} {number(major)}:{number(minor)} {access}" for kind, major, minor, access in rules]


def apply_v1(directory: str, rules: Iterable[Rule]) -> None:
    """Deny everything, then allow *rules*, in the v1 devices cgroup *directory*."""
    try:
        with open(os.path.join(directory, "devices.deny"), "w") as f:
            f.write("a")
        for line in v1_lines(rules):
            with open(os.path.join(directory, "devices.allow"), "w") as f:
                f.write(line)
    except OSError as exc:
        raise DeviceRuleError(f"cannot set the device rules in {directory}: {exc.strerror}") from None


# ---- cgroup v2: the eBPF program ------------------------------------------------------------

# eBPF opcodes (linux/bpf.h, linux/bpf_common.h).
_LDX_MEM_W = 0x61  # dst = *(u32 *)(src + off)
_MOV64_X = 0xBF
_MOV64_K = 0xB7
_AND64_K = 0x57
_RSH64_K = 0x77
_JNE_K = 0x55
_EXIT = 0x95

_DEV_BLOCK, _DEV_CHAR = 1, 2  # BPF_DEVCG_DEV_*
_ACCESS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_*

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
_SYS_BPF = 321  # x86_64


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(rules: Iterable[Rule]) -> bytes:
    """The eBPF program (packed ``struct bpf_insn``s): 1 (allow) when a rule matches the
    access the kernel asks about, else 0. The context is ``struct bpf_cgroup_dev_ctx``
    {u32 access_type (access << 16 | type); u32 major; u32 minor}."""
    head = [
        _insn(_LDX_MEM_W, dst=2, src=1, off=0),  # r2 = access_type
        _insn(_MOV64_X, dst=3, src=2),  # r3 = type
        _insn(_AND64_K, dst=3, imm=0xFFFF),
        _insn(_MOV64_X, dst=4, src=2),  # r4 = access
        _insn(_RSH64_K, dst=4, imm=16),
        _insn(_LDX_MEM_W, dst=5, src=1, off=4),  # r5 = major
        _insn(_LDX_MEM_W, dst=6, src=1, off=8),  # r6 = minor
    ]
    body = []
    for kind, major, minor, access in rules:
        checks = []  # each jumps to the end of this rule's block when it fails
        if kind != "a":
            checks.append((3, _DEV_CHAR if kind == "c" else _DEV_BLOCK))
        if major >= 0:
            checks.append((5, major))
        if minor >= 0:
            checks.append((6, minor))
        allowed = sum(_ACCESS[a] for a in set(access))
        tail = [
            _insn(_MOV64_X, dst=7, src=4),  # r7 = access & ~allowed
            _insn(_AND64_K, dst=7, imm=~allowed & 0xFFFF),
            b"",  # if r7 != 0: next rule (made below, once the block's length is known)
            _insn(_MOV64_K, dst=0, imm=1),
            _insn(_EXIT),
        ]
        block_len = len(checks) + len(tail)
        for index, (register, value) in enumerate(checks):
            body.append(_insn(_JNE_K, dst=register, off=block_len - index - 1, imm=value))
        tail[2] = _insn(_JNE_K, dst=7, off=2, imm=0)
        body.extend(tail)
    end = [_insn(_MOV64_K, dst=0, imm=0), _insn(_EXIT)]
    return b"".join(head + body + end)


def _bpf(command: int, attr: bytes) -> int:
    buffer = ctypes.create_string_buffer(attr, 128)
    return syscalls._check(
        syscalls._libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_int(command), buffer, ctypes.c_uint(128))
    )


_preloaded: dict[tuple[Rule, ...], int] = {}
"""Programs loaded ahead of their cgroup (:func:`preload`), by rules: fd, used once."""


def preload(rules: Iterable[Rule]) -> None:
    """Load the program for *rules* now, so that :func:`apply_v2` with the same rules
    only attaches it: a pooled VM loads docker's default one while it waits for its
    container (guest.init.warm_up); the kernel's verifier takes a while under TCG.
    Raises DeviceRuleError."""
    key = tuple(rules)
    if key not in _preloaded:
        _preloaded[key] = _load(program(key))


def _load(code: bytes) -> int:
    """BPF_PROG_LOAD of *code*; the program's fd (close-on-exec). Raises DeviceRuleError."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    attr = struct.pack(
        "<IIQQIIQII16sII",
        BPF_PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        0,
        0,
        0,
        0,
        0,
        b"vmshim_devices",
        0,
        BPF_CGROUP_DEVICE,
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        raise DeviceRuleError(
            f"cannot load the device rules program (the kernel needs "
            f"CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF): "
            f"{exc.strerror}"
        ) from None


def apply_v2(directory: str, rules: Iterable[Rule]) -> None:
    """Load the program for *rules* (unless :func:`preload` did) and attach it to the v2
    cgroup *directory* (a fresh one: it must have no device program yet). Raises
    DeviceRuleError."""
    key = tuple(rules)
    prog_fd = _preloaded.pop(key, None)
    if prog_fd is None:
        prog_fd = _load(program(key))
    try:
        cgroup_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _bpf(BPF_PROG_ATTACH, struct.pack("<IIIII", cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, 0, 0))
        finally:
            os.close(cgroup_fd)
    except OSError as exc:
        raise DeviceRuleError(f"cannot attach the device rules to {directory}: {exc.strerror}") from None
    finally:
        os.close(prog_fd)
