"""Asking the host: run a tool (missing → GuestImageError), installed package versions,
cheap stat signatures, and a best-effort JSON cache file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterable

from shim.errors import GuestImageError


def _stat_sig(path: Path) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise GuestImageError(f"{cmd[0]} is not installed; run scripts/setup") from None


def _package_versions(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    out = _run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Status}\n", *names])
    found = {}
    for line in out.stdout.splitlines():
        pkg, ver, status = (line.split("\t") + ["", ""])[:3]
        if status == "installed":
            found[pkg.split(":")[0]] = ver
    return {n: found.get(n, "") for n in names}


def _write_json_quietly(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # only a cache of look-ups; a read-only state dir must not break anything
