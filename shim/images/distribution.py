"""Pull and push: the local store on one side, a registry (``RegistryClient``) on the other.

``pull(ref)``: fetch the manifest (an index is resolved to the platform's manifest), then
the config and the layers the store lacks (three at a time), each streamed into a resumable,
verified :class:`~shim.images.store.Ingest`; then store the manifest and record the name.
All of it under ``store.writing()`` so garbage collection cannot take blobs in between.
A blob whose content does not match its digest fails the pull with ImageError, and the
blobs this pull added are removed again; a network failure keeps them (and the partial
download) so that pulling again continues where it stopped.

``push(ref)``: for each blob, skip it if the registry has it (HEAD), else mount it from
another repository of the same registry that is known to have it, else upload it
(monolithic, or chunked above ``chunk_size``); then PUT the manifest byte for byte, so the
digest in the registry is the local one.

Progress goes to a :class:`Progress` (the CLI draws rich bars; the default draws nothing).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from shim.errors import ImageError, RegistryError, UsageError, VmshimError
from shim.images.reference import Reference, as_reference
from shim.images.registry import Cancelled, RegistryClient, with_retries
from shim.images.store import (
    DOCKER_CONFIG,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    ImageStore,
    check_descriptor,
    digest_hex,
    host_arch,
)

PARALLEL = 3
SCHEMA1_TYPES = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}
DEFAULT_CHUNK_SIZE = 0  # monolithic; VMSHIM_PUSH_CHUNK_SIZE (bytes) turns on chunked uploads


class Progress(Protocol):
    """What pull/push/load report. ``key`` identifies one blob (its short digest)."""

    def start(self, key: str, description: str, total: int | None) -> None: ...

    def advance(self, key: str, n: int) -> None: ...

    def finish(self, key: str, status: str) -> None: ...


class NoProgress:
    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, n: int) -> None:
        pass

    def finish(self, key: str, status: str) -> None:
        pass


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Platform":
        """``linux/amd64``, ``linux/arm64/v8``, ``amd64``; None → linux/<host arch>."""
        if not text:
            return cls("linux", host_arch())
        parts = text.strip().lower().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class PullResult:
    reference: Reference  # the name recorded in the store
    digest: str  # what the registry has for the reference (maybe an index)
    manifest_digest: str  # the platform manifest stored
    config_digest: str
    updated: bool  # the name now points somewhere new


@dataclass(frozen=True)
class PushResult:
    reference: Reference
    digest: str
    size: int


def _chunk_size() -> int:
    try:
        return int(os.environ.get("VMSHIM_PUSH_CHUNK_SIZE", DEFAULT_CHUNK_SIZE))
    except ValueError:
        raise UsageError("VMSHIM_PUSH_CHUNK_SIZE must be a number of bytes") from None


def _parse_manifest(body: bytes, media_type: str, what: str) -> dict:
    try:
        manifest = json.loads(body)
    except ValueError as e:
        raise ImageError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ImageError(f"{what}: not a JSON object")
    if media_type in SCHEMA1_TYPES or manifest.get("schemaVersion") == 1:
        raise ImageError(
            f"{what}: Docker image manifest schema 1 is deprecated and not "
            "supported; push the image again with a current tool"
        )
    return manifest


def _select_platform(index: dict, platform: Platform, what: str) -> dict:
    candidates = []
    for desc in index.get("manifests") or []:
        if not isinstance(desc, dict):
            continue
        plat = desc.get("platform") or {}
        if plat.get("os") != platform.os or plat.get("architecture") != platform.architecture:
            continue
        variant = plat.get("variant")
        if platform.variant and variant and variant != platform.variant:
            continue
        candidates.append(desc)
    if not candidates:
        have = sorted(
            {
                "/".join(
                    p
                    for p in (
                        (d.get("platform") or {}).get("os"),
                        (d.get("platform") or {}).get("architecture"),
                        (d.get("platform") or {}).get("variant"),
                    )
                    if p
                )
                for d in index.get("manifests") or []
                if isinstance(d, dict)
            }
        )
        raise ImageError(
            f"{what}: no manifest for {platform} in the image index (it has: {', '.join(have) or 'nothing'})"
        )
    exact = [d for d in candidates if (d.get("platform") or {}).get("variant") == platform.variant]
    return (exact or candidates)[0]


def pull(
    ref: str | Reference,
    *,
    store: ImageStore | None = None,
    platform: str | None = None,
    insecure: bool = False,
    progress: Progress | None = None,
    client: RegistryClient | None = None,
) -> PullResult:
    """Pull ``ref`` into ``store`` and record its name. Raises RegistryError (registry or
    network), ImageError (content: digest mismatch, unsupported manifest), UsageError."""
    store = store or ImageStore()
    progress = progress or NoProgress()
    ref = as_reference(ref)
    plat = Platform.parse(platform)
    client = client or RegistryClient(ref.registry, insecure=insecure)
    repo = ref.repository
    wanted = ref.digest or ref.tag or "latest"
    what = f"pulling {ref.familiar}"

    body, media_type, top_digest = with_retries(lambda: client.get_manifest(repo, wanted), what)
    manifest = _parse_manifest(body, media_type, what)
    index_body = None
    if media_type in INDEX_TYPES or (not media_type and "manifests" in manifest):
        index_body = body
        desc = _select_platform(manifest, plat, what)
        child, _ = check_descriptor(desc, what)
        body, media_type, manifest_digest = with_retries(lambda: client.get_manifest(repo, child), what)
        manifest = _parse_manifest(body, media_type, what)
    else:
        manifest_digest = top_digest
    if media_type not in MANIFEST_TYPES and not (not media_type and "layers" in manifest):
        raise ImageError(f"{what}: unsupported manifest media type {media_type!r}")
    config_desc = manifest.get("config")
    config_digest, config_size = check_descriptor(config_desc, what)
    config_type = (config_desc or {}).get("mediaType")  # a dict: checked just above
    if config_type not in (OCI_CONFIG, DOCKER_CONFIG, None):
        raise ImageError(f"{what}: {ref.familiar} is not a container image (config media type {config_type})")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{what}: the manifest has no layers list")
    blobs = [(config_digest, config_size)]
    for layer in layers:
        blobs.append(check_descriptor(layer, what))
        if "tar" not in str(layer.get("mediaType", "tar")):
            raise ImageError(f"{what}: layer {layer['digest']} has unsupported media type {layer.get('mediaType')!r}")

    if ref.tag is not None:
        name = Reference(ref.registry, ref.repository, ref.tag, None)
    else:
        name = Reference(ref.registry, ref.repository, None, ref.digest)
    try:
        previous = store.resolve(name).manifest_digest
    except VmshimError:  # not there yet (or broken): a new pull
        previous = None

    added: list[str] = []
    with store.writing():
        try:
            _fetch_blobs(client, store, repo, blobs, progress, added)
            store.put_blob(body, expected_digest=manifest_digest)
            added.append(manifest_digest)
            if name.digest is not None and index_body is not None:
                store.put_blob(index_body, expected_digest=top_digest)
                added.append(top_digest)
                store.tag(name, top_digest)
            else:
                store.tag(name, manifest_digest)
        except ImageError:  # content was bad: keep nothing of this pull
            store.discard_blobs(added)
            store.discard_partials(d for d, _ in blobs)
            raise
    store.record_sources(client.host, repo, [d for d, _ in blobs])
    return PullResult(
        reference=name,
        digest=top_digest,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        updated=previous != manifest_digest,
    )


def _fetch_blobs(
    client: RegistryClient,
    store: ImageStore,
    repo: str,
    blobs: list[tuple[str, int]],
    progress: Progress,
    added: list[str],
) -> None:
    todo = []
    seen = set()
    for digest, size in blobs:
        key = digest_hex(digest)[:12]
        if digest in seen:
            continue
        seen.add(digest)
        if store.has_blob(digest):
            progress.start(key, key, size)
            progress.finish(key, "Already exists")
        else:
            todo.append((digest, size))
    if not todo:
        return
    cancelled = threading.Event()
    lock = threading.Lock()

    def one(digest: str, size: int) -> None:
        key = digest_hex(digest)[:12]
        progress.start(key, key, size)
        with store.ingest(digest, size) as ingest:
            if ingest.done:
                progress.finish(key, "Already exists")
                return
            client.fetch_blob(repo, digest, ingest, lambda n: progress.advance(key, n), cancelled)
        with lock:
            added.append(digest)
        progress.finish(key, "Pull complete")

    pool = ThreadPoolExecutor(max_workers=min(PARALLEL, len(todo)), thread_name_prefix="vmshim-pull")
    try:
        futures = [pool.submit(one, d, s) for d, s in todo]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                cancelled.set()
                for p in pending:
                    p.cancel()
                wait(pending)
                # the first real error by submission order, for a stable message
                errors = [e for g in futures if g.done() and not g.cancelled() and (e := g.exception()) is not None]
                raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
    except BaseException:
        cancelled.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


PULL_POLICIES = ("missing", "always", "never")
"""docker's ``run --pull``: pull when the store lacks the image, every time, or never."""


