"""Image store: blobs verified and atomic, names in index.json, concurrency."""

import hashlib
import io
import json
import multiprocessing
import tarfile
import threading
from pathlib import Path

import pytest

from shim.errors import ImageError, ImageNotFound, InvalidReference
from shim.images.store import (
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    REF_NAME,
    ImageStore,
    format_size,
    import_image,
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return ImageStore()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def blob_files(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.blobs_dir.iterdir())


def test_layout_on_disk(store, tmp_path):
    assert store.root == tmp_path / "root" / "images"
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert store.blobs_dir == store.root / "blobs" / "sha256"


def test_put_blob_bytes_and_stream(store):
    d = store.put_blob(b"hello")
    assert d == sha(b"hello")
    assert store.blob_path(d).read_bytes() == b"hello"
    assert store.has_blob(d)
    d2 = store.put_blob(io.BytesIO(b"x" * (3 << 20)), expected_digest=sha(b"x" * (3 << 20)), size=3 << 20)
    assert store.blob_path(d2).stat().st_size == 3 << 20
    assert blob_files(store) == sorted([d[7:], d2[7:]])  # no temp files


def test_digest_mismatch_leaves_no_file(store):
    with pytest.raises(ImageError, match="digest mismatch"):
        store.put_blob(b"evil", expected_digest=sha(b"good"))
    with pytest.raises(ImageError, match="expected 3"):
        store.put_blob(b"four", size=3)
    with pytest.raises(ImageError, match="expected 10"):
        store.put_blob(b"four", size=10)
    assert blob_files(store) == []


def test_invalid_digests_are_not_paths(store):
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64, ""):
        with pytest.raises(ImageError, match="invalid digest"):
            store.blob_path(bad)
    with pytest.raises(ImageError, match="missing"):
        store.blob_path(sha(b"nothing"))


def test_existing_blob_is_not_read_again(store):
    d = store.put_blob(b"abc")

    class Exploding(io.RawIOBase):
        def read(self, n=-1):
            raise AssertionError("read")

    assert store.put_blob(Exploding(), expected_digest=d) == d


def import_simple(store, tmp_path, ref="example/x:1", content=b"hi"):
    layer = make_tar(tmp_path / f"layer-{content.hex()}.tar", {"f": content})
    return store.import_image(
        [layer], {"config": {"Cmd": ["sh"], "Env": ["A=1"], "WorkingDir": "/w", "User": "1000"}}, ref
    )


def test_import_builds_proper_manifest(store, tmp_path):
    image = import_simple(store, tmp_path)
    manifest = json.loads(store.blob_path(image.manifest_digest).read_bytes())
    assert manifest["mediaType"] == OCI_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["digest"] == image.config_digest
    layer_bytes = (tmp_path / f"layer-{b'hi'.hex()}.tar").read_bytes()
    assert manifest["layers"] == [{"mediaType": OCI_LAYER_TAR, "digest": sha(layer_bytes), "size": len(layer_bytes)}]
    assert image.config["rootfs"] == {"type": "layers", "diff_ids": [sha(layer_bytes)]}
    assert image.layers[0].diff_id == sha(layer_bytes)
    assert image.config["os"] == "linux" and image.config["architecture"]
    assert (image.cmd, image.env, image.workdir, image.user, image.entrypoint) == (["sh"], ["A=1"], "/w", "1000", None)
    assert str(image.reference) == "docker.io/example/x:1"
    index = json.loads(store.index_path.read_text())
    assert index["manifests"][0]["annotations"][REF_NAME] == "docker.io/example/x:1"
    # deterministic: same inputs, same digests
    again = import_simple(store, tmp_path)
    assert again.manifest_digest == image.manifest_digest


def test_import_gzip_layer_diff_id_is_uncompressed(store, tmp_path):
    plain = make_tar(tmp_path / "l.tar", {"a": b"1"})
    gz = tmp_path / "l.tar.gz"
    import gzip

    gz.write_bytes(gzip.compress(plain.read_bytes()))
    image = store.import_image([gz], {}, "gz")
    assert image.layers[0].media_type == OCI_LAYER_GZIP
    assert image.layers[0].digest == sha(gz.read_bytes())
    assert image.layers[0].diff_id == sha(plain.read_bytes())


def test_module_level_import_uses_default_store(store, tmp_path):
    layer = make_tar(tmp_path / "l.tar", {"a": b"1"})
    image = import_image([layer], {}, "mod")
    assert store.resolve("mod").manifest_digest == image.manifest_digest


