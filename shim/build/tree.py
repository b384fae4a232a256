"""What an image's layers add up to, seen from the host without extracting anything, and
the writer for the layer tars the builder makes.

:class:`RootView` answers the questions COPY, ADD, WORKDIR and the RUN diff ask about the
image so far: does ``/usr/src/app`` exist, what is ``/bin`` (a symlink on merged-/usr
systems), what are a directory's owner and mode, what does ``/etc/passwd`` say, which files
lie under ``/out`` of an earlier stage. It is built from per-layer listings (name, type,
mode, owner, size, link target) with the OCI whiteouts applied; a listing is read once per
layer digest and cached as JSON under ``$VMSHIM_ROOT/build/listings``. File contents are
read from the layer tars on demand. Everything is virtual: a hostile layer can make the view
wrong, never make the host write or read outside the store.

:class:`LayerWriter` writes an uncompressed OCI layer tar (PAX, numeric owners), computing
its sha256 (= digest = diff_id) on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from shim import paths
from shim.build.symlinks import resolve_within
from shim.errors import ImageError
from shim.images.layers import entry_kind
from shim.images.tarsafe import BoundedTarInfo

_WH = ".wh."
_WH_OPAQUE = ".wh..wh..opq"
_LISTING_VERSION = 1
MAX_SYMLINKS = 40


@dataclass
class Node:
    """One path of the view. ``kind``: d(ir), f(ile), l(symlink), h(ardlink), p(fifo).
    ``layer`` is the index of the layer that provides it (for reading its content)."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    layer: int


