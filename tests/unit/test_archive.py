"""save/load (docker-archive, OCI archive and layout), garbage collection, prune, system df,
history: in-process, no registry."""

import gzip
import io
import json
import subprocess
import tarfile
import threading

import pytest
from click.testing import CliRunner

from shim.errors import ImageError
from shim.images import archive
from shim.images.store import ImageStore, import_image
from tests.tarfiles import tar_of


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return ImageStore()


def layer_tar(path, files, gz=False):
    data = tar_of(files)
    data = gzip.compress(data, mtime=0) if gz else data
    path.write_bytes(data)
    return path


def two_layer_image(store, tmp_path, ref="docker.io/ns/app:1"):
    a = layer_tar(tmp_path / "a.tar", {"etc/a": b"a" * 1000})
    b = layer_tar(tmp_path / "b.tar.gz", {"etc/b": b"b" * 1000}, gz=True)
    cfg = {
        "config": {"Cmd": ["sh"]},
        "created": "2024-01-02T03:04:05Z",
        "history": [
            {"created_by": "ADD a", "created": "2024-01-01T00:00:00Z"},
            {"created_by": "ENV X=1", "empty_layer": True},
            {"created_by": "ADD b", "comment": "second"},
        ],
    }
    return import_image([a, b], cfg, ref, store=store)


def blobs(store):
    return sorted(p.name for p in store.blobs_dir.iterdir())


@pytest.mark.parametrize("fmt", archive.FORMATS)
def test_save_load_round_trip(store, tmp_path, fmt):
    image = two_layer_image(store, tmp_path)
    out = tmp_path / "img.tar"
    archive.save_to_file(store, ["ns/app:1"], out, fmt)
    other = ImageStore(tmp_path / "other")
    loaded = archive.load(other, out)
    assert [str(n) for n in loaded[0].names] == ["docker.io/ns/app:1"]
    again = other.resolve("ns/app:1")
    assert again.config_digest == image.config_digest
    assert [layer.diff_id for layer in again.layers] == [layer.diff_id for layer in image.layers]
    if fmt == "oci-archive":  # blobs kept as they are: same manifest digest
        assert again.manifest_digest == image.manifest_digest
    else:  # docker-archive layers are uncompressed tars
        with tarfile.open(out) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["docker.io/ns/app:1"]
        assert all(layer.media_type.endswith(".tar") for layer in again.layers)
        assert all(layer.digest == layer.diff_id for layer in again.layers)
    assert not list((tmp_path).glob(".tmp-*"))


def test_load_compressed_and_from_stdin(store, tmp_path):
    two_layer_image(store, tmp_path)
    raw = tmp_path / "img.tar"
    archive.save_to_file(store, ["ns/app:1"], raw)
    gz = tmp_path / "img.tar.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    one = ImageStore(tmp_path / "one")
    assert archive.load(one, gz)[0].names[0].familiar == "ns/app:1"
    two = ImageStore(tmp_path / "two")
    with open(gz, "rb") as f:
        assert archive.load(two, stdin=f)[0].names[0].familiar == "ns/app:1"


def test_load_oci_layout_directory_and_unnamed_images(store, tmp_path):
    image = two_layer_image(store, tmp_path)
    out = tmp_path / "oci.tar"
    archive.save_to_file(store, [image.id], out, "oci-archive")  # by ID: no name
    d = tmp_path / "layout"
    d.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(d)], check=True)
    other = ImageStore(tmp_path / "other")
    loaded = archive.load(other, d)
    assert loaded[0].names == [] and loaded[0].image_id == image.id
    assert other.resolve(image.id[7:19]).manifest_digest == image.manifest_digest


def _docker_archive(path, members: dict[str, bytes], links: dict[str, str] | None = None):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tar.addfile(ti)
    return path


def _layer_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _config(diff_ids):
    import hashlib

    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    return cfg, hashlib.sha256(cfg).hexdigest()


