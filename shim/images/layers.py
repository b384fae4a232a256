"""Layer tar → read-only squashfs disk, made once per layer digest and shared by every VM.

``layer_disk(store, layer)`` returns ``paths.layer_disks_dir()/<layer-digest-hex>.sqfs``,
converting on first use. The conversion never extracts anything on the host:

pass 1 (scan)   streams the layer (plain, gzip, zstd or xz tar), checks every header and
                builds a plan: which occurrence of each path is kept (a later entry replaces
                an earlier one, as when extracting), which whiteouts become char devices and
                which directories become opaque. Hostile or broken archives are refused
                here with LayerError naming the entry. It also verifies the diff_id.
pass 2 (write)  streams the layer again, rewrites it per the plan and pipes it into
                ``tar2sqfs -q -s -c zstd -X level=3`` writing a temp file beside the
                result; fsync + rename makes it appear complete or not at all.

Whiteouts are rewritten for overlayfs: ``D/.wh.NAME`` → char device 0/0 ``D/NAME``;
``D/.wh..wh..opq`` → xattr ``trusted.overlay.opaque=y`` on D's own entry (carried as a PAX
``SCHILY.xattr.`` header, which tar2sqfs stores). A whiteout whose name also exists in the
same layer is dropped (the layer's own entry wins, OCI image-spec); if that entry is a
directory it is made opaque instead (lower content hidden, this layer's content shown).
Source xattrs in the ``user.``, ``security.`` and ``trusted.`` namespaces are kept, except
``trusted.overlay.*``, which only the rewrite sets.

Refused (LayerError, nothing left behind): absolute names, ``..`` components, NUL bytes,
names through an earlier symlink or file, entries under a path the layer later turns into a
non-directory, hardlinks that point outside, to themselves, to not-yet-seen entries, to
directories, or to an entry replaced later; char/block devices; unknown entry types; more
than ``Limits.max_entries`` entries, more than ``Limits.max_dir_entries`` in one directory
(tar2sqfs is quadratic per directory) or more than ``Limits.max_bytes`` uncompressed bytes
(decompression bombs); PAX or GNU long-name headers over the caps of
``shim.images.tarsafe`` (refused before they are read); a path longer than 4096 bytes, or
names adding up to more than ``Limits.max_name_bytes``; truncated or corrupt archives
(including a missing end-of-archive marker and data after it beyond the cap); a diff_id
mismatch.

For ``--isolation process`` the host mounts these files read-only through loop devices:
``mount_layer(sqfs, target)`` / ``umount_layer(target)``.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from shim import paths
from shim.errors import ImageError, LayerError
from shim.images.store import ImageStore, LayerRef, Readable, digest_hex
from shim.images.tarsafe import BoundedTarInfo

DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_MAX_BYTES = 64 << 30
# tar2sqfs (squashfs-tools-ng 1.2) is quadratic in the entries of one directory; measured
# here: 20,000 entries 2.7 s, 32,768 entries 6.4 s, so a layer costs at most ~0.2 ms per
# entry (linear) whatever its shape, and a 200,000-entry directory is refused in the scan.
DEFAULT_MAX_DIR_ENTRIES = 32_768
MAX_PATH_BYTES = 4096  # PATH_MAX: the scan keeps every path, so each is bounded ...
DEFAULT_MAX_NAME_BYTES = 256 << 20  # ... and so is their sum

TAR2SQFS_ARGS = ["-q", "-s", "-c", "zstd", "-X", "level=3", "-d", "uid=0,gid=0,mode=0755,mtime=0", "-f"]
OPAQUE_XATTR = "SCHILY.xattr.trusted.overlay.opaque"
_WH = ".wh."
_WH_OPAQUE = ".wh..wh..opq"
_WH_META = ".wh..wh."
_XATTR_PREFIX = "SCHILY.xattr."
_XATTR_NAMESPACES = ("user.", "security.", "trusted.")
_CHUNK = 1 << 20
_MTIME_MAX = 2**32 - 1
_KIND_NAMES = {"d": "directory", "f": "regular file", "l": "symlink", "h": "hardlink", "p": "fifo"}


@dataclass(frozen=True)
class Limits:
    """Caps applied while reading a layer. ``max_bytes`` bounds both the sum of the file
    sizes and the whole uncompressed stream; ``max_dir_entries`` the names in one
    directory (what tar2sqfs's cost is quadratic in)."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    max_dir_entries: int = DEFAULT_MAX_DIR_ENTRIES
    max_name_bytes: int = DEFAULT_MAX_NAME_BYTES


# Public API ---------------------------------------------------------------------------------
def layer_disk(store: ImageStore, layer: LayerRef, limits: Limits | None = None) -> Path:
    """Path of the squashfs disk for ``layer``, converting it on first use.

    Safe to call concurrently from threads and processes: one converts, the others wait
    for it. Precondition: the layer blob is in ``store``. Raises LayerError if the layer is
    hostile or corrupt (no file left behind), ImageError if the blob is missing or
    tar2sqfs is not installed.
    """
    hexd = digest_hex(layer.digest)
    out_dir = paths.layer_disks_dir()
    final = out_dir / f"{hexd}.sqfs"
    if final.is_file():
        return final
    paths.private_dir(out_dir)
    with _exclusive_lock(out_dir / f".{hexd}.lock"):
        if final.is_file():
            return final
        for stale in out_dir.glob(f".tmp-{hexd}.sqfs-*"):  # a crashed earlier attempt
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        convert_layer(store.blob_path(layer.digest), final, diff_id=layer.diff_id, limits=limits)
    return final


def convert_layer(
    blob: Path, out: Path, *, diff_id: str | None = None, limits: Limits | None = None, jobs: int | None = None
) -> None:
    """Convert the layer tar ``blob`` into the squashfs image ``out`` (atomically).

    ``diff_id`` (``sha256:...`` of the uncompressed tar), when given, is verified. Raises
    LayerError naming the offending entry; then neither ``out`` nor a temp file exists.
    """
    limits = limits or Limits()
    tar2sqfs = shutil.which("tar2sqfs")
    if tar2sqfs is None:
        raise ImageError("tar2sqfs not found: install squashfs-tools-ng (scripts/setup)")
    plan = _scan(blob, limits, diff_id)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".tmp-{out.name}-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(blob, limits, plan, tmp, [tar2sqfs, "-j", str(jobs or _jobs()), *TAR2SQFS_ARGS])
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # libvirt's DAC driver chowns it to QEMU's user when attached
        os.rename(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dfd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_layer(blob: Path, limits: Limits | None = None) -> int:
    """Run the converter's checks (pass 1) on the layer tar *blob* without converting it,
    for tars the host did not get from a registry (a RUN step's diff from the agent).
    Returns the entry count. Raises LayerError naming the first offending entry."""
    return _scan(blob, limits or Limits(), None).count


@contextlib.contextmanager
def read_members(
    blob: Path, limits: Limits | None = None
) -> Iterator[tuple[tarfile.TarFile, Iterator[tarfile.TarInfo]]]:
    """(tar, members) of the layer *blob*, read forward only with the converter's caps
    and strictness; ``tar.extractfile(member)`` reads a member's data (in order). Every
    read failure is LayerError."""
    limits = limits or Limits()
    with _reading(blob, limits) as (tar, _reader):
        yield tar, _members(tar)


def mount_layer(sqfs: Path, target: Path) -> None:
    """Mount ``sqfs`` read-only (loop device, ``nodev,nosuid``: an image's setuid files
    give nothing on the host) on ``target`` (created if needed).
    Needs root. The loop device is released by ``umount_layer``. Raises ImageError."""
    Path(target).mkdir(parents=True, exist_ok=True)
    _run(
        ["mount", "-t", "squashfs", "-o", "loop,ro,nodev,nosuid", "--", str(sqfs), str(target)],
        f"cannot mount layer disk {sqfs} on {target}",
    )


def umount_layer(target: Path) -> None:
    """Unmount a layer mounted by ``mount_layer`` (its loop device is auto-cleared).
    Raises ImageError if it is busy or not mounted."""
    _run(["umount", "--", str(target)], f"cannot unmount layer at {target}")


def _run(argv: list[str], what: str) -> None:
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} not found") from None
    if res.returncode != 0:
        raise ImageError(f"{what}: {(res.stderr or res.stdout).strip()}")


def _jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """flock ``path`` exclusively; the file is removed on release (checking the inode
    after locking makes that safe against a concurrent unlink)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# Reading the (compressed) stream ------------------------------------------------------------
class _CappedReader:
    """The uncompressed stream as a forward-only file for ``tarfile`` (``tell`` and forward
    ``seek`` only, so tarfile's seekable mode works without its slow stream buffer).
    Counts and hashes every byte and refuses more than ``limit``."""

    def __init__(self, src: Readable, limit: int):
        self.src, self.limit, self.count = src, limit, 0
        self.sha = hashlib.sha256()

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        data = self.src.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise LayerError(f"layer is larger than {self.limit} bytes uncompressed (decompression bomb?); refused")
        self.sha.update(data)
        return data

    def tell(self) -> int:
        return self.count

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self.count:
            raise tarfile.ReadError("the layer stream cannot seek backwards")
        while self.count < pos:
            if not self.read(min(_CHUNK, pos - self.count)):
                break  # at EOF: the next read notices
        return self.count

    def write(self, b: bytes, /) -> int:  # tarfile's file protocol; it never writes here
        raise io.UnsupportedOperation("the layer stream is read-only")

    def close(self) -> None:
        """Nothing to release: ``_open_stream`` owns the source."""


@contextlib.contextmanager
def _open_stream(blob: Path, limits: Limits) -> Iterator[_CappedReader]:
    """The uncompressed tar stream of ``blob``, whatever its compression."""
    with open(blob, "rb") as f:
        magic = f.read(6)
        f.seek(0)
        proc: subprocess.Popen[bytes] | None = None
        errlog: IO[bytes] | None = None
        src: Readable
        if magic[:2] == b"\x1f\x8b":
            src = gzip.GzipFile(fileobj=f, mode="rb")
        elif magic[:4] == b"\x28\xb5\x2f\xfd":
            if shutil.which("zstd") is None:
                raise ImageError("this layer is zstd-compressed and the zstd tool is missing")
            errlog = tempfile.TemporaryFile()
            with open(blob, "rb") as zin:  # its own fd: f's offset is not where it seems
                proc = subprocess.Popen(["zstd", "-dcq"], stdin=zin, stdout=subprocess.PIPE, stderr=errlog)
            assert proc.stdout is not None  # stdout=PIPE
            src = proc.stdout
        elif magic == b"\xfd7zXZ\x00":
            src = lzma.LZMAFile(f)
        elif magic[:3] == b"BZh":
            src = bz2.BZ2File(f)
        else:
            src = f
        ok = False
        try:
            yield _CappedReader(src, limits.max_bytes)
            ok = True
        finally:
            if proc is not None:
                assert proc.stdout is not None and errlog is not None  # set together above
                if not ok and proc.poll() is None:
                    proc.kill()
                proc.stdout.close()
                rc = proc.wait()
                errlog.seek(0)
                err = errlog.read().decode(errors="replace").strip()
                errlog.close()
                if ok and rc != 0:
                    reason = err or f"zstd exit status {rc}"
                    raise LayerError(f"layer is not a valid zstd stream: {reason}")


class _Uncompressed:
    """A forward-only reader of a layer's uncompressed bytes whose read failures are
    LayerError (``sha``: the running sha256 of what was read, i.e. the diff_id at EOF)."""

    def __init__(self, reader: _CappedReader, blob: Path):
        self.reader, self.blob = reader, blob

    @property
    def sha(self):
        return self.reader.sha

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self.reader.read(size)
        except LayerError:
            raise
        except _READ_ERRORS as e:
            raise LayerError(f"layer sha256:{self.blob.name} is corrupt or truncated: {e}") from None


@contextlib.contextmanager
def open_uncompressed(blob: Path, limits: Limits | None = None) -> Iterator[_Uncompressed]:
    """The uncompressed tar stream of the layer blob ``blob`` (plain, gzip, zstd, xz or
    bzip2), for ``save``: ``read()`` only, failures raise LayerError."""
    with _open_stream(blob, limits or Limits()) as reader:
        yield _Uncompressed(reader, blob)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Iterate a TarFile strictly: unlike ``TarFile.next()``, a corrupt header
    after the first or a missing end-of-archive marker is an error, not the end. Members
    are not accumulated (``TarFile.members`` stays empty), so memory stays flat."""
    # firstmember, members and the *HeaderError classes are CPython tarfile internals that
    # typeshed leaves out; this strict reader depends on them.
    first = tar.firstmember  # type: ignore[attr-defined]  # read by TarFile() itself (strict at offset 0)
    tar.firstmember = None  # type: ignore[attr-defined]
    tar.members = []  # type: ignore[attr-defined]
    if first is None:
        return
    yield first
    while True:
        if tar.offset != tar.fileobj.tell():  # skip the data the consumer did not read
            tar.fileobj.seek(tar.offset - 1)
            if not tar.fileobj.read(1):
                raise tarfile.ReadError("unexpected end of data")
        try:
            info = tar.tarinfo.fromtarfile(tar)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]
            return  # a zero block: the end-of-archive marker
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]
            raise tarfile.ReadError("archive ends without an end-of-archive marker (truncated?)") from None
        except tarfile.TruncatedHeaderError:  # type: ignore[attr-defined]
            raise tarfile.ReadError("truncated header") from None
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"corrupt header at byte {tar.offset}: {e}") from None
        yield info


