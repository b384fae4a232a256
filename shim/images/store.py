"""The local image store: content-addressed, in OCI image-layout form.

On disk, under ``paths.images_dir()`` (``$VMSHIM_ROOT/images``)::

    oci-layout                    {"imageLayoutVersion": "1.0.0"}
    index.json                    OCI image index; one entry per local name (see below)
    blobs/sha256/<hex>            manifests, configs, layers (files named by their sha256)
    blobs/sha256/.tmp-*           blob writes in progress (renamed into place when verified)
    ingest/<hex>.partial          resumable downloads (pull): flocked while written, verified
                                  and renamed into blobs/ when complete, resumed after a crash
    blob-sources.json             where blobs were seen in registries ({hex: [[host, repo]]}),
                                  for cross-repository mounts on push (a cache, rebuildable)
    .index.lock                   flock: serialises every rewrite of index.json
    .gc.lock                      flock: shared while importing, exclusive while deleting blobs
    tmp/                          scratch space for recipes building layer tars

Names live in index.json itself: each entry of ``manifests`` is a manifest descriptor whose
``annotations["org.opencontainers.image.ref.name"]`` holds the *full canonical* reference
(``docker.io/library/busybox:latest``, or ``name@sha256:...`` for an image recorded by
digest only). This is the form containerd's exporter writes; skopeo/umoci read the layout
(their ``oci:DIR:REF`` then takes the full canonical name). No separate refs file.

Invariants: a blob file only ever exists complete and verified (write to a temp file in the
same directory, check sha256 and size, fsync, rename, fsync the directory); index.json is
only ever replaced whole (temp + rename) under an exclusive flock, so readers need no lock
and always see valid JSON. Layer disks (squashfs) are not here: see ``shim.images.layers``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import gzip
import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterable, Iterator, Protocol

from shim import paths
from shim.files import flocked, replaced
from shim.errors import ImageError, ImageNotFound, InvalidReference
from shim.images.reference import Reference, as_reference, parse_reference

# Media types --------------------------------------------------------------------------------
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEX_TYPES = {OCI_INDEX, DOCKER_MANIFEST_LIST}
REF_NAME = "org.opencontainers.image.ref.name"

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})\Z")
_HEX = re.compile(r"[0-9a-f]{64}\Z")
_SOURCES_MAX = 8
_STALE_TMP_SECONDS = 600  # a .tmp- blob file untouched this long belongs to a dead writer
_CHUNK = 1 << 20
_JSON_MAX = 8 << 20  # manifests and configs are small; refuse absurd ones
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class Readable(Protocol):
    """What the blob and layer readers need of a stream: ``read(n)`` (a file, a pipe,
    a GzipFile, a capped or counting wrapper)."""

    def read(self, size: int = -1, /) -> bytes: ...


def host_arch() -> str:
    """The OCI/Go name of this machine's architecture (``amd64``, ``arm64``...)."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


def digest_hex(digest: object) -> str:
    """``sha256:<hex>`` → ``<hex>``. Raises ImageError for anything else (never a path)."""
    m = _DIGEST.match(digest) if isinstance(digest, str) else None
    if not m:
        raise ImageError(f"invalid digest {digest!r}: expected 'sha256:' and 64 lowercase hex digits")
    return m.group(1)


def check_descriptor(desc: object, what: str) -> tuple[str, int]:
    """``(digest, size)`` of an OCI descriptor from a manifest, an index or an archive
    that vmshim did not write. Raises ImageError naming *what* when it is not a dict,
    its digest is not one vmshim takes, or its size is not a whole number >= 0."""
    if not isinstance(desc, dict):
        raise ImageError(f"{what}: malformed descriptor {desc!r}")
    digest, size = desc.get("digest"), desc.get("size")
    try:
        hex_ = digest_hex(digest)
    except ImageError:
        raise ImageError(f"{what}: unsupported or invalid digest {digest!r}") from None
    if not isinstance(size, int) or size < 0:
        raise ImageError(f"{what}: descriptor of {digest} has an invalid size {size!r}")
    return "sha256:" + hex_, size


# Data model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRef:
    """One layer of an image. ``digest``/``size`` are of the blob as stored (maybe
    compressed); ``diff_id`` is the sha256 of the uncompressed tar (from the config)."""

    digest: str
    media_type: str
    size: int
    diff_id: str | None = None


