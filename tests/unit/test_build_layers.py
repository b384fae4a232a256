"""The builder's file-system pieces, with fakes: the merged view of layers, the overlay
upper directory → OCI layer conversion (whiteouts, opaque directories), COPY/ADD layers,
the build context and .dockerignore, cache keys. No VM, no store daemon."""

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shim.build import copy as copying
from shim.build.cache import BuildCache, cache_key
from shim.build.context import BuildContext, ContextError, DockerIgnore
from shim.build import diff as build_diff
from shim.build.tree import LayerWriter, RootView, norm
from tests.tarfiles import add_entries

ROOT = os.geteuid() == 0


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def content(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


def layer(path: Path, entries: list) -> Path:
    """entries: (name, kind, data_or_link) with kind d/f/l/h."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add_entries(tar, entries)
    return path


@pytest.fixture(autouse=True)
def state_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "state"))


def view_of(tmp_path: Path, *layers: list) -> RootView:
    from shim.build.tree import listing

    blobs, listings = [], []
    for i, entries in enumerate(layers):
        blob = layer(tmp_path / f"layer{i}.tar", entries)
        blobs.append(blob)
        listings.append(listing(blob, f"{i:064x}"))
    return RootView(blobs, listings)


# ---- RootView ---------------------------------------------------------------------------------
def test_view_applies_whiteouts_and_opaque_dirs(tmp_path):
    view = view_of(
        tmp_path,
        [
            ("etc", "d", None),
            ("etc/passwd", "f", b"root:x:0:0::/root:/bin/sh\n"),
            ("data", "d", None),
            ("data/a", "f", b"a"),
            ("data/b", "f", b"b"),
            ("keep", "d", None),
            ("keep/old", "f", b"old"),
            ("usr/bin/sh", "f", b"#!"),
            ("bin", "l", "usr/bin"),
        ],
        [("data/.wh.a", "f", b""), ("keep/.wh..wh..opq", "f", b""), ("keep/new", "f", b"new")],
    )
    assert "data/a" not in view.nodes and "data/b" in view.nodes
    assert "keep/old" not in view.nodes and "keep/new" in view.nodes
    assert view.nodes["usr"].kind == "d"  # implied parent
    assert view.resolve("/bin/sh") == "usr/bin/sh"
    assert view.resolve("bin", follow_last=False) == "bin"
    assert view.is_dir("/bin") and view.get("/bin/sh").kind == "f"
    assert view.read("/etc/passwd").startswith(b"root:")
    assert view.read("/keep/new") == b"new"
    assert list(view.walk("keep")) == ["keep/new"]


def test_view_whiteout_of_a_directory_removes_its_tree(tmp_path):
    view = view_of(tmp_path, [("d", "d", None), ("d/x", "f", b"x"), ("d/y/z", "f", b"z")], [(".wh.d", "f", b"")])
    assert not any(p == "d" or p.startswith("d/") for p in view.nodes)


def test_view_symlinks_stay_inside_the_view(tmp_path):
    view = view_of(tmp_path, [("escape", "l", "../../../etc"), ("loop", "l", "loop")])
    assert view.resolve("/escape/passwd") == "etc/passwd"
    with pytest.raises(Exception, match="too many levels"):
        view.resolve("/loop/x")


def test_view_reads_hardlinks(tmp_path):
    view = view_of(tmp_path, [("a", "f", b"data"), ("b", "h", "a")])
    assert view.read("/b") == b"data"


def test_norm():
    assert norm("/a//b/./c/") == "a/b/c"
    assert norm("../../x") == "x"
    assert norm("/") == ""


# ---- upper directory → layer ------------------------------------------------------------------
needs_root = pytest.mark.skipif(not ROOT, reason="whiteouts are char devices: mknod needs root")


def _xattr_ok(path: Path) -> bool:
    try:
        os.setxattr(path, "trusted.vmshim-test", b"1")
        return True
    except OSError:
        return False


def write_upper(upper: Path, writer: LayerWriter, base: RootView | None = None) -> int:
    """The whole RUN-step path without a VM: the agent's tar of *upper*
    (guest.runtime.diff), the host's check, the host's rewrite."""
    from guest.runtime import diff as guest_diff

    spool = writer.path.with_name(writer.path.name + ".spool")
    with open(spool, "wb") as f:
        r, w = os.pipe()
        assert guest_diff.write_tar(str(upper), f.fileno(), w) == 0
        os.close(w)
        os.close(r)
    build_diff.check(spool)
    return build_diff.write_layer(spool, writer, base)


@needs_root
def test_upper_whiteouts_and_opaque_directories(tmp_path):
    upper = tmp_path / "upper"
    (upper / "data").mkdir(parents=True)
    os.mknod(upper / "data" / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "data" / "new").write_bytes(b"new")
    (upper / "opq").mkdir()
    (upper / "opq" / "only").write_bytes(b"1")
    (upper / "link").symlink_to("data/new")
    os.link(upper / "data" / "new", upper / "hard")
    opaque = _xattr_ok(upper / "opq")
    if opaque:
        os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    out = tmp_path / "layer.tar"
    writer = LayerWriter(out)
    count = write_upper(upper, writer)
    digest = writer.close()
    m = members(out)
    assert "data/.wh.gone" in m and m["data/.wh.gone"].isreg() and m["data/.wh.gone"].size == 0
    assert "data/gone" not in m
    assert m["link"].issym() and m["link"].linkname == "data/new"
    assert m["hard"].islnk() or m["data/new"].islnk()
    assert content(out, "data/new") == b"new"
    if opaque:
        assert "opq/.wh..wh..opq" in m
        assert not any("trusted.overlay" in k for k in m["opq"].pax_headers)
    assert count >= 6
    import hashlib

    assert digest == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()


def test_upper_leaves_out_runtime_mount_points_and_untouched_dirs(tmp_path):
    base = view_of(tmp_path, [("etc", "d", None), ("etc/hostname", "f", b"x"), ("tmp", "d", None), ("usr", "d", None)])
    os.chmod(tmp_path, 0o755)
    upper = tmp_path / "upper"
    for d in ("etc", "proc", "dev", "sys", "usr", "newdir"):
        (upper / d).mkdir(parents=True)
    for name in ("etc", "usr", "proc", "dev", "sys"):
        os.chmod(upper / name, 0o755)
    (upper / "etc" / "hosts").write_bytes(b"")  # made by the runtime to mount on
    (upper / "etc" / "resolv.conf").write_bytes(b"")
    (upper / "etc" / "hostname").write_bytes(b"")  # the image has it: a real change
    (upper / "newfile").write_bytes(b"n")
    out = tmp_path / "l.tar"
    writer = LayerWriter(out)
    write_upper(upper, writer, base)
    writer.close()
    names = set(members(out))
    assert names == {"etc", "etc/hostname", "newdir", "newfile"}  # usr: copied up, unchanged


def test_upper_without_etc_in_the_image_leaves_out_the_runtime_etc(tmp_path):
    base = view_of(tmp_path, [("bin", "d", None)])
    os.chmod(tmp_path, 0o755)
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "hosts").write_bytes(b"")
    (upper / "dev" / "sub").mkdir(parents=True)
    (upper / "bin").mkdir()
    (upper / "bin" / "tool").write_bytes(b"t")
    os.chmod(upper / "bin", 0o755)
    out = tmp_path / "l.tar"
    writer = LayerWriter(out)
    write_upper(upper, writer, base)
    writer.close()
    assert set(members(out)) == {"bin", "bin/tool", "dev", "dev/sub"}  # no etc


def test_empty_upper_is_no_change(tmp_path):
    (tmp_path / "upper").mkdir()
    writer = LayerWriter(tmp_path / "l.tar")
    assert write_upper(tmp_path / "upper", writer) == 0
    writer.close()


def test_agent_tar_never_follows_a_symlinked_upper(tmp_path):
    """``upper -> /somewhere``: the agent refuses to open it (O_NOFOLLOW), so nothing of
    the symlink's target can reach a layer."""
    from guest.runtime import diff as guest_diff

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"host secret")
    (tmp_path / "upper").symlink_to(secret)
    r, w = os.pipe()
    with open(tmp_path / "out.tar", "wb") as f:
        assert guest_diff.write_tar(str(tmp_path / "upper"), f.fileno(), w) == 1
    os.close(w)
    assert b"cannot open the writable layer" in os.read(r, 4096)
    os.close(r)
    assert b"host secret" not in (tmp_path / "out.tar").read_bytes()