def _drain(reader: _CappedReader) -> None:
    """Read to the end of the stream (checks gzip CRCs, completes the hash, and counts
    trailing bytes against the cap)."""
    while reader.read(_CHUNK):
        pass


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


@contextlib.contextmanager
def _reading(blob: Path, limits: Limits) -> Iterator[tuple[tarfile.TarFile, _CappedReader]]:
    """Open the layer as a TarFile reading forward only; every read failure becomes
    LayerError."""
    try:
        with _open_stream(blob, limits) as reader:
            tar = tarfile.open(fileobj=reader, mode="r:", tarinfo=BoundedTarInfo)
            yield tar, reader
    except (LayerError, BrokenPipeError):
        raise
    except _READ_ERRORS as e:
        raise LayerError(f"layer sha256:{blob.name} is corrupt or truncated: {e}") from None


# Names --------------------------------------------------------------------------------------
def _norm(name: str, what: str, entry: str) -> str:
    """Normalise an archive name ("./a//b/" → "a/b", "./" → ""). Refuses absolute names,
    ``..``, NUL and components longer than 255 bytes."""
    if "\x00" in name:
        raise LayerError(f"{what} {_shown(entry)} contains a NUL byte; refused")
    if name.startswith("/"):
        raise LayerError(f"{what} {_shown(entry)} is an absolute path; refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what} {_shown(entry)} contains a '..' component; refused")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > 255:
            raise LayerError(f"{what} {_shown(entry)} has a name component longer than 255 bytes")
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise LayerError(f"{what} {_shown(entry)} is longer than {MAX_PATH_BYTES} bytes; refused")
    return path