def test_docker_archive_with_symlinked_layers(store, tmp_path):
    import hashlib

    layer = _layer_bytes({"x": b"x"})
    diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    cfg, cfg_hex = _config([diff, diff])
    path = _docker_archive(
        tmp_path / "d.tar",
        {
            f"{cfg_hex}.json": cfg,
            "aaa/layer.tar": layer,
            "manifest.json": json.dumps(
                [{"Config": f"{cfg_hex}.json", "RepoTags": ["x/y:z"], "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]
            ).encode(),
        },
        links={"bbb/layer.tar": "../aaa/layer.tar"},
    )
    loaded = archive.load(store, path)
    assert loaded[0].names[0].familiar == "x/y:z"
    assert len(store.resolve("x/y:z").layers) == 2


@pytest.mark.parametrize(
    "case", ["bad-diff-id", "config-name-lies", "escaping-link", "missing-layer", "not-an-archive", "oci-bad-blob"]
)
def test_bad_archives_are_refused_leaving_nothing(store, tmp_path, case):
    import hashlib

    layer = _layer_bytes({"x": b"x"})
    diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    cfg, cfg_hex = _config([diff])
    entry = {"Config": f"{cfg_hex}.json", "RepoTags": ["x/y:z"], "Layers": ["l/layer.tar"]}
    members = {f"{cfg_hex}.json": cfg, "l/layer.tar": layer}
    links = {}
    if case == "bad-diff-id":
        members["l/layer.tar"] = _layer_bytes({"x": b"other"})
    elif case == "config-name-lies":
        members = {f"{'0' * 64}.json": cfg, "l/layer.tar": layer}
        entry["Config"] = f"{'0' * 64}.json"
    elif case == "escaping-link":
        del members["l/layer.tar"]
        links = {"l/layer.tar": "../../etc/passwd"}
    elif case == "missing-layer":
        del members["l/layer.tar"]
    members["manifest.json"] = json.dumps([entry]).encode()
    path = _docker_archive(tmp_path / "d.tar", members, links)
    if case == "not-an-archive":
        path.write_bytes(b"hello, not a tar" * 100)
    if case == "oci-bad-blob":
        image = two_layer_image(ImageStore(tmp_path / "src"), tmp_path)
        d = tmp_path / "layout"
        archive.save_to_file(ImageStore(tmp_path / "src"), ["ns/app:1"], tmp_path / "o.tar", "oci-archive")
        d.mkdir()
        subprocess.run(["tar", "-xf", str(tmp_path / "o.tar"), "-C", str(d)], check=True)
        victim = d / "blobs" / "sha256" / image.layers[1].digest[7:]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        path = d
    before = blobs(store)
    with pytest.raises(ImageError):
        archive.load(store, path)
    assert blobs(store) == before and store.list_images() == []
    assert not any((store.root / "tmp").iterdir()) if (store.root / "tmp").exists() else True


def test_cli_save_load_history(store, tmp_path):
    from shim.cli.main import cli

    two_layer_image(store, tmp_path)
    runner = CliRunner()
    out = tmp_path / "x.tar"
    res = runner.invoke(cli, ["save", "-o", str(out), "ns/app:1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["rmi", "ns/app:1"])
    assert blobs(store) == []
    res = runner.invoke(cli, ["load", "-q", "-i", str(out)])
    assert res.exit_code == 0 and res.output == "Loaded image: ns/app:1\n"
    res = runner.invoke(cli, ["history", "ns/app:1"])
    lines = res.output.splitlines()
    assert lines[0].split()[:2] == ["IMAGE", "CREATED"]
    assert "ADD b" in lines[1] and "second" in lines[1] and "ENV X=1" in lines[2]
    assert lines[2].startswith("<missing>") and "0B" in lines[2]
    rows = [json.loads(x) for x in runner.invoke(cli, ["history", "--format", "json", "ns/app:1"]).output.splitlines()]
    assert [r["CreatedBy"] for r in rows] == ["ADD b", "ENV X=1", "ADD a"]
    assert rows[1]["Size"] == 0 and rows[2]["Size"] > 1000
    res = runner.invoke(cli, ["tag", "ns/app:1", "other:2"])
    assert res.exit_code == 0
    assert store.resolve("other:2").id == store.resolve("ns/app:1").id
    res = runner.invoke(cli, ["save", "-o", str(tmp_path / "y.tar"), "nothing:1"])
    assert res.exit_code == 125 and res.output.startswith("Error: ")
    assert not (tmp_path / "y.tar").exists()


# Garbage collection, prune, df ------------------------------------------------------------
def test_gc_removes_only_unreachable_blobs(store, tmp_path):
    image = two_layer_image(store, tmp_path)
    stray = store.put_blob(b"nobody uses me")
    (store.root / "ingest").mkdir()
    (store.root / "ingest" / ("ab" * 32 + ".partial")).write_bytes(b"half")
    assert store.disk_usage().reclaimable == len(b"nobody uses me") + 4
    files, freed = store.collect_garbage()
    assert (files, freed) == (2, len(b"nobody uses me") + 4)
    assert not store.has_blob(stray)
    assert store.resolve("ns/app:1").manifest_digest == image.manifest_digest


def test_retag_leaves_garbage_that_prune_removes(store, tmp_path):
    old = two_layer_image(store, tmp_path)
    c = layer_tar(tmp_path / "c.tar", {"c": b"c"})
    import_image([c], {}, "docker.io/ns/app:1", store=store)  # the name moves on
    assert store.has_blob(old.manifest_digest)
    report = store.prune()
    assert report.untagged == [] and report.space_reclaimed > 0
    assert not store.has_blob(old.manifest_digest)
    report = store.prune(all_images=True)
    assert report.untagged == ["docker.io/ns/app:1"] and blobs(store) == []


def test_prune_all_keeps_images_in_use(store, tmp_path):
    image = two_layer_image(store, tmp_path)
    c = layer_tar(tmp_path / "c.tar", {"c": b"c"})
    import_image([c], {}, "docker.io/ns/other:1", store=store)
    report = store.prune(all_images=True, keep={image.manifest_digest})
    assert report.untagged == ["docker.io/ns/other:1"]
    assert store.resolve("ns/app:1")


def test_gc_waits_for_a_writer_between_put_and_tag(store, tmp_path):
    """A blob put under writing() but not tagged yet survives a concurrent gc."""
    started, release = threading.Event(), threading.Event()
    result = {}

    def writer():
        with store.writing():
            result["d"] = store.put_blob(b"{}")
            started.set()
            release.wait(5)
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"digest": result["d"], "size": 2, "mediaType": "application/vnd.oci.image.config.v1+json"},
                "layers": [],
            }
            digest, _ = store.put_json(manifest)
            store.tag("docker.io/ns/fresh:1", digest)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(5)
    gc = threading.Thread(target=store.collect_garbage)
    gc.start()
    gc.join(0.3)
    assert gc.is_alive()  # blocked on the gc lock
    release.set()
    t.join(5)
    gc.join(5)
    assert store.has_blob(result["d"])
    assert store.resolve("ns/fresh:1")


def test_system_df_and_prune_cli(store, tmp_path):
    from shim.cli.main import cli

    two_layer_image(store, tmp_path)
    store.put_blob(b"x" * 5000)
    runner = CliRunner()
    rows = [json.loads(x) for x in runner.invoke(cli, ["system", "df", "--format", "json"]).output.splitlines()]
    images = next(r for r in rows if r["Type"] == "Images")
    assert images["TotalCount"] == 1 and images["Reclaimable"] == 5000
    res = runner.invoke(cli, ["system", "df"])
    assert res.output.splitlines()[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
    res = runner.invoke(cli, ["image", "prune", "-f"])
    assert res.exit_code == 0 and "Total reclaimed space: 5kB" in res.output
    res = runner.invoke(cli, ["image", "prune", "-a", "-f"])
    assert "untagged: ns/app:1" in res.output
    assert blobs(store) == []