def test_agent_tar_keeps_symlinks_inside_the_upper_as_links(tmp_path):
    from guest.runtime import diff as guest_diff

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"host secret")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "d").symlink_to(secret)
    spool = tmp_path / "out.tar"
    r, w = os.pipe()
    with open(spool, "wb") as f:
        assert guest_diff.write_tar(str(upper), f.fileno(), w) == 0
    os.close(w)
    os.close(r)
    assert b"host secret" not in spool.read_bytes()
    assert members(spool)["d"].issym()


def hostile_tar(path: Path, entries: list) -> Path:
    """A tar as a hostile agent might send it; entries: (name, kind, data_or_link) with
    kind d/f/l/h, names and link targets as given."""
    with open(path, "wb") as f:
        tar = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)
        add_entries(tar, entries, mode=0o755)
        tar.close()
    return path


@pytest.mark.parametrize(
    "entries, expected",
    [
        ([("../escape", "f", b"x")], "'..'"),
        (([("/etc/cron.d/x", "f", b"x")]), "absolute"),
        ([("d", "l", "/root"), ("d/key", "f", b"x")], "goes through 'd', which is a symlink"),
        ([("a", "f", b"x"), ("a/b", "f", b"y")], "goes through 'a', which is a regular file"),
        ([("h", "h", "/etc/shadow")], "absolute"),
        ([("h", "h", "nothing-before")], "not an earlier entry"),
    ],
)
def test_hostile_diffs_are_refused_with_one_line(tmp_path, entries, expected):
    spool = hostile_tar(tmp_path / "diff.tar", entries)
    with pytest.raises(build_diff.DiffError) as info:
        build_diff.check(spool)
    text = str(info.value)
    assert "\n" not in text and expected in text and text.startswith("the RUN step's changes")


