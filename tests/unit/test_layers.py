"""Layer tar → squashfs: whiteout rewriting, caching, and refusal of hostile archives.

Needs squashfs-tools-ng (tar2sqfs, rdsquashfs); the overlay test needs root (loop mounts).
"""

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from shim import paths
from shim.errors import LayerError
from shim.images import layers as layers_mod
from shim.images.layers import Limits, layer_disk, mount_layer, umount_layer
from shim.images.store import ImageStore, LayerRef
from tests.overlay import overlay_of

pytestmark = pytest.mark.skipif(
    shutil.which("tar2sqfs") is None or shutil.which("rdsquashfs") is None, reason="squashfs-tools-ng is not installed"
)


# Building tars ------------------------------------------------------------------------------
def reg(name, data=b"", mode=0o644, pax=None, **kw):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    ti.pax_headers = pax or {}
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def node(name, type_, mode=0o755, linkname="", pax=None, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname = type_, mode, linkname
    ti.pax_headers = pax or {}
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def dir_(name, **kw):
    return node(name, tarfile.DIRTYPE, **kw)


def sym(name, target):
    return node(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hard(name, target):
    return node(name, tarfile.LNKTYPE, mode=0o644, linkname=target)


def tar_bytes(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return ImageStore()


def put_layer(store, data: bytes, compress: str | None = None, diff_id=True) -> LayerRef:
    uncompressed = data
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "zstd":
        data = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    digest = store.put_blob(data)
    did = "sha256:" + hashlib.sha256(uncompressed).hexdigest() if diff_id else None
    return LayerRef(digest=digest, media_type="x", size=len(data), diff_id=did)


def rd(sqfs: Path, *args) -> str:
    return subprocess.run(["rdsquashfs", *args, str(sqfs)], capture_output=True, text=True, check=True).stdout


def xattrs(sqfs: Path, path: str) -> str:
    return rd(sqfs, "-x", path)


def stat(sqfs: Path, path: str) -> str:
    return rd(sqfs, "-s", path)


def cat(sqfs: Path, path: str) -> bytes:
    return subprocess.run(["rdsquashfs", "-c", path, str(sqfs)], capture_output=True, check=True).stdout


def leftovers() -> list[str]:
    d = paths.layer_disks_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# Whiteouts and normal content ---------------------------------------------------------------
WHITEOUT_LAYER = (
    dir_("./"),
    dir_("etc/"),
    reg("etc/.wh.old"),
    reg("etc/new", b"new"),
    dir_("opq/", mode=0o700),
    reg("opq/.wh..wh..opq"),
    reg("opq/kept", b"k"),
    reg("implicit/.wh..wh..opq"),
    reg("implicit/x", b"x"),
    reg(".wh.gone"),
    reg(".wh.samename"),
    reg("samename", b"mine"),
    reg(".wh.redo"),
    reg("redo/y", b"y"),
    reg("aufs/.wh..wh.plnk"),
)


def test_whiteouts_become_overlay_markers(store):
    sqfs = layer_disk(store, put_layer(store, tar_bytes(*WHITEOUT_LAYER)))
    assert sqfs == paths.layer_disks_dir() / f"{put_layer(store, tar_bytes(*WHITEOUT_LAYER)).digest[7:]}.sqfs"
    listing = rd(sqfs, "-l", "/")
    assert ".wh." not in listing
    # .wh.NAME → char device 0:0
    for path in ("/etc/old", "/gone"):
        st = stat(sqfs, path)
        assert "character device" in st and "Device number: 0:0" in st
    # .wh..wh..opq → xattr on the directory's own entry (explicit and implicit dirs)
    assert "trusted.overlay.opaque=y" in xattrs(sqfs, "/opq")
    assert "Access: 0700" in stat(sqfs, "/opq")
    assert "trusted.overlay.opaque=y" in xattrs(sqfs, "/implicit")
    assert cat(sqfs, "/opq/kept") == b"k" and cat(sqfs, "/implicit/x") == b"x"
    # whiteout + the same name in this layer: the layer's entry wins
    assert cat(sqfs, "/samename") == b"mine"
    # whiteout + a directory recreated in this layer: an opaque directory
    assert "directory" in stat(sqfs, "/redo")
    assert "trusted.overlay.opaque=y" in xattrs(sqfs, "/redo")
    assert "trusted.overlay.opaque" not in xattrs(sqfs, "/etc")
    assert "trusted.overlay.opaque" not in xattrs(sqfs, "/")
    assert "aufs" not in listing  # aufs metadata is ignored (as containerd does)
    assert leftovers() == [sqfs.name]


def test_opaque_root(store):
    sqfs = layer_disk(store, put_layer(store, tar_bytes(dir_("./", mode=0o750), reg(".wh..wh..opq"), reg("a", b"1"))))
    assert "trusted.overlay.opaque=y" in xattrs(sqfs, "/")
    assert "Access: 0750" in stat(sqfs, "/")


def test_duplicates_last_wins(store):
    sqfs = layer_disk(
        store,
        put_layer(
            store,
            tar_bytes(
                reg("f", b"v1"),
                dir_("d/", mode=0o755),
                reg("d/x", b"x"),
                reg("f", b"v2"),
                dir_("d/", mode=0o711),
                sym("s", "f"),
                reg("s", b"now a file"),
            ),
        ),
    )
    assert cat(sqfs, "/f") == b"v2"
    assert "Access: 0711" in stat(sqfs, "/d")
    assert cat(sqfs, "/d/x") == b"x"
    assert cat(sqfs, "/s") == b"now a file"


def test_hardlinks_symlinks_fifo_metadata(store):
    sqfs = layer_disk(
        store,
        put_layer(
            store,
            tar_bytes(
                reg("./bin/tool", b"elf", mode=0o4755, uid=5, gid=6, mtime=1234567890),
                hard("bin/h1", "./bin/tool"),
                hard("bin/h2", "bin/h1"),
                sym("abs", "/etc/passwd"),
                sym("rel", "../../outside"),
                node("fifo", tarfile.FIFOTYPE, mode=0o600),
            ),
        ),
    )
    st = stat(sqfs, "/bin/tool")
    assert "Access: 04755" in st and "UID: 5" in st and "GID: 6" in st and "(1234567890)" in st
    assert "Hard link count: 3" in stat(sqfs, "/bin/h2")
    assert cat(sqfs, "/bin/h2") == b"elf"
    listing = rd(sqfs, "-l", "/")
    assert "abs -> /etc/passwd" in listing and "rel -> ../../outside" in listing
    assert "FIFO" in stat(sqfs, "/fifo") or "fifo" in stat(sqfs, "/fifo").lower()


def test_xattrs_kept_but_overlay_ones_dropped(store):
    cap = "\x01\x00\x00\x02\x00 \x00\x00" + "\x00" * 12
    sqfs = layer_disk(
        store,
        put_layer(
            store,
            tar_bytes(
                reg(
                    "ping",
                    b"p",
                    pax={
                        "SCHILY.xattr.security.capability": cap,
                        "SCHILY.xattr.user.note": "hello",
                        "SCHILY.xattr.trusted.overlay.redirect": "/elsewhere",
                        "SCHILY.xattr.trusted.overlay.opaque": "y",
                    },
                )
            ),
        ),
    )
    x = xattrs(sqfs, "/ping")
    assert "security.capability=0x01000002002000" in x and "user.note=hello" in x
    assert "overlay" not in x


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_compressed_layers(store, compress):
    if compress == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd tool missing")
    plain = layer_disk(store, put_layer(store, tar_bytes(*WHITEOUT_LAYER)))
    packed = layer_disk(store, put_layer(store, tar_bytes(*WHITEOUT_LAYER), compress))
    assert packed != plain
    assert rd(packed, "-l", "/") == rd(plain, "-l", "/")
    assert "trusted.overlay.opaque=y" in xattrs(packed, "/opq")


def test_empty_layer(store):
    sqfs = layer_disk(store, put_layer(store, tar_bytes()))
    assert rd(sqfs, "-l", "/") == ""


def test_converted_once_and_cached(store, monkeypatch):
    layer = put_layer(store, tar_bytes(reg("a", b"1")))
    calls = []
    real = layers_mod.convert_layer

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(layers_mod, "convert_layer", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(layer_disk(store, layer))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6
    assert len(calls) == 1
    assert leftovers() == [results[0].name]  # no lock or temp files
    assert oct(results[0].stat().st_mode & 0o777) == "0o600"  # container data: private


def test_stale_temp_files_are_cleaned(store):
    layer = put_layer(store, tar_bytes(reg("a", b"1")))
    d = paths.layer_disks_dir()
    d.mkdir(parents=True)
    stale = d / f".tmp-{layer.digest[7:]}.sqfs-crashed"
    stale.write_bytes(b"half")
    sqfs = layer_disk(store, layer)
    assert leftovers() == [sqfs.name]


# Hostile and broken archives ----------------------------------------------------------------
def _gzip_bomb_trailing() -> bytes:
    return gzip.compress(tar_bytes(reg("a", b"1")) + bytes(20 << 20))


def _gzip_bomb_member() -> bytes:
    return gzip.compress(tar_bytes(reg("zeros", bytes(20 << 20))))


def _truncated(data: bytes, cut: int) -> bytes:
    return data[:cut]


def _corrupt_middle() -> bytes:
    data = bytearray(tar_bytes(reg("a", b"1" * 10), reg("b", b"2")))
    data[1024:1536] = b"\xff" * 512  # the header of "b" (after a's header and data block)
    return bytes(data)


def _pax(name):
    ti = tarfile.TarInfo("placeholder")
    ti.pax_headers = {"path": name}
    return ti, b""


SMALL = Limits(max_entries=50, max_bytes=10 << 20)

HOSTILE = {
    "absolute path": (lambda: tar_bytes(reg("/etc/passwd", b"x")), None, "absolute"),
    "dotdot": (lambda: tar_bytes(reg("a/../../escape", b"x")), None, "'..'"),
    "hardlink outside": (lambda: tar_bytes(reg("a"), hard("h", "../../etc/shadow")), None, "'..'"),
    "hardlink absolute": (lambda: tar_bytes(hard("h", "/etc/shadow")), None, "absolute"),
    "hardlink not yet seen": (lambda: tar_bytes(hard("h", "later"), reg("later")), None, "not an earlier entry"),
    "hardlink to itself": (lambda: tar_bytes(reg("h"), hard("h", "h")), None, "itself"),
    "hardlink to directory": (lambda: tar_bytes(dir_("d/"), hard("h", "d")), None, "directory"),
    "hardlink target replaced later": (
        lambda: tar_bytes(reg("t", b"1"), hard("h", "t"), reg("t", b"2")),
        None,
        "replaces",
    ),
    "through symlink": (
        lambda: tar_bytes(sym("l", "/etc"), reg("l/passwd", b"x")),
        None,
        "goes through 'l', which is a symlink",
    ),
    "through symlink deep": (lambda: tar_bytes(dir_("a/"), sym("a/l", "/"), reg("a/l/x/y")), None, "symlink"),
    "through file": (lambda: tar_bytes(reg("f"), reg("f/x")), None, "regular file"),
    "dir later replaced by symlink": (
        lambda: tar_bytes(dir_("d/"), reg("d/x"), sym("d", "/etc")),
        None,
        "makes a symlink",
    ),
    "whiteout under symlink": (lambda: tar_bytes(sym("l", "/etc"), reg("l/.wh.passwd")), None, "symlink"),
    "char device": (lambda: tar_bytes(node("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)), None, "device node"),
    "char device 0:0 in source": (lambda: tar_bytes(node("x", tarfile.CHRTYPE)), None, "device node"),
    "block device": (lambda: tar_bytes(node("sda", tarfile.BLKTYPE, devmajor=8)), None, "block device"),
    "unknown type": (lambda: tar_bytes(node("v", b"V")), None, "unsupported tar type"),
    "root replaced by file": (lambda: tar_bytes(reg("./", b"")), None, "root directory"),
    "whiteout of dotdot": (lambda: tar_bytes(reg("a/.wh...")), None, "whiteout"),
    "inside whiteout marker": (lambda: tar_bytes(reg(".wh.x/y")), None, "whiteout marker"),
    "nul in name": (lambda: tar_bytes(_pax("a\x00b")), None, "NUL"),
    "long component": (lambda: tar_bytes(reg("x" * 300)), None, "255"),
    "entry count bomb": (lambda: tar_bytes(*[reg(f"f{i}") for i in range(51)]), SMALL, "more than 50 entries"),
    "size bomb": (lambda: tar_bytes(reg("a", bytes(6 << 20)), reg("b", bytes(6 << 20))), SMALL, "add up to more than"),
    "gzip bomb trailing": (_gzip_bomb_trailing, SMALL, "decompression bomb"),
    "gzip bomb member": (_gzip_bomb_member, SMALL, "add up to more than"),
    "truncated gzip": (
        lambda: _truncated(gzip.compress(tar_bytes(reg("a", os.urandom(5000)))), 2000),
        None,
        "corrupt or truncated",
    ),
    "corrupt gzip": (
        lambda: gzip.compress(tar_bytes(reg("a", b"x")))[:20] + b"\x00" * 60,
        None,
        "corrupt or truncated",
    ),
    "truncated mid-member": (lambda: _truncated(tar_bytes(reg("a", b"x" * 5000)), 2048), None, "corrupt or truncated"),
    "no end-of-archive marker": (lambda: tar_bytes(reg("a", b"x"), reg("b", b"y"))[:2048], None, "end-of-archive"),
    "corrupt header in the middle": (_corrupt_middle, None, "corrupt"),
    "not a tar": (lambda: os.urandom(4096), None, "corrupt or truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_refused_leaving_nothing(store, case):
    make, limits, message = HOSTILE[case]
    layer = put_layer(store, make(), diff_id=False)
    with pytest.raises(LayerError) as exc:
        layer_disk(store, layer, limits=limits)
    assert message in str(exc.value), str(exc.value)
    assert leftovers() == []
    assert not list(Path(store.root).glob("**/.tmp-*"))


def test_diff_id_mismatch_refused(store):
    layer = put_layer(store, tar_bytes(reg("a", b"1")))
    wrong = LayerRef(layer.digest, layer.media_type, layer.size, "sha256:" + "0" * 64)
    with pytest.raises(LayerError, match="does not match its diff_id"):
        layer_disk(store, wrong)
    assert leftovers() == []


def test_tar2sqfs_failure_is_a_layer_error(store, monkeypatch):
    monkeypatch.setattr(layers_mod, "TAR2SQFS_ARGS", ["-c", "nosuchcompressor", "-f"])
    with pytest.raises(LayerError, match="tar2sqfs refused"):
        layer_disk(store, put_layer(store, tar_bytes(reg("a", b"1"))))
    assert leftovers() == []


# Overlay semantics on real mounts (root) ----------------------------------------------------
@pytest.mark.host_root
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="needs root and loop devices")
def test_whiteouts_survive_loop_mount_and_overlay(store, tmp_path):
    lower_layer = layer_disk(
        store,
        put_layer(
            store,
            tar_bytes(
                dir_("etc/"),
                reg("etc/old", b"old"),
                reg("etc/keep", b"keep"),
                dir_("opq/"),
                reg("opq/hidden", b"h"),
                reg("gone", b"g"),
                reg("samename", b"lower"),
                dir_("redo/"),
                reg("redo/lowerfile", b"l"),
            ),
        ),
    )
    upper_layer = layer_disk(store, put_layer(store, tar_bytes(*WHITEOUT_LAYER)))
    with overlay_of(lower_layer, upper_layer, tmp_path) as merged:
        assert sorted(os.listdir(merged / "etc")) == ["keep", "new"]
        assert sorted(os.listdir(merged / "opq")) == ["kept"]
        assert not (merged / "gone").exists()
        assert (merged / "samename").read_bytes() == b"mine"
        assert sorted(os.listdir(merged / "redo")) == ["y"]
        assert (merged / "implicit" / "x").read_bytes() == b"x"
    up = tmp_path / "up"
    # read-only and nodev: the char device of a whiteout cannot be opened
    mount_layer(upper_layer, up)
    try:
        with pytest.raises(OSError):
            (up / "etc" / "new").write_bytes(b"x")
        assert os.stat(up / "etc" / "old").st_rdev == 0
    finally:
        umount_layer(up)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd tool missing")
def test_zstd_with_long_trailer_and_corrupt_zstd(store):
    data = tar_bytes(reg("a", b"1")) + bytes(1 << 20)  # more than a pipe buffer of padding
    sqfs = layer_disk(store, put_layer(store, data, "zstd"))
    assert cat(sqfs, "/a") == b"1"
    packed = subprocess.run(
        ["zstd", "-q", "-c"], input=tar_bytes(reg("a", os.urandom(9000))), capture_output=True, check=True
    ).stdout
    broken = packed[:40] + bytes(len(packed) - 40)
    with pytest.raises(LayerError):
        layer_disk(store, LayerRef(store.put_blob(broken), "x", len(broken)))
    assert leftovers() == [sqfs.name]
