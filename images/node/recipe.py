"""Recipe for ``node:18-bookworm`` (also tagged ``node:18``, ``node:bookworm`` and
``node:latest``): Debian bookworm (debootstrap, minbase) with Debian's ``nodejs`` (18.x) and
``npm`` packages — no registry needed, only a Debian mirror.

The root filesystem is made once with::

    debootstrap --variant=minbase bookworm DIR MIRROR
    chroot DIR apt-get install --no-install-recommends nodejs npm ca-certificates

(MIRROR: the first bookworm ``URIs:``/``deb`` line of the host's apt sources, else
deb.debian.org; ``VMSHIM_DEBIAN_MIRROR`` overrides), slimmed (apt lists, caches and .debs,
logs, documentation, manual pages, translations, /dev nodes), given an ``/etc/npmrc`` that
keeps ``npm install`` from calling home (no audit, fund or update-notifier requests: a
build has no network), and written as one layer tar
with sorted entries, numeric owners and mtimes clamped to the nodejs package's changelog
date. That tar is cached as ``$VMSHIM_ROOT/cache/node/rootfs-bookworm-<arch>.tar`` (the
debootstrap takes minutes); later runs import it again and give the same digests.
Once imported, bootstrapping again only re-tags (the cached tar's diff_id is compared with
the stored image's). ``VMSHIM_NODE_REBUILD=1`` throws the cache away first.

Config: ``Cmd ["node"]``, PATH, ``NODE_VERSION``, the host architecture.

Run with ``vmshim image bootstrap node`` (or ``python images/node/recipe.py``).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from email.utils import parsedate_to_datetime
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shim import paths  # noqa: E402
from shim.errors import ImageError, VmshimError  # noqa: E402
from shim.images.store import Image, ImageStore, host_arch, recipe_config  # noqa: E402

REFERENCE = "docker.io/library/node:18-bookworm"
ALIASES = ("docker.io/library/node:18", "docker.io/library/node:bookworm", "docker.io/library/node:latest")
SUITE = "bookworm"
PACKAGES = ("nodejs", "npm", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NPMRC = (
    "# vmshim node image: builds run without network; npm must not call home on its own.\n"
    "audit=false\n"
    "fund=false\n"
    "update-notifier=false\n"
)
# Removed from the rootfs before it is packed (paths relative to it; contents only for dirs).
CLEAN_CONTENTS = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "var/log",
    "dev",
    "tmp",
    "var/tmp",
    "run",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)


def mirror() -> str:
    """The Debian mirror apt uses on this host (deb822 or one-line sources)."""
    if os.environ.get("VMSHIM_DEBIAN_MIRROR"):
        return os.environ["VMSHIM_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
                    return fields["URIs"].split()[0]
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and SUITE in parts[2:3]:
                    uri = [p for p in parts[1:] if not p.startswith("[")][0]
                    return uri
    return DEFAULT_MIRROR


def cache_path() -> Path:
    return paths.cache_dir() / "node" / f"rootfs-{SUITE}-{host_arch()}.tar"


def changelog_date(rootfs: Path, package: str) -> dt.datetime:
    """Date of the newest entry of ``package``'s Debian changelog inside ``rootfs``."""
    for log in sorted((rootfs / "usr/share/doc" / package).glob("changelog.Debian*.gz")):
        try:
            with gzip.open(log, "rt", errors="replace") as f:
                for line in f:
                    m = re.match(r" -- .*?>  (.+)$", line)
                    if m:
                        return parsedate_to_datetime(m.group(1).strip()).astimezone(dt.timezone.utc)
        except (OSError, ValueError, TypeError):
            continue
    return dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc)