def test_diff_with_too_many_bytes_or_entries_is_refused(tmp_path):
    from shim.images.layers import Limits

    spool = hostile_tar(tmp_path / "diff.tar", [("big", "f", b"x" * 100000)])
    with pytest.raises(build_diff.DiffError, match="more than 50000 bytes"):
        build_diff.check(spool, Limits(max_entries=10, max_bytes=50000))
    spool = hostile_tar(tmp_path / "d2.tar", [(f"f{i}", "f", b"") for i in range(20)])
    with pytest.raises(build_diff.DiffError, match="more than 10 entries"):
        build_diff.check(spool, Limits(max_entries=10, max_bytes=50000))


def test_truncated_diff_is_refused(tmp_path):
    spool = hostile_tar(tmp_path / "diff.tar", [("big", "f", b"x" * 100000)])
    data = spool.read_bytes()
    spool.write_bytes(data[:5000])
    with pytest.raises(build_diff.DiffError, match="corrupt or truncated"):
        build_diff.check(spool)


# ---- build context ----------------------------------------------------------------------------
@pytest.fixture
def ctx(tmp_path):
    root = tmp_path / "ctx"
    (root / "src" / "sub").mkdir(parents=True)
    (root / "src" / "a.txt").write_text("a")
    (root / "src" / "b.log").write_text("b")
    (root / "src" / "sub" / "c.txt").write_text("c")
    (root / ".hidden").write_text("h")
    (root / "node_modules" / "x").mkdir(parents=True)
    (root / "node_modules" / "x" / "i.js").write_text("i")
    (root / "README.md").write_text("r")
    (root / "keep.md").write_text("k")
    (root / "link").symlink_to("/src/a.txt")
    (root / ".dockerignore").write_text("# comment\nnode_modules\n**/*.log\n*.md\n!keep.md\n")
    return BuildContext(root)


