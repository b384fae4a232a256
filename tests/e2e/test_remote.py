"""`vmshim --host ssh://…`: every verb run on a "remote" host through a real OpenSSH server
(tests/sshd.py: 127.0.0.1, its own host key, user key and config), whose remote side is this
machine's vmshim with the same state root. Output and exit codes are compared with the local
CLI's where it matters. VM tests share one detached container."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import tarfile
import termios
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import CLI, vmshim
from tests.sshd import REMOTE_VMSHIM, Sshd
from tests.waiting import wait_until

vm = pytest.mark.vm


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("remote"))
    server.start()
    yield server
    server.stop_control_processes()
    server.stop()


def remote(sshd, *args, input=None, timeout=180, env=None):
    """Run the CLI with --host pointing at the test sshd (HOME = the client's home)."""
    return subprocess.run(
        CLI + ["--host", sshd.url] + list(args),
        input=input,
        capture_output=True,
        timeout=timeout,
        env=sshd.client_env(**(env or {})),
    )


def text(proc) -> str:
    return proc.stdout.decode(errors="replace")


def err(proc) -> str:
    return proc.stderr.decode(errors="replace")


def other_home(sshd, tmp_path, key: bool = True, known_hosts: str | None = "real") -> dict:
    """A client environment with its own home: with or without the user key, and with
    known_hosts holding the real host key, another key, or nothing."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    if key:
        shutil.copy(sshd.user_key, home / ".ssh" / "id_ed25519")
    if known_hosts == "real":
        shutil.copy(sshd.home / ".ssh" / "known_hosts", home / ".ssh" / "known_hosts")
    elif known_hosts == "other":
        public = sshd.user_key.with_suffix(".pub").read_text().split()  # not the host's key
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {public[0]} {public[1]}\n")
    return sshd.client_env(HOME=str(home))


def run_other(sshd, env, *args):
    try:
        return subprocess.run(CLI + ["--host", sshd.url] + list(args), capture_output=True, timeout=60, env=env)
    finally:
        for pidfile in (Path(env["HOME"]) / ".cache" / "vmshim" / "ssh").glob("*.pid"):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


# ---- connecting, refusing, contexts (no VM) ------------------------------------------------
def test_remote_info_names_the_host_and_matches_local_images(sshd):
    proc = remote(sshd, "info")
    assert proc.returncode == 0, err(proc)
    assert f"Context:       (--host) ({sshd.url})" in text(proc)
    assert remote(sshd, "images").stdout == vmshim("images").stdout


def test_remote_errors_keep_the_exit_code_and_message(sshd):
    local = vmshim("inspect", "no-such-container-xyz")
    proc = remote(sshd, "inspect", "no-such-container-xyz")
    assert (proc.returncode, err(proc)) == (local.returncode, err(local))
    assert proc.returncode != 0


def test_unknown_host_key_is_refused_with_how_to_trust_it(sshd, tmp_path):
    proc = run_other(sshd, other_home(sshd, tmp_path, known_hosts=None), "ps")
    assert proc.returncode == 125
    assert err(proc).count("\n") == 1 and "Traceback" not in err(proc)
    assert f"host key of [127.0.0.1]:{sshd.port} is not in ~/.ssh/known_hosts" in err(proc)
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> ~/.ssh/known_hosts" in err(proc)


def test_changed_host_key_is_refused(sshd, tmp_path):
    proc = run_other(sshd, other_home(sshd, tmp_path, known_hosts="other"), "ps")
    assert proc.returncode == 125 and err(proc).count("\n") == 1
    assert "has CHANGED" in err(proc) and "ssh-keygen -R" in err(proc)


def test_missing_user_key_is_refused(sshd, tmp_path):
    proc = run_other(sshd, other_home(sshd, tmp_path, key=False), "ps")
    assert proc.returncode == 125 and err(proc).count("\n") == 1
    assert "SSH authentication as root@[127.0.0.1]" in err(proc)
    assert "ssh-keygen" in err(proc) and "authorized_keys" in err(proc)


def test_wrong_user_key_is_refused(sshd, tmp_path):
    env = other_home(sshd, tmp_path, key=False)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(Path(env["HOME"]) / ".ssh" / "id_ed25519")],
        check=True,
    )
    proc = run_other(sshd, env, "ps")
    assert proc.returncode == 125 and "SSH authentication as root@" in err(proc)
    assert "authorized_keys" in err(proc)


def test_missing_remote_vmshim_names_what_to_install(sshd, tmp_path):
    env = other_home(sshd, tmp_path)
    env["VMSHIM_REMOTE_VMSHIM"] = "/nonexistent/vmshim"
    proc = run_other(sshd, env, "ps")
    assert proc.returncode == 125 and err(proc).count("\n") == 1
    assert "no '/nonexistent/vmshim' to run: install vmshim there" in err(proc)


def test_connection_is_reused_between_commands(sshd):
    log = sshd.dir / "sshd.log"
    before = log.read_text().count("Accepted publickey")
    for _ in range(3):
        assert remote(sshd, "ps").returncode == 0
    assert log.read_text().count("Accepted publickey") - before <= 1
    sockets = list((sshd.home / ".cache" / "vmshim" / "ssh").glob("*.sock"))
    assert sockets and all(s.stat().st_mode & 0o777 == 0o600 for s in sockets)
    assert (sshd.home / ".cache" / "vmshim" / "ssh").stat().st_mode & 0o777 == 0o700


def test_contexts(sshd):
    env = sshd.client_env()

    def cli(*args):
        return subprocess.run(CLI + list(args), capture_output=True, timeout=60, env=env)

    assert (
        cli(
            "context",
            "create",
            "lab",
            "--host",
            sshd.url,
            "--description",
            "loopback",
            "--remote-vmshim",
            REMOTE_VMSHIM,
        ).returncode
        == 0
    )
    bad = cli("context", "create", "bad", "--host", "tcp://x")
    assert bad.returncode != 0 and "expected ssh://" in err(bad)
    assert "lab " in text(cli("context", "ls")) and "default *" in text(cli("context", "ls"))
    assert json.loads(text(cli("context", "inspect", "lab")))[0]["host"] == sshd.url
    assert cli("context", "use", "lab").returncode == 0
    try:
        assert "lab *" in text(cli("context", "ls"))
        info = cli("info")
        assert info.returncode == 0, err(info)
        assert f"Context:       lab ({sshd.url})" in text(info)
        assert cli("context", "rm", "lab").returncode != 0  # in use
    finally:
        assert cli("context", "use", "default").returncode == 0
    assert "Context:       default (this machine)" in text(cli("info"))
    assert cli("context", "rm", "lab").returncode == 0
    assert "lab" not in text(cli("context", "ls"))


def test_save_and_load_stream_local_files(sshd, tmp_path):
    archive = tmp_path / "busybox.tar"
    proc = remote(sshd, "save", "-o", str(archive), "busybox")
    assert proc.returncode == 0, err(proc)
    with tarfile.open(archive) as tar:
        assert "manifest.json" in tar.getnames()
    proc = remote(sshd, "load", "-q", "-i", str(archive))
    assert proc.returncode == 0, err(proc)
    assert "Loaded image: busybox:latest" in text(proc)
    missing = remote(sshd, "save", "-o", str(tmp_path / "none.tar"), "no-such-image-xyz")
    assert missing.returncode != 0 and not (tmp_path / "none.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".none.tar")]


# ---- containers (real microVMs) ------------------------------------------------------------
@pytest.fixture(scope="module")
def box(sshd):
    name = f"remote-{uuid.uuid4().hex[:8]}"
    proc = remote(
        sshd,
        "run",
        "-d",
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        "echo started; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done",
    )
    assert proc.returncode == 0, err(proc)
    yield name
    vmshim("rm", "-f", name)


@vm
def test_run_keeps_streams_apart_and_the_exit_code(sshd):
    args = ["run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3"]
    proc = remote(sshd, *args)
    assert (proc.returncode, text(proc), err(proc)) == (3, "out\n", "err\n")
    proc = remote(sshd, "run", "--rm", "-i", "busybox", "sh", "-c", "tr a-z A-Z", input=b"hello\n")
    assert (proc.returncode, text(proc)) == (0, "HELLO\n")


@vm
def test_ctrl_c_reaches_the_remote_container(sshd):
    """SIGINT to the local client (a terminal's Ctrl-C without -t) → SSH signal → the remote
    vmshim forwards it to the container, as the local CLI does: the trap's exit code."""
    proc = subprocess.Popen(
        CLI
        + [
            "--host",
            sshd.url,
            "run",
            "--rm",
            "busybox",
            "sh",
            "-c",
            'trap "echo got-int; exit 42" INT; echo ready; while true; do sleep 0.2; done',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sshd.client_env(),
    )
    try:
        wait_until(lambda: select.select([proc.stdout], [], [], 1)[0], 90, "ready")
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 42
        assert proc.stdout.read() == b"got-int\n"
    finally:
        proc.kill()
        proc.wait()


@vm
def test_exec(sshd, box):
    proc = remote(sshd, "exec", box, "sh", "-c", "cat /etc/hostname; exit 4")
    assert proc.returncode == 4 and text(proc).strip()
    proc = remote(sshd, "exec", "-i", box, "cat", input=b"piped\n")
    assert (proc.returncode, text(proc)) == (0, "piped\n")
    stats = remote(sshd, "stats", "--no-stream", "--format", "json", box)
    assert stats.returncode == 0, err(stats)
    assert json.loads(text(stats).splitlines()[0])["Name"] == box
    local = vmshim("exec", box, "/nope")
    proc = remote(sshd, "exec", box, "/nope")
    assert (proc.returncode, err(proc)) == (local.returncode, err(local)) == (127, err(local))


@vm
def test_logs_follow_streams_and_ctrl_c_stops_it(sshd, box):
    proc = subprocess.Popen(
        CLI + ["--host", sshd.url, "logs", "-f", box],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sshd.client_env(),
    )
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"tick 1\n" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert seen.startswith(b"started\ntick 0\n") and b"tick 1\n" in seen
        proc.send_signal(signal.SIGINT)  # forwarded to the remote `vmshim logs -f`
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    local = subprocess.Popen(CLI + ["logs", "-f", box], stdout=subprocess.PIPE)
    try:
        wait_until(lambda: select.select([local.stdout], [], [], 1)[0], 60, "local logs -f output")
        local.send_signal(signal.SIGINT)
        assert proc.returncode == local.wait(timeout=30)
    finally:
        local.kill()
        local.wait()


@vm
def test_run_it_under_a_pty_follows_resizes(sshd):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))

    def controlling_tty():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        CLI + ["--host", sshd.url, "run", "-it", "--rm", "busybox", "sh"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=sshd.client_env(),
        preexec_fn=controlling_tty,
    )
    os.close(slave)
    seen = bytearray()

    def read_until(marker: bytes, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while marker not in seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in {bytes(seen)[-400:]!r}")
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen.extend(os.read(master, 4096))
                except OSError:
                    break

    try:
        read_until(b"/ # ")  # typed earlier, input is flushed when the terminal goes raw
        os.write(master, b"stty size; echo SIZE1-$((6*7))\n")
        read_until(b"SIZE1-42")
        assert b"30 100" in seen
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        # The resize travels as SIGWINCH → SSH window-change → the container's pty; the
        # change is asynchronous, so ask again (each question a round trip) until it shows.
        deadline = time.monotonic() + 30
        n = 2
        while b"40 120" not in seen.split(b"SIZE1-42", 1)[1]:
            assert time.monotonic() < deadline, bytes(seen)[-400:]
            os.write(master, b"stty size; echo SIZE%d-$((6*7))\n" % n)
            read_until(b"SIZE%d-42" % n)
            n += 1
        os.write(master, b"exit 7\n")
        assert proc.wait(timeout=60) == 7
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


@vm
def test_cp_both_ways(sshd, box, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"to the container\n")
    proc = remote(sshd, "cp", str(source), f"{box}:/tmp/in.txt")
    assert proc.returncode == 0, err(proc)
    assert text(remote(sshd, "exec", box, "cat", "/tmp/in.txt")) == "to the container\n"
    remote(sshd, "exec", box, "sh", "-c", "mkdir -p /tmp/d/sub && echo back > /tmp/d/sub/f")
    proc = remote(sshd, "cp", f"{box}:/tmp/d", str(tmp_path / "out"))
    assert proc.returncode == 0, err(proc)
    assert (tmp_path / "out" / "sub" / "f").read_text() == "back\n"
    missing = remote(sshd, "cp", f"{box}:/nope", str(tmp_path / "x"))
    assert missing.returncode != 0 and "/nope" in err(missing)


def test_build_streams_the_local_context_minus_dockerignore(sshd, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text('FROM busybox\nCOPY . /ctx/\nCMD ["ls", "/ctx"]\n')
    (context / "kept.txt").write_text("kept\n")
    (context / "secret.txt").write_text("secret\n")
    (context / ".dockerignore").write_text("secret.txt\n")
    tag = f"remote-build-{uuid.uuid4().hex[:8]}:1"
    proc = remote(sshd, "build", "-t", tag, str(context))
    try:
        assert proc.returncode == 0, err(proc)
        assert f"Successfully tagged {tag}" in text(proc)
        assert text(proc).startswith("Step 1/3 : FROM busybox\n")
        saved = tmp_path / "img.tar"
        assert remote(sshd, "save", "-o", str(saved), tag).returncode == 0
        with tarfile.open(saved) as outer:
            names = set()
            for member in outer.getmembers():
                if member.isfile() and member.name.endswith(".tar"):
                    with tarfile.open(fileobj=outer.extractfile(member)) as layer:
                        names |= set(layer.getnames())
        assert "ctx/kept.txt" in names and "ctx/Dockerfile" in names
        assert "ctx/secret.txt" not in names
        # -f from outside the context, and a build error keeps the remote's exit code.
        outside = tmp_path / "Other.Dockerfile"
        outside.write_text("FROM busybox\nCOPY missing.txt /\n")
        proc = remote(sshd, "build", "-f", str(outside), str(context))
        local = vmshim("build", "-f", str(outside), str(context))
        assert proc.returncode == local.returncode != 0
        assert "missing.txt" in err(proc)
    finally:
        vmshim("rmi", tag)


@vm
def test_remote_benchmark_reports_overhead_and_ratios(tmp_path):
    import sys

    out = tmp_path / "remote.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/remote.py", "--runs", "3", "--json", str(out)],
        capture_output=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, err(proc)
    print(text(proc))  # the figures, for -rP
    data = json.loads(out.read_text())
    for what in ("ps", "exec", "run"):
        assert data[f"{what}_remote"]["runs"] == 3 and data[f"{what}_overhead"]["ratio"] > 0
    assert data["connect"]["runs"] == 1