def test_tag_resolve_remove(store, tmp_path):
    image = import_simple(store, tmp_path)
    store.tag("other:latest", image.manifest_digest)
    assert store.resolve("other").manifest_digest == image.manifest_digest
    assert store.resolve("docker.io/library/other:latest").config_digest == image.config_digest
    # by image ID (config digest), full or prefix, and by manifest digest
    assert store.resolve(image.config_digest).manifest_digest == image.manifest_digest
    assert store.resolve(image.config_digest[7:19]).manifest_digest == image.manifest_digest
    assert store.resolve(f"other@{image.manifest_digest}").manifest_digest == image.manifest_digest
    assert [s.reference.familiar for s in store.list_images()] == ["example/x:1", "other:latest"]
    summary = store.list_images()[0]
    assert summary.id == image.config_digest and summary.size == image.size

    store.remove("other")
    with pytest.raises(ImageNotFound, match="image 'other:latest' not found in the local store"):
        store.resolve("other")
    assert store.has_blob(image.manifest_digest)  # still named example/x:1
    store.remove("example/x:1")
    assert store.list_images() == []
    assert blob_files(store) == []  # garbage collected


def test_remove_keeps_shared_layers(store, tmp_path):
    a = import_simple(store, tmp_path, "a", b"same")
    b_layer = tmp_path / f"layer-{b'same'.hex()}.tar"
    b = store.import_image([b_layer], {"config": {"Cmd": ["other"]}}, "b")
    assert a.layers[0].digest == b.layers[0].digest
    store.remove("a")
    assert store.has_blob(b.layers[0].digest) and store.has_blob(b.config_digest)
    assert not store.has_blob(a.config_digest)


def test_remove_by_id_refuses_when_ambiguous(store, tmp_path):
    image = import_simple(store, tmp_path)
    store.tag("second", image.manifest_digest)
    with pytest.raises(ImageError, match="several names"):
        store.remove(image.config_digest[7:19])
    store.remove("second")
    store.remove(image.config_digest[7:19])
    assert store.list_images() == []


def test_errors(store, tmp_path):
    with pytest.raises(InvalidReference):
        store.resolve("Not Valid")
    with pytest.raises(ImageNotFound, match="pull or build it first"):
        store.resolve("nothing/here")
    with pytest.raises(ImageNotFound, match="vmshim image bootstrap busybox"):
        store.resolve("busybox")
    with pytest.raises(ImageNotFound):
        store.remove("nothing")
    with pytest.raises(ImageError, match="missing"):
        store.tag("x", "sha256:" + "0" * 64)
    image = import_simple(store, tmp_path)
    with pytest.raises(ImageError, match="different digest"):
        store.tag(f"x@sha256:{'1' * 64}", image.manifest_digest)


def test_tag_refuses_manifest_with_missing_blobs(store):
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "x", "digest": "sha256:" + "2" * 64, "size": 1},
        "layers": [],
    }
    digest, _ = store.put_json(manifest)
    with pytest.raises(ImageError, match="is missing"):
        store.tag("x", digest)
    assert store.list_images() == []


def test_corrupt_index_is_reported(store):
    store.index_path.write_text("{not json")
    with pytest.raises(ImageError, match="corrupt"):
        store.list_images()


def test_format_size():
    assert format_size(0) == "0B"
    assert format_size(2140160) == "2.14MB"
    assert format_size(4_260_000_000) == "4.26GB"


# Concurrency -----------------------------------------------------------------------------
def test_concurrent_put_same_blob_threads(store):
    data = b"z" * (5 << 20)
    errors, digests = [], []

    def put():
        try:
            digests.append(store.put_blob(io.BytesIO(data), expected_digest=None))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(digests) == {sha(data)}
    assert blob_files(store) == [sha(data)[7:]]
    assert store.blob_path(sha(data)).read_bytes() == data


def _put_in_process(root: str, n: int) -> str:
    return ImageStore(Path(root)).put_blob(b"q" * (2 << 20))


def _tag_in_process(args) -> None:
    root, manifest_digest, i = args
    store = ImageStore(Path(root))
    for j in range(10):
        store.tag(f"repo{i}:t{j}", manifest_digest)


def test_concurrent_put_same_blob_processes(store):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        digests = pool.starmap(_put_in_process, [(str(store.root), i) for i in range(8)])
    assert len(set(digests)) == 1
    assert blob_files(store) == [digests[0][7:]]


def test_index_stays_valid_under_parallel_tags(store, tmp_path):
    image = import_simple(store, tmp_path)
    ctx = multiprocessing.get_context("fork")
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            try:
                json.loads(store.index_path.read_text())
            except ValueError as e:  # pragma: no cover - the failure being tested for
                bad.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        with ctx.Pool(4) as pool:
            pool.map(_tag_in_process, [(str(store.root), image.manifest_digest, i) for i in range(6)])
    finally:
        stop.set()
        t.join()
    assert not bad
    names = {s.reference.familiar for s in store.list_images()}
    assert names == {"example/x:1"} | {f"repo{i}:t{j}" for i in range(6) for j in range(10)}
    leftovers = [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
