"""``vmshim cp CONTAINER:PATH HOSTDIR``'s extractor against archives a hostile guest crafts.

Every attack here wrote outside the destination (or kept a guest's setuid bit and owner)
with the extractor that used ``tarfile.extract`` after a parent-realpath check."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tracemalloc

import pytest

from shim.containers.copy import CopyLimits, extract
from shim.errors import VmshimError


def _tar(*members) -> io.BytesIO:
    """members: (name, kind, extra) with kind d/f/l/h; extra = data, link target, or a dict
    of TarInfo attributes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, *rest in members:
            extra = rest[0] if rest else None
            attrs = rest[1] if len(rest) > 1 else {}
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            data = None
            if kind == "d":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "f":
                data = extra or b""
                ti.size, ti.mode = len(data), 0o644
            elif kind == "l":
                ti.type, ti.linkname = tarfile.SYMTYPE, extra
            elif kind == "h":
                ti.type, ti.linkname = tarfile.LNKTYPE, extra
            for key, value in attrs.items():
                setattr(ti, key, value)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


@pytest.fixture
def dirs(tmp_path):
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    os.chmod(outside, 0o755)
    return dest, outside


def test_symlink_then_file_of_the_same_name_never_writes_through(dirs):
    dest, outside = dirs
    victim = outside / "cron-x"
    archive = _tar(("foo", "d"), ("foo/link", "l", str(victim)), ("foo/link", "f", b"* * * * * root evil\n"))
    with pytest.raises(VmshimError, match="names it twice"):
        extract(archive, dest, "foo")
    assert not victim.exists()
    assert os.readlink(dest / "foo" / "link") == str(victim)


def test_symlink_then_directory_of_the_same_name_never_chmods_through(dirs):
    dest, outside = dirs
    archive = _tar(
        ("foo", "d"), ("foo/dl", "l", str(outside)), ("foo/dl", "d", None, {"mode": 0o777}), ("foo/dl/x", "f", b"x")
    )
    with pytest.raises(VmshimError, match="names it twice"):
        extract(archive, dest, "foo")
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o755
    assert os.listdir(outside) == []


def test_no_entry_goes_through_a_symlink(dirs):
    dest, outside = dirs
    archive = _tar(("foo", "d"), ("foo/dl", "l", str(outside)), ("foo/dl/x", "f", b"x"))
    with pytest.raises(VmshimError, match="not a directory"):
        extract(archive, dest, "foo")
    assert os.listdir(outside) == []


def test_no_entry_goes_through_a_symlink_already_at_the_destination(dirs):
    dest, outside = dirs
    os.symlink(outside, dest / "foo")
    extract(_tar(("foo", "d"), ("foo/x", "f", b"x")), dest, "foo")
    assert os.listdir(outside) == []
    assert (dest / "foo").is_dir() and not (dest / "foo").is_symlink()
    assert (dest / "foo" / "x").read_bytes() == b"x"