@dataclass
class Image:
    """A resolved image: its manifest, parsed config and layers (bottom first)."""

    reference: Reference
    manifest_digest: str
    config_digest: str
    config: dict
    layers: list[LayerRef] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Docker's image ID: the config digest."""
        return self.config_digest

    @property
    def _runtime(self) -> dict:
        return self.config.get("config") or {}

    @property
    def entrypoint(self) -> list[str] | None:
        return self._runtime.get("Entrypoint") or None

    @property
    def cmd(self) -> list[str] | None:
        return self._runtime.get("Cmd") or None

    @property
    def env(self) -> list[str]:
        return list(self._runtime.get("Env") or [])

    @property
    def workdir(self) -> str:
        return self._runtime.get("WorkingDir") or ""

    @property
    def user(self) -> str:
        return self._runtime.get("User") or ""

    @property
    def created(self) -> str | None:
        return self.config.get("created")

    @property
    def size(self) -> int:
        """Sum of the layer blobs as stored."""
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class ImageSummary:
    """One line of ``vmshim images``: one local name and the image it points at."""

    reference: Reference
    manifest_digest: str
    id: str  # config digest
    created: str | None
    size: int


# Small file helpers -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a
    partial one (temp file in the same directory, fsync, rename, fsync the directory)."""
    with replaced(path, mode) as f:
        f.write(data)
    _fsync_dir(path.parent)


def canonical_json(obj: dict) -> bytes:
    """Deterministic JSON (sorted keys, no spaces): same content → same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# The store ----------------------------------------------------------------------------------
