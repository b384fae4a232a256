"""The builder's orchestration with a fake RUN step (no VM, no namespaces): step lines,
image IDs, the cache, config-only steps, COPY layers, multi-stage, --target, build args,
ONBUILD, tagging, and what a failure leaves behind."""

import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from shim.build import builder as builder_mod
from shim.build.builder import BuildOptions, BuildOutput, Builder
from shim.build.errors import BuildError
from shim.build.runner import RunStepError, StepResult
from shim.build.tree import LayerWriter
from shim.images.store import ImageStore
from tests.tarfiles import add_entries


class Recorder(BuildOutput):
    run_fd = None

    def __init__(self):
        self.lines = []

    def step(self, number, total, text):
        self.lines.append(f"Step {number}/{total} : {text}")

    def line(self, text):
        self.lines.append(text)

    def warn(self, text):
        self.lines.append(f"[Warning] {text}")


MEETING = threading.Barrier(2, timeout=5)


class FakeRunner:
    """Stands in for StepRunner: ``RUN touch PATH`` adds a file, ``RUN fail`` fails,
    anything else changes nothing. Records the process specs it was given."""

    def __init__(self, store, **_):
        self.store = store
        self.calls = []
        self._lock = threading.Lock()  # stages run in threads: each call gets its own number

    def run(self, layers, process, base, *, out_fd, container_id=None, announce=None, mounts=None):
        with self._lock:
            self.calls.append(process)
            number = len(self.calls)
        self.mounts = getattr(self, "mounts", []) + [mounts]
        if mounts is not None:  # what the step would see, while it runs
            self.seen = [(r.type, r.target, r.readonly, _look(r)) for r in mounts.requests]
        cid = f"{number:064x}"
        if announce:
            announce(cid)
        command = process.args[-1]
        if command == "meet":  # both independent stages' steps run at the same time
            try:
                MEETING.wait()
            except threading.BrokenBarrierError:
                raise RunStepError("nobody came to the meeting", 1) from None
        if command == "fail":
            raise RunStepError("The command 'fail' returned a non-zero code: 2", 2, b"boom\n")
        if command.startswith("touch "):
            work = self.store.root / "tmp"
            work.mkdir(exist_ok=True)
            out = work / f"fake-{number}.tar"
            writer = LayerWriter(out)
            name = command.split()[1].lstrip("/")
            writer.add_file(name, b"x", 1)
            digest = writer.close()
            return StepResult(cid, out, digest, 1)
        return StepResult(cid, None, None, 0)


