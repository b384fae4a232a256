"""Seccomp filters in pure Python: a profile becomes a classic-BPF program, installed with
prctl(PR_SET_SECCOMP). Stdlib only; the guest agent and ``--isolation process`` (the same
runtime, on the host) both use it.

Two formats:

- a **profile** (docker's format: ``syscalls`` entries may carry ``includes`` /
  ``excludes`` by ``caps``, ``minKernel`` or ``arches``), such as the default one
  (guest.runtime.seccomp_default) or a ``--security-opt seccomp=PROFILE.json`` file;
  :func:`resolve_profile` turns it into
- an **OCI seccomp object** (``linux.seccomp`` of the runtime spec: ``defaultAction``,
  ``defaultErrnoRet``, ``syscalls`` with ``names``/``action``/``errnoRet``/``args``), which
  is what :class:`guest.spec.ProcessSpec` carries and :func:`compile_filter` compiles.

The filter (x86_64 only; another architecture gets the default action): check the audit
arch, refuse x32 numbers, find the syscall in a binary tree of ``jge`` on its number, then
try its rules in order; each rule is an AND of 64-bit argument comparisons (done on the
two 32-bit halves). The first rule that matches decides; none matching: the default.
"""

from __future__ import annotations

import ctypes
import os
import struct

from guest.runtime import syscalls
from guest.runtime.seccomp_default import PROFILE as DEFAULT_PROFILE

from guest.runtime.syscalls_x86_64 import AUDIT_ARCH_X86_64, NUMBERS, X32_SYSCALL_BIT

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

# seccomp return values (linux/seccomp.h).
ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,  # kill the thread
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,  # | errno
    "SCMP_ACT_TRACE": 0x7FF00000,  # | msg
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")
OUR_ARCHES = ("SCMP_ARCH_X86_64", "amd64", "x86_64")
MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS

# classic BPF opcodes (linux/filter.h).
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JEQ = 0x15
_JGT = 0x25
_JGE = 0x35
_JSET = 0x45
_JA = 0x05
_RET_K = 0x06

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR, _ARCH = 0, 4


def _arg_lo(index: int) -> int:
    return 16 + 8 * index


def _arg_hi(index: int) -> int:
    return 20 + 8 * index


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class SeccompError(Exception):
    """A profile is malformed or cannot be compiled or installed; text is for the user."""


# ---- profiles ----------------------------------------------------------------------------


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel (or of *release*, ``6.1.0-13-cloud-amd64``)."""
    release = release or os.uname().release
    parts = []
    for piece in release.split(".")[:2]:
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits or 0))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def resolve_profile(
    profile: object, capabilities: Iterable[str] | None, kernel: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A docker-format *profile* → an OCI seccomp object, keeping the entries whose
    ``includes`` hold (every cap in *capabilities*, the kernel at least ``minKernel``, our
    architecture listed) and whose ``excludes`` do not. Raises SeccompError."""
    if not isinstance(profile, dict):
        raise SeccompError("a seccomp profile must be a JSON object")
    caps = set(capabilities or ())
    kernel = kernel or kernel_version()
    out: dict[str, Any] = {"defaultAction": profile.get("defaultAction"), "syscalls": []}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    entries = profile.get("syscalls") or []
    if not isinstance(entries, list):
        raise SeccompError("seccomp profile field 'syscalls' must be a list")
    for entry in entries:
        if not isinstance(entry, dict):
            raise SeccompError("seccomp profile: each syscalls entry must be an object")
        if not _holds(entry.get("includes") or {}, caps, kernel, all_of=True):
            continue
        excludes = entry.get("excludes") or {}
        if excludes and _holds(excludes, caps, kernel, all_of=False):
            continue
        rule = {k: entry[k] for k in ("names", "action", "errnoRet", "args") if k in entry}
        if "name" in entry and "names" not in entry:  # docker's older single-name form
            rule["names"] = [entry["name"]]
        out["syscalls"].append(rule)
    check(out)
    return out


def _holds(condition: object, caps: set[str], kernel: tuple[int, int], all_of: bool) -> bool:
    """Whether an ``includes`` (*all_of*: every part must hold) or ``excludes`` (any part
    holding excludes) condition is true."""
    if not isinstance(condition, dict):
        raise SeccompError("seccomp profile: includes/excludes must be objects")
    results = []
    if condition.get("caps"):
        wanted = set(condition["caps"])
        results.append(wanted <= caps if all_of else bool(wanted & caps))
    if condition.get("arches"):
        results.append(any(a in OUR_ARCHES for a in condition["arches"]))
    if condition.get("minKernel"):
        results.append(kernel >= kernel_version(str(condition["minKernel"])))
    if not results:
        return all_of
    return all(results) if all_of else any(results)