def norm(path: str) -> str:
    """An absolute or relative path → the view's key: no leading/trailing slash, no ``.``,
    ``..`` resolved lexically and never above the root ("" is the root)."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


@contextlib.contextmanager
def open_layer_tar(blob: Path) -> Iterator[tarfile.TarFile]:
    """A forward-only TarFile over a layer blob (plain, gzip, bzip2, xz; zstd through
    shim.images.layers). Raises ImageError when it cannot be read."""
    with open(blob, "rb") as f:
        magic = f.read(4)
    try:
        if magic == b"\x28\xb5\x2f\xfd":  # zstd
            from shim.images.layers import open_uncompressed  # noqa: I001

            with (
                open_uncompressed(blob) as stream,
                # typeshed asks every fileobj for the whole file protocol; stream mode only reads
                tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as tar,  # type: ignore[call-overload]
            ):
                yield tar
        else:
            with tarfile.open(blob, mode="r|*", tarinfo=BoundedTarInfo) as tar:
                yield tar
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"cannot read layer {blob.name}: {exc}") from None


def listing(blob: Path, digest_hex: str) -> list[list]:
    """The entries of one layer: ``[name, kind, mode, uid, gid, size, mtime, linkname]``
    in archive order, names normalised; whiteouts are kind ``w`` (name: the path they
    delete) and ``o`` (name: the opaque directory). Cached per digest."""
    cache_dir = paths.root() / "build" / "listings"
    cache = cache_dir / f"{digest_hex}.json"
    try:
        data = json.loads(cache.read_bytes())
        if data.get("v") == _LISTING_VERSION:
            return data["entries"]
    except (OSError, ValueError, AttributeError):
        pass
    entries = []
    with open_layer_tar(blob) as tar:
        for ti in tar:
            name = norm(ti.name)
            parent, _, base = name.rpartition("/")
            if base == _WH_OPAQUE:
                entries.append([parent, "o", 0, 0, 0, 0, 0, ""])
                continue
            if base.startswith(_WH):
                if not base.startswith(_WH + _WH):  # .wh..wh.* aufs bookkeeping: ignored
                    entries.append([posixpath.join(parent, base[len(_WH) :]), "w", 0, 0, 0, 0, 0, ""])
                continue
            kind = entry_kind(ti)  # None for devices: layers refuse them anyway
            if kind is None or not name:
                continue
            link = norm(ti.linkname) if kind == "h" else (ti.linkname if kind == "l" else "")
            entries.append([name, kind, ti.mode & 0o7777, ti.uid, ti.gid, ti.size, int(ti.mtime), link])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}")  # stages: threads
    tmp.write_text(json.dumps({"v": _LISTING_VERSION, "entries": entries}, separators=(",", ":")))
    os.replace(tmp, cache)
    return entries


class RootView:
    """The merged filesystem of a list of layers (bottom first)."""

    def __init__(self, blobs: list[Path], listings: list[list[list]]):
        self.blobs = blobs
        self.nodes: dict[str, Node] = {"": Node("d", 0o755, 0, 0, 0, 0, "", -1)}
        for index, entries in enumerate(listings):
            self._apply(index, entries)
        self._children: dict[str, list[str]] | None = None

    @classmethod
    def empty(cls) -> "RootView":
        return cls([], [])

    @classmethod
    def of(cls, store, layers: list[dict]) -> "RootView":
        """The view of manifest layer descriptors ``layers`` stored in ``store``."""
        blobs, listings = [], []
        for desc in layers:
            blob = store.blob_path(desc["digest"])
            blobs.append(blob)
            listings.append(listing(blob, desc["digest"].split(":", 1)[1]))
        return cls(blobs, listings)

    def _remove_tree(self, path: str, below_layer: int | None = None, keep_self: bool = False) -> None:
        node = self.nodes.get(path)
        if node is not None and node.kind != "d":  # no descendants: the common case
            if not keep_self:
                del self.nodes[path]
            return
        prefix = path + "/" if path else ""
        doomed = [
            p
            for p, n in self.nodes.items()
            if p.startswith(prefix) and p != "" and (below_layer is None or n.layer < below_layer)
        ]
        for p in doomed:
            del self.nodes[p]
        if not keep_self:
            self.nodes.pop(path, None)

    def _apply(self, index: int, entries: list[list]) -> None:
        for name, kind, mode, uid, gid, size, mtime, link in entries:
            if kind == "w":
                self._remove_tree(name)
            elif kind == "o":
                self._remove_tree(name, below_layer=index, keep_self=True)
            else:
                old = self.nodes.get(name)
                if old is not None and (old.kind != "d" or kind != "d"):
                    self._remove_tree(name)  # replaced by a non-directory (or by a dir)
                self.nodes[name] = Node(kind, mode, uid, gid, size, mtime, link, index)
                parent = name
                while "/" in parent:  # implied parents (tars may omit them)
                    parent = parent.rpartition("/")[0]
                    if parent in self.nodes:
                        break
                    self.nodes[parent] = Node("d", 0o755, 0, 0, 0, 0, "", index)

    # ---- lookups ----------------------------------------------------------------------------
    def resolve(self, path: str, follow_last: bool = True) -> str:
        """*path* with every symlink resolved as if the view's root were ``/`` (missing
        components kept literally). Raises ImageError after MAX_SYMLINKS links."""

        def link_of(resolved: list[str], part: str, last: bool) -> str | None:
            node = self.nodes.get("/".join(resolved + [part]))
            if node is None or node.kind != "l" or (last and not follow_last):
                return None
            return node.linkname

        return resolve_within(
            path, link_of, MAX_SYMLINKS, lambda: ImageError(f"too many levels of symbolic links in /{path}")
        )

    def get(self, path: str, follow: bool = True) -> Node | None:
        """The node at *path* (symlinks followed, also the last one when *follow*)."""
        return self.nodes.get(self.resolve(path, follow_last=follow))

    def is_dir(self, path: str) -> bool:
        node = self.get(path)
        return node is not None and node.kind == "d"

    def children(self, path: str) -> list[str]:
        """Names directly under the directory *path* (already resolved), sorted."""
        if self._children is None:
            index: dict[str, list[str]] = {}
            for p in self.nodes:
                if p:
                    parent, _, base = p.rpartition("/")
                    index.setdefault(parent, []).append(base)
            for names in index.values():
                names.sort()
            self._children = index
        return list(self._children.get(path, []))

    def walk(self, top: str) -> Iterator[str]:
        """Every path strictly below the directory *top* (resolved), parents first."""
        for name in self.children(top):
            child = f"{top}/{name}" if top else name
            yield child
            if self.nodes[child].kind == "d":
                yield from self.walk(child)

    def read(self, path: str, limit: int = 1 << 20) -> bytes | None:
        """Content of the regular file at *path* (symlinks followed), at most *limit*
        bytes; None when it is not a regular file."""
        for _, f in self.open_many([self.resolve(path)]):
            return f.read(limit)
        return None

    def open_many(self, wanted: list[str]) -> Iterator[tuple[str, IO[bytes]]]:
        """Yield (path, file object) for the regular files among *wanted*, layer by layer,
        streaming (each file object is valid until the next item)."""
        by_layer: dict[int, dict[str, list[str]]] = {}
        for path in wanted:
            node = self.nodes.get(path)
            if node is None or node.kind not in ("f", "h"):
                continue
            member = node.linkname if node.kind == "h" else path
            by_layer.setdefault(node.layer, {}).setdefault(member, []).append(path)
        for layer in sorted(by_layer):
            targets = by_layer[layer]
            with open_layer_tar(self.blobs[layer]) as tar:
                for ti in tar:
                    name = norm(ti.name)
                    if name in targets and ti.isreg():
                        paths_here = targets.pop(name)
                        f = tar.extractfile(ti)
                        assert f is not None  # ti.isreg()
                        if len(paths_here) == 1:
                            yield paths_here[0], f
                        else:
                            data = f.read()
                            for path in paths_here:
                                yield path, io.BytesIO(data)
                        if not targets:
                            break


class LayerWriter:
    """Write an uncompressed layer tar to *path*; ``digest`` is known after close()."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        # typeshed asks for the whole file protocol; write mode only writes and tells
        self._tar = tarfile.open(  # type: ignore[call-overload]
            fileobj=_Hashing(self._file, self._hash), mode="w", format=tarfile.PAX_FORMAT
        )
        self.entries = 0
        self.digest: str | None = None

    def _info(self, name: str, type_: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid = type_, mode & 0o7777, uid, gid
        ti.mtime = max(0, int(mtime))
        ti.uname = ti.gname = ""
        return ti

    def add_dir(
        self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0, xattrs: dict | None = None
    ) -> None:
        ti = self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime)
        self._add(ti, None, xattrs)

    def add_file(
        self,
        name: str,
        data: IO[bytes] | bytes,
        size: int,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        xattrs: dict | None = None,
    ) -> None:
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
        ti.size = size
        self._add(ti, io.BytesIO(data) if isinstance(data, bytes) else data, xattrs)

    def add_symlink(self, name: str, target: str, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        ti = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
        ti.linkname = target
        self._add(ti, None, None)

    def add_hardlink(self, name: str, target: str, uid: int = 0, gid: int = 0) -> None:
        ti = self._info(name, tarfile.LNKTYPE, 0o644, uid, gid, 0)
        ti.linkname = target
        self._add(ti, None, None)

    def add_fifo(self, name: str, mode: int, uid: int, gid: int, mtime: int) -> None:
        self._add(self._info(name, tarfile.FIFOTYPE, mode, uid, gid, mtime), None, None)

    def add_whiteout(self, path: str) -> None:
        parent, _, base = path.rpartition("/")
        self.add_file(posixpath.join(parent, _WH + base), b"", 0, 0o644)

    def add_opaque(self, directory: str) -> None:
        self.add_file(posixpath.join(directory, _WH_OPAQUE), b"", 0, 0o644)

    def _add(self, ti: tarfile.TarInfo, data, xattrs: dict | None) -> None:
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self._tar.addfile(ti, data)
        self.entries += 1

    def close(self) -> str:
        """Finish the archive; return its ``sha256:`` digest."""
        if self.digest is None:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.digest = "sha256:" + self._hash.hexdigest()
        return self.digest

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Hashing:
    """A write-only file wrapper that hashes what passes through."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()