def _look(request):
    """What a mount shows: a bind's file bytes, or {relative path: bytes or None} of
    its directory; a volume's name."""
    if request.type != "bind":
        return request.source
    source = Path(request.source)
    if source.is_file():
        return source.read_bytes()
    return {str(p.relative_to(source)): (p.read_bytes() if p.is_file() else None) for p in sorted(source.rglob("*"))}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "state"))
    store = ImageStore()
    base = tmp_path / "base.tar"
    with tarfile.open(base, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/passwd", b"root:x:0:0::/root:/bin/sh\nu:x:7:8::/:/bin/sh\n"), ("bin/sh", b"#!")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    store.import_image([base], {"config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]}}, "base:1")
    monkeypatch.setattr(builder_mod, "StepRunner", FakeRunner)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    return store, ctx


def run_build(ctx: Path, dockerfile: str, **options):
    (ctx / "Dockerfile").write_text(dockerfile)
    out = Recorder()
    b = Builder(BuildOptions(context=ctx, **options), out)
    result = b.build()
    return result, out.lines, b


def _app(ctx, metadata: str) -> str:
    """Writes app.txt into the context *ctx*; a Dockerfile of seven steps that copies it,
    the sixth being *metadata* (an instruction that only changes the config)."""
    (ctx / "app.txt").write_text("app")
    return f'FROM base:1\nENV A=1\nWORKDIR /srv\nCOPY app.txt .\nRUN touch /made\n{metadata}\nCMD ["cat", "app.txt"]\n'


def test_steps_ids_and_an_all_cached_rebuild(env):
    store, ctx = env
    dockerfile = _app(ctx, "EXPOSE 8080")
    result, lines, b = run_build(ctx, dockerfile, tags=["app:1"])
    assert lines[0] == "Step 1/7 : FROM base:1"
    assert lines[-1] == f" ---> {result.image_id[7:19]}"
    assert lines.count(" ---> Using cache") == 0
    assert any(line.startswith(" ---> Running in ") for line in lines)
    image = store.resolve("app:1")
    assert image.config_digest == result.image_id
    cfg = image.config["config"]
    assert cfg["Env"] == ["PATH=/bin", "A=1"] and cfg["WorkingDir"] == "/srv"
    assert cfg["ExposedPorts"] == {"8080/tcp": {}} and cfg["Cmd"] == ["cat", "app.txt"]
    assert len(image.layers) == 4  # base, WORKDIR (made /srv), COPY, RUN
    assert len(image.config["history"]) == 6  # one per step (the fake base has none)
    spec = b.runner.calls[0]
    assert spec.cwd == "/srv" and "A=1" in spec.env and spec.args == ["/bin/sh", "-c", "touch /made"]

    again, lines, b = run_build(ctx, dockerfile, tags=["app:1"])
    assert again.image_id == result.image_id
    assert lines.count(" ---> Using cache") == 6 and b.runner.calls == []

    (ctx / "app.txt").write_text("changed")
    third, lines, b = run_build(ctx, dockerfile, tags=["app:1"])
    assert third.image_id != result.image_id
    assert lines.count(" ---> Using cache") == 2 and len(b.runner.calls) == 1


def test_workdir_that_exists_is_config_only(env):
    store, ctx = env
    result, _, _ = run_build(ctx, "FROM base:1\nWORKDIR /etc\n", tags=["w:1"])
    assert len(store.resolve("w:1").layers) == 1


def test_multi_stage_target_and_copy_from(env):
    store, ctx = env
    dockerfile = (
        "FROM base:1 AS one\nRUN touch /artifact\n"
        "FROM base:1 AS two\nCOPY --from=one /artifact /copied\n"
        'FROM two\nCMD ["true"]\n'
    )
    result, lines, _ = run_build(ctx, dockerfile, tags=["ms:1"])
    assert "Step 3/6 : FROM base:1 AS two" in lines
    image = store.resolve("ms:1")
    with tarfile.open(store.blob_path(image.layers[-1].digest)) as tar:
        assert tar.getnames() == ["copied"]
    result, lines, _ = run_build(ctx, dockerfile, tags=["ms:one"], target="one")
    assert lines[0] == "Step 1/2 : FROM base:1 AS one" and len(lines) < 8
    assert len(store.resolve("ms:one").layers) == 2


def test_build_args_scope_and_unused_warning(env):
    store, ctx = env
    dockerfile = "ARG TAG=1\nFROM base:$TAG\nARG WHO=world\nARG TAG\nLABEL who=$WHO tag=$TAG\nRUN echo $WHO\n"
    _, lines, b = run_build(ctx, dockerfile, tags=["args:1"], build_args={"WHO": "vm", "NOPE": "x"})
    labels = store.resolve("args:1").config["config"]["Labels"]
    assert labels == {"who": "vm", "tag": "1"}
    assert "WHO=vm" in b.runner.calls[0].env and "TAG=1" in b.runner.calls[0].env
    assert "WHO=vm" not in store.resolve("args:1").config["config"]["Env"]
    assert "[Warning] One or more build-args [NOPE] were not consumed" in lines
    # a different value of a build arg is a different RUN
    _, lines, b = run_build(ctx, dockerfile, tags=["args:2"], build_args={"WHO": "other"})
    assert len(b.runner.calls) == 1


def test_onbuild_is_stored_and_triggered_once(env):
    store, ctx = env
    run_build(ctx, "FROM base:1\nONBUILD RUN touch /triggered\n", tags=["parent:1"])
    assert store.resolve("parent:1").config["config"]["OnBuild"] == ["RUN touch /triggered"]
    _, lines, b = run_build(ctx, 'FROM parent:1\nCMD ["x"]\n', tags=["child:1"])
    assert "# Executing 1 build trigger" in lines and len(b.runner.calls) == 1
    child = store.resolve("child:1")
    assert "OnBuild" not in child.config["config"]


def test_config_instructions(env):
    store, ctx = env
    dockerfile = """\
FROM base:1
LABEL a=1 "b c"="d e"
USER u
STOPSIGNAL SIGINT
VOLUME ["/data", "/logs"]
HEALTHCHECK --interval=10s --retries=3 CMD ["check"]
SHELL ["/bin/bash", "-c"]
ENTRYPOINT run me
MAINTAINER someone
"""
    run_build(ctx, dockerfile, tags=["cfg:1"])
    image = store.resolve("cfg:1")
    cfg = image.config["config"]
    assert cfg["Labels"] == {"a": "1", "b c": "d e"} and cfg["User"] == "u"
    assert cfg["StopSignal"] == "SIGINT" and cfg["Volumes"] == {"/data": {}, "/logs": {}}
    assert cfg["Healthcheck"] == {"Test": ["CMD", "check"], "Interval": 10_000_000_000, "Retries": 3}
    assert cfg["Shell"] == ["/bin/bash", "-c"]
    assert cfg["Entrypoint"] == ["/bin/bash", "-c", "run me"]
    assert "Cmd" not in cfg  # ENTRYPOINT resets the CMD inherited from the base
    assert image.config["author"] == "someone"
    assert all(h.get("empty_layer") for h in image.config["history"][1:])
    assert len(image.layers) == 1


def test_copy_chown_by_name_uses_the_images_passwd(env):
    store, ctx = env
    (ctx / "f").write_text("f")
    run_build(ctx, "FROM base:1\nCOPY --chown=u f /f\n", tags=["own:1"])
    image = store.resolve("own:1")
    with tarfile.open(store.blob_path(image.layers[-1].digest)) as tar:
        member = tar.getmember("f")
    assert (member.uid, member.gid) == (7, 8)


def test_failed_step_stores_nothing_and_tags_nothing(env):
    store, ctx = env
    blobs = set(store.blobs_dir.iterdir())
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN fail\n")
    with pytest.raises(RunStepError, match="returned a non-zero code: 2"):
        Builder(BuildOptions(context=ctx, tags=["bad:1"]), Recorder()).build()
    assert set(store.blobs_dir.iterdir()) == blobs
    assert not [p for p in (store.root / "tmp").iterdir() if p.name.startswith("build-")]
    with pytest.raises(Exception):
        store.resolve("bad:1")


def test_untagged_builds_can_be_found_by_id(env):
    store, ctx = env
    result, _, _ = run_build(ctx, "FROM base:1\nENV X=1\n")
    assert store.resolve(result.image_id[7:19]).config_digest == result.image_id


@pytest.mark.parametrize(
    "dockerfile, message",
    [
        ("FROM nothere:1\n", "not found in the local store"),
        ("FROM base:1\nCOPY --from=9 /a /b\n", "no earlier stage 9"),
        ("FROM base:1\nCOPY a\n", "needs at least one source"),
        ("FROM base:1\nWORKDIR /etc/passwd/x\n", "not a directory"),
    ],
)
def test_errors(env, dockerfile, message, monkeypatch):
    store, ctx = env
    monkeypatch.setenv("VMSHIM_REGISTRY_RETRIES", "0")
    monkeypatch.setenv("VMSHIM_REGISTRY_BACKOFF", "0")
    with pytest.raises(BuildError, match=message):
        run_build(ctx, dockerfile)


def test_env_substitution_and_forms(env):
    store, ctx = env
    dockerfile = (
        "FROM base:1\nENV PATH=$PATH:/opt/bin LEGACY_OK=1\nENV NAME a value with spaces\n"
        "ENV A=1 B=$A\nENV C=\"${NAME:-x}\" D='$A'\nWORKDIR /w/$A\n"
    )
    run_build(ctx, dockerfile, tags=["env:1"])
    cfg = store.resolve("env:1").config["config"]
    env_map = dict(e.split("=", 1) for e in cfg["Env"])
    assert env_map["PATH"] == "/bin:/opt/bin" and env_map["LEGACY_OK"] == "1"
    assert env_map["NAME"] == "a value with spaces"
    assert env_map["B"] == ""  # docker: a line's values see the environment before it
    assert env_map["C"] == "a value with spaces" and env_map["D"] == "$A"
    assert cfg["WorkingDir"] == "/w/1"


def layer_files(store, ref: str) -> dict[str, bytes]:
    """Regular files of every layer of *ref*: name → content (later layers win)."""
    out = {}
    for desc in store.resolve(ref).layers:
        with tarfile.open(store.blob_path(desc.digest)) as tar:
            for m in tar:
                if m.isreg():
                    out[m.name] = tar.extractfile(m).read()
    return out


def test_heredocs_in_run_and_copy_and_syntax_ignored(env):
    store, ctx = env
    dockerfile = (
        "# syntax=docker/dockerfile:1.7\n"
        "FROM base:1\nENV NAME=world\n"
        "RUN <<EOF\necho one\necho two\nEOF\n"
        "RUN cat <<-'A' > /x && cat <<B > /y\n\tkeep $X\n\tA\nplain\nB\n"
        "COPY <<greeting.txt <<raw.txt /srv/\nhello $NAME\ngreeting.txt\n"
        "$NAME stays\nraw.txt\n"
        "COPY <<'quoted' /srv/q\n$NAME\nquoted\n"
        'CMD ["true"]\n'
    )
    result, lines, b = run_build(ctx, dockerfile, tags=["h:1"])
    assert lines[0] == "Step 1/7 : FROM base:1"
    assert b.runner.calls[0].args == ["/bin/sh", "-c", "echo one\necho two\n"]
    assert b.runner.calls[1].args[-1] == ("cat <<-'A' > /x && cat <<B > /y\nkeep $X\nA\nplain\nB\n")
    files = layer_files(store, "h:1")
    assert files["srv/greeting.txt"] == b"hello world\n"
    assert files["srv/raw.txt"] == b"world stays\n"
    assert files["srv/q"] == b"$NAME\n"
    again, lines, _ = run_build(ctx, dockerfile, tags=["h:1"])
    assert again.image_id == result.image_id
    changed = dockerfile.replace("hello $NAME", "hi $NAME")
    third, lines, _ = run_build(ctx, changed, tags=["h:1"])
    assert third.image_id != result.image_id


@pytest.mark.parametrize(
    "dockerfile, message",
    [
        ("FROM base:1\nRUN <<EOF\necho never closed\n", "the heredoc <<EOF is not closed"),
        ("FROM base:1\nRUN echo a && \\\n  cat <<EOF\nx\nEOF\n", "must start on the RUN line"),
    ],
)
def test_bad_heredocs_are_one_line_errors(env, dockerfile, message):
    _, ctx = env
    with pytest.raises(BuildError, match=message):
        run_build(ctx, dockerfile)


def test_proxy_args_reach_run_but_not_history_or_cache_key(env):
    store, ctx = env
    dockerfile = "FROM base:1\nRUN touch /p\n"
    result, lines, b = run_build(ctx, dockerfile, tags=["p:1"], build_args={"HTTP_PROXY": "http://proxy:3128"})
    assert "HTTP_PROXY=http://proxy:3128" in b.runner.calls[0].env
    assert not any("not consumed" in line for line in lines)
    history = store.resolve("p:1").config["history"]
    assert not any("proxy" in h.get("created_by", "") for h in history)
    again, lines, b = run_build(ctx, dockerfile, tags=["p:1"], build_args={"HTTP_PROXY": "http://other:3128"})
    assert again.image_id == result.image_id and b.runner.calls == []  # not in the key


def test_labels_go_on_the_final_image_only(env):
    store, ctx = env
    dockerfile = "FROM base:1 AS a\nRUN touch /a\nFROM base:1\nLABEL kept=yes\n"
    result, _, _ = run_build(ctx, dockerfile, tags=["l:1"], labels={"org.x": "1", "kept": "no"})
    labels = store.resolve("l:1").config["config"]["Labels"]
    assert labels == {"kept": "no", "org.x": "1"}  # the flag wins, like docker
    again, _, _ = run_build(ctx, dockerfile, tags=["l:1"], labels={"org.x": "1", "kept": "no"})
    assert again.image_id == result.image_id


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_run_mounts_cache_secret_tmpfs(env, tmp_path):
    store, ctx = env
    secret = tmp_path / "token.txt"
    secret.write_text("s3cr3t-value")
    dockerfile = (
        "FROM base:1\nWORKDIR /app\n"
        "RUN --mount=type=cache,target=.npm --mount=type=secret,id=tok "
        "--mount=type=tmpfs,target=/scratch,size=1048576 touch /done\n"
    )
    result, lines, b = run_build(ctx, dockerfile, tags=["m:1"], secrets={"tok": secret})
    seen = b.runner.seen
    assert seen[0][:3] == ("volume", "/app/.npm", False)
    assert seen[0][3].startswith("buildcache-vm-")
    assert seen[1] == ("bind", "/run/secrets/tok", True, b"s3cr3t-value")
    assert seen[2][:2] == ("tmpfs", "/scratch")
    assert {"run/secrets/tok", "run/secrets", "run", "app/.npm", "scratch"} <= b.runner.mounts[-1].mount_points
    assert not any(p.name.startswith("secret-") for p in b._work.iterdir()) if b._work and b._work.exists() else True
    config = store.resolve("m:1").config
    assert "s3cr3t" not in json.dumps(config)
    assert any("--mount=type=secret,id=tok" in h["created_by"] for h in config["history"])
    for entry in (store.root / "..").resolve().rglob("*.json"):
        assert b"s3cr3t" not in entry.read_bytes()  # nothing stored, cache included
    # another secret value: the same cache key (like docker), so the step is cached
    secret.write_text("other")
    again, lines, b = run_build(ctx, dockerfile, tags=["m:1"], secrets={"tok": secret})
    assert again.image_id == result.image_id and b.runner.calls == []


def test_a_required_secret_that_was_not_given_fails_clearly(env):
    _, ctx = env
    with pytest.raises(BuildError, match="secret 'tok' is required"):
        run_build(ctx, "FROM base:1\nRUN --mount=type=secret,id=tok,required true\n")


def test_mount_points_of_a_step_stay_out_of_its_layer(tmp_path):
    from shim.build import diff as build_diff

    spool = tmp_path / "d.tar"
    with tarfile.open(spool, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (("run", "d"), ("run/secrets", "d"), ("run/secrets/tok", "f"), ("cache", "d"), ("made", "f")):
            ti = tarfile.TarInfo(name)
            if kind == "d":
                ti.type = tarfile.DIRTYPE
            data = b"x" if name == "made" else b""
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if kind == "f" else None)
    out = tmp_path / "l.tar"
    writer = LayerWriter(out)
    build_diff.write_layer(spool, writer, None, mount_points={"run", "run/secrets", "run/secrets/tok", "cache"})
    writer.close()
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["made"]


@pytest.mark.parametrize(
    "spec, mode, is_dir, expected",
    [
        ("0755", 0o600, False, 0o755),
        ("u+x", 0o644, False, 0o744),
        ("go-w", 0o666, False, 0o644),
        ("a=rX,u+w", 0o700, True, 0o755),
        ("a=rX,u+w", 0o600, False, 0o644),
        ("u=rwx,g=rx,o=", 0o777, False, 0o750),
        ("+x", 0o644, False, 0o755),
    ],
)
def test_chmod_octal_and_symbolic(spec, mode, is_dir, expected):
    from shim.build.copy import parse_chmod

    assert parse_chmod(spec)(mode, is_dir) == expected


def test_copy_chmod_symbolic_link_and_bad_chmod(env):
    store, ctx = env
    (ctx / "tool").write_text("#!/bin/sh\n")
    (ctx / "tool").chmod(0o644)
    run_build(ctx, "FROM base:1\nCOPY --link --chmod=u+x,g-r tool /bin/tool\n", tags=["c:1"])
    with tarfile.open(store.blob_path(store.resolve("c:1").layers[-1].digest)) as tar:
        assert tar.getmember("bin/tool").mode == 0o704
    with pytest.raises(BuildError, match=r"invalid --chmod 'u\+q'"):
        run_build(ctx, "FROM base:1\nCOPY --chmod=u+q tool /bin/tool\n")


def test_add_checksum_verifies_the_download(env, tmp_path):
    import hashlib
    import http.server
    import threading

    store, ctx = env
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.txt").write_bytes(b"payload")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(tmp_path / "www")
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/f.txt"
    good = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    try:
        run_build(ctx, f"FROM base:1\nADD --checksum={good} {url} /f.txt\n", tags=["a:1"])
        with pytest.raises(BuildError, match="the checksum of f.txt is sha256:"):
            run_build(ctx, f"FROM base:1\nADD --checksum=sha256:{'0' * 64} {url} /f.txt\n")
        (ctx / "local").write_text("x")
        with pytest.raises(BuildError, match="only for URL sources"):
            run_build(ctx, f"FROM base:1\nADD --checksum={good} local /f.txt\n")
    finally:
        server.shutdown()


def test_output_local_tar_and_oci(env, tmp_path):
    from shim.build.output import parse_output, write

    store, ctx = env
    (ctx / "app").mkdir()
    (ctx / "app" / "main.txt").write_text("main")
    result, _, _ = run_build(ctx, "FROM base:1\nCOPY app /app\nRUN touch /made\n", tags=["o:1"])
    local = tmp_path / "out-dir"
    write(store, result.image_id, parse_output(f"type=local,dest={local}"))
    assert (local / "app" / "main.txt").read_text() == "main"
    assert (local / "etc" / "passwd").read_text().startswith("root:")
    assert (local / "made").exists()
    write(store, result.image_id, parse_output(f"type=tar,dest={tmp_path / 'fs.tar'}"))
    with tarfile.open(tmp_path / "fs.tar") as tar:
        names = tar.getnames()
        assert "app/main.txt" in names and "made" in names and "etc/passwd" in names
        assert tar.extractfile("app/main.txt").read() == b"main"
    write(store, result.image_id, parse_output(f"type=oci,dest={tmp_path / 'img.tar'}"))
    with tarfile.open(tmp_path / "img.tar") as tar:
        assert "index.json" in tar.getnames() and "oci-layout" in tar.getnames()
    with pytest.raises(BuildError, match="not empty"):
        write(store, result.image_id, parse_output(f"type=local,dest={local}"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("type=zip,dest=x", "invalid --output type 'zip'"),
        ("type=tar", "needs dest=PATH"),
        ("type=tar,dest=-", "needs dest=PATH"),
        ("type=local,dest=d,extra=1", "does not take"),
    ],
)
def test_bad_outputs(spec, message):
    from shim.build.output import parse_output

    with pytest.raises(BuildError, match=message):
        parse_output(spec)


def test_output_local_never_writes_through_an_image_symlink(tmp_path, monkeypatch):
    """An image whose layers say ``esc -> OUTSIDE`` and then ``esc/x``: the file must not
    land in OUTSIDE (fails with a writer that follows the image's symlinks)."""
    from shim.build.output import OutputError, write_local
    from shim.build.tree import listing

    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "state"))
    outside = tmp_path / "outside"
    outside.mkdir()
    blobs, listings = [], []
    for i, entries in enumerate([[("esc", "l", str(outside))], [("esc/x", "f", b"pwned")]]):
        blob = tmp_path / f"l{i}.tar"
        with tarfile.open(blob, "w") as tar:
            add_entries(tar, entries)
        blobs.append(blob)
        listings.append(listing(blob, f"{i:064x}"))
    from shim.build.tree import RootView

    view = RootView(blobs, listings)
    view.nodes["esc/x"] = view.nodes.get("esc/x") or view.nodes["esc"].__class__("f", 0o644, 0, 0, 5, 0, "", 1)
    try:
        write_local(view, tmp_path / "dest")
    except OutputError:
        pass  # refused: fine too
    assert not (outside / "x").exists()
    assert os.path.islink(tmp_path / "dest" / "esc")