def _shown(name: str) -> str:
    """An archive name for an error message: quoted, and cut if absurdly long."""
    return repr(name if len(name) <= 120 else name[:100] + "...")


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# Pass 1: scan and plan ----------------------------------------------------------------------
@dataclass
class _Plan:
    entries: dict[str, tuple[int, str]] = field(default_factory=dict)  # path → (index, kind)
    links: dict[str, str] = field(default_factory=dict)  # hardlink path → final target
    whiteouts: dict[str, int] = field(default_factory=dict)  # path → marker index to emit
    opaque: set[str] = field(default_factory=set)  # dirs that get the xattr
    synth_dirs: dict[str, int] = field(default_factory=dict)  # dir → marker index to emit at
    count: int = 0


def entry_kind(ti: tarfile.TarInfo) -> str | None:
    """``f`` file, ``d`` directory, ``l`` symlink, ``h`` hard link, ``p`` fifo; None for
    what layers refuse (device nodes, other tar types)."""
    if ti.isreg():
        return "f"
    if ti.isdir():
        return "d"
    if ti.issym():
        return "l"
    if ti.islnk():
        return "h"
    if ti.isfifo():
        return "p"
    return None


def _kind(ti: tarfile.TarInfo, entry: str) -> str:
    kind = entry_kind(ti)
    if kind is not None:
        return kind
    if ti.ischr() or ti.isblk():
        kind = "character" if ti.ischr() else "block"
        raise LayerError(
            f"entry {_shown(entry)} is a {kind} device node ({ti.devmajor}:{ti.devminor}); device nodes are refused"
        )
    raise LayerError(f"entry {_shown(entry)} has unsupported tar type {ti.type!r}; refused")