def test_dockerignore_rules():
    ig = DockerIgnore(["node_modules", "**/*.log", "*.md", "!keep.md", "/abs/x", "a/**/b"])
    assert ig.excluded("node_modules") and ig.excluded("node_modules/x/i.js")
    assert ig.excluded("deep/down/x.log") and ig.excluded("x.log")
    assert ig.excluded("README.md") and not ig.excluded("keep.md")
    assert not ig.excluded("sub/README.md")  # *.md matches at the top only
    assert ig.excluded("abs/x") and ig.excluded("a/b") and ig.excluded("a/x/y/b")
    assert not DockerIgnore([]).excluded("anything")


def test_context_sources(ctx):
    assert [s.rel for s in ctx.sources("src/*.txt", "COPY")] == ["src/a.txt"]
    assert [s.rel for s in ctx.sources("/src/a.txt", "COPY")] == ["src/a.txt"]
    assert [s.rel for s in ctx.sources(".", "COPY")] == [""]
    assert [s.rel for s in ctx.sources("*", "COPY")] == [".dockerignore", ".hidden", "keep.md", "link", "src"]
    (link,) = ctx.sources("link", "COPY")
    assert link.real == "src/a.txt"  # an absolute link resolves inside the context
    walked = [rel for rel, _ in ctx.walk("")]
    assert "src/b.log" not in walked and "node_modules" not in walked
    assert "README.md" not in walked and "keep.md" in walked and "src/sub/c.txt" in walked


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("../outside", "forbidden path outside the build context"),
        ("src/../../x", "forbidden path outside the build context"),
        ("nothere", "file not found in build context or excluded"),
        ("README.md", "excluded by .dockerignore"),
        ("*.nothing", "no source files were specified"),
    ],
)
def test_context_refusals(ctx, pattern, message):
    with pytest.raises(ContextError, match=message):
        ctx.sources(pattern, "COPY")


# ---- COPY / ADD layers ------------------------------------------------------------------------
def copy_layer(tmp_path, view, plans, dest, workdir="/", **kw) -> dict:
    out = tmp_path / "copy.tar"
    writer = LayerWriter(out)
    copying.write_layer(
        writer,
        view,
        plans,
        dest,
        workdir,
        chown=kw.get("chown"),
        chmod=kw.get("chmod"),
        what="COPY",
        multiple=kw.get("multiple", False),
    )
    writer.close()
    return members(out)


def test_copy_into_symlinked_directory_and_existing_parents(tmp_path, ctx):
    view = view_of(tmp_path, [("usr/bin", "d", None), ("bin", "l", "usr/bin"), ("tmp", "d", None)])
    view.nodes["tmp"].mode = 0o1777
    plans = copying.plan_context(ctx, ["src/a.txt"], "COPY")
    m = copy_layer(tmp_path, view, plans, "/bin/")
    assert "usr/bin/a.txt" in m and "bin" not in m  # never replaces the /bin symlink
    m = copy_layer(tmp_path, view, plans, "/tmp/x/")
    assert m["tmp"].mode == 0o1777 and "tmp/x/a.txt" in m