def test_run_bind_mounts_context_stage_and_image_never_in_the_layer(env):
    store, ctx = env
    (ctx / "src").mkdir()
    (ctx / "src" / "a.txt").write_text("from the context")
    (ctx / "skip.txt").write_text("ignored")
    (ctx / ".dockerignore").write_text("skip.txt\n")
    dockerfile = (
        "FROM base:1 AS tools\nRUN touch /tool\n"
        "FROM base:1\nWORKDIR /w\n"
        "RUN --mount=type=bind,target=ctx --mount=type=bind,source=src/a.txt,"
        "target=/one.txt,rw --mount=type=bind,from=tools,source=/tool,target=/t "
        "--mount=from=base:1,source=etc,target=/base-etc touch /made\n"
    )
    result, _, b = run_build(ctx, dockerfile, tags=["b:1"])
    seen = b.runner.seen
    assert seen[0][:3] == ("bind", "/w/ctx", True)
    assert seen[0][3]["src/a.txt"] == b"from the context" and "skip.txt" not in seen[0][3]
    assert seen[1] == ("bind", "/one.txt", False, b"from the context")  # rw: a copy
    assert seen[2] == ("bind", "/t", True, b"x")
    assert seen[3][3]["passwd"].startswith(b"root:x:0:0")
    assert {"w/ctx", "one.txt", "t", "base-etc"} <= b.runner.mounts[-1].mount_points
    assert not list(b._work.glob("bind-*")) if b._work.exists() else True
    # unchanged: cached; a bound file changed: the step runs again (content in the key)
    again, _, b = run_build(ctx, dockerfile, tags=["b:1"])
    assert again.image_id == result.image_id and b.runner.calls == []
    (ctx / "src" / "a.txt").write_text("changed")
    third, _, b = run_build(ctx, dockerfile, tags=["b:1"])
    assert third.image_id != result.image_id and len(b.runner.calls) == 1