def check(oci: object) -> dict[str, Any]:
    """Validate an OCI seccomp object (untrusted JSON); return it. Raises SeccompError
    naming the bad field."""
    if not isinstance(oci, dict):
        raise SeccompError("seccomp must be a JSON object")
    _action(oci.get("defaultAction"), oci.get("defaultErrnoRet"), "defaultAction")
    arches = oci.get("architectures") or []
    if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
        raise SeccompError("seccomp field 'architectures' must be a list of names")
    rules = oci.get("syscalls") or []
    if not isinstance(rules, list) or len(rules) > 2048:
        raise SeccompError("seccomp field 'syscalls' must be a list of at most 2048 rules")
    for number, rule in enumerate(rules):
        where = f"seccomp syscalls[{number}]"
        if not isinstance(rule, dict):
            raise SeccompError(f"{where} must be an object")
        names = rule.get("names")
        if (
            not isinstance(names, list)
            or not names
            or len(names) > 1024
            or not all(isinstance(n, str) and 0 < len(n) < 64 for n in names)
        ):
            raise SeccompError(f"{where}.names must be a non-empty list of syscall names")
        _action(rule.get("action"), rule.get("errnoRet"), f"{where}.action")
        args = rule.get("args") or []
        if not isinstance(args, list) or len(args) > 6:
            raise SeccompError(f"{where}.args must be a list of at most 6 conditions")
        for arg in args:
            if (
                not isinstance(arg, dict)
                or arg.get("op") not in OPS
                or not _is_u64(arg.get("value", 0))
                or not _is_u64(arg.get("valueTwo", 0))
                or not (_is_int(arg.get("index")) and 0 <= arg["index"] <= 5)
            ):
                raise SeccompError(
                    f"{where}.args: each needs index 0..5, value(s) 0..2^64-1 and op one of {', '.join(OPS)}"
                )
    return oci


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _action(name: object, errno_ret: object, where: str) -> int:
    """The seccomp return value of action *name*; raises SeccompError."""
    if name not in ACTIONS:
        raise SeccompError(f"{where} must be one of {', '.join(sorted(ACTIONS))} (got {name!r})")
    value = ACTIONS[name]
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        if errno_ret is None:
            errno_ret = 1 if name == "SCMP_ACT_ERRNO" else 0  # EPERM, as runc
        if not isinstance(errno_ret, int) or isinstance(errno_ret, bool) or not 0 <= errno_ret <= 0xFFFF:
            raise SeccompError(f"{where}: errnoRet must be an integer in 0..65535")
        value |= errno_ret
    return value


# ---- the BPF program ---------------------------------------------------------------------


class _Label:
    __slots__ = ()


_Target = int | _Label
"""A jump offset, or the label it is to be computed to."""


class _Assembler:
    """Instructions with forward labels; conditional jumps must land within 255."""

    def __init__(self) -> None:
        self.items: list[_Label | tuple[int, _Target, _Target, _Target]] = []

    def place(self, label: _Label) -> None:
        self.items.append(label)

    def load(self, offset: int) -> None:
        self.items.append((_LD_W_ABS, 0, 0, offset))

    def and_k(self, mask: int) -> None:
        self.items.append((_ALU_AND_K, 0, 0, mask))

    def jump(self, code: int, k: int, jt: _Target = 0, jf: _Target = 0) -> None:
        self.items.append((code, jt, jf, k))

    def goto(self, label: _Label) -> None:
        self.items.append((_JA, 0, 0, label))

    def ret(self, value: int) -> None:
        self.items.append((_RET_K, 0, 0, value))

    def assemble(self) -> bytes:
        where: dict[int, int] = {}
        position = 0
        for item in self.items:
            if isinstance(item, _Label):
                where[id(item)] = position
            else:
                position += 1
        if position > MAX_INSTRUCTIONS:
            raise SeccompError(
                f"the seccomp profile compiles to {position} instructions; the kernel takes at most {MAX_INSTRUCTIONS}"
            )
        out = []
        position = 0
        for item in self.items:
            if isinstance(item, _Label):
                continue
            code, jt, jf, k = item

            def offset(target: _Target, short: bool, position: int = position) -> int:
                if not isinstance(target, _Label):
                    return target
                distance = where[id(target)] - position - 1
                if distance < 0 or (short and distance > 255):
                    raise AssertionError(f"bad jump distance {distance}")  # a compiler bug
                return distance

            # only a goto's k is a label, only a conditional jump's jt/jf: offset() leaves
            # the other, plain numbers, as they are
            k_n, jt_n, jf_n = offset(k, short=False), offset(jt, True), offset(jf, True)
            out.append(struct.pack("<HBBI", code, jt_n, jf_n, k_n & 0xFFFFFFFF))
            position += 1
        return b"".join(out)


def compile_filter(oci: object) -> bytes:
    """The classic-BPF program (packed ``struct sock_filter``s) for OCI seccomp object
    *oci*. Names this table does not know are skipped. Raises SeccompError."""
    oci = check(oci)
    default = _action(oci["defaultAction"], oci.get("defaultErrnoRet"), "defaultAction")
    rules: dict[int, list[tuple[int, list[dict[str, Any]]]]] = {}
    for rule in oci.get("syscalls") or []:
        action = _action(rule["action"], rule.get("errnoRet"), "action")
        conditions = rule.get("args") or []
        for name in rule["names"]:
            number = NUMBERS.get(name)
            if number is not None:
                rules.setdefault(number, []).append((action, conditions))
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ, AUDIT_ARCH_X86_64, jt=1, jf=0)
    asm.ret(default)  # another architecture (i386 via int 0x80): the default action
    asm.load(_NR)
    asm.jump(_JSET, X32_SYSCALL_BIT, jt=0, jf=1)
    asm.ret(default)
    blocks = {number: _Label() for number in rules}
    _tree(asm, sorted(rules), blocks, default)
    for number in sorted(rules):
        asm.place(blocks[number])
        _block(asm, rules[number], default)
    return asm.assemble()


