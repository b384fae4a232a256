"""The micro workloads, as busybox shell scripts run inside a container, and their output.

Each script times its own phases with the container's clock, so the figure is the
workload alone, whichever way the script got into the container (``exec`` into a
detached container, or one ``run --rm`` per sample) and however slow that way is. The
clock is busybox ``adjtimex`` (microseconds; /proc/timer_list is masked in containers and
busybox ``date`` has no %N); where it is missing, /proc/uptime (10 ms). Under TCG the
guest's clock follows the host's, so guest-timed phases compare with host-timed ones.

A script prints one line per phase, ``BENCH <phase> <t0> <t1>`` (seconds), plus
``MODE <key> <value>`` lines describing how it ran, and ``FAIL <phase>`` on an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shim.errors import VmshimError


class WorkloadError(VmshimError):
    """A workload script failed inside the container, or printed nothing usable."""


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does; recorded in results.json. Sized so that under
    TCG each phase takes about a second (and natively 0.1 s or more, well above the
    clock's resolution) while ``vmshim bench --runs 5`` stays in its budget."""

    cpu_mib: int = 32
    """sha256sum of this many MiB of zeros (CPU bound: hashing, a pipe, few syscalls)."""
    syscall_count: int = 500_000
    """``dd bs=1 count=N`` from /dev/zero to /dev/null: 2N read/write syscalls."""
    seq_mib: int = 64
    """Sequential write (then read) of a file of this size, 1 MiB blocks."""
    rand_ops: int = 200
    """Random 4 KiB writes (each fsynced) and reads at random offsets in that file."""

    def to_dict(self) -> dict:
        return asdict(self)


CLOCK = r"""
if adjtimex >/dev/null 2>&1; then
  now() { adjtimex | awk '/time.tv_sec/{s=$2} /time.tv_usec/{u=$2} END{printf "%d.%06d\n", s, u}'; }
  echo "MODE clock adjtimex"
else
  now() { cut -d' ' -f1 /proc/uptime; }
  echo "MODE clock uptime"
fi
"""


def _phase(name: str, command: str) -> str:
    return (
        f't0=$(now); if {command}; then t1=$(now); echo "BENCH {name} $t0 $t1"; else echo "FAIL {name}"; exit 1; fi\n'
    )


def cpu_script(sizes: Sizes) -> str:
    count = sizes.cpu_mib * 1048576
    return CLOCK + _phase("cpu", f"head -c {count} /dev/zero | sha256sum >/dev/null")


def syscall_script(sizes: Sizes) -> str:
    return CLOCK + _phase("syscall", f"dd if=/dev/zero of=/dev/null bs=1 count={sizes.syscall_count} 2>/dev/null")


def io_script(sizes: Sizes, directory: str) -> str:
    """Sequential write (fsynced) and read of ``seq_mib`` MiB, then ``rand_ops`` random
    4 KiB writes (each ``conv=notrunc,fsync``) and reads in that file, then as many bare
    ``dd`` spawns (phase ``spawn``: what one dd process costs without I/O).

    Reads use O_DIRECT where the filesystem takes it (so they reach the disk), else the
    page cache; ``MODE read direct|buffered`` says which.
    """
    blocks = sizes.seq_mib * 256  # 4 KiB blocks in the file
    d = directory.rstrip("/") or ""
    f = f"{d}/vmshim-bench-io/data"
    return (
        CLOCK
        + f"""mkdir -p {d}/vmshim-bench-io || {{ echo "FAIL mkdir"; exit 1; }}
echo "MODE fs $(awk -v d="{directory}" '$2==d{{t=$3}} END{{print t}}' /proc/mounts)"
"""
        + _phase("seq_write", f"dd if=/dev/zero of={f} bs=1048576 count={sizes.seq_mib} conv=fsync 2>/dev/null")
        + f"""
direct=
if dd if={f} of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then direct=iflag=direct; fi
if [ -n "$direct" ]; then echo "MODE read direct"; else echo "MODE read buffered"; fi
"""
        + _phase("seq_read", f"dd if={f} of=/dev/null bs=1048576 $direct 2>/dev/null")
        + f"""
woffs=$(shuf -i 0-{blocks - 1} -n {sizes.rand_ops})
roffs=$(shuf -i 0-{blocks - 1} -n {sizes.rand_ops})
"""
        + _phase(
            "rand_write",
            f"(for o in $woffs; do dd if=/dev/zero of={f} bs=4096 count=1 seek=$o "
            f"conv=notrunc,fsync 2>/dev/null || exit 1; done)",
        )
        + _phase(
            "rand_read",
            f"(for o in $roffs; do dd if={f} of=/dev/null bs=4096 count=1 skip=$o $direct 2>/dev/null || exit 1; done)",
        )
        + _phase(
            "spawn", "(for o in $roffs; do dd if=/dev/zero of=/dev/null bs=4096 count=1 2>/dev/null || exit 1; done)"
        )
        + f"rm -rf {d}/vmshim-bench-io\n"
    )


@dataclass
class Output:
    """What a script printed: phase → seconds, and its MODE lines."""

    phases: dict[str, float]
    modes: dict[str, str]


def parse(text: str, expect: list[str] | tuple[str, ...] = ()) -> Output:
    """Parse a script's stdout. Raises WorkloadError naming the phase that failed, or a
    phase of *expect* that is missing."""
    phases: dict[str, float] = {}
    modes: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "FAIL":
            raise WorkloadError(f"workload phase {parts[1] if len(parts) > 1 else '?'} failed in the container")
        if parts[0] == "MODE" and len(parts) >= 2:
            modes[parts[1]] = " ".join(parts[2:])
        elif parts[0] == "BENCH" and len(parts) == 4:
            try:
                t0, t1 = float(parts[2]), float(parts[3])
            except ValueError:
                raise WorkloadError(f"unreadable timing line: {line!r}") from None
            phases[parts[1]] = max(t1 - t0, 0.0)
    missing = [p for p in expect if p not in phases]
    if missing:
        tail = text.strip().splitlines()[-3:]
        raise WorkloadError(
            f"workload printed no timing for {', '.join(missing)}"
            + (f" (last output: {' | '.join(tail)})" if tail else " (no output)")
        )
    return Output(phases, modes)