@pytest.mark.parametrize(
    "mount, message",
    [
        ("type=bind,source=../../etc,target=/x", "outside the build context"),
        ("type=bind,source=nothere,target=/x", "file not found in build context"),
        ("type=bind,from=nostage,source=/,target=/x", "nostage"),
        ("type=bind,source=.,target=/", "target=/ is not allowed"),
        ("type=bind,source=.", "needs target="),
        ("type=bind,target=/x,uid=0", "does not take 'uid'"),
    ],
)
def test_bad_bind_mounts_are_one_line_errors(env, mount, message):
    _, ctx = env
    with pytest.raises(Exception, match=message) as info:
        run_build(ctx, f"FROM base:1\nRUN --mount={mount} true\n")
    assert "\n" not in str(info.value)


def test_bind_materialize_refuses_paths_that_leave_its_directory(tmp_path):
    from shim.build.copy import Entry, SourcePlan
    from shim.build.mounts import MountError, materialize

    for bad in ("../escape", "a/../../b", "/abs", "a//b"):
        plan = SourcePlan("dir", "x", [Entry(bad, "f", 0o644, opener=lambda: io.BytesIO(b""))])
        with pytest.raises(MountError, match="unexpected path"):
            materialize([plan], tmp_path / f"d{len(list(tmp_path.iterdir()))}")
    # a symlink in the source is made, never followed: a file under it is refused
    plan = SourcePlan(
        "dir",
        "x",
        [Entry("l", "l", 0o777, linkname=str(tmp_path)), Entry("l/pwned", "f", 0o644, opener=lambda: io.BytesIO(b"x"))],
    )
    with pytest.raises(MountError, match="not below a directory"):
        materialize([plan], tmp_path / "sym")
    assert not (tmp_path / "pwned").exists()


