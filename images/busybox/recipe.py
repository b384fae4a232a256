"""Recipe for ``busybox:latest`` (``docker.io/library/busybox:latest``), built from the
host's Debian ``busybox-static`` — no registry needed.

One layer, made in Python with deterministic metadata (mtime = the package's build date,
owner root except /home/user), so rebuilding with the same busybox-static package gives the
same layer, config and manifest digests:

    /bin/busybox                      the static binary
    <applet paths>  → /bin/busybox    one symlink per applet (``busybox --list-full``)
    /etc/passwd, /etc/group           root (0), nobody (65534), user (1000)
    /etc/hostname                     empty
    /root 0700, /tmp 1777, /home/user (1000:1000), /var, /dev /proc /sys (mount points)

Config: ``Cmd ["sh"]``, the usual PATH, the host architecture (amd64 here), ``created``
and ``history`` from the package's changelog date.

Run with ``vmshim image bootstrap busybox`` (or ``python images/busybox/recipe.py``).
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from email.utils import parsedate_to_datetime
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shim.errors import ImageError  # noqa: E402
from shim.images.store import Image, ImageStore, recipe_config  # noqa: E402

REFERENCE = "docker.io/library/busybox:latest"
PACKAGE = "busybox-static"
BUSYBOX = Path(os.environ.get("VMSHIM_BUSYBOX", "/bin/busybox"))
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "user:x:1000:1000:user:/home/user:/bin/sh\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\nuser:x:1000:\n"

# path: (mode, uid, gid)
DIRS = {
    "bin": (0o755, 0, 0),
    "sbin": (0o755, 0, 0),
    "usr": (0o755, 0, 0),
    "usr/bin": (0o755, 0, 0),
    "usr/sbin": (0o755, 0, 0),
    "etc": (0o755, 0, 0),
    "root": (0o700, 0, 0),
    "tmp": (0o1777, 0, 0),
    "home": (0o755, 0, 0),
    "home/user": (0o755, 1000, 1000),
    "var": (0o755, 0, 0),
    "dev": (0o755, 0, 0),
    "proc": (0o555, 0, 0),
    "sys": (0o555, 0, 0),
}


def package_version() -> str:
    """The installed busybox-static version, e.g. ``1:1.35.0-4+deb12u1+b1``."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return out or "unknown"


def package_date() -> dt.datetime:
    """The package's build date: the newest first entry of its Debian changelogs (what
    SOURCE_DATE_EPOCH is made from), else the binary's mtime (set by dpkg from the .deb)."""
    dates = []
    for log in Path(f"/usr/share/doc/{PACKAGE}").glob("changelog.Debian*.gz"):
        try:
            with gzip.open(log, "rt", errors="replace") as f:
                for line in f:
                    m = re.match(r" -- .*?>  (.+)$", line)
                    if m:
                        dates.append(parsedate_to_datetime(m.group(1).strip()))
                        break
        except (OSError, ValueError, TypeError):
            continue
    if dates:
        return max(dates).astimezone(dt.timezone.utc)
    return dt.datetime.fromtimestamp(int(BUSYBOX.stat().st_mtime), dt.timezone.utc)


def is_static_elf(path: Path) -> bool:
    """True when ``path`` is a 64-bit little-endian ELF without a PT_INTERP header."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            return False
        (phoff,) = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (p_type,) = struct.unpack("<I", f.read(4))
            if p_type == 3:  # PT_INTERP: dynamically linked
                return False
    return True


def applets() -> list[str]:
    """Applet paths relative to / (``bin/sh``, ``usr/bin/awk``...), sorted."""
    out = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    return sorted({a for a in out if "/" in a and a != "bin/busybox" and ".." not in a})


def write_layer(dest: Path, mtime: int) -> None:
    """Write the image's single layer tar to ``dest`` (deterministic)."""
    entries: list[tuple[str, tarfile.TarInfo, bytes | None]] = []

    def info(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, mtime
        ti.uname = ti.gname = ""
        return ti

    for path, (mode, uid, gid) in DIRS.items():
        entries.append((path, info(path, tarfile.DIRTYPE, mode, uid, gid), None))
    files = {
        "bin/busybox": (BUSYBOX.read_bytes(), 0o755),
        "etc/passwd": (PASSWD.encode(), 0o644),
        "etc/group": (GROUP.encode(), 0o644),
        "etc/hostname": (b"", 0o644),
    }
    for path, (data, mode) in files.items():
        ti = info(path, tarfile.REGTYPE, mode)
        ti.size = len(data)
        entries.append((path, ti, data))
    for path in applets():
        if path in files or path in DIRS:
            continue
        parent = path.rpartition("/")[0]
        if parent not in DIRS:
            raise ImageError(f"busybox applet {path} is in an unexpected directory")
        ti = info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = "/bin/busybox"
        entries.append((path, ti, None))

    entries.sort(key=lambda e: e[0])  # parents sort before their children
    with open(dest, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _, ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)


def build(store: ImageStore | None = None) -> Image:
    """Build ``busybox:latest`` into ``store`` (default: the local store) and return it.
    Raises ImageError if busybox-static is not installed."""
    store = store or ImageStore()
    if not BUSYBOX.is_file() or not is_static_elf(BUSYBOX):
        raise ImageError(
            f"{BUSYBOX} is missing or not statically linked: install Debian's {PACKAGE} (apt-get install {PACKAGE})"
        )
    version = package_version()
    created_at = package_date()
    created = created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    config = recipe_config(
        created, {"Env": [PATH_ENV], "Cmd": ["sh"]}, f"vmshim images/busybox/recipe.py (Debian {PACKAGE} {version})"
    )
    tmpdir = store.root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        layer = Path(tmp) / "layer.tar"
        write_layer(layer, int(created_at.timestamp()))
        return store.import_image([layer], config, REFERENCE)


if __name__ == "__main__":
    image = build()
    print(f"{image.reference.familiar} {image.id}")
