"""The agent's own helpers, run inside a running container in place of an exec'ed command
(``builtin`` messages, see guest.protocol). Stdlib only.

They run in the container's namespaces with its root as "/", where there is no python:
everything they use is imported here, by the agent, before it forks (:func:`prepare`).
Each writes its result to fd 1, its complaints to fd 2, and returns an exit code.

- ``ps``: the container's processes as one JSON object ``{"titles": [...],
  "processes": [[...], ...]}`` (docker's ``top`` API shape), for ``vmshim top``.
- ``tar-out PATH``: a tar stream of PATH (a file, a directory with its contents, or the
  contents only when PATH ends in ``/.``), for ``vmshim cp CONTAINER:PATH …``.
- ``tar-in DEST``: extract the tar stream on stdin. If DEST is a directory, into it; else
  into DEST's parent, with the archive's first top-level entry renamed to DEST's name
  (``cp file CONTAINER:/tmp/newname``). Entries with absolute names or ``..`` are refused.
- ``sync``: flush every file system's dirty data to its disk (before ``checkpoint``).
"""

from __future__ import annotations

import json
import os
import tarfile

from guest.runtime.process import SpawnError

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Callable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def prepare(name: str, args: list[str]) -> Callable[[], int]:
    """Return the callable that runs builtin *name* with *args*. Raises SpawnError (125)
    for an unknown name or wrong arguments."""
    if name == "ps" and not args:
        return ps
    if name == "tar-out" and len(args) == 1 and args[0].startswith("/"):
        return lambda: tar_out(args[0])
    if name == "tar-in" and len(args) == 1 and args[0].startswith("/"):
        return lambda: tar_in(args[0])
    if name == "sync" and not args:
        return sync
    raise SpawnError(f"bad builtin {name!r} with arguments {args!r}")


def sync() -> int:
    """Write every file system's dirty pages to its disk (volumes, the writable layer)."""
    os.sync()
    return 0


def _say(text: str) -> None:
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


# ---- ps -------------------------------------------------------------------------------------


def _user_names() -> dict[int, str]:
    names: dict[int, str] = {}
    try:
        with open("/etc/passwd", errors="replace") as f:
            for line in f:
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit():
                    names.setdefault(int(fields[2]), fields[0])
    except OSError:
        pass
    return names


def _process_row(pid: int, names: dict[int, str]) -> list[str | int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/status", errors="replace") as f:
            uid = next((int(line.split()[1]) for line in f if line.startswith("Uid:")), 0)
    except (OSError, ValueError):
        return None  # it exited while we looked
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    state, ppid = rest[0], int(rest[1])
    cpu_seconds = (int(rest[11]) + int(rest[12])) // CLOCK_TICKS
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    command = " ".join(args) if args else f"[{comm}]"
    elapsed = f"{cpu_seconds // 3600:02d}:{cpu_seconds // 60 % 60:02d}:{cpu_seconds % 60:02d}"
    return [names.get(uid, str(uid)), pid, ppid, state, elapsed, command]


def ps() -> int:
    me = os.getpid()
    names = _user_names()
    rows = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            row = _process_row(int(entry), names)
            if row is not None:
                rows.append(row)
    rows.sort(key=lambda r: r[1])
    data = {"titles": ["USER", "PID", "PPID", "STAT", "TIME", "COMMAND"], "processes": rows}
    os.write(1, json.dumps(data).encode() + b"\n")
    return 0


# ---- tar ------------------------------------------------------------------------------------


def tar_out(path: str) -> int:
    contents_only = path.endswith("/.")
    path = os.path.normpath(path)
    if not os.path.lexists(path):
        _say(f"no such file or directory in the container: {path}")
        return 1
    out = os.fdopen(1, "wb", buffering=256 * 1024, closefd=False)
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if contents_only and os.path.isdir(path):
                for name in sorted(os.listdir(path)):
                    tar.add(os.path.join(path, name), arcname=name)
            else:
                tar.add(path, arcname=os.path.basename(path) or ".")
        out.flush()
    except OSError as exc:
        _say(f"cannot read {path}: {exc.strerror or exc}")
        return 1
    return 0


def tar_in(dest: str) -> int:
    dest = os.path.normpath(dest)
    if os.path.isdir(dest):
        target, rename = dest, None
    else:
        target, rename = os.path.dirname(dest) or "/", os.path.basename(dest)
        if not os.path.isdir(target):
            _say(f"no such directory in the container: {target}")
            return 1
    source = os.fdopen(0, "rb", buffering=256 * 1024, closefd=False)
    first = None  # the archive's first top-level name, as it was
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            for member in tar:
                if first is None:
                    first = _parts(member.name)[0]
                member.name = _checked(member.name, rename, first)
                if member.islnk():
                    member.linkname = _checked(member.linkname, rename, first)
                tar.extract(member, target, set_attrs=True, numeric_owner=True)
    except (tarfile.TarError, ValueError) as exc:
        _say(f"cannot extract into {dest}: {exc}")
        return 1
    except OSError as exc:
        _say(f"cannot extract into {dest}: {exc.strerror or exc}")
        return 1
    return 0


def _parts(name: str) -> list[str]:
    """The components of an archive name. Raises ValueError for absolute names, ``..``
    and empty names."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise ValueError(f"refusing archive entry {name!r}")
    return parts


def _checked(name: str, rename: str | None, first: str) -> str:
    """*name* made relative and safe; below the top-level entry *first*, that entry is
    called *rename* instead (when given). Raises ValueError (see :func:`_parts`)."""
    parts = _parts(name)
    if rename is not None and parts[0] == first:
        parts[0] = rename
    return "/".join(parts)