def test_copy_parents_keeps_the_sources_directories(env):
    store, ctx = env
    for rel in ("x/a.txt", "y/a.txt", "y/sub/b.txt", "deep/er/c.txt"):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(rel)
    os.chmod(ctx / "deep", 0o750)
    dockerfile = (
        "FROM base:1\nCOPY --parents x/a.txt y/*.txt /p/\n"
        "COPY --parents y/sub deep/./er/c.txt /q/\nCOPY x/a.txt y/sub /plain/\n"
    )
    run_build(ctx, dockerfile, tags=["p:1"])
    layers = store.resolve("p:1").layers
    names = []
    for layer in layers[1:]:
        with tarfile.open(store.blob_path(layer.digest)) as tar:
            names.append({m.name: m for m in tar.getmembers()})
    assert {n for n, m in names[0].items() if m.isfile()} == {"p/x/a.txt", "p/y/a.txt"}
    assert {n for n, m in names[1].items() if m.isfile()} == {"q/y/sub/b.txt", "q/er/c.txt"}
    assert "q/deep" not in names[1]
    assert {n for n, m in names[2].items() if m.isfile()} == {"plain/a.txt", "plain/b.txt"}
    with pytest.raises(BuildError, match="outside the build context"):
        run_build(ctx, "FROM base:1\nCOPY --parents ../x /p/\n")