def debootstrap(rootfs: Path, log=print, packages: tuple[str, ...] = PACKAGES, recipe: str = "node") -> None:
    """Install bookworm minbase + *packages* into ``rootfs`` (the other debootstrap recipes
    call this too, with their own; *recipe* names the caller in errors). Raises ImageError."""
    tool = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(tool).exists():
        raise ImageError("debootstrap is not installed: apt-get install debootstrap (scripts/setup installs it)")
    if os.geteuid() != 0:
        raise ImageError(f"the {recipe} recipe runs debootstrap and needs root")
    source = mirror()
    log(f"debootstrap {SUITE} (minbase) from {source}, then apt-get install {' '.join(packages)} (takes a few minutes)")
    logfile = rootfs.parent / "debootstrap.log"
    with open(logfile, "w") as out:
        _step([tool, "--variant=minbase", SUITE, str(rootfs), source], out, logfile, "debootstrap")
        (rootfs / "etc/apt/sources.list").write_text(f"deb {source} {SUITE} main\n")
        # debootstrap's --include resolves dependencies poorly (npm's configure fails);
        # apt inside the new root does it right.
        subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
        try:
            _step(
                [
                    "chroot",
                    str(rootfs),
                    "sh",
                    "-c",
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                    f"--no-install-recommends {' '.join(packages)}",
                ],
                out,
                logfile,
                "apt-get install",
            )
        finally:
            _umount_below(rootfs)  # before anything below is deleted: never recurse into a mount
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)  # the host's; the runtime mounts one


def slim(rootfs: Path) -> None:
    """Drop what a container does not need (apt's downloads, lists and binary caches,
    logs, documentation, manual pages, translations) and the /dev nodes."""
    for rel in CLEAN_CONTENTS:
        top = rootfs / rel
        if not top.is_dir() or top.is_symlink():
            continue
        for child in top.iterdir():
            if child.name == "partial" and rel in ("var/lib/apt/lists", "var/cache/apt/archives"):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for cache in (rootfs / "var/cache/apt").glob("*.bin"):
        cache.unlink()


def _step(argv: list[str], out, logfile: Path, what: str) -> None:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        out.flush()
        tail = logfile.read_text(errors="replace").strip().splitlines()[-4:]
        raise ImageError(f"{what} failed (exit {res.returncode}): {' | '.join(tail)}")


