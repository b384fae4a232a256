"""guest.runtime.rootfs helpers that need no mounts, and process helpers that need no root."""

from __future__ import annotations

import os

import pytest

from guest.runtime import process, rootfs
from guest.runtime.process import SpawnError, build_env, spawn_container
from guest.spec import ProcessSpec


def test_secure_join_keeps_symlinks_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").symlink_to("/etc/shadow")  # absolute: re-rooted
    (root / "etc" / "up").symlink_to("../../../../outside")  # climbs: stops at root
    (root / "proc").symlink_to("/")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert rootfs.secure_join(r, "/etc/hosts") == f"{r}/etc/shadow"
    assert rootfs.secure_join(r, "etc/up/x") == f"{r}/outside/x"
    assert rootfs.secure_join(r, "/proc") == r
    assert rootfs.secure_join(r, "/../../etc") == f"{r}/etc"
    assert rootfs.secure_join(r, "/missing/dir") == f"{r}/missing/dir"
    with pytest.raises(OSError):
        rootfs.secure_join(r, "/loop")


def test_prepare_rootfs_writes_files_and_mount_points(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "host-side" / "stub-resolv.conf"
    (root / "etc" / "resolv.conf").symlink_to(outside)  # absolute: must stay in root
    files = tmp_path / "files"
    binds = rootfs.prepare_rootfs(str(root), "box", "", "nameserver 10.0.0.1\n", str(files))
    assert set(binds) == {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}
    assert (files / "hostname").read_text() == "box\n"
    assert "127.0.1.1\tbox" in (files / "hosts").read_text()
    assert (files / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    # Mount points exist inside the rootfs; the symlink was followed inside it only.
    assert (root / "etc" / "hostname").is_file()
    assert (root / str(outside).lstrip("/")).is_file()
    assert not outside.exists()


def test_prepare_rootfs_leaves_resolv_conf_alone_when_empty(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    binds = rootfs.prepare_rootfs(str(root), "h", "1.2.3.4 x\n", "", str(tmp_path / "f"))
    assert "/etc/resolv.conf" not in binds
    assert (tmp_path / "f" / "hosts").read_text() == "1.2.3.4 x\n"


def test_build_env_defaults():
    spec = ProcessSpec(args=["x"], env=["A=1", "PATH=/bin", "EMPTY="], tty=True)
    env = build_env(spec, hostname="box", home="/root")
    assert env == {"A": "1", "PATH": "/bin", "EMPTY": "", "HOSTNAME": "box", "HOME": "/root", "TERM": "xterm"}
    env = build_env(ProcessSpec(args=["x"], env=["HOME=/h"]))
    assert env["PATH"] == process.DEFAULT_PATH and env["HOME"] == "/h" and "TERM" not in env


def _me(args, **kw):
    return ProcessSpec(args=args, user=f"{os.getuid()}:{os.getgid()}", **kw)


def test_spawn_without_namespaces_pipes_and_exit_code(tmp_path):
    spawned = spawn_container(
        None, _me(["sh", "-c", "cat; echo err >&2; exit 5"], cwd=str(tmp_path)), "", None, namespaces=(), stdin=True
    )
    os.write(spawned.stdin, b"in\n")
    os.close(spawned.stdin)
    spawned.stdin = None
    out = b"".join(iter(lambda: os.read(spawned.stdout, 4096), b""))
    err = b"".join(iter(lambda: os.read(spawned.stderr, 4096), b""))
    assert (out, err) == (b"in\n", b"err\n")
    assert process.wait(spawned.pid) == 5
    spawned.close()


def test_spawn_reports_missing_cwd_and_command():
    with pytest.raises(SpawnError) as info:
        spawn_container(None, _me(["true"], cwd="/no/such/dir"), "", None, namespaces=())
    assert info.value.exit_code == 125
    assert "working directory /no/such/dir" in str(info.value)
    with pytest.raises(SpawnError) as info:
        spawn_container(None, _me(["/nope"]), "", None, namespaces=())
    assert info.value.exit_code == 127
    assert str(info.value) == 'exec: "/nope": no such file or directory'


def test_spawn_with_a_tty():
    spawned = spawn_container(
        None, _me(["sh", "-c", "stty size; test -t 0 && echo tty"], tty=True), "", None, namespaces=(), rows=33, cols=77
    )
    assert spawned.master is not None and spawned.stdout is None
    out = b""
    while True:
        try:
            chunk = os.read(spawned.master, 4096)
        except OSError:  # EIO once the slave side is gone
            break
        if not chunk:
            break
        out += chunk
    assert b"33 77" in out and b"tty" in out
    assert process.wait(spawned.pid) == 0
    spawned.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="new namespaces need root")
def test_spawn_joins_anothers_namespaces_then_makes_its_own():
    """A pod member (``join``): it is in the uts namespace of the process it joins, and in
    an ipc namespace of its own that it made after joining; naming one both ways is refused."""
    holder = spawn_container(None, _me(["sleep", "30"]), "holder", None, namespaces=("uts", "ipc"), stdin=False)
    try:
        spawned = spawn_container(
            None,
            _me(["sh", "-c", "readlink /proc/self/ns/uts /proc/self/ns/ipc; hostname"]),
            "member",
            None,
            namespaces=("ipc",),
            stdin=False,
            join=(holder.pid, ("uts",)),
        )
        out = b"".join(iter(lambda: os.read(spawned.stdout, 4096), b"")).decode().split()
        assert process.wait(spawned.pid) == 0
        spawned.close()
        assert out[0] == os.readlink(f"/proc/{holder.pid}/ns/uts")
        assert out[1] not in (os.readlink(f"/proc/{holder.pid}/ns/ipc"), os.readlink("/proc/self/ns/ipc"))
        assert out[2] == "holder"  # the joined uts namespace's name, not the member's own
        with pytest.raises(SpawnError, match="both joined and new"):
            spawn_container(None, _me(["true"]), "", None, namespaces=("uts",), join=(holder.pid, ("uts",)))
    finally:
        os.kill(holder.pid, 9)
        process.wait(holder.pid)
        holder.close()