PARALLEL = """\
FROM base:1 AS a
RUN meet
RUN touch /a
FROM base:1 AS b
RUN meet
RUN touch /b
FROM base:1
COPY --from=a /a /a
COPY --from=b /b /b
"""


def test_independent_stages_run_at_the_same_time(env):
    store, ctx = env
    MEETING.reset()
    result, lines, b = run_build(ctx, PARALLEL, tags=["par:1"], jobs=2)
    assert len([c for c in b.runner.calls if c.args[-1] == "meet"]) == 2
    # the last stage waited for both: their files are in it; steps keep their numbers
    names = set()
    for layer in store.resolve("par:1").layers[1:]:
        with tarfile.open(store.blob_path(layer.digest)) as tar:
            names |= set(tar.getnames())
    assert {"a", "b"} <= names
    assert sorted(ln for ln in lines if ln.startswith("Step ")) == sorted(
        f"Step {n}/9 : {t}" for n, t in enumerate(PARALLEL.splitlines(), 1)
    )
    # one job at a time: the first stage waits alone and fails, the build fails
    MEETING.reset()
    with pytest.raises(RunStepError, match="nobody came"):
        run_build(ctx, PARALLEL.replace("RUN touch /a", "RUN touch /a2"), no_cache=True, jobs=1)
    MEETING.reset()