def write_layer(rootfs: Path, dest: Path, mtime: int) -> None:
    """Pack ``rootfs`` into the layer tar ``dest``: sorted, numeric owners, hardlinks kept,
    mtimes clamped to ``mtime``; device nodes and sockets skipped (layers refuse them)."""
    seen: dict[tuple[int, int], str] = {}

    def walk(tar: tarfile.TarFile, rel: str) -> None:
        for name in sorted(os.listdir(os.path.join(rootfs, rel) if rel else rootfs)):
            child = f"{rel}/{name}" if rel else name
            _add(tar, rootfs, child, mtime, seen)
            full = os.path.join(rootfs, child)
            if os.path.isdir(full) and not os.path.islink(full):
                walk(tar, child)

    with open(dest, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        walk(tar, "")


def _add(tar: tarfile.TarFile, rootfs: Path, rel: str, mtime: int, seen: dict[tuple[int, int], str]) -> None:
    full = os.path.join(rootfs, rel)
    st = os.lstat(full)
    ti = tarfile.TarInfo(rel)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = min(int(st.st_mtime), mtime)
    if stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
        tar.addfile(ti)
    elif stat.S_ISLNK(st.st_mode):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(full)
        tar.addfile(ti)
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            ti.type = tarfile.LNKTYPE
            ti.linkname = seen[key]
            tar.addfile(ti)
            return
        seen[key] = rel
        ti.size = st.st_size
        with open(full, "rb") as data:
            tar.addfile(ti, data)
    elif stat.S_ISFIFO(st.st_mode):
        ti.type = tarfile.FIFOTYPE
        tar.addfile(ti)
    # char/block devices and sockets: not part of an image


def build(store: ImageStore | None = None, log=print) -> Image:
    """Build ``node:18-bookworm`` into ``store`` (default: the local store), tag the
    aliases, return it. Raises ImageError (debootstrap missing or failing, not root)."""
    store = store or ImageStore()
    tar_path = cache_path()
    meta_path = tar_path.with_suffix(".json")
    forget_when_asked("VMSHIM_NODE_REBUILD", tar_path, meta_path)
    if not (tar_path.is_file() and meta_path.is_file()):

        def prepare(rootfs: Path):
            debootstrap(rootfs, log)
            (rootfs / "etc/npmrc").write_text(NPMRC)
            return changelog_date(rootfs, "nodejs"), {"node_version": _node_version(rootfs)}

        write_rootfs_tar(store, "node", tar_path, meta_path, prepare)
    meta = json.loads(meta_path.read_text())
    config = recipe_config(
        meta["created"],
        {"Env": [PATH_ENV, f"NODE_VERSION={meta['node_version']}"], "Cmd": ["node"]},
        f"vmshim images/node/recipe.py (debootstrap {SUITE} minbase + {' '.join(PACKAGES)}; "
        f"nodejs {meta['node_version']})",
    )
    image = stored_or_imported(store, REFERENCE, tar_path, meta, config)
    for alias in ALIASES:
        store.tag(alias, image.manifest_digest)
    return image


def forget_when_asked(env: str, *files: Path) -> None:
    """With ``$env=1`` remove the cached *files*, so the image is made afresh."""
    if os.environ.get(env) == "1":
        for p in files:
            p.unlink(missing_ok=True)


def write_rootfs_tar(store: ImageStore, name: str, tar_path: Path, meta_path: Path, prepare) -> None:
    """Make a root file system in a temp directory of *store* with ``prepare(rootfs)``
    (debootstrap and the recipe's own steps; it returns the datetime the image is dated
    by and a dict of notes), slim it, write it as one layer tar at *tar_path* and its
    notes (created, the recipe's, mirror, diff_id) at *meta_path*. What stays mounted
    below the root file system is unmounted. Shared by the debootstrap recipes."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = store.root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix=f"{name}-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        rootfs.mkdir()
        try:
            created_at, notes = prepare(rootfs)
            slim(rootfs)
            partial = tar_path.with_suffix(".tar.partial")
            write_layer(rootfs, partial, int(created_at.timestamp()))
            os.replace(partial, tar_path)
            meta_path.write_text(
                json.dumps(
                    {
                        "created": created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        **notes,
                        "mirror": mirror(),
                        "diff_id": _sha256(tar_path),
                    }
                )
            )
        finally:
            _umount_below(rootfs)


def stored_or_imported(store: ImageStore, reference: str, tar_path: Path, meta: dict, config: dict) -> Image:
    """The image *reference* made from the cached layer tar: the stored one when it was
    made from this tar (:func:`stored_image`), else the tar imported with *config*."""
    image = stored_image(store, reference, meta.get("diff_id"))
    if image is None:  # not imported yet (or something else took the name)
        image = store.import_image([tar_path], config, reference)
    return image


def stored_image(store: ImageStore, reference: str, diff_id: str | None) -> Image | None:
    """The stored image *reference* when it was made from the cached tar whose layer is
    *diff_id* (saves re-hashing and copying the tar on every bootstrap); the other
    debootstrap recipes use it too."""
    if not diff_id:
        return None
    try:
        image = store.resolve(reference)
    except VmshimError:
        return None
    if [layer.diff_id for layer in image.layers] != [diff_id]:
        return None
    return image


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _node_version(rootfs: Path) -> str:
    """The nodejs package version from the rootfs's dpkg status, e.g. ``18.19.0``."""
    try:
        status = (rootfs / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return "18"
    m = re.search(r"^Package: nodejs\n(?:.+\n)*?Version: (?:\d+:)?([^\s+~-]+)", status, re.M)
    return m.group(1) if m else "18"


def _umount_below(rootfs: Path) -> None:
    """debootstrap mounts /proc and /sys in the target; make sure nothing is left."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    prefix = str(rootfs.resolve()) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


if __name__ == "__main__":
    image = build()
    print(f"{image.reference.familiar} {image.id}")