def pull_for_run(
    ref: str, policy: str, *, store: ImageStore | None = None, progress: Progress | None = None, on_missing=lambda: None
) -> PullResult | None:
    """Apply ``run``/``create``'s *policy* to image *ref* before the container is made:
    the PullResult of a pull, or None when nothing was pulled (it is in the store, the
    policy is ``never``, or *ref* is an image ID, which cannot be pulled). When ``missing``
    had to pull (after calling *on_missing*) and the pull failed, raises ImageNotFound
    saying both; ``always`` raises
    the pull's own error (RegistryError, ImageError)."""
    import re

    from shim.errors import ImageNotFound

    if policy not in PULL_POLICIES:
        raise UsageError(f"invalid --pull {policy!r}: use one of {', '.join(PULL_POLICIES)}")
    store = store or ImageStore()
    if policy == "never":
        return None
    if policy == "missing":
        try:
            store.resolve(ref)
            return None
        except ImageNotFound:
            if re.fullmatch(r"(?:sha256:)?[0-9a-f]{64}", ref):
                raise  # an image ID: nothing to pull
            on_missing()
            try:
                return pull(ref, store=store, progress=progress)
            except (RegistryError, ImageError) as failed:
                raise ImageNotFound(
                    f"image '{ref}' not found in the local store, and pulling it failed: {failed}"
                ) from None
    return pull(ref, store=store, progress=progress)