def test_setuid_and_owner_from_the_guest_are_dropped(dirs):
    dest, _ = dirs
    archive = _tar(
        ("foo", "d", None, {"mode": 0o1777, "uid": 4321, "gid": 4321}),
        ("foo/su", "f", b"#!/bin/sh\n", {"mode": 0o6755, "uid": 0, "gid": 0}),
        ("foo/mine", "f", b"x", {"mode": 0o640, "uid": 1234, "gid": 1234}),
    )
    extract(archive, dest, "foo")
    su = os.stat(dest / "foo" / "su")
    assert stat.S_IMODE(su.st_mode) == 0o755
    mine = os.stat(dest / "foo" / "mine")
    assert (mine.st_uid, mine.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(mine.st_mode) == 0o640
    top = os.stat(dest / "foo")
    assert stat.S_IMODE(top.st_mode) == 0o777
    assert top.st_uid == os.getuid()


def test_symlinks_that_climb_out_are_refused_and_absolute_ones_stay_links(dirs):
    dest, outside = dirs
    with pytest.raises(VmshimError, match="leads outside"):
        extract(_tar(("foo", "d"), ("foo/up", "l", "../../outside/x")), dest, "foo")
    with pytest.raises(VmshimError, match="leads outside"):
        extract(_tar(("bar", "d"), ("bar/up", "l", "/../../../etc")), dest, "bar")
    # inside the destination, or absolute (read from the link's directory, as docker): kept
    extract(
        _tar(("baz", "d"), ("baz/etc", "l", "/etc"), ("baz/rel", "l", "../foo"), ("baz/self", "l", "etc/passwd")),
        dest,
        "baz",
    )
    assert os.readlink(dest / "baz" / "etc") == "/etc"
    assert os.readlink(dest / "baz" / "rel") == "../foo"


def test_hard_links_only_to_files_this_copy_wrote(dirs, tmp_path):
    dest, outside = dirs
    (outside / "secret").write_text("s")
    for target in ("foo/missing", "foo/sym", "foo"):
        d = dest / target.replace("/", "_")
        d.mkdir()
        with pytest.raises(VmshimError, match="hard link"):
            extract(_tar(("foo", "d"), ("foo/sym", "l", str(outside / "secret")), ("foo/h", "h", target)), d, "foo")
    with pytest.raises(VmshimError, match="refusing"):
        extract(_tar(("foo", "d"), ("foo/h", "h", "../outside/secret")), dest, "foo")
    assert os.stat(outside / "secret").st_nlink == 1
    ok = dest / "ok"
    ok.mkdir()
    extract(_tar(("foo", "d"), ("foo/a", "f", b"A"), ("foo/b", "h", "foo/a")), ok, "foo")
    assert os.stat(ok / "foo" / "a").st_ino == os.stat(ok / "foo" / "b").st_ino


def test_absolute_and_dotdot_names_are_refused(dirs):
    dest, outside = dirs
    for name in ("/abs", "../up", "foo/../../up"):
        with pytest.raises(VmshimError, match="refusing"):
            extract(_tar((name, "f", b"x")), dest, "x")
    assert os.listdir(outside) == []


def test_an_ordinary_tree_is_copied_with_rename_and_contents_only(tmp_path):
    def archive():
        return _tar(
            ("app", "d", None, {"mode": 0o750}),
            ("app/sub", "d"),
            ("app/sub/f", "f", b"hello", {"mode": 0o600}),
            ("app/l", "l", "sub/f"),
            ("app/h", "h", "app/sub/f"),
        )

    into = tmp_path / "into"
    into.mkdir()
    extract(archive(), into, "app")
    assert (into / "app" / "sub" / "f").read_bytes() == b"hello"
    assert os.readlink(into / "app" / "l") == "sub/f"
    assert stat.S_IMODE(os.stat(into / "app").st_mode) == 0o750
    assert os.stat(into / "app" / "sub" / "f").st_mtime == 1_600_000_000
    extract(archive(), into, "app")  # a second copy over the first replaces its files
    assert (into / "app" / "h").read_bytes() == b"hello"
    renamed = tmp_path / "renamed"
    extract(archive(), renamed, "app")  # dest does not exist: becomes the copy itself
    assert (renamed / "sub" / "f").read_bytes() == b"hello"
    assert os.stat(renamed / "h").st_ino == os.stat(renamed / "sub" / "f").st_ino


def test_entry_and_byte_caps(dirs):
    dest, _ = dirs
    many = _tar(("foo", "d"), *[(f"foo/{i}", "f", b"") for i in range(20)])
    with pytest.raises(VmshimError, match="more than 10 entries"):
        extract(many, dest, "foo", CopyLimits(max_entries=10))
    big = _tar(("bar", "d"), ("bar/a", "f", b"x" * 600), ("bar/b", "f", b"x" * 600))
    with pytest.raises(VmshimError, match="more than 1000 bytes"):
        extract(big, dest, "bar", CopyLimits(max_bytes=1000))
    names = _tar(("baz", "d"), *[(f"baz/{i:03d}{'n' * 200}", "f", b"") for i in range(20)])
    with pytest.raises(VmshimError, match="names in the archive .* more than 2000 bytes"):
        extract(names, dest, "baz", CopyLimits(max_name_bytes=2000))


class _Sparse(io.RawIOBase):
    """A stream of *size* bytes: *head* then zeros, produced lazily."""

    def __init__(self, head: bytes, size: int):
        self.head, self.size, self.pos = head, size, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.size - self.pos)
        chunk = bytearray(n)
        if self.pos < len(self.head):
            part = self.head[self.pos : self.pos + n]
            chunk[: len(part)] = part
        b[:n] = chunk
        self.pos += n
        return n


def pax_bomb(size: int) -> bytes:
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, size
    return ti.tobuf(tarfile.USTAR_FORMAT)


def test_a_pax_header_bomb_is_refused_without_reading_it(dirs):
    dest, _ = dirs
    size = 256 << 20
    tracemalloc.start()
    try:
        with pytest.raises(VmshimError, match="PAX extended header .* cap"):
            extract(io.BufferedReader(_Sparse(pax_bomb(size), size + 1024)), dest, "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
