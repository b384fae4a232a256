"""``.dockerignore`` cannot be bypassed with a symlink to an ignored file: docker never
sends an ignored path, so a symlink to one leads nowhere. The build runs for real through
the CLI (COPY needs no VM), and the resulting image is read back with ``vmshim save``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest

from shim.build.context import BuildContext, ContextError


@pytest.fixture
def ctx_dir(tmp_path):
    root = tmp_path / "ctx"
    (root / "private").mkdir(parents=True)
    (root / "secret.txt").write_text("TOPSECRET\n")
    (root / "private" / "key").write_text("TOPSECRET key\n")
    (root / "public.txt").write_text("public\n")
    (root / "sub").mkdir()
    (root / "link").symlink_to("secret.txt")
    (root / "abslink").symlink_to("/secret.txt")
    (root / "sub" / "up").symlink_to("../secret.txt")
    (root / "dirlink").symlink_to("private")
    (root / "hidden-link").symlink_to("public.txt")  # itself ignored
    (root / "via").symlink_to("hidden-link")
    (root / ".dockerignore").write_text("secret.txt\nprivate\nhidden-link\n")
    return root


@pytest.mark.parametrize("source", ["link", "abslink", "sub/up", "dirlink/key", "dirlink", "via"])
def test_a_symlink_to_an_ignored_path_is_not_in_the_context(ctx_dir, source):
    with pytest.raises(ContextError, match="excluded by .dockerignore"):
        BuildContext(ctx_dir).sources(source, "COPY")


def test_wildcards_skip_symlinks_to_ignored_paths(ctx_dir):
    found = {s.rel for s in BuildContext(ctx_dir).sources("*", "COPY")}
    assert found == {".dockerignore", "public.txt", "sub"}
    with pytest.raises(ContextError, match="matches nothing"):
        BuildContext(ctx_dir).sources("sub/*", "COPY")  # sub/up leads to secret.txt


def test_a_plain_symlink_still_works(ctx_dir):
    (ctx_dir / "ok").symlink_to("public.txt")
    (source,) = BuildContext(ctx_dir).sources("ok", "COPY")
    assert source.real == "public.txt"


def _cli(root, *args, cwd=None):
    env = dict(os.environ, VMSHIM_ROOT=str(root))
    return subprocess.run(
        [sys.executable, "-m", "shim.cli.main", *args], capture_output=True, env=env, cwd=cwd, timeout=120
    )


def test_a_real_build_never_copies_an_ignored_file(ctx_dir, tmp_path):
    state = tmp_path / "state"
    (ctx_dir / "Dockerfile").write_text("FROM scratch\nCOPY link /x\n")
    proc = _cli(state, "build", "-t", "leak", str(ctx_dir))
    assert proc.returncode != 0
    assert b"excluded by .dockerignore: link" in proc.stderr
    # a directory copy carries the symlinks as symlinks, never the ignored content
    (ctx_dir / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    proc = _cli(state, "build", "-t", "whole", str(ctx_dir))
    assert proc.returncode == 0, proc.stderr
    saved = _cli(state, "save", "whole")
    assert saved.returncode == 0, saved.stderr
    outer = tarfile.open(fileobj=io.BytesIO(saved.stdout))
    names, blobs = set(), b""
    for member in outer:
        if member.isfile() and member.name.endswith(".tar"):
            layer = tarfile.open(fileobj=outer.extractfile(member))
            for entry in layer:
                names.add(entry.name.lstrip("./"))
                if entry.isfile():
                    blobs += layer.extractfile(entry).read()
    assert b"TOPSECRET" not in blobs
    assert "ctx/secret.txt" not in names and "ctx/private/key" not in names
    assert "ctx/public.txt" in names