class ImageStore:
    """Content-addressed OCI layout store. Safe for concurrent use by many processes."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.images_dir()
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.index_path = self.root / "index.json"
        self._index_lock = self.root / ".index.lock"
        self._gc_lock = self.root / ".gc.lock"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        paths.private_dir(self.blobs_dir, 0o700)  # QEMU never opens a blob
        layout = self.root / "oci-layout"
        if not layout.exists():
            atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')

    # -- blobs ---------------------------------------------------------------------------
    def put_blob(self, data: bytes | Readable, expected_digest: str | None = None, size: int | None = None) -> str:
        """Store ``data`` (bytes or a readable binary stream) and return its ``sha256:...``.

        Streams to a temp file beside the blobs, verifies the digest (and ``size`` when
        given), fsyncs and renames. On mismatch raises ImageError and leaves no file. If
        ``expected_digest`` is already stored, returns at once without reading ``data``.
        """
        if expected_digest is not None:
            digest_hex(expected_digest)
            if self.has_blob(expected_digest):
                return expected_digest
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = io.BytesIO(data)
        stream: Readable = data
        h = hashlib.sha256()
        written = 0
        fd, tmp = tempfile.mkstemp(dir=self.blobs_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(_CHUNK):
                    written += len(chunk)
                    if size is not None and written > size:
                        raise ImageError(
                            f"blob is larger than the expected {size} bytes"
                            + (f" ({expected_digest})" if expected_digest else "")
                        )
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            if size is not None and written != size:
                raise ImageError(f"blob {digest} is {written} bytes, expected {size}")
            if expected_digest is not None and digest != expected_digest:
                raise ImageError(f"digest mismatch: expected {expected_digest}, got {digest}")
            os.chmod(tmp, 0o600)  # image content: not for other local users
            os.rename(tmp, self.blobs_dir / h.hexdigest())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.blobs_dir)
        return digest

    def put_json(self, obj: dict) -> tuple[str, int]:
        """Store ``obj`` as canonical JSON; return (digest, size)."""
        data = canonical_json(obj)
        return self.put_blob(data), len(data)

    def blob_path(self, digest: str) -> Path:
        """Path of a stored blob. Raises ImageError if it is missing or the digest is invalid."""
        path = self.blobs_dir / digest_hex(digest)
        if not path.is_file():
            raise ImageError(f"blob {digest} is missing from the image store ({self.root})")
        return path

    def has_blob(self, digest: str) -> bool:
        return (self.blobs_dir / digest_hex(digest)).is_file()

    def read_blob(self, digest: str, limit: int = _JSON_MAX) -> bytes:
        path = self.blob_path(digest)
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"blob {digest} is larger than {limit} bytes; refusing to read it")
        return data

    def read_json(self, digest: str) -> dict:
        try:
            obj = json.loads(self.read_blob(digest))
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"blob {digest} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ImageError(f"blob {digest} is not a JSON object")
        return obj

    # -- locks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold while putting blobs that are about to be tagged (pull, import, build):
        ``remove()`` then cannot garbage-collect them in between."""
        with flocked(self._gc_lock, fcntl.LOCK_SH):
            yield

    # -- index ---------------------------------------------------------------------------
    def _read_index(self) -> dict:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        try:
            index = json.loads(data)
            if not isinstance(index.get("manifests"), list):
                raise ValueError("no manifests list")
        except (ValueError, AttributeError) as e:
            raise ImageError(f"{self.index_path} is corrupt ({e}); restore or delete it") from None
        return index

    def _write_index(self, index: dict) -> None:
        index["manifests"].sort(key=lambda d: d.get("annotations", {}).get(REF_NAME, ""))
        data = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write(self.index_path, data)

    def _entries(self, index: dict | None = None) -> list[tuple[Reference, dict]]:
        """(name, descriptor) of every named entry of ``index`` (default: read it now)."""
        out = []
        for desc in (index if index is not None else self._read_index())["manifests"]:
            name = (desc.get("annotations") or {}).get(REF_NAME)
            if not name:
                continue  # an unnamed entry (another tool's); kept, but not listed
            try:
                out.append((parse_reference(name), desc))
            except InvalidReference:
                continue
        return out

    @staticmethod
    def _stored_name(ref: Reference) -> str:
        """The key under which a name is recorded: ``name:tag`` or ``name@digest``."""
        if ref.tag is not None:
            return f"{ref.name}:{ref.tag}"
        return f"{ref.name}@{ref.digest}"

    def tag(self, ref: str | Reference, manifest_digest: str) -> None:
        """Point ``ref`` at the stored manifest ``manifest_digest`` (replacing any previous
        target). The manifest and every blob it names must be stored (ImageError if not)."""
        ref = as_reference(ref)
        if ref.digest is not None and ref.digest != manifest_digest:
            raise ImageError(
                f"cannot record {ref.familiar} for manifest {manifest_digest}: the reference names a different digest"
            )
        manifest = self.read_json(manifest_digest)
        desc = {
            "mediaType": manifest.get("mediaType") or OCI_MANIFEST,
            "digest": manifest_digest,
            "size": self.blob_path(manifest_digest).stat().st_size,
            "annotations": {REF_NAME: self._stored_name(ref)},
        }
        with flocked(self._index_lock):
            # Checked under the lock: remove() deletes blobs only while holding it too.
            for digest in self._required_blobs(manifest_digest, manifest):
                if not self.has_blob(digest):
                    raise ImageError(
                        f"cannot tag {ref.familiar}: blob {digest} of manifest "
                        f"{manifest_digest} is missing (removed meanwhile?); retry"
                    )
            index = self._read_index()
            key = self._stored_name(ref)
            index["manifests"] = [
                d for d in index["manifests"] if (d.get("annotations") or {}).get(REF_NAME) != key
            ] + [desc]
            self._write_index(index)

    # -- resolving -----------------------------------------------------------------------
    def resolve(self, ref: str | Reference) -> Image:
        """Find ``ref`` in the store: a name (``busybox``, ``x:1``, ``x@sha256:..``), or an
        image ID (config digest, ``sha256:<hex>`` or a unique hex prefix of 4+ digits).
        Raises ImageNotFound (with what to do), InvalidReference, or ImageError when an
        ID prefix is ambiguous or the image's blobs are broken."""
        return self._lookup(ref)[0]

    def _lookup(self, ref: str | Reference) -> tuple[Image, str]:
        """(image, how) where how is "name", "digest" or "id"."""
        text = str(ref)
        id_match = None
        if isinstance(ref, str):
            id_match = re.fullmatch(r"(?:sha256:)?([0-9a-f]{4,64})", ref)
            try:
                parsed = parse_reference(ref)
            except InvalidReference:
                if not id_match:
                    raise
                parsed = None
        else:
            parsed = ref
        if parsed is not None:
            key = self._stored_name(parsed)
            for name, desc in self._entries():
                if self._stored_name(name) == key and (parsed.digest is None or desc.get("digest") == parsed.digest):
                    return self._load(name, desc["digest"]), "name"
            if parsed.digest is not None and parsed.tag is None:
                for name, desc in self._entries():
                    if name.name == parsed.name and desc.get("digest") == parsed.digest:
                        return self._load(parsed, parsed.digest), "digest"
        if id_match:
            found = self._find_by_id(id_match.group(1))
            if found is not None:
                return found, "id"
        raise ImageNotFound(_not_found_message(parsed, text))

    def _find_by_id(self, prefix: str) -> Image | None:
        hits: dict[str, Image] = {}
        for name, desc in self._entries():
            try:
                image = self._load(name, desc["digest"])
            except ImageError:
                continue
            if digest_hex(image.config_digest).startswith(prefix):
                hits.setdefault(image.config_digest, image)
        if len(hits) > 1:
            raise ImageError(
                f"image ID prefix '{prefix}' is ambiguous: it matches {len(hits)} images; give more digits"
            )
        return next(iter(hits.values()), None)

    def _load(self, ref: Reference, manifest_digest: str) -> Image:
        manifest = self.read_json(manifest_digest)
        media_type = manifest.get("mediaType")
        if media_type in INDEX_TYPES or (media_type is None and "manifests" in manifest):
            manifest_digest = self._pick_platform(manifest, manifest_digest)
            manifest = self.read_json(manifest_digest)
            media_type = manifest.get("mediaType")
        if media_type not in MANIFEST_TYPES and not (media_type is None and "layers" in manifest):
            raise ImageError(f"manifest {manifest_digest} of {ref.familiar} has unsupported media type {media_type!r}")
        try:
            config_digest = manifest["config"]["digest"]
            config = self.read_json(config_digest)
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            layers = []
            for i, desc in enumerate(manifest.get("layers") or []):
                digest_hex(desc["digest"])
                layers.append(
                    LayerRef(
                        digest=desc["digest"],
                        media_type=desc.get("mediaType", OCI_LAYER_TAR),
                        size=int(desc.get("size", 0)),
                        diff_id=diff_ids[i] if i < len(diff_ids) else None,
                    )
                )
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"manifest {manifest_digest} of {ref.familiar} is malformed: {e!r}") from None
        if diff_ids and len(diff_ids) != len(layers):
            raise ImageError(f"image {ref.familiar}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
        return Image(
            reference=ref, manifest_digest=manifest_digest, config_digest=config_digest, config=config, layers=layers
        )

    def _pick_platform(self, index: dict, digest: str) -> str:
        """The child manifest of ``index`` to use: the stored one for linux/<host arch>,
        else the only stored child (an index pulled with ``--platform``)."""
        arch = host_arch()
        stored = []
        for desc in index.get("manifests") or []:
            if not isinstance(desc, dict) or not _DIGEST.match(str(desc.get("digest"))):
                continue
            if not self.has_blob(desc["digest"]):
                continue
            plat = desc.get("platform") or {}
            if plat.get("os", "linux") == "linux" and plat.get("architecture") == arch:
                return desc["digest"]
            stored.append(desc["digest"])
        if len(stored) == 1:
            return stored[0]
        raise ImageError(f"image index {digest} has no stored manifest for linux/{arch}")

    def _required_blobs(self, manifest_digest: str, manifest: dict) -> list[str]:
        """The blobs that must be stored for ``manifest`` to be usable: for an image
        manifest, itself, its config and layers; for an index (pulled by its digest), itself
        and one complete platform manifest (the other platforms may be absent)."""
        if manifest.get("mediaType") in INDEX_TYPES or (manifest.get("mediaType") is None and "manifests" in manifest):
            child = self._pick_platform(manifest, manifest_digest)
            return [manifest_digest, child, *self._referenced_by(self.read_json(child))]
        return [manifest_digest, *self._referenced_by(manifest)]

    @staticmethod
    def _referenced_by(manifest: dict) -> list[str]:
        out = []
        if isinstance(manifest.get("config"), dict) and "digest" in manifest["config"]:
            out.append(manifest["config"]["digest"])
        for key in ("layers", "manifests"):
            for desc in manifest.get(key) or []:
                if isinstance(desc, dict) and "digest" in desc:
                    out.append(desc["digest"])
        return out

    # -- listing and removal --------------------------------------------------------------
    def list_images(self) -> list[ImageSummary]:
        """Every local name with the image it points at, sorted by name. Entries whose
        blobs are broken are skipped."""
        out = []
        for name, desc in self._entries():
            try:
                image = self._load(name, desc["digest"])
            except ImageError:
                continue
            out.append(
                ImageSummary(
                    reference=name,
                    manifest_digest=desc["digest"],
                    id=image.config_digest,
                    created=image.created,
                    size=image.size,
                )
            )
        return sorted(out, key=lambda s: str(s.reference))

    def remove(self, ref: str | Reference) -> None:
        """Remove a name (``busybox``), the names of ``repo@sha256:..`` that point at that
        manifest, or an image ID when exactly one name points at it; then delete the blobs
        of the image that no remaining name uses. Layer disks (``paths.layer_disks_dir()``)
        are kept: stopped containers may still use them. Raises ImageNotFound, or
        ImageError when an ID is used by several names."""
        image, how = self._lookup(ref)
        with flocked(self._gc_lock, fcntl.LOCK_EX), flocked(self._index_lock):
            index = self._read_index()
            entries = self._entries(index)
            if how == "name":
                key = self._stored_name(image.reference)
                doomed = [d for n, d in entries if self._stored_name(n) == key]
            elif how == "digest":
                doomed = [
                    d
                    for n, d in entries
                    if n.name == image.reference.name and d.get("digest") == image.reference.digest
                ]
            else:
                doomed = [d for n, d in entries if self._config_of(d) == image.config_digest]
                if len(doomed) > 1:
                    shown = ", ".join(n.familiar for n, d in entries if any(d is x for x in doomed))
                    raise ImageError(f"image {ref} is referenced by several names ({shown}); remove them by name")
            index["manifests"] = [d for d in index["manifests"] if not any(d is x for x in doomed)]
            self._write_index(index)
            self._collect_garbage([d["digest"] for d in doomed], index)

    def _config_of(self, desc: dict) -> str | None:
        try:
            return self._load(parse_reference(desc["annotations"][REF_NAME]), desc["digest"]).config_digest
        except (ImageError, InvalidReference, KeyError):
            return None

    def _collect_garbage(self, roots: list[str], index: dict) -> None:
        """Delete the blobs reachable from the manifests ``roots`` that no manifest left in
        ``index`` reaches. Caller holds the gc lock exclusively and the index lock."""
        keep = self._reachable_from_index(index)
        for digest in self._reachable(roots) - keep:
            with contextlib.suppress(FileNotFoundError, ImageError):
                os.unlink(self.blobs_dir / digest_hex(digest))

    # -- resumable ingest (pull) ---------------------------------------------------------
    def ingest(self, digest: str, size: int | None = None) -> "Ingest":
        """A resumable writer for the blob ``digest`` (see :class:`Ingest`). Use as a
        context manager, inside ``writing()``."""
        digest_hex(digest)
        return Ingest(self, digest, size)

    # -- garbage collection, pruning, usage ------------------------------------------------
    def _reachable_from_index(self, index: dict) -> set[str]:
        """Every blob digest reachable from the entries of ``index``."""
        return self._reachable([d["digest"] for d in index["manifests"] if isinstance(d.get("digest"), str)])

    def _reachable(self, manifests: list[str]) -> set[str]:
        """Every blob digest reachable from the manifests (or indexes) ``manifests``:
        children of indexes followed, manifests' configs and layers listed without being
        read; a missing or broken blob ends its branch."""
        seen: set[str] = set()
        todo = list(manifests)
        while todo:
            d = todo.pop()
            if d in seen:
                continue
            seen.add(d)
            try:
                obj = self.read_json(d)
            except ImageError:
                continue
            if obj.get("mediaType") in INDEX_TYPES or "manifests" in obj:
                todo.extend(self._referenced_by(obj))
            else:
                seen.update(self._referenced_by(obj))
        return seen

    def _blob_files(self) -> Iterator[os.DirEntry]:
        with os.scandir(self.blobs_dir) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    yield entry

    def collect_garbage(self) -> tuple[int, int]:
        """Delete every blob that no named image reaches, interrupted downloads
        (``ingest/``) and temp files of writers that died. Returns (files, bytes) freed.

        Takes the gc lock exclusively, so it waits for imports and pulls in progress (they
        hold it shared from their first blob until they tag) and none starts meanwhile."""
        files = freed = 0
        with flocked(self._gc_lock, fcntl.LOCK_EX), flocked(self._index_lock):
            keep = {digest_hex(d) for d in self._reachable_from_index(self._read_index()) if _DIGEST.match(d)}
            for entry in list(self._blob_files()):
                if entry.name in keep:
                    continue
                st = entry.stat(follow_symlinks=False)
                stale_tmp = entry.name.startswith(".tmp-") and time.time() - st.st_mtime > _STALE_TMP_SECONDS
                if stale_tmp or _HEX.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        files, freed = files + 1, freed + st.st_size
            ingest_dir = self.root / "ingest"
            if ingest_dir.is_dir():
                for p in list(ingest_dir.iterdir()):
                    freed_here = _unlink_if_unlocked(p)
                    if freed_here is not None:
                        files, freed = files + 1, freed + freed_here
        return files, freed

    def discard_blobs(self, digests: "Iterable[str]") -> None:
        """Delete the given blobs unless a named image reaches them: the cleanup of an
        import or pull that failed after storing some of its blobs."""
        digests = [d for d in digests if _DIGEST.match(d)]
        if not digests:
            return
        with flocked(self._index_lock):
            keep = self._reachable_from_index(self._read_index())
            for d in digests:
                if d not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.blobs_dir / digest_hex(d))

    def discard_partials(self, digests: "Iterable[str]") -> None:
        """Delete the interrupted downloads (``ingest/``) of these blobs that no process is
        writing: after a pull failed on bad content, nothing of it is kept."""
        for d in digests:
            if _DIGEST.match(d):
                _unlink_if_unlocked(self.root / "ingest" / f"{digest_hex(d)}.partial")

    def prune(self, all_images: bool = False, keep: "Iterable[str]" = ()) -> "PruneReport":
        """``image prune``: garbage-collect (see ``collect_garbage``); with ``all_images``
        first remove every name whose image (manifest or config digest) is not in ``keep``
        (the images that containers use). Returns what was removed."""
        keep = set(keep)
        untagged: list[str] = []
        if all_images:
            with flocked(self._gc_lock, fcntl.LOCK_EX), flocked(self._index_lock):
                index = self._read_index()
                kept = []
                for desc in index["manifests"]:
                    name = (desc.get("annotations") or {}).get(REF_NAME)
                    used = desc.get("digest") in keep or self._config_of(desc) in keep
                    if name and not used:
                        untagged.append(name)
                    else:
                        kept.append(desc)
                index["manifests"] = kept
                self._write_index(index)
        files, freed = self.collect_garbage()
        return PruneReport(untagged=untagged, blobs_deleted=files, space_reclaimed=freed)

    def disk_usage(self) -> "DiskUsage":
        """Sizes for ``system df``: named images, the blobs they use (shared ones once), and
        what ``image prune`` would free (unreferenced blobs and interrupted downloads)."""
        index = self._read_index()
        reachable = {digest_hex(d) for d in self._reachable_from_index(index) if _DIGEST.match(d)}
        used = unused = 0
        for entry in self._blob_files():
            size = entry.stat(follow_symlinks=False).st_size
            if entry.name in reachable:
                used += size
            else:
                unused += size
        ingest_dir = self.root / "ingest"
        if ingest_dir.is_dir():
            unused += sum(p.stat().st_size for p in ingest_dir.iterdir() if p.is_file())
        names = len(self._entries(index))
        images = {d.get("digest") for _, d in self._entries(index)}
        layer_digests: set[str] = set()
        for _, desc in self._entries(index):
            try:
                image = self._load(parse_reference(desc["annotations"][REF_NAME]), desc["digest"])
            except (ImageError, InvalidReference, KeyError):
                continue
            layer_digests.update(digest_hex(layer.digest) for layer in image.layers)
        return DiskUsage(
            names=names, images=len(images), blobs_size=used, reclaimable=unused, layer_digests=frozenset(layer_digests)
        )

    # -- where blobs came from (for cross-repository mounts) -----------------------------
    def record_sources(self, host: str, repository: str, digests: "Iterable[str]") -> None:
        """Remember that ``host/repository`` has these blobs (best effort, a cache)."""
        path = self.root / "blob-sources.json"
        with contextlib.suppress(OSError), flocked(self.root / ".sources.lock"):
            try:
                data = json.loads(path.read_bytes())
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            for d in digests:
                if not _DIGEST.match(d):
                    continue
                seen = [s for s in data.get(d[7:], []) if s != [host, repository]]
                data[d[7:]] = ([[host, repository]] + seen)[:_SOURCES_MAX]
            atomic_write(path, json.dumps(data, sort_keys=True).encode())

    def sources(self, digest: str) -> list[tuple[str, str]]:
        """(host, repository) pairs known to hold ``digest``, most recent first."""
        try:
            data = json.loads((self.root / "blob-sources.json").read_bytes())
            return [(h, r) for h, r in data.get(digest_hex(digest), []) if isinstance(h, str) and isinstance(r, str)]
        except (OSError, ValueError, TypeError, AttributeError):
            return []

    # -- import --------------------------------------------------------------------------
    def import_image(self, layer_tars: list[str | os.PathLike], config: dict, ref: str | Reference) -> Image:
        """Store layer tars (plain or gzip) and ``config`` as an OCI image named ``ref``.

        Plain tars are stored as ``application/vnd.oci.image.layer.v1.tar`` (digest ==
        diff_id), gzip ones as ``...tar+gzip``. ``config["rootfs"]`` is (re)written with
        the diff_ids (sha256 of each uncompressed tar); ``architecture``/``os`` default to
        the host's. The config and manifest are stored as canonical JSON, so the same inputs
        always give the same digests. Returns the resolved Image."""
        ref = as_reference(ref)
        config = json.loads(json.dumps(config))  # a private deep copy
        config.setdefault("architecture", host_arch())
        config.setdefault("os", "linux")
        with self.writing():
            layers, diff_ids = [], []
            for tar in layer_tars:
                media_type, diff_id = _inspect_tar(Path(tar))
                with open(tar, "rb") as f:
                    digest = self.put_blob(f)
                layers.append(
                    {"mediaType": media_type, "digest": digest, "size": self.blob_path(digest).stat().st_size}
                )
                diff_ids.append(diff_id)
            config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
            config_digest, config_size = self.put_json(config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": layers,
            }
            manifest_digest, _ = self.put_json(manifest)
            self.tag(ref, manifest_digest)
        return self._load(ref, manifest_digest)


