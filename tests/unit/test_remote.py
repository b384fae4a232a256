"""shim.remote without a network: URLs, contexts, the argv pre-scan, verb plans, frames."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from shim.errors import UsageError, VmshimError
from shim.cli.main import cli
from shim.remote import mux
from shim.remote.hook import split_globals
from shim.remote.target import ContextStore, SshTarget, control_dir, parse_host, resolve
from shim.remote.verbs import CONTEXT_PLACEHOLDER, DOCKERFILE_PLACEHOLDER, plan, scan
from tests.tarfiles import add_entries


def test_parse_host():
    assert parse_host("ssh://alice@kvm1:2222") == SshTarget(host="kvm1", user="alice", port=2222)
    assert parse_host("ssh://kvm1") == SshTarget(host="kvm1")
    assert parse_host("ssh://[::1]:22").host == "::1"
    for bad, why in (
        ("tcp://h", "only SSH"),
        ("ssh://h:99999", "port"),
        ("ssh://h/x", "no path"),
        ("ssh://u:pw@h", "passwords"),
        ("ssh://", "expected"),
    ):
        with pytest.raises(UsageError, match=why):
            parse_host(bad)


def test_contexts_store(tmp_path):
    store = ContextStore(tmp_path)
    assert store.current() == "default" and store.target("default") is None
    store.create("lab", "ssh://me@lab:2200", "a lab", "/opt/vmshim/bin/vmshim")
    with pytest.raises(VmshimError, match="already exists"):
        store.create("lab", "ssh://x")
    with pytest.raises(UsageError, match="invalid context name"):
        store.create("default", "ssh://x")
    with pytest.raises(UsageError, match="expected ssh://"):
        store.create("bad", "http://x")
    store.use("lab")
    assert store.current() == "lab"
    target = store.target("lab")
    assert (target.user, target.host, target.port, target.remote_vmshim, target.context) == (
        "me",
        "lab",
        2200,
        "/opt/vmshim/bin/vmshim",
        "lab",
    )
    with pytest.raises(VmshimError, match="in use"):
        store.remove("lab")
    store.remove("lab", force=True)
    assert store.current() == "default" and store.list() == {}
    assert [p.name for p in tmp_path.iterdir()] == ["contexts.json"]  # no temp file left


def test_resolve_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("VMSHIM_HOST", raising=False)
    monkeypatch.delenv("VMSHIM_CONTEXT", raising=False)
    monkeypatch.delenv("VMSHIM_REMOTE_VMSHIM", raising=False)
    assert resolve(None, None, None) is None
    ContextStore().create("lab", "ssh://lab")
    assert resolve(None, None, "lab").host == "lab"
    monkeypatch.setenv("VMSHIM_HOST", "ssh://envhost")
    assert resolve(None, None, "lab").host == "envhost"
    assert resolve("ssh://flag", "/x/vmshim", None) == SshTarget(host="flag", remote_vmshim="/x/vmshim")


def test_control_dir_must_be_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert oct(control_dir().stat().st_mode & 0o777) == "0o700"
    os.chmod(control_dir(), 0o755)
    with pytest.raises(VmshimError, match="mode 0700"):
        control_dir()


def test_split_globals():
    assert split_globals(["--host", "ssh://h", "ps", "-a"]) == ({"--host": "ssh://h"}, ["ps", "-a"])
    assert split_globals(["-H=ssh://h", "--debug", "run", "--host", "x"]) == (
        {"--host": "ssh://h", "--debug": True},
        ["run", "--host", "x"],
    )
    assert split_globals(["-c", "lab", "info"]) == ({"--context": "lab"}, ["info"])


def test_scan_follows_the_commands_own_options():
    from shim.cli.build import build_cmd
    from shim.cli.exec import exec_cmd

    s = scan(build_cmd, ["-t", "x:1", "--file=D", "-q", "ctx"])
    assert s.positionals == [("ctx", 4)]
    assert s.options["tags"] == [("x:1", 1, "")] and s.options["dockerfile"] == [("D", 2, "--file=")]
    s = scan(exec_cmd, ["-it", "box", "sh", "-i"])  # options after the container are the command's
    assert s.options["interactive"] and s.options["tty"]
    assert [p for p, _ in s.positionals] == ["box", "sh", "-i"]


def test_plans(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "Other").write_text("FROM busybox\n")
    p = plan(["build", "-t", "x", "-f", "Other", "ctx"], cli)
    assert p.args == [
        "remote-build-context",
        "--",
        "build",
        "-t",
        "x",
        "-f",
        DOCKERFILE_PLACEHOLDER,
        CONTEXT_PLACEHOLDER,
    ] and callable(p.stdin)
    with pytest.raises(UsageError, match="not a directory"):
        plan(["build", "nope"], cli)
    assert plan(["exec", "box", "cat"], cli).stdin is None
    assert plan(["exec", "-i", "box", "cat"], cli).stdin == "terminal"
    assert plan(["run", "busybox", "sh", "-i"], cli).stdin is None
    (tmp_path / "f").write_text("x")
    p = plan(["cp", "f", "box:/tmp"], cli)
    assert p.args == ["cp", "-", "box:/tmp"] and callable(p.stdin)
    p = plan(["cp", "box:/etc/hostname", "out"], cli)
    assert p.args == ["cp", "box:/etc/hostname", "-"] and p.stdout is not None
    p.finish(1)
    p = plan(["image", "save", "-o", "img.tar", "busybox"], cli)
    assert p.args == ["image", "save", "busybox"]
    assert p.finish(1) == 1 and list(tmp_path.glob(".img.tar*")) == []
    (tmp_path / "img.tar").write_bytes(b"")
    assert plan(["load", "--input=img.tar", "-q"], cli).args == ["load", "-q"]
    assert plan(["attach", "box"], cli).stdin == "terminal"
    assert plan(["attach", "--no-stdin", "box"], cli).stdin is None


def test_frames_round_trip_and_bounds():
    a, b = socket.socketpair()
    with a, b:
        mux.send(a, mux.STDOUT, b"hello")
        mux.send(a, mux.EOF)
        assert mux.recv(b) == (mux.STDOUT, b"hello")
        assert mux.recv(b) == (mux.EOF, b"")
        a.sendall(struct.pack(">cI", b"O", mux.MAX_FRAME + 1))
        with pytest.raises(mux.FrameError, match="larger"):
            mux.recv(b)
        a.sendall(struct.pack(">cI", b"O", 10) + b"abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(mux.FrameError, match="middle"):
            mux.recv(b)


def test_remote_pid_line_is_taken_out_of_the_stream():
    from shim.remote.control import _take_pid_line

    assert _take_pid_line(b"vmshim-remote-") == (b"", None)
    assert _take_pid_line(b"vmshim-remote-pid 42\nerr\n") == (b"err\n", 42)
    assert _take_pid_line(b"typed\r\nvmshim-remote-pid 7\r\nout") == (b"typed\r\nout", 7)
    assert _take_pid_line(b"vmshim-remote-pid x\n") == (b"vmshim-remote-pid x\n", 0)
    assert _take_pid_line(b"y" * 5000) == (b"y" * 5000, 0)


def test_remote_command_quotes_and_marks_its_pid():
    from shim.remote.ssh import remote_command

    line = remote_command(SshTarget("h", remote_vmshim="/opt/v m/vmshim"), ["run", "a b", "$x"], {"COLUMNS": "80"})
    assert line == (
        "printf '%s%d\\n' 'vmshim-remote-pid ' $$ >&2; exec env COLUMNS=80 '/opt/v m/vmshim' run 'a b' '$x'"
    )


def _tar(entries):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_entries(tar, [(name, {"sym": "l", "lnk": "h"}.get(kind, "f"), target) for name, kind, target in entries])
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "entries, why",
    [
        ([("/etc/evil", "file", b"x")], "refusing build context entry"),
        ([("context/../../evil", "file", b"x")], "refusing build context entry"),
        ([("context/out", "sym", "/"), ("context/out/evil", "file", b"x")], "leads outside"),
        ([("context/h", "lnk", "/etc/passwd")], "hard link"),
    ],
)
def test_remote_build_context_refuses_hostile_tars(tmp_path, entries, why):
    from shim.cli.context import _unpack

    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UsageError, match=why):
        _unpack(_tar(entries), root)
    assert not (tmp_path / "evil").exists() and not list(tmp_path.rglob("evil"))


def test_remote_build_context_unpacks_a_normal_context(tmp_path):
    from shim.cli.context import _unpack

    _unpack(
        _tar(
            [
                ("context/a/b.txt", "file", b"hi"),
                ("context/l", "sym", "a/b.txt"),
                ("Dockerfile", "file", b"FROM busybox\n"),
            ]
        ),
        tmp_path,
    )
    assert (tmp_path / "context" / "l").read_text() == "hi"
    assert (tmp_path / "Dockerfile").read_bytes() == b"FROM busybox\n"
