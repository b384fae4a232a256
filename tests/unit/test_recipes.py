"""What the debootstrap recipes share (images/node/recipe.py): making the cached layer tar
and its notes from a prepared root file system, and forgetting the cache on request. No
debootstrap here: a stand-in prepares the root file system."""

from __future__ import annotations

import datetime as dt
import json
import tarfile

import pytest

from shim.images.store import ImageStore, load_recipe, recipe_config


@pytest.fixture
def node(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return load_recipe("node")


def test_write_rootfs_tar_slims_the_tree_and_notes_how_it_was_made(node, tmp_path):
    store = ImageStore()
    tar_path, meta_path = tmp_path / "cache/rootfs.tar", tmp_path / "cache/rootfs.json"

    def prepare(rootfs):
        (rootfs / "etc").mkdir()
        (rootfs / "etc/hello").write_text("hi\n")
        (rootfs / "var/log").mkdir(parents=True)
        (rootfs / "var/log/apt.log").write_text("noise\n")
        return dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc), {"packages": ["p"]}

    node.write_rootfs_tar(store, "test", tar_path, meta_path, prepare)
    notes = json.loads(meta_path.read_text())
    assert list(notes) == ["created", "packages", "mirror", "diff_id"]
    assert notes["created"] == "2024-01-02T00:00:00Z" and notes["packages"] == ["p"]
    assert notes["diff_id"] == node._sha256(tar_path)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert "etc/hello" in names and "var/log" in names and "var/log/apt.log" not in names
    assert list((store.root / "tmp").iterdir()) == []  # the work tree is gone


def test_a_failing_prepare_leaves_no_cache(node, tmp_path):
    tar_path, meta_path = tmp_path / "cache/rootfs.tar", tmp_path / "cache/rootfs.json"

    def prepare(rootfs):
        raise RuntimeError("debootstrap failed")

    with pytest.raises(RuntimeError):
        node.write_rootfs_tar(ImageStore(), "test", tar_path, meta_path, prepare)
    assert not tar_path.exists() and not meta_path.exists()


def test_forget_when_asked(node, tmp_path, monkeypatch):
    cached = tmp_path / "rootfs.tar"
    cached.write_bytes(b"x")
    node.forget_when_asked("VMSHIM_TEST_REBUILD", cached)
    assert cached.exists()
    monkeypatch.setenv("VMSHIM_TEST_REBUILD", "1")
    node.forget_when_asked("VMSHIM_TEST_REBUILD", cached)
    assert not cached.exists()


def test_recipe_config_is_one_layer_of_this_host():
    config = recipe_config("2024-01-02T00:00:00Z", {"Cmd": ["sh"]}, "made by hand")
    assert config["config"] == {"Cmd": ["sh"]} and config["os"] == "linux"
    assert config["history"] == [{"created": "2024-01-02T00:00:00Z", "created_by": "made by hand"}]