def _unlink_if_unlocked(path: Path) -> int | None:
    """Delete ``path`` unless another process holds an flock on it; its size, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        size = os.fstat(fd).st_size
        try:
            os.unlink(path)
        except FileNotFoundError:
            return None
        return size
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PruneReport:
    untagged: list[str]
    blobs_deleted: int
    space_reclaimed: int


@dataclass(frozen=True)
class DiskUsage:
    names: int  # entries of index.json
    images: int  # distinct manifests they point at
    blobs_size: int  # bytes of blobs reachable from a name
    reclaimable: int  # bytes ``image prune`` frees
    layer_digests: frozenset  # hex digests of the layers named images use


class Ingest:
    """A resumable, verified download of one blob of known digest.

    Bytes go to ``ingest/<hex>.partial``, which is flocked while open, so two pulls of the
    same blob take turns (the second finds it stored). Reopening after a crash continues
    where the file ends (``offset``; the caller asks the server for the rest) after
    re-hashing what is there. ``commit()`` verifies size and sha256 and renames the file
    into ``blobs/``; on a mismatch the partial file is deleted and ImageError raised.
    Other errors leave the partial file for the next attempt.
    """

    def __init__(self, store: "ImageStore", digest: str, size: int | None):
        self.store, self.digest, self.size = store, digest, size
        self.dir = store.root / "ingest"
        self.path = self.dir / f"{digest_hex(digest)}.partial"
        self.fd = -1
        self.offset = 0
        self.done = False
        self._sha = hashlib.sha256()

    def __enter__(self) -> "Ingest":
        self.dir.mkdir(exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # committed or discarded meanwhile: look again
        self.fd = fd
        if self.store.has_blob(self.digest):
            self.done = True
            self._unlink()
            return self
        end = os.fstat(fd).st_size
        if self.size is not None and end > self.size:
            end = 0
        os.ftruncate(fd, end)
        os.lseek(fd, 0, os.SEEK_SET)
        left = end
        while left:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                break
            self._sha.update(chunk)
            left -= len(chunk)
        self.offset = end - left
        os.lseek(fd, self.offset, os.SEEK_SET)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reset(self) -> None:
        """Start over (the server ignored a range request)."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.offset = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if self.size is not None and self.offset + len(data) > self.size:
            self.discard()
            raise ImageError(
                f"blob {self.digest} is larger than the {self.size} bytes its descriptor declares; refused"
            )
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._sha.update(data)
        self.offset += len(data)

    def discard(self) -> None:
        self._unlink()
        self.reset()

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def commit(self) -> None:
        """Verify and move into the store. Raises ImageError (partial file deleted) when
        the content does not match the digest or size."""
        if self.done:
            return
        actual = "sha256:" + self._sha.hexdigest()
        if self.size is not None and self.offset != self.size:
            self.discard()
            raise ImageError(f"blob {self.digest} is {self.offset} bytes, its descriptor declares {self.size}; refused")
        if actual != self.digest:
            self.discard()
            raise ImageError(
                f"digest mismatch: blob {self.digest} arrived with content of "
                f"digest {actual}; refused (corrupted in transit or by the "
                "registry)"
            )
        os.fsync(self.fd)
        os.fchmod(self.fd, 0o644)
        os.rename(self.path, self.store.blobs_dir / digest_hex(self.digest))
        _fsync_dir(self.store.blobs_dir)
        self.done = True


