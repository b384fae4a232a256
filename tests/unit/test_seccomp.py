"""The seccomp compiler and the default profile, run for real: a forked child installs the
filter and makes the system calls (no VM; x86_64 hosts)."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from guest.runtime import seccomp
from guest.runtime.seccomp_default import PROFILE
from guest.runtime.syscalls_x86_64 import NUMBERS
from guest.spec import CAPABILITIES, DEFAULT_CAPABILITIES, ProcessSpec
from tests.pipes import read_to_end

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 filter")

_libc = ctypes.CDLL(None, use_errno=True)


def _in_child(oci: dict, calls: list[tuple]) -> list[int]:
    """Install *oci* (with no_new_privs) in a child, make each raw syscall
    ``(name, *args)``; return 0 (success) or the errno of each."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            seccomp.install(oci)
            results = []
            for name, *args in calls:
                ret = _libc.syscall(ctypes.c_long(NUMBERS[name]), *[ctypes.c_ulong(a) for a in args])
                results.append(0 if ret >= 0 else ctypes.get_errno())
            os.write(write_end, struct.pack(f"<{len(results)}i", *results))
        finally:
            os._exit(0)
    os.close(write_end)
    data = read_to_end(read_end)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(data) == 4 * len(calls), "the child died"
    return list(struct.unpack(f"<{len(calls)}i", data))


def test_default_profile_blocks_what_docker_blocks():
    oci = seccomp.default_for(DEFAULT_CAPABILITIES)
    got = _in_child(
        oci,
        [
            ("getpid",),
            ("keyctl", 0, (1 << 64) - 3, 0),
            ("kexec_load", 0, 0, 0, 0xDEAD0000),
            ("unshare", 0x10000000),
            ("personality", 0xFFFFFFFF),
            ("personality", 0x0400000),
            ("clone3", 0, 0),
            ("socket", 40, 1, 0),
            ("mount", 0, 0, 0, 0, 0),
            ("init_module", 0, 0, 0),
            ("chroot", 0),
        ],
    )
    assert got == [0, 1, 1, 1, 0, 1, 38, 1, 1, 1, 14]  # chroot(NULL): EFAULT, allowed


def test_capabilities_open_their_syscalls():
    with_admin = seccomp.default_for(list(DEFAULT_CAPABILITIES) + ["CAP_SYS_ADMIN"])
    names = {n for rule in with_admin["syscalls"] for n in rule["names"]}
    assert {"mount", "unshare", "setns"} <= names
    without = seccomp.default_for([])
    names = {n for rule in without["syscalls"] for n in rule["names"]}
    assert "chroot" not in names and "mount" not in names and "read" in names
    assert not any(rule["names"] == ["clone"] and "args" not in rule for rule in without["syscalls"])


def test_clone_with_namespace_flags_is_refused_plain_fork_works():
    oci = seccomp.default_for(DEFAULT_CAPABILITIES)
    # clone(CLONE_NEWUSER | SIGCHLD) is refused by the argument rule (no child is made);
    # plain forks under the same filter are what the e2e escape tests run all the time.
    assert _in_child(oci, [("clone", 0x10000000 | 17, 0, 0, 0, 0)]) == [1]