def _marker(path: str) -> tuple[str, str] | None:
    """("opaque", dir) / ("whiteout", path) / ("meta", "") for whiteout markers, else None."""
    parent, _, base = path.rpartition("/")
    if not base.startswith(_WH):
        return None
    if base == _WH_OPAQUE:
        return "opaque", parent
    if base.startswith(_WH_META):
        return "meta", ""  # aufs bookkeeping (.wh..wh.plnk etc.): ignored, as containerd does
    return "whiteout", _join(parent, base[len(_WH) :])


def _scan(blob: Path, limits: Limits, diff_id: str | None) -> _Plan:
    plan = _Plan()
    entries = plan.entries
    has_children: set[str] = set()
    opaque_markers: dict[str, int] = {}
    whiteout_markers: dict[str, int] = {}
    link_checks: list[tuple[str, int, str]] = []
    names: set[str] = set()  # every path an entry or whiteout puts in a directory
    dir_sizes: dict[str, int] = {}
    total = name_bytes = 0
    with _reading(blob, limits) as (tar, reader):
        for index, ti in enumerate(_members(tar)):
            if index >= limits.max_entries:
                raise LayerError(f"layer has more than {limits.max_entries} entries; refused")
            plan.count = index + 1
            entry = ti.name
            path = _norm(entry, "entry", entry)
            name_bytes += len(path) + len(ti.linkname)
            if name_bytes > limits.max_name_bytes:
                raise LayerError(f"the names in the layer add up to more than {limits.max_name_bytes} bytes; refused")
            parts = path.split("/") if path else []
            # every ancestor must be a directory (or not exist yet) at this point
            prefix = ""
            for part in parts[:-1]:
                prefix = _join(prefix, part)
                if part.startswith(_WH):
                    raise LayerError(f"entry {_shown(entry)} is inside a whiteout marker; refused")
                seen = entries.get(prefix)
                if seen is not None and seen[1] != "d":
                    raise LayerError(
                        f"entry {_shown(entry)} goes through {_shown(prefix)}, "
                        f"which is a {_KIND_NAMES[seen[1]]}; refused"
                    )
                has_children.add(prefix)
            if ti.isreg():
                total += ti.size
                if total > limits.max_bytes:
                    raise LayerError(
                        f"layer files add up to more than {limits.max_bytes} bytes (at entry {_shown(entry)}); refused"
                    )
            marker = _marker(path)
            named = marker[1] if marker is not None and marker[0] == "whiteout" else path
            if marker is None or marker[0] == "whiteout":
                if named and named not in names:
                    names.add(named)
                    parent = _parent(named)
                    dir_sizes[parent] = dir_sizes.get(parent, 0) + 1
                    if dir_sizes[parent] > limits.max_dir_entries:
                        raise LayerError(
                            f"directory {_shown(parent or '/')} of the layer has "
                            f"more than {limits.max_dir_entries} entries; "
                            "refused"
                        )
            if marker is not None:
                what, target = marker
                if what == "opaque":
                    opaque_markers[target] = index
                elif what == "whiteout":
                    name = target.rpartition("/")[2]
                    if name in ("", ".", ".."):
                        raise LayerError(f"whiteout {_shown(entry)} names {name!r}; refused")
                    whiteout_markers[target] = index
                continue
            kind = _kind(ti, entry)
            if path == "" and kind != "d":
                raise LayerError(
                    f"entry {_shown(entry)} would replace the root directory with a {_KIND_NAMES[kind]}; refused"
                )
            if kind == "h":
                target = _norm(ti.linkname, "hardlink target", ti.linkname)
                if target == path:
                    raise LayerError(f"hardlink {_shown(entry)} points to itself; refused")
                seen = entries.get(target)
                if seen is None:
                    raise LayerError(
                        f"hardlink {_shown(entry)} points to "
                        f"{_shown(ti.linkname)}, which is not an earlier entry "
                        "of the layer; refused"
                    )
                final = plan.links.get(target, target)
                final_kind = entries[final][1]
                if final_kind not in ("f", "l"):
                    raise LayerError(f"hardlink {_shown(entry)} points to a {_KIND_NAMES[final_kind]}; refused")
                plan.links[path] = final
                link_checks.append((final, entries[final][0], entry))
            elif kind == "l":
                if not ti.linkname or "\x00" in ti.linkname or len(ti.linkname) > 4095:
                    raise LayerError(f"symlink {_shown(entry)} has an empty or invalid target; refused")
            if kind != "h":
                plan.links.pop(path, None)
            entries[path] = (index, kind)
        _drain(reader)
        actual = "sha256:" + reader.sha.hexdigest()
    if diff_id is not None and actual != diff_id:
        raise LayerError(
            f"layer sha256:{blob.name} does not match its diff_id: expected {diff_id}, got {actual}; refused"
        )

    def check_ancestors(path: str, what: str) -> None:
        p = _parent(path) if what != "opaque" else path
        while p:
            seen = entries.get(p)
            if seen is not None:
                if seen[1] != "d":
                    raise LayerError(
                        f"{what} {_shown(path)} is inside {_shown(p)}, which the "
                        f"layer makes a {_KIND_NAMES[seen[1]]}; refused"
                    )
                return
            p = _parent(p)

    for path in entries:
        check_ancestors(path, "entry")
    for final, index, entry in link_checks:
        if entries[final][0] != index:
            raise LayerError(
                f"hardlink {_shown(entry)} points to {_shown(final)}, which a later entry replaces; refused"
            )
    for path, index in whiteout_markers.items():
        check_ancestors(path, "whiteout")
        seen = entries.get(path)
        if seen is not None:  # the layer's own entry wins; a directory hides the lower one
            if seen[1] == "d":
                plan.opaque.add(path)
        elif path in has_children:  # deleted, then recreated as a directory in this layer
            plan.opaque.add(path)
            plan.synth_dirs[path] = index
        else:
            plan.whiteouts[path] = index
    for path, index in opaque_markers.items():
        check_ancestors(path, "opaque")
        plan.opaque.add(path)
        if path not in entries:
            plan.synth_dirs.setdefault(path, index)
    return plan