def push(
    ref: str | Reference,
    *,
    store: ImageStore | None = None,
    insecure: bool = False,
    progress: Progress | None = None,
    client: RegistryClient | None = None,
    chunk_size: int | None = None,
) -> PushResult:
    """Push the local image named ``ref`` to the registry and repository the name says.
    Raises ImageNotFound, RegistryError, ImageError."""
    store = store or ImageStore()
    progress = progress or NoProgress()
    ref = as_reference(ref)
    image = store.resolve(ref)
    chunk = _chunk_size() if chunk_size is None else chunk_size
    client = client or RegistryClient(ref.registry, insecure=insecure)
    repo = ref.repository
    body = store.read_blob(image.manifest_digest)
    manifest = json.loads(body)
    media_type = manifest.get("mediaType") or OCI_MANIFEST
    blobs = [(layer.digest, layer.size) for layer in image.layers]
    blobs.append((image.config_digest, store.blob_path(image.config_digest).stat().st_size))
    what = f"pushing {ref.familiar}"

    def one(digest: str, size: int) -> None:
        key = digest_hex(digest)[:12]
        progress.start(key, key, size)
        scopes = (f"repository:{repo}:pull,push",)
        if with_retries(lambda: client.blob_exists(repo, digest, scopes), what):
            progress.finish(key, "Layer already exists")
            return
        location = None
        for host, source in store.sources(digest):
            if host != client.host or source == repo:
                continue
            try:
                location = with_retries(functools.partial(client.mount_blob, repo, digest, source), what)
            except RegistryError:
                continue  # no access to the source: upload instead
            if location is None:
                progress.finish(key, f"Mounted from {source}")
                return
            break

        def upload() -> None:
            nonlocal location
            sent = 0

            def on_bytes(n: int) -> None:
                nonlocal sent
                sent += n
                progress.advance(key, n)

            try:
                client.upload_blob(
                    repo,
                    digest,
                    size,
                    lambda: open(store.blob_path(digest), "rb"),
                    location=location,
                    chunk_size=chunk,
                    on_bytes=on_bytes,
                )
            except RegistryError:
                location = None  # the upload session is gone; a retry opens a new one
                progress.advance(key, -sent)
                raise

        with_retries(upload, what)
        progress.finish(key, "Pushed")

    blobs_unique = list(dict.fromkeys(blobs))
    with ThreadPoolExecutor(
        max_workers=max(1, min(PARALLEL, len(blobs_unique))), thread_name_prefix="vmshim-push"
    ) as pool:
        futures = [pool.submit(one, d, s) for d, s in blobs_unique]
        for f in futures:
            f.result()
    tag = ref.tag if ref.tag is not None else image.manifest_digest
    digest = with_retries(lambda: client.put_manifest(repo, tag, body, media_type), what)
    store.record_sources(client.host, repo, [d for d, _ in blobs])
    return PushResult(reference=ref, digest=digest, size=len(body))