def _inspect_tar(path: Path) -> tuple[str, str]:
    """(media type, diff_id) of a local layer tar, plain or gzip-compressed."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            f.seek(0)
            h = hashlib.sha256()
            if magic == b"\x1f\x8b":
                media_type = OCI_LAYER_GZIP
                src: Readable = gzip.GzipFile(fileobj=f)
            else:
                media_type = OCI_LAYER_TAR
                src = f
            while chunk := src.read(_CHUNK):
                h.update(chunk)
    except OSError as e:  # includes BadGzipFile and truncated gzip (EOFError is not OSError)
        raise ImageError(f"cannot read layer tar {path}: {e}") from None
    except EOFError:
        raise ImageError(f"layer tar {path} is a truncated gzip stream") from None
    return media_type, "sha256:" + h.hexdigest()


def import_image(
    layer_tars: list[str | os.PathLike], config: dict, ref: str | Reference, store: ImageStore | None = None
) -> Image:
    """Module-level form of :meth:`ImageStore.import_image` (default store)."""
    return (store or ImageStore()).import_image(layer_tars, config, ref)


# Recipes (images/<name>/recipe.py) ----------------------------------------------------------
_RECIPE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")


def recipes_dir() -> Path:
    """``images/`` of the source tree (recipes are not installed as a package);
    ``VMSHIM_RECIPES`` overrides."""
    env = os.environ.get("VMSHIM_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "images"


def recipe_path(name: str) -> Path | None:
    """``images/<name>/recipe.py`` if ``name`` is a plain name and the recipe exists."""
    if not _RECIPE_NAME.match(name or ""):
        return None
    path = recipes_dir() / name / "recipe.py"
    return path if path.is_file() else None


def recipe_config(created: str, config: dict, created_by: str) -> dict:
    """The image config of a recipe's one-layer image: made at *created* (RFC 3339) for
    this host's architecture, with the container *config* (Env, Cmd, …) and one history
    entry that says how (*created_by*)."""
    return {
        "created": created,
        "architecture": host_arch(),
        "os": "linux",
        "config": config,
        "history": [{"created": created, "created_by": created_by}],
    }


def load_recipe(name: str) -> ModuleType:
    """The recipe ``images/<name>/recipe.py`` as a module (a fresh one at each call:
    recipes share helpers this way, e.g. the node recipe's debootstrap). Raises
    ImageError naming the known recipes."""
    path = recipe_path(name)
    if path is None:
        known = sorted(p.parent.name for p in recipes_dir().glob("*/recipe.py"))
        raise ImageError(f"no image recipe named '{name}' (known: {', '.join(known) or 'none'})")
    spec = importlib.util.spec_from_file_location(f"vmshim_recipe_{name.replace('-', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bootstrap(name: str, store: ImageStore | None = None) -> Image:
    """Run the recipe ``images/<name>/recipe.py`` (its ``build(store) -> Image``)."""
    module = load_recipe(name)
    if not callable(getattr(module, "build", None)):
        raise ImageError(f"recipe {recipe_path(name)} defines no build(store) function")
    return module.build(store or ImageStore())


def _not_found_message(parsed: Reference | None, text: str) -> str:
    shown = parsed.familiar if parsed is not None else text
    msg = f"image '{shown}' not found in the local store"
    if parsed is not None and parsed.registry == "docker.io":
        base = parsed.familiar_name.rsplit("/", 1)[-1]
        if parsed.familiar_name == base and recipe_path(base) is not None:
            return msg + f"; create it with 'vmshim image bootstrap {base}'"
    return msg + "; pull or build it first ('vmshim images' lists what is here)"


def format_created(created: str | None, now: _dt.datetime | None = None) -> str:
    """Docker-style relative age ("3 days ago") of an RFC 3339 timestamp."""
    if not created:
        return "N/A"
    try:
        when = _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return created
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    secs = int((now - when).total_seconds())
    if secs < 0:
        return "Less than a second ago"
    for unit, length in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ):
        if secs >= length:
            n = secs // length
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "Less than a second ago"


def format_size(size: int) -> str:
    """Docker-style decimal size: 4.26MB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.3g}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1000
    return f"{size}B"