def test_copy_directory_contents_relative_to_workdir_with_chown(tmp_path, ctx):
    view = view_of(
        tmp_path,
        [
            ("etc/passwd", "f", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/h:/bin/sh\n"),
            ("etc/group", "f", b"root:x:0:\nstaff:x:50:\n"),
        ],
    )
    uid, gid = copying.parse_chown("app", view)
    assert (uid, gid) == (1000, 1001)
    assert copying.parse_chown("app:staff", view) == (1000, 50)
    assert copying.parse_chown("7", view) == (7, 7)
    with pytest.raises(copying.CopyError, match="unable to find user nobody"):
        copying.parse_chown("nobody", view)
    plans = copying.plan_context(ctx, ["src"], "COPY")
    m = copy_layer(tmp_path, view, plans, "dst", "/work", chown=(uid, gid))
    assert {"work", "work/dst", "work/dst/a.txt", "work/dst/sub/c.txt"} <= set(m)
    assert "work/dst/b.log" not in m  # .dockerignore
    assert m["work/dst/a.txt"].uid == 1000 and m["work/dst/sub"].gid == 1001
    assert m["work"].uid == 1000  # made for the copy: owned like the files


def test_copy_several_sources_need_a_directory(tmp_path, ctx):
    view = RootView.empty()
    plans = copying.plan_context(ctx, ["src/a.txt", "keep.md"], "COPY")
    with pytest.raises(copying.CopyError, match="must be a directory and end with a /"):
        copy_layer(tmp_path, view, plans, "/dst", multiple=True)
    m = copy_layer(tmp_path, view, plans, "/dst/", multiple=True, chmod=0o600)
    assert m["dst/a.txt"].mode == 0o600 and "dst/keep.md" in m


def test_copy_onto_a_file_path_fails(tmp_path, ctx):
    view = view_of(tmp_path, [("file", "f", b"x")])
    plans = copying.plan_context(ctx, ["src/a.txt"], "COPY")
    with pytest.raises(copying.CopyError, match="not a directory"):
        copy_layer(tmp_path, view, plans, "/file/sub/x")


def test_add_extracts_local_archives(tmp_path, ctx):
    archive = ctx.root / "files.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("./top/one", b"1"), ("two", b"2")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.uid = len(data), 5
            tar.addfile(ti, io.BytesIO(data))
    plans = copying.plan_context(ctx, ["files.tar.gz"], "ADD", extract=True)
    assert plans[0].kind == "archive"
    m = copy_layer(tmp_path, RootView.empty(), plans, "/opt/")
    assert {"opt", "opt/top/one", "opt/two"} <= set(m) and m["opt/two"].uid == 5
    # COPY does not extract
    plans = copying.plan_context(ctx, ["files.tar.gz"], "COPY")
    assert plans[0].kind == "file"


def test_add_refuses_archive_entries_that_escape(tmp_path, ctx):
    archive = ctx.root / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        ti = tarfile.TarInfo("../../etc/evil")
        ti.size = 1
        tar.addfile(ti, io.BytesIO(b"x"))
    plans = copying.plan_context(ctx, ["evil.tar"], "ADD", extract=True)
    with pytest.raises(copying.CopyError, match="leads outside"):
        copy_layer(tmp_path, RootView.empty(), plans, "/opt/")


def test_add_url_unreachable_is_a_clear_error(tmp_path):
    with pytest.raises(ContextError, match="ADD failed: cannot fetch http://127.0.0.1:9/x"):
        copying.plan_url("http://127.0.0.1:9/x", tmp_path, "ADD")


def test_copy_from_another_image(tmp_path):
    src = view_of(tmp_path, [("out", "d", None), ("out/bin", "f", b"ELF"), ("out/lib/x.so", "f", b"so")])
    plans = copying.plan_image(src, ["/out"], "COPY", "builder")
    out = tmp_path / "from.tar"
    writer = LayerWriter(out)
    copying.write_layer(
        writer,
        RootView.empty(),
        plans,
        "/app",
        "/",
        chown=None,
        chmod=None,
        what="COPY",
        multiple=False,
        open_view_files=src.open_many,
    )
    writer.close()
    assert content(out, "app/bin") == b"ELF" and content(out, "app/lib/x.so") == b"so"
    with pytest.raises(ContextError, match="not found in builder"):
        copying.plan_image(src, ["/nope"], "COPY", "builder")


# ---- cache ----------------------------------------------------------------------------------
def test_cache_keys_depend_on_parent_instruction_and_inputs(ctx):
    base = cache_key("sha256:p", "RUN x")
    assert base == cache_key("sha256:p", "RUN x")
    assert base != cache_key("sha256:q", "RUN x")
    assert base != cache_key("sha256:p", "RUN y")
    plans = copying.plan_context(ctx, ["src"], "COPY")
    k1 = cache_key("sha256:p", "COPY src /x", [p.key() for p in plans])
    (ctx.root / "src" / "a.txt").write_text("changed")
    plans = copying.plan_context(ctx, ["src"], "COPY")
    k2 = cache_key("sha256:p", "COPY src /x", [p.key() for p in plans])
    assert k1 != k2
    (ctx.root / "src" / "b.log").write_text("ignored files do not count")
    plans = copying.plan_context(ctx, ["src"], "COPY")
    assert cache_key("sha256:p", "COPY src /x", [p.key() for p in plans]) == k2


class FakeStore:
    def __init__(self, blobs):
        self.blobs = set(blobs)

    def has_blob(self, digest):
        return digest in self.blobs


def test_cache_entries_need_their_layers(tmp_path):
    cache = BuildCache(tmp_path / "cache")
    layers = [{"digest": "sha256:" + "a" * 64, "size": 1, "mediaType": "x"}]
    cache.put("k", {"config": {}}, layers)
    assert cache.get("k", FakeStore({"sha256:" + "a" * 64})) == ({"config": {}}, layers)
    assert cache.get("k", FakeStore(set())) is None  # its layer was garbage-collected
    assert cache.get("other", FakeStore(set())) is None


# ---- the diff stream from the agent -----------------------------------------------------------
class FakeAgent:
    """An agent channel that answers ``diff`` with the given messages."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []

    def send(self, type, payload=b"", **fields):
        self.sent.append((type, fields))

    def recv(self, timeout=None):
        from shim.errors import AgentError

        if not self.replies:
            raise AgentError("the agent did not answer")
        return self.replies.pop(0)


def _msg(type, payload=b"", **fields):
    from guest.protocol import Message

    return Message(type, fields, payload)


def test_fetch_diff_spools_the_stream_and_passes_warnings(tmp_path):
    from guest import protocol
    from guest.spec import BootConfig, ProcessSpec
    from shim.build import runner

    boot = BootConfig(container_id="c", token="t", hostname="h", process=ProcessSpec(args=["x"]), layer_count=0)
    agent = FakeAgent(
        [
            _msg(protocol.HELLO),
            _msg(protocol.STARTED, id=2, pid=5),
            _msg(protocol.STDOUT, b"abc", id=2),
            _msg(protocol.STDOUT, b"zzz", id=1),
            _msg(protocol.STDERR, b"/dev/x: device nodes \x1b[31m\n", id=2),
            _msg(protocol.STDOUT, b"def", id=2),
            _msg(protocol.EXIT, id=2, code=0),
        ]
    )
    warnings = []
    runner._fetch_diff(agent, boot, tmp_path / "spool", warnings.append)
    assert (tmp_path / "spool").read_bytes() == b"abcdef"
    assert warnings == ["/dev/x: device nodes ?[31m"]
    assert agent.sent == [(protocol.DIFF, {"token": "t", "id": 2})]


@pytest.mark.parametrize(
    "replies, error, text",
    [
        ([("started",), ("stdout", b"x" * 600), ("stdout", b"x" * 600)], "DiffError", "larger than 1000"),
        ([("error",)], "DiffError", "cannot send the RUN step's changes: nope"),
        (
            [("started",), ("stderr", b"cannot open the writable layer\n"), ("exit", 1)],
            "DiffError",
            "could not send the RUN step's changes: cannot open the writable layer",
        ),
        ([("started",), ("stdout", b"x", [2])], "AgentError", "broke the protocol"),
        ([("started",), ("stdout", b"x")], "AgentError", "did not answer"),
    ],
)
def test_fetch_diff_refuses_what_a_hostile_agent_sends(tmp_path, replies, error, text):
    from guest import protocol
    from guest.spec import BootConfig, ProcessSpec
    from shim.build import runner

    def make(kind, extra=None, ident=2):
        if kind == "started":
            return _msg(protocol.STARTED, id=2, pid=5)
        if kind == "error":
            return _msg(protocol.ERROR, id=2, message="nope")
        if kind == "exit":
            return _msg(protocol.EXIT, id=2, code=extra)
        return _msg(kind, extra, id=ident)

    boot = BootConfig(container_id="c", token="t", hostname="h", process=ProcessSpec(args=["x"]), layer_count=0)
    agent = FakeAgent([make(*r) for r in replies])
    with pytest.raises(Exception) as info:
        runner._fetch_diff(agent, boot, tmp_path / "spool", lambda _: None, limit=1000)
    assert type(info.value).__name__ == error and text in str(info.value)