def _tree(asm: _Assembler, numbers: list[int], blocks: dict[int, _Label], default: int) -> None:
    """Jump to blocks[nr] for the syscall number in A, searching *numbers* (sorted)."""
    if len(numbers) <= 4:
        for number in numbers:
            asm.jump(_JEQ, number, jt=0, jf=1)
            asm.goto(blocks[number])
        asm.ret(default)
        return
    middle = len(numbers) // 2
    high = _Label()
    asm.jump(_JGE, numbers[middle], jt=0, jf=1)
    asm.goto(high)
    _tree(asm, numbers[:middle], blocks, default)
    asm.place(high)
    _tree(asm, numbers[middle:], blocks, default)


def _block(asm: _Assembler, rules: list[tuple[int, list[dict[str, Any]]]], default: int) -> None:
    """One syscall's rules, first match wins; the default when none matches."""
    for action, conditions in rules:
        next_rule = _Label()
        for condition in conditions:
            _condition(asm, condition, next_rule)
        asm.ret(action)
        asm.place(next_rule)
        if not conditions:
            return  # an unconditional rule: nothing after it can be reached
    asm.ret(default)


def _condition(asm: _Assembler, cond: dict[str, Any], fail: _Label) -> None:
    """Fall through when argument ``cond['index']`` (64-bit, unsigned) satisfies the
    comparison, else jump to *fail*."""
    index, op = cond["index"], cond["op"]
    value, value2 = cond.get("value", 0), cond.get("valueTwo", 0)
    vh, vl = value >> 32, value & 0xFFFFFFFF
    ok, stub = _Label(), _Label()
    hi, lo = _arg_hi(index), _arg_lo(index)
    if op == "SCMP_CMP_EQ":
        asm.load(hi)
        asm.jump(_JEQ, vh, jt=0, jf=stub)
        asm.load(lo)
        asm.jump(_JEQ, vl, jt=ok, jf=stub)
    elif op == "SCMP_CMP_NE":
        asm.load(hi)
        asm.jump(_JEQ, vh, jt=0, jf=ok)
        asm.load(lo)
        asm.jump(_JEQ, vl, jt=stub, jf=ok)
    elif op == "SCMP_CMP_MASKED_EQ":
        eh, el = value2 >> 32, value2 & 0xFFFFFFFF
        asm.load(hi)
        asm.and_k(vh)
        asm.jump(_JEQ, eh, jt=0, jf=stub)
        asm.load(lo)
        asm.and_k(vl)
        asm.jump(_JEQ, el, jt=ok, jf=stub)
    elif op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        low_jump = _JGT if op == "SCMP_CMP_GT" else _JGE
        asm.load(hi)
        asm.jump(_JGT, vh, jt=ok, jf=0)
        asm.jump(_JEQ, vh, jt=0, jf=stub)
        asm.load(lo)
        asm.jump(low_jump, vl, jt=ok, jf=stub)
    else:  # LT is "not GE", LE is "not GT"
        low_jump = _JGE if op == "SCMP_CMP_LT" else _JGT
        asm.load(hi)
        asm.jump(_JGT, vh, jt=stub, jf=0)
        asm.jump(_JEQ, vh, jt=0, jf=ok)
        asm.load(lo)
        asm.jump(low_jump, vl, jt=stub, jf=ok)
    asm.place(stub)
    asm.goto(fail)
    asm.place(ok)


# ---- installing ----------------------------------------------------------------------------


def install(oci: object) -> None:
    """Compile *oci* and make it this thread's seccomp filter (see :func:`install_program`).
    Raises SeccompError (bad profile) or OSError."""
    install_program(compile_filter(oci))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_program(program: bytes) -> None:
    """Make *program* (from :func:`compile_filter`) this thread's seccomp filter, inherited
    by children and kept across execve. Needs PR_SET_NO_NEW_PRIVS or CAP_SYS_ADMIN; imports
    nothing (it runs after pivot_root). Raises OSError (EINVAL without
    CONFIG_SECCOMP_FILTER, EACCES without the privilege above; ENOEXEC on a machine that
    is not x86_64, the only architecture the filter knows)."""
    if os.uname().machine not in ("x86_64", "amd64"):
        raise OSError(8, "seccomp filters are built for x86_64 only")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    syscalls._check(
        syscalls._libc.prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(SECCOMP_MODE_FILTER),
            ctypes.byref(fprog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    )


def default_for(capabilities: Iterable[str] | None) -> dict[str, Any]:
    """The default profile resolved for a process whose bounding set is *capabilities*."""
    return resolve_profile(DEFAULT_PROFILE, capabilities)
