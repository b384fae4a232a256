"""``save`` and ``load``: docker-archive and OCI image layout (directory or tar).

docker-archive (what ``docker save``/``podman save`` write; skopeo ``docker-archive:``)::

    manifest.json             [{"Config": "<hex>.json",
                                "RepoTags": ["docker.io/library/busybox:latest"],
                                "Layers": ["<diff_id hex>/layer.tar", ...]}]
    <config hex>.json         the config blob, byte for byte (so the image ID is kept)
    <diff_id hex>/layer.tar   each layer uncompressed (compressed blobs are inflated)

oci-archive: a tar of an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/<hex>``) holding the stored blobs as they are, so manifest digests are kept.
Each name is one ``index.json`` entry annotated with ``org.opencontainers.image.ref.name``
and ``io.containerd.image.name`` = the full name (``docker.io/library/busybox:latest``).

``load`` reads any of: a docker-archive, an OCI archive, an OCI layout directory, each of
the tars plain or gzip/zstd/xz-compressed, from a file or stdin. Nothing is extracted: tar
members are looked up by name and streamed into the store, where every blob is verified
(OCI: against its descriptor; docker-archive: layers against the config's diff_ids).
Member names are never used as paths; links inside the archive are followed only to other
members. If anything fails, the blobs the load added are removed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Iterator

from shim.errors import ImageError, InvalidReference, UsageError
from shim.images.distribution import NoProgress, Progress
from shim.images.layers import open_uncompressed
from shim.images.reference import Reference, parse_reference
from shim.images.store import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
    Image,
    ImageStore,
    Readable,
    canonical_json,
    check_descriptor,
    digest_hex,
)
from shim.images.tarsafe import BoundedTarInfo

FORMATS = ("docker-archive", "oci-archive")
CONTAINERD_NAME = "io.containerd.image.name"
UNNAMED = "localhost/loaded"
MAX_MEMBERS = 200_000
MAX_NAME_BYTES = 64 << 20
MAX_SPOOL_BYTES = 64 << 30  # load's spooled, decompressed input (as a layer's own cap)
_JSON_MAX = 8 << 20
_CHUNK = 1 << 20


# Save ---------------------------------------------------------------------------------------
def _resolve_all(store: ImageStore, refs: list[str]) -> list[tuple[Image, Reference | None]]:
    out = []
    for text in refs:
        image, how = store._lookup(text)
        # by ID: saved without a name; by digest only: neither format has a place for it
        name = image.reference if how == "name" and image.reference.tag is not None else None
        out.append((image, name))
    return out


def _tarinfo(name: str, size: int, mode: int = 0o644, type_: bytes = tarfile.REGTYPE):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.type, ti.mtime = size, mode, type_, 0
    ti.uname = ti.gname = ""
    return ti


class _Counted:
    def __init__(self, f: Readable, key: str, progress: Progress):
        self.f, self.key, self.progress = f, key, progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.progress.advance(self.key, len(data))
        return data


def save(
    store: ImageStore, refs: list[str], out: BinaryIO, fmt: str = "docker-archive", progress: Progress | None = None
) -> None:
    """Write the images ``refs`` as one archive of format ``fmt`` to the stream ``out``.
    Raises ImageNotFound, UsageError (unknown format), LayerError (a corrupt stored layer)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown archive format {fmt!r}: use one of {', '.join(FORMATS)}")
    progress = progress or NoProgress()
    images = _resolve_all(store, refs)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if fmt == "docker-archive":
            _save_docker(store, images, tar, progress)
        else:
            _save_oci(store, images, tar, progress)