def test_cache_from_an_image_history_gives_the_same_image(env):
    store, ctx = env
    dockerfile = _app(ctx, "MAINTAINER me")
    first, _, _ = run_build(ctx, dockerfile, tags=["cf:1"])
    history = store.resolve("cf:1").config["history"]
    assert all(h["comment"].startswith("vmshim.build cache-key ") for h in history)
    shutil.rmtree(store.root.parent / "build" / "cache")  # another machine: no local cache
    again, lines, b = run_build(ctx, dockerfile, tags=["cf:2"], cache_from=["cf:1"])
    assert again.image_id == first.image_id and b.runner.calls == []
    assert lines.count(" ---> Using cache") == 6
    # without it every step runs; a change re-runs from the changed step on
    shutil.rmtree(store.root.parent / "build" / "cache")
    _, lines, b = run_build(ctx, dockerfile, tags=["cf:3"])
    assert lines.count(" ---> Using cache") == 0 and len(b.runner.calls) == 1
    shutil.rmtree(store.root.parent / "build" / "cache")
    (ctx / "app.txt").write_text("changed")
    _, lines, b = run_build(ctx, dockerfile, tags=["cf:4"], cache_from=["cf:1"])
    assert lines.count(" ---> Using cache") == 2 and len(b.runner.calls) == 1


def test_cache_from_ignores_what_it_cannot_use(env):
    store, ctx = env
    dockerfile = "FROM base:1\nRUN touch /made\n"
    run_build(ctx, dockerfile, tags=["h:1"])
    config = json.loads(json.dumps(store.resolve("h:1").config))
    config["history"][0]["comment"] = "vmshim.build cache-key ../../../etc/passwd"
    store.import_image([], config, "hostile:1")
    shutil.rmtree(store.root.parent / "build" / "cache")
    _, lines, b = run_build(ctx, dockerfile, cache_from=["hostile:1", "missing.invalid/x:9"])
    assert len(b.runner.calls) == 1
    assert any("--cache-from missing.invalid/x:9: not used" in ln for ln in lines)
