"""The default seccomp profile: what docker's default profile allows, written as data.

Written from docker's documentation of its default profile (docs.docker.com, "Seccomp
security profiles for Docker"): an allow-list; everything else fails with EPERM. The
syscalls the documentation lists as blocked stay blocked unless the container holds the
capability that gates them (the profile is resolved against the process's bounding set,
as docker does with ``includes.caps`` / ``excludes.caps``), and a few are allowed only
with arguments that cannot make namespaces or switch personalities.

The format is docker's profile format (``defaultAction``, ``syscalls`` with ``names``,
``action``, ``errnoRet``, ``args``, ``includes``/``excludes`` by ``caps`` or
``minKernel``), so ``--security-opt seccomp=PROFILE.json`` files use the same code path
(guest.runtime.seccomp.resolve_profile). Names that x86_64 does not have (``chown32``,
``_llseek`` …) are listed where docker lists them and skipped by the compiler.
"""

# Namespace flags clone(2) may not carry without CAP_SYS_ADMIN: CLONE_NEWNS | NEWCGROUP |
# NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET.
CLONE_NAMESPACE_FLAGS = 0x7E020000
AF_VSOCK = 40

ALLOWED = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown
chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod
fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr
flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate
ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat
getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32
getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority
getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage
getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy
io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit
ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32
lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr
lstat lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir
mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify
mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink
mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat
_newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc
pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64
process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages
removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32
setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority
setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid
setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs statfs64 statx
symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times
tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
arch_prctl modify_ldt
""".split()
"""Allowed whatever the capabilities and arguments."""


def _caps(*names: str) -> dict[str, list[str]]:
    return {"caps": list(names)}


PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,  # EPERM
    "syscalls": [
        {"names": ALLOWED, "action": "SCMP_ACT_ALLOW"},
        # ptrace is safe from kernel 4.8 on (seccomp is re-checked after a tracer's change).
        {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
        # personality: only the harmless personas (Linux, 32-bit, UNAME26, and the query).
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0x0, "op": "SCMP_CMP_EQ"}],
        },
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0x8, "op": "SCMP_CMP_EQ"}],
        },
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0x20000, "op": "SCMP_CMP_EQ"}],
        },
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0x20008, "op": "SCMP_CMP_EQ"}],
        },
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_EQ"}],
        },
        # socket: any family but AF_VSOCK (the VM's channel to its host).
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}],
        },
        # clone without namespace flags (x86_64: flags are the first argument).
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            "excludes": _caps("CAP_SYS_ADMIN"),
        },
        # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes libc
        # fall back to clone, which is checked above.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38, "excludes": _caps("CAP_SYS_ADMIN")},
        # What each capability opens, as docker's profile does.
        {
            "names": [
                "bpf",
                "clone",
                "clone3",
                "fanotify_init",
                "fsconfig",
                "fsmount",
                "fsopen",
                "fspick",
                "lookup_dcookie",
                "mount",
                "mount_setattr",
                "move_mount",
                "name_to_handle_at",
                "open_tree",
                "perf_event_open",
                "quotactl",
                "quotactl_fd",
                "setdomainname",
                "sethostname",
                "setns",
                "syslog",
                "umount",
                "umount2",
                "unshare",
            ],
            "action": "SCMP_ACT_ALLOW",
            "includes": _caps("CAP_SYS_ADMIN"),
        },
        {"names": ["reboot"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_SYS_BOOT")},
        {"names": ["chroot"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_SYS_CHROOT")},
        {
            "names": ["delete_module", "init_module", "finit_module"],
            "action": "SCMP_ACT_ALLOW",
            "includes": _caps("CAP_SYS_MODULE"),
        },
        {"names": ["acct"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_SYS_PACCT")},
        {
            "names": ["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"],
            "action": "SCMP_ACT_ALLOW",
            "includes": _caps("CAP_SYS_PTRACE"),
        },
        {"names": ["iopl", "ioperm"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_SYS_RAWIO")},
        {
            "names": ["settimeofday", "stime", "clock_settime", "clock_settime64"],
            "action": "SCMP_ACT_ALLOW",
            "includes": _caps("CAP_SYS_TIME"),
        },
        {"names": ["vhangup"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_SYS_TTY_CONFIG")},
        {
            "names": ["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"],
            "action": "SCMP_ACT_ALLOW",
            "includes": _caps("CAP_SYS_NICE"),
        },
        {"names": ["syslog"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_SYSLOG")},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_BPF")},
        {"names": ["perf_event_open"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_PERFMON")},
        {"names": ["open_by_handle_at"], "action": "SCMP_ACT_ALLOW", "includes": _caps("CAP_DAC_READ_SEARCH")},
    ],
}
"""Never blocked by it, whatever the capabilities: kexec_load, kexec_file_load, keyctl,
add_key, request_key, userfaultfd, uselib, ustat, sysfs, _sysctl, swapon, swapoff,
nfsservctl, create_module, get_kernel_syms, query_module, vm86, vm86old (docker's list)."""