def test_argument_comparisons_on_both_halves():
    rules = [
        {
            "names": ["getpriority"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 11,
            "args": [{"index": 1, "value": 1 << 33, "op": "SCMP_CMP_GE"}],
        },
        {
            "names": ["getpriority"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 12,
            "args": [{"index": 1, "value": 5, "op": "SCMP_CMP_LT"}],
        },
        {
            "names": ["getpriority"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 13,
            "args": [{"index": 1, "value": 0xF0, "valueTwo": 0x70, "op": "SCMP_CMP_MASKED_EQ"}],
        },
        {
            "names": ["getpriority"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 14,
            "args": [{"index": 1, "value": 200, "op": "SCMP_CMP_NE"}, {"index": 1, "value": 300, "op": "SCMP_CMP_LE"}],
        },
    ]
    oci = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}
    got = _in_child(
        oci,
        [
            ("getpriority", 0, (1 << 33) + 1),
            ("getpriority", 0, 3),
            ("getpriority", 0, 0x7F),
            ("getpriority", 0, 250),
            ("getpriority", 0, 200),
            ("getpriority", 0, 1 << 32),
        ],
    )
    # 200 and 2^32 match no rule: the default (allow) runs getpriority(0, who) for real.
    assert got[:4] == [11, 12, 13, 14]
    assert got[4] in (0, 3) and got[5] in (0, 3)  # ESRCH or success, never our errnos


def test_profiles_are_checked():
    for bad, words in (
        ({"defaultAction": "NOPE"}, "defaultAction"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": []}]}, "names"),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 1, "value": -1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            },
            "args",
        ),
    ):
        with pytest.raises(seccomp.SeccompError, match=words):
            seccomp.check(bad)
    with pytest.raises(ValueError, match="process.seccomp"):
        ProcessSpec.from_dict({"args": ["x"], "seccomp": {"defaultAction": 3}})


def test_docker_format_includes_and_excludes():
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["a"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["b"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["c"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
            {"names": ["d"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
            {"names": ["e"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        ],
    }
    names = [r["names"][0] for r in seccomp.resolve_profile(profile, [], (6, 1))["syscalls"]]
    assert names == ["b", "e"]
    names = [r["names"][0] for r in seccomp.resolve_profile(profile, CAPABILITIES, (6, 1))["syscalls"]]
    assert names == ["a", "e"]


def test_filter_size_and_every_listed_name_is_real_or_foreign():
    program = seccomp.compile_filter(seccomp.default_for(CAPABILITIES))
    assert len(program) % 8 == 0 and len(program) // 8 < seccomp.MAX_INSTRUCTIONS
    listed = {n for rule in PROFILE["syscalls"] for n in rule["names"]}
    unknown = sorted(n for n in listed if n not in NUMBERS)
    # Only 32-bit or other architectures' names and syscalls newer than the table.
    assert all(
        n.endswith(("32", "64"))
        or n.startswith(("_", "sig", "socketcall", "ipc"))
        or n
        in {
            "cachestat",
            "fchmodat2",
            "futex_requeue",
            "futex_wait",
            "futex_wake",
            "map_shadow_stack",
            "set_mempolicy_home_node",
            "stime",
            "time32",
            "ugetrlimit",
            "waitpid",
            "recv",
            "send",
            "mmap2",
            "_newselect",
            "mq_timedreceive_time64",
            "epoll_ctl_old",
            "epoll_wait_old",
            "umount",
            "sync_file_range2",
            "utimensat_time64",
            "nice",
        }
        for n in unknown
    ), unknown


def test_prepare_filters_compiles_the_default_filter_ahead_of_the_start(monkeypatch):
    """guest.init calls it once the container is assembled: a snapshot template saves the
    compiled filter with its VM, so a restored copy's start does not compile it (~0.1 s
    under an empty TCG translation cache). A custom profile is left for the start."""
    from guest.runtime import process
    from guest.spec import DEFAULT_CAPABILITIES, ProcessSpec

    monkeypatch.setattr(process, "_default_programs", {})
    monkeypatch.setattr(process, "_last_cap_read", [])
    caps = list(DEFAULT_CAPABILITIES)
    spec = ProcessSpec(args=["true"], seccomp="default", capabilities={"bounding": caps})
    process.prepare_filters(spec)
    assert list(process._default_programs) == [tuple(sorted(caps))]
    assert process._last_cap_read, "cap_last_cap was not read ahead"
    compiled = process._default_programs[tuple(sorted(caps))]
    assert process._seccomp_program(spec) is compiled  # the start takes it from the cache
    custom = ProcessSpec(args=["true"], seccomp={"defaultAction": "SCMP_ACT_ALLOW"})
    process.prepare_filters(custom)
    assert len(process._default_programs) == 1