# Pass 2: rewrite into tar2sqfs --------------------------------------------------------------
def _xattrs(ti: tarfile.TarInfo) -> dict[str, str]:
    out = {}
    for key, value in ti.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            name = key[len(_XATTR_PREFIX) :]
            if name.startswith(_XATTR_NAMESPACES) and not name.startswith("trusted.overlay."):
                out[key] = value
    return out


def _header(path: str, type_: bytes, ti: tarfile.TarInfo | None = None) -> tarfile.TarInfo:
    out = tarfile.TarInfo(path or ".")
    out.type = type_
    if ti is not None:
        out.mode = ti.mode & 0o7777
        out.uid, out.gid = ti.uid, ti.gid
        out.mtime = int(min(max(ti.mtime, 0), _MTIME_MAX))
        out.pax_headers = _xattrs(ti)
    else:
        out.mode, out.uid, out.gid, out.mtime = 0o755, 0, 0, 0
    return out


def _write(blob: Path, limits: Limits, plan: _Plan, out: Path, argv: list[str]) -> None:
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen([*argv, str(out)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errlog)

        def tar2sqfs_error() -> LayerError:
            errlog.seek(0)
            err = errlog.read().decode(errors="replace").strip()
            return LayerError(f"tar2sqfs refused layer sha256:{blob.name}: {err or f'exit status {proc.returncode}'}")

        stdin = proc.stdin
        assert stdin is not None  # stdin=PIPE
        try:
            _rewrite(blob, limits, plan, stdin)
            stdin.close()
        except BrokenPipeError:  # tar2sqfs gave up: its message says why
            proc.wait()
            raise tar2sqfs_error() from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with contextlib.suppress(OSError):
                stdin.close()
        if proc.wait() != 0:
            raise tar2sqfs_error()


class _TarSink:
    """Writes a PAX tar straight to a pipe (tarfile's stream writer copies each buffer
    several times; this is ~3x faster)."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def add(self, ti: tarfile.TarInfo, data: Readable | None = None) -> None:
        self.f.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data is None:
            return
        remaining = ti.size
        while remaining:
            chunk = data.read(min(_CHUNK, remaining))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            self.f.write(chunk)
            remaining -= len(chunk)
        if ti.size % tarfile.BLOCKSIZE:
            self.f.write(bytes(tarfile.BLOCKSIZE - ti.size % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self.f.write(bytes(2 * tarfile.BLOCKSIZE))
        self.f.flush()


def _rewrite(blob: Path, limits: Limits, plan: _Plan, sink_file: IO[bytes]) -> None:
    """Stream the layer again and write the planned tar to ``sink_file``."""
    sink = _TarSink(sink_file)
    with _reading(blob, limits) as (src, reader):
        for index, ti in enumerate(_members(src)):
            if index >= plan.count:
                raise LayerError(f"layer sha256:{blob.name} changed while being converted")
            path = _norm(ti.name, "entry", ti.name)
            marker = _marker(path)
            if marker is not None:
                target = marker[1]
                if plan.synth_dirs.get(target) == index:
                    d = _header(target, tarfile.DIRTYPE)
                    d.pax_headers = {OPAQUE_XATTR: "y"}
                    sink.add(d)
                if marker[0] == "whiteout" and plan.whiteouts.get(target) == index:
                    wh = _header(target, tarfile.CHRTYPE)
                    wh.mode, wh.devmajor, wh.devminor = 0, 0, 0
                    sink.add(wh)
                continue
            kept = plan.entries.get(path)
            if kept is None:
                raise LayerError(f"layer sha256:{blob.name} changed while being converted")
            if kept[0] != index:
                continue  # replaced by a later entry of the same path
            kind = kept[1]
            if kind == "f":
                h = _header(path, tarfile.REGTYPE, ti)
                h.size = ti.size
                sink.add(h, src.extractfile(ti))
                continue
            if kind == "d":
                h = _header(path, tarfile.DIRTYPE, ti)
                if path in plan.opaque:
                    h.pax_headers = {**h.pax_headers, OPAQUE_XATTR: "y"}
            elif kind == "l":
                h = _header(path, tarfile.SYMTYPE, ti)
                h.linkname = ti.linkname
            elif kind == "h":
                h = _header(path, tarfile.LNKTYPE, ti)
                h.linkname = plan.links[path]
            else:
                h = _header(path, tarfile.FIFOTYPE, ti)
            sink.add(h)
        sink.close()
        _drain(reader)  # lets a zstd child finish cleanly
