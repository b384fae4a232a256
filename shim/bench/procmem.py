"""Host memory of process trees (PSS from /proc/<pid>/smaps_rollup) and /proc/meminfo.

PSS (proportional set size) charges each shared page to every process that maps it in
equal parts, so summing PSS over the processes a container owns does not count shared
libraries twice, and summing it over all containers adds up to what they really use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shim.oci.hostcgroup import descendants  # noqa: F401  (the bench's process trees)

PROC = Path("/proc")


def parent_map(proc: Path = PROC) -> dict[int, int]:
    """pid → ppid for every process visible now (processes that vanish are skipped)."""
    out: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields after the last ')' are fixed
        rest = stat.rsplit(b")", 1)[-1].split()
        try:
            out[int(entry.name)] = int(rest[1])
        except (IndexError, ValueError):
            continue
    return out


def pids_in_cgroup_matching(text: str, proc: Path = PROC) -> set[int]:
    """Pids whose /proc/<pid>/cgroup mentions *text* (a container id): the container's
    processes wherever they were re-parented to."""
    if not text:
        return set()
    out = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text in (entry / "cgroup").read_text():
                out.add(int(entry.name))
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class Usage:
    """PSS and RSS in bytes summed over ``pids`` (those readable when measured)."""

    pss: int
    rss: int
    pids: tuple[int, ...]
    by_command: dict[str, int]
    """PSS per command name (``comm``), for reading where the memory goes."""


def parse_rollup(text: str) -> tuple[int, int]:
    """(pss, rss) in bytes from the text of a smaps_rollup file."""
    pss = rss = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            kib = int(rest.split()[0])
            if key == "Pss":
                pss = kib * 1024
            else:
                rss = kib * 1024
    return pss, rss


def usage(pids: set[int] | list[int], proc: Path = PROC) -> Usage:
    """Summed PSS and RSS of *pids*; processes gone meanwhile or without an address space
    (kernel threads) count as 0 and are left out of ``pids``."""
    pss = rss = 0
    seen = []
    by_command: dict[str, int] = {}
    for pid in sorted(set(pids)):
        try:
            text = (proc / str(pid) / "smaps_rollup").read_text()
        except OSError:
            continue
        p, r = parse_rollup(text)
        if p or r:
            pss += p
            rss += r
            seen.append(pid)
            try:
                comm = (proc / str(pid) / "comm").read_text().strip()
            except OSError:
                comm = "?"
            by_command[comm] = by_command.get(comm, 0) + p
    return Usage(pss, rss, tuple(seen), by_command)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as ``{"MemTotal": bytes, …}`` (values without a kB unit as they are)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[key.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def host_meminfo() -> dict[str, int]:
    return parse_meminfo(Path("/proc/meminfo").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --- where one process's memory goes (/proc/<pid>/smaps) -----------------------------------

SMAPS_MAX_BYTES = 16 << 20
"""Read at most this much of one smaps file (a QEMU has a few hundred mappings, ~100 KiB)."""
BREAKDOWN_CLASSES = ("guest_ram", "tcg_code", "heap", "anon_other", "files")


@dataclass(frozen=True)
class Mapping:
    """One mapping of an smaps file: its size, permissions, path ('' when anonymous) and
    PSS/RSS in bytes."""

    size: int
    perms: str
    path: str
    pss: int
    rss: int


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of an smaps text (header lines ``start-end perms offset dev inode
    [path]`` each followed by ``Key: N kB`` lines); malformed lines are skipped."""
    out: list[Mapping] = []
    cur: dict | None = None

    def flush() -> None:
        if cur is not None:
            out.append(Mapping(cur["size"], cur["perms"], cur["path"], cur["pss"], cur["rss"]))

    for line in text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            start, _, end = head[0].partition("-")
            try:
                size = int(end, 16) - int(start, 16)
            except ValueError:
                continue
            flush()
            cur = {"size": size, "perms": head[1], "path": head[5].strip() if len(head) > 5 else "", "pss": 0, "rss": 0}
            continue
        key, _, rest = line.partition(":")
        if cur is not None and key in ("Pss", "Rss"):
            try:
                cur[key.lower()] = int(rest.split()[0]) * 1024
            except (IndexError, ValueError):
                continue
    flush()
    return out


def breakdown(mappings: list[Mapping], guest_ram: int) -> dict[str, int]:
    """PSS in bytes of a QEMU process by what it is (:data:`BREAKDOWN_CLASSES`):

    - ``guest_ram``: anonymous (or memfd) mappings at least *guest_ram* bytes long (the
      guest's RAM: what the guest touched and the host has not taken back);
    - ``tcg_code``: anonymous ``rwx`` mappings (TCG's translated-code buffer);
    - ``heap``: ``[heap]`` (QEMU's malloc, glib);
    - ``anon_other``: other anonymous memory (thread stacks, malloc arenas, ROM copies);
    - ``files``: file-backed mappings (libraries, firmware, a mapped kernel/initramfs)."""
    out = dict.fromkeys(BREAKDOWN_CLASSES, 0)
    for m in mappings:
        if m.path.startswith("/memfd:") and m.size >= guest_ram > 0:
            out["guest_ram"] += m.pss  # memfd-backed RAM (domains with virtiofs)
        elif m.path.startswith("/"):
            out["files"] += m.pss
        elif m.path == "[heap]":
            out["heap"] += m.pss
        elif "x" in m.perms and "w" in m.perms:
            out["tcg_code"] += m.pss
        elif m.size >= guest_ram > 0:
            out["guest_ram"] += m.pss
        else:
            out["anon_other"] += m.pss
    return out


def smaps_breakdown(pid: int, guest_ram: int, proc: Path = PROC) -> dict[str, int]:
    """:func:`breakdown` of a live process; raises OSError when its smaps is unreadable."""
    with open(proc / str(pid) / "smaps", "rb") as f:
        text = f.read(SMAPS_MAX_BYTES).decode(errors="replace")
    return breakdown(parse_smaps(text), guest_ram)