def save_to_file(
    store: ImageStore, refs: list[str], path: Path, fmt: str = "docker-archive", progress: Progress | None = None
) -> None:
    """``save`` into ``path``, atomically: a temp file beside it, renamed when complete."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    except OSError as e:
        raise ImageError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            save(store, refs, f, fmt, progress)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_docker(store: ImageStore, images, tar: tarfile.TarFile, progress: Progress) -> None:
    entries: dict[str, dict] = {}  # config digest → manifest.json entry
    written: set[str] = set()
    for image, name in images:
        entry = entries.get(image.config_digest)
        if entry is None:
            cfg_name = f"{digest_hex(image.config_digest)}.json"
            layer_names = []
            for layer in image.layers:
                diff_id = layer.diff_id or layer.digest
                member = f"{digest_hex(diff_id)}/layer.tar"
                layer_names.append(member)
                if member in written:
                    continue
                blob = store.blob_path(layer.digest)
                if layer.media_type == OCI_LAYER_TAR or diff_id == layer.digest:
                    size = blob.stat().st_size
                else:
                    size = _uncompressed_size(blob, diff_id)
                key = digest_hex(diff_id)[:12]
                progress.start(key, key, size)
                tar.addfile(_tarinfo(f"{digest_hex(diff_id)}/", 0, 0o755, tarfile.DIRTYPE))
                with open_uncompressed(blob) as src:
                    tar.addfile(_tarinfo(member, size), _Counted(src, key, progress))
                progress.finish(key, "Saved")
                written.add(member)
            config = store.read_blob(image.config_digest)
            if cfg_name not in written:
                tar.addfile(_tarinfo(cfg_name, len(config)), io.BytesIO(config))
                written.add(cfg_name)
            entry = {"Config": cfg_name, "RepoTags": [], "Layers": layer_names}
            entries[image.config_digest] = entry
        if name is not None and str(name) not in entry["RepoTags"]:
            entry["RepoTags"].append(str(name))  # full name: podman reads short ones as localhost/
    manifest = json.dumps(list(entries.values()), indent=None).encode() + b"\n"
    tar.addfile(_tarinfo("manifest.json", len(manifest)), io.BytesIO(manifest))


def _uncompressed_size(blob: Path, diff_id: str) -> int:
    size = 0
    with open_uncompressed(blob) as src:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
        actual = "sha256:" + src.sha.hexdigest()
    if actual != diff_id:
        raise ImageError(
            f"stored layer sha256:{blob.name} does not match its diff_id {diff_id} (got {actual}); the store is damaged"
        )
    return size


def _save_oci(store: ImageStore, images, tar: tarfile.TarFile, progress: Progress) -> None:
    layout = b'{"imageLayoutVersion":"1.0.0"}'
    tar.addfile(_tarinfo("oci-layout", len(layout)), io.BytesIO(layout))
    for d in ("blobs/", "blobs/sha256/"):
        tar.addfile(_tarinfo(d, 0, 0o755, tarfile.DIRTYPE))
    written: set[str] = set()
    manifests: list[dict] = []
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}

    def put(digest: str) -> int:
        path = store.blob_path(digest)
        size = path.stat().st_size
        if digest not in written:
            key = digest_hex(digest)[:12]
            progress.start(key, key, size)
            with open(path, "rb") as f:
                tar.addfile(_tarinfo(f"blobs/sha256/{digest_hex(digest)}", size), _Counted(f, key, progress))
            progress.finish(key, "Saved")
            written.add(digest)
        return size

    for image, name in images:
        for layer in image.layers:
            put(layer.digest)
        put(image.config_digest)
        size = put(image.manifest_digest)
        media_type = json.loads(store.read_blob(image.manifest_digest)).get("mediaType") or OCI_MANIFEST
        desc = {"mediaType": media_type, "digest": image.manifest_digest, "size": size}
        if name is not None:
            desc["annotations"] = {REF_NAME: str(name), CONTAINERD_NAME: str(name)}
        if desc not in manifests:
            manifests.append(desc)
    data = json.dumps(index, indent=2).encode() + b"\n"
    tar.addfile(_tarinfo("index.json", len(data)), io.BytesIO(data))


# Load: reading archives ---------------------------------------------------------------------
class _Source:
    """Named members of an archive or directory, read without extracting anything."""

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, limit: int = _JSON_MAX) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"archive member {name} is larger than {limit} bytes; refused")
        return data


def _clean(name: str) -> str | None:
    """Normalise an archive member name (``./a//b`` → ``a/b``); None if it escapes."""
    if name.startswith("/") or "\x00" in name:
        return None
    norm = posixpath.normpath(name)
    if norm == ".":
        return ""
    if norm.startswith("../") or norm == "..":
        return None
    return norm


class _DirSource(_Source):
    def __init__(self, root: Path):
        self.root = root.resolve()

    def _path(self, name: str) -> Path:
        clean = _clean(name)
        if clean is None:
            raise ImageError(f"OCI layout refers to {name!r} outside its directory; refused")
        path = (self.root / clean).resolve()
        if self.root not in path.parents and path != self.root:
            raise ImageError(f"OCI layout member {name!r} leads outside {self.root}; refused")
        return path

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise ImageError(f"the OCI layout {self.root} lacks {name}") from None
        except IsADirectoryError:
            raise ImageError(f"{name} in the OCI layout {self.root} is a directory") from None

    def has(self, name: str) -> bool:
        try:
            return self._path(name).is_file()
        except ImageError:
            return False


class _TarSource(_Source):
    def __init__(self, f: BinaryIO, label: str):
        self.label = label
        try:
            self.tar = tarfile.open(fileobj=f, mode="r:", tarinfo=BoundedTarInfo)
            self.members: dict[str, tarfile.TarInfo] = {}
            count = names = 0
            while (ti := self.tar.next()) is not None:
                count += 1
                if count > MAX_MEMBERS:
                    raise ImageError(f"{label} has more than {MAX_MEMBERS} entries; refused")
                names += len(ti.name) + len(ti.linkname)
                if names > MAX_NAME_BYTES:  # the index below keeps every name
                    raise ImageError(f"the member names of {label} add up to more than {MAX_NAME_BYTES} bytes; refused")
                clean = _clean(ti.name)
                if clean is not None:
                    self.members[clean] = ti
            # the index above is all we keep (TarFile.members: CPython, not in typeshed)
            self.tar.members = []  # type: ignore[attr-defined]
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ImageError(f"{label} is not a readable tar archive: {e}") from None

    def _resolve(self, name: str, hops: int = 0) -> tarfile.TarInfo:
        clean = _clean(name)
        if clean is None or (ti := self.members.get(clean)) is None:
            raise ImageError(f"{self.label} lacks {name}")
        if hops > 8:
            raise ImageError(f"{self.label}: too many links at {name}; refused")
        if ti.issym():
            return self._resolve(posixpath.join(posixpath.dirname(clean), ti.linkname), hops + 1)
        if ti.islnk():
            return self._resolve(ti.linkname, hops + 1)
        if not ti.isreg():
            raise ImageError(f"{self.label}: {name} is not a regular file")
        return ti

    def open(self, name: str) -> IO[bytes]:
        ti = self._resolve(name)
        f = self.tar.extractfile(ti)
        assert f is not None
        return f

    def size(self, name: str) -> int:
        return self._resolve(name).size

    def has(self, name: str) -> bool:
        try:
            self._resolve(name)
            return True
        except ImageError:
            return False


_MAGIC = {
    b"\x1f\x8b": ["gzip", "-dc"],
    b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"],
    b"\xfd7zXZ": ["xz", "-dc"],
    b"BZh": ["bzip2", "-dc"],
}


@contextlib.contextmanager
def _open_input(
    store: ImageStore, path: Path | None, stdin: BinaryIO | None, label: str, max_bytes: int
) -> Iterator[_Source]:
    """A _Source for a directory, a (compressed) tar file, or stdin (spooled to a temp
    file in the store, decompressed on the way, at most *max_bytes*)."""
    if path is not None and Path(path).is_dir():
        if not (Path(path) / "oci-layout").is_file():
            raise ImageError(f"{path} is a directory but not an OCI image layout (no oci-layout file)")
        yield _DirSource(Path(path))
        return
    tmpdir = store.root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    try:
        raw = open(path, "rb") if path is not None else stdin
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from None
    assert raw is not None
    with contextlib.ExitStack() as stack:
        if path is not None:
            stack.enter_context(raw)
        head = _peek(raw, 6)  # consumed: written out below unless we rewind
        tool = next((argv for magic, argv in _MAGIC.items() if head.startswith(magic)), None)
        if tool is None and path is not None:
            raw.seek(0)
            yield _TarSource(raw, label)
            return
        spool = stack.enter_context(tempfile.TemporaryFile(dir=tmpdir))
        capped = _CappedSpool(spool, max_bytes, label)
        if tool is None:
            capped.write(head)
            while chunk := raw.read(_CHUNK):
                capped.write(chunk)
        else:
            _decompress(tool, head, raw, capped, label)
        spool.seek(0)
        yield _TarSource(spool, label)


class _CappedSpool:
    """The spool of ``load``'s input: refuses more than *limit* bytes (a decompression
    bomb, or an input larger than the store should take), so the disk is not filled."""

    def __init__(self, f: BinaryIO, limit: int, label: str):
        self.f, self.limit, self.label, self.count = f, limit, label, 0

    def write(self, data: bytes) -> None:
        self.count += len(data)
        if self.count > self.limit:
            raise ImageError(
                f"{self.label} is larger than {self.limit} bytes uncompressed "
                "(decompression bomb?); refused (VMSHIM_LOAD_MAX_BYTES raises "
                "the cap)"
            )
        self.f.write(data)


def _decompress(tool: list[str], head: bytes, raw: BinaryIO, out: _CappedSpool, label: str) -> None:
    """Run *tool* on head + raw, its output into *out* (stopped at the cap)."""
    if shutil.which(tool[0]) is None:
        raise ImageError(f"{label} is {tool[0]}-compressed and {tool[0]} is not installed")
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(tool, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog)
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None  # both PIPE

        def feed() -> None:
            try:
                stdin.write(head)
                while chunk := raw.read(_CHUNK):
                    stdin.write(chunk)
            except (BrokenPipeError, ValueError, OSError):
                pass  # the tool exited (or was killed at the cap): its status says why
            finally:
                with contextlib.suppress(OSError):
                    stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            while chunk := stdout.read(_CHUNK):
                out.write(chunk)
        except BaseException:
            proc.kill()
            raise
        finally:
            stdout.close()
            rc = proc.wait()
            feeder.join()
        if rc != 0:
            errlog.seek(0)
            err = errlog.read().decode(errors="replace").strip()
            raise ImageError(f"{label} could not be decompressed: {err or tool[0]}")


def _peek(f: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _spool_cap(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return max_bytes
    text = os.environ.get("VMSHIM_LOAD_MAX_BYTES")
    if not text:
        return MAX_SPOOL_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"VMSHIM_LOAD_MAX_BYTES must be a positive number of bytes, not {text!r}")
    return value


# Load: into the store -----------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """One image loaded. ``names`` is empty when the archive named it not at all: it is
    then recorded as ``localhost/loaded@<manifest digest>`` (find it by ``image_id``)."""

    names: list[Reference]
    image_id: str
    manifest_digest: str


class _Loader:
    def __init__(self, store: ImageStore, src: _Source, progress: Progress):
        self.store, self.src, self.progress = store, src, progress
        self.added: list[str] = []

    def put(self, name: str, expected: str | None = None, size: int | None = None) -> str:
        """Stream member ``name`` into the store (verified against ``expected``/``size``)."""
        if expected is not None and self.store.has_blob(expected):
            return expected
        if expected:
            key = digest_hex(expected)[:12]
        else:  # "<id>/layer.tar" (docker) or "<id>.tar" (podman)
            key = posixpath.basename(name.removesuffix("/layer.tar")).removesuffix(".tar")[:12]
        total = size
        if total is None and isinstance(self.src, _TarSource):
            total = self.src.size(name)
        self.progress.start(key, key, total)
        with self.src.open(name) as f:
            digest = self.store.put_blob(_Counted(f, key, self.progress), expected, size)
        self.added.append(digest)
        self.progress.finish(key, "Loaded")
        return digest

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        existed = expected is not None and self.store.has_blob(expected)
        digest = self.store.put_blob(data, expected)
        if not existed:
            self.added.append(digest)
        return digest


def load(
    store: ImageStore,
    path: Path | None = None,
    stdin: BinaryIO | None = None,
    progress: Progress | None = None,
    max_bytes: int | None = None,
) -> list[Loaded]:
    """Load every image of an archive/layout into ``store`` and record their names.
    Input that must be spooled (stdin, compressed archives) is capped at *max_bytes*
    uncompressed (default: $VMSHIM_LOAD_MAX_BYTES, else MAX_SPOOL_BYTES). Raises
    ImageError naming what is wrong; on failure the blobs added are removed."""
    progress = progress or NoProgress()
    label = str(path) if path is not None else "the archive on stdin"
    with _open_input(store, path, stdin, label, _spool_cap(max_bytes)) as src, store.writing():
        loader = _Loader(store, src, progress)
        try:
            if src.has("oci-layout") and src.has("index.json"):
                return _load_oci(loader, label)
            if src.has("manifest.json"):
                return _load_docker(loader, label)
            raise ImageError(
                f"{label} is neither a docker-archive (no manifest.json) nor an "
                "OCI image layout (no oci-layout/index.json)"
            )
        except BaseException:
            store.discard_blobs(loader.added)
            raise


def _json(src: _Source, name: str, what: str) -> object:
    try:
        return json.loads(src.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: {name} is not valid JSON ({e})") from None


def _docker_tags(src: _Source) -> dict[str, list[str]]:
    """config hex → RepoTags, from a manifest.json beside an OCI layout (docker 25+)."""
    if not src.has("manifest.json"):
        return {}
    try:
        entries = json.loads(src.read("manifest.json"))
        return {
            posixpath.basename(e["Config"]).removesuffix(".json"): list(e.get("RepoTags") or [])
            for e in entries
            if isinstance(e, dict)
        }
    except (ValueError, KeyError, TypeError, AttributeError, ImageError):
        return {}


def _names_from(annotations: dict, fallback: list[str]) -> tuple[list[Reference], str | None]:
    """(names, bare tag) from an OCI descriptor's annotations."""
    names = []
    tag = None
    for key in (CONTAINERD_NAME, REF_NAME):
        value = (annotations or {}).get(key)
        if not isinstance(value, str) or not value:
            continue
        if "/" not in value and ":" not in value and "@" not in value:
            tag = tag or value  # a bare tag, as the OCI spec suggests
            continue
        try:
            ref = parse_reference(value)
        except InvalidReference:
            continue
        if ref not in names:
            names.append(ref)
    if not names:
        for text in fallback:
            with contextlib.suppress(InvalidReference):
                names.append(parse_reference(text))
    return names, tag


def _load_oci(loader: _Loader, label: str) -> list[Loaded]:
    src, store = loader.src, loader.store
    index = _json(src, "index.json", label)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{label}: index.json has no manifests list")
    docker_tags = _docker_tags(src)
    results: list[Loaded] = []
    for desc in index["manifests"]:
        top, _ = check_descriptor(desc, label)
        digest, manifest, media = _load_manifest_tree(loader, desc, label)
        config_digest = manifest["config"]["digest"]
        names, tag = _names_from(desc.get("annotations") or {}, docker_tags.get(digest_hex(config_digest), []))
        unnamed = not names
        if unnamed:
            names = [parse_reference(f"{UNNAMED}:{tag}" if tag else f"{UNNAMED}@{digest}")]
        recorded = []
        for name in names:
            if name.tag is not None:
                name = Reference(name.registry, name.repository, name.tag, None)
                store.tag(name, digest)
            else:  # by digest: the index's (stored, with this platform) or the manifest's
                target = name.digest if name.digest in (top, digest) else digest
                name = Reference(name.registry, name.repository, None, target)
                store.tag(name, target)
            recorded.append(name)
        results.append(
            Loaded(names=[] if unnamed and not tag else recorded, image_id=config_digest, manifest_digest=digest)
        )
    if not results:
        raise ImageError(f"{label}: the OCI layout holds no images")
    return results


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def _load_manifest_tree(loader: _Loader, desc: dict, label: str) -> tuple[str, dict, str]:
    """Store the manifest ``desc`` names (an index: itself and the host platform's child)
    with its config and layers. Returns (image manifest digest, manifest, media type)."""
    src = loader.src
    digest, size = check_descriptor(desc, label)
    body = src.read(_blob_name(digest))
    if len(body) != size:
        raise ImageError(f"{label}: blob {digest} does not have the size {size} its descriptor declares; refused")
    loader.put_bytes(body, digest)
    try:
        manifest = json.loads(body)
        assert isinstance(manifest, dict)
    except (ValueError, AssertionError):
        raise ImageError(f"{label}: manifest {digest} is not a JSON object") from None
    media = manifest.get("mediaType") or desc.get("mediaType")
    if media in INDEX_TYPES or (media is None and "manifests" in manifest):
        child = _pick_child(manifest, label, src)
        return _load_manifest_tree(loader, child, label)
    if media not in MANIFEST_TYPES and "layers" not in manifest:
        raise ImageError(f"{label}: manifest {digest} has unsupported media type {media!r}")
    try:
        blobs = [check_descriptor(manifest["config"], label)] + [check_descriptor(d, label) for d in manifest["layers"]]
    except (KeyError, TypeError):
        raise ImageError(f"{label}: manifest {digest} is malformed") from None
    for blob, blob_size in blobs:
        loader.put(_blob_name(blob), blob, blob_size)
    return digest, manifest, media or OCI_MANIFEST


def _pick_child(index: dict, label: str, src: _Source) -> dict:
    from shim.images.distribution import Platform, _select_platform

    try:
        return _select_platform(index, Platform.parse(None), label)
    except ImageError:
        present = [
            d
            for d in index.get("manifests") or []
            if isinstance(d, dict)
            and isinstance(d.get("digest"), str)
            and d["digest"].startswith("sha256:")
            and src.has(_blob_name(d["digest"]))
        ]
        if len(present) == 1:
            return present[0]
        raise


def _load_docker(loader: _Loader, label: str) -> list[Loaded]:
    src, store = loader.src, loader.store
    entries = _json(src, "manifest.json", label)
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{label}: manifest.json is not a non-empty list")
    results = []
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("Config"), str)
            or not isinstance(entry.get("Layers"), list)
        ):
            raise ImageError(f"{label}: malformed manifest.json entry {str(entry)[:80]}")
        config_bytes = src.read(entry["Config"])
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        stem = posixpath.basename(entry["Config"]).removesuffix(".json")
        if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and stem != digest_hex(config_digest):
            raise ImageError(
                f"{label}: config {entry['Config']} does not match the digest "
                f"its name claims (it is {config_digest}); refused"
            )
        try:
            config = json.loads(config_bytes)
            diff_ids = config["rootfs"]["diff_ids"]
            assert isinstance(diff_ids, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ImageError(f"{label}: config {entry['Config']} has no rootfs.diff_ids") from None
        if len(diff_ids) != len(entry["Layers"]):
            raise ImageError(
                f"{label}: {entry['Config']} lists {len(diff_ids)} diff_ids for {len(entry['Layers'])} layers"
            )
        loader.put_bytes(config_bytes, config_digest)
        layers = []
        for member, diff_id in zip(entry["Layers"], diff_ids, strict=True):
            if not isinstance(member, str):
                raise ImageError(f"{label}: malformed layer entry {member!r}")
            digest = loader.put(member)
            blob = store.blob_path(digest)
            with open(blob, "rb") as f:
                magic = f.read(4)
            if magic[:2] == b"\x1f\x8b":
                media = OCI_LAYER_GZIP
            elif magic == b"\x28\xb5\x2f\xfd":
                media = OCI_LAYER_ZSTD
            else:
                media = OCI_LAYER_TAR
            actual = digest
            if media != OCI_LAYER_TAR:
                with open_uncompressed(blob) as u:
                    while u.read(_CHUNK):
                        pass
                    actual = "sha256:" + u.sha.hexdigest()
            if actual != diff_id:
                raise ImageError(
                    f"{label}: layer {member} does not match the diff_id "
                    f"{diff_id} its config declares (it is {actual}); refused"
                )
            layers.append({"mediaType": media, "digest": digest, "size": blob.stat().st_size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": layers,
        }
        manifest_digest = loader.put_bytes(canonical_json(manifest))
        names = []
        for text in entry.get("RepoTags") or []:
            try:
                names.append(parse_reference(text))
            except InvalidReference:
                raise ImageError(f"{label}: invalid RepoTag {text!r}") from None
        for name in names or [parse_reference(f"{UNNAMED}@{manifest_digest}")]:
            store.tag(name, manifest_digest)
        results.append(Loaded(names=names, image_id=config_digest, manifest_digest=manifest_digest))
    return results
