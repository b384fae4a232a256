"""A RUN step's changes come from a hostile guest (issue 12): the host reads them only as a
tar stream from the agent, checked like a registry layer, and never mounts or walks what
the guest wrote. A guest image variant (VMSHIM_GUEST_SOURCE) plays the attacker:

- its runtime turns the step's ``upper`` directory into a symlink to a host directory
  holding a secret (what a RUN step as root could do to the writable disk), which the
  host used to follow when it walked the mounted disk;
- its agent sends hostile diffs, picked by the file ``/attack`` the RUN step writes:
  ``..`` names, absolute names, a symlink and then a file through it, a hardlink out, an
  entry claiming a terabyte.

Each build must fail with one clear line, put nothing of the host in a layer, and write
nothing outside the build's own directories.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest

from shim import paths
from tests.e2e.conftest import blobs_hold, vmshim

pytestmark = pytest.mark.vm
GUEST = Path(__file__).resolve().parents[2] / "guest"

HOSTILE_START = """

# ---- hostile variant (tests/e2e/test_hostile_diff.py) ----
_vmshim_real_start = Container.start


def _vmshim_hostile_start(self, process, **kwargs):
    spawned = _vmshim_real_start(self, process, **kwargs)
    if "HOSTILE=upper-symlink" in (process.env or []):
        upper = "/run/vmshim/rw/upper"
        if os.path.isdir(upper) and not os.path.islink(upper):
            os.rename(upper, upper + ".real")  # the overlay keeps writing to it
            os.symlink(@TARGET@, upper)
    return spawned


Container.start = _vmshim_hostile_start
"""

HOSTILE_DIFF = """

# ---- hostile variant (tests/e2e/test_hostile_diff.py) ----
import io as _io

_vmshim_real_write_tar = write_tar


def _entry(tar, name, kind="f", data=b"", link="", size=None):
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    if kind == "d":
        ti.type = tarfile.DIRTYPE
    elif kind == "l":
        ti.type, ti.linkname = tarfile.SYMTYPE, link
    elif kind == "h":
        ti.type, ti.linkname = tarfile.LNKTYPE, link
    ti.size = len(data) if size is None else size
    tar.addfile(ti, _io.BytesIO(data) if kind == "f" else None)


def write_tar(upperdir, out_fd, err_fd):
    try:
        with open(os.path.join(upperdir, "attack")) as f:
            attack = f.read().strip()
    except OSError:
        return _vmshim_real_write_tar(upperdir, out_fd, err_fd)
    out = os.fdopen(out_fd, "wb", closefd=False)
    if attack == "huge":
        ti = tarfile.TarInfo("huge")
        ti.size = 1 << 40  # a terabyte it never sends
        out.write(ti.tobuf(tarfile.PAX_FORMAT))
        out.write(b"x" * 4096)
        out.flush()
        return 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if attack == "dotdot":
            _entry(tar, "../../../../../../tmp/@MARK@-dotdot", data=b"pwned")
        elif attack == "absolute":
            _entry(tar, "/tmp/@MARK@-absolute", data=b"pwned")
        elif attack == "symlink-then-file":
            _entry(tar, "esc", "l", link="/tmp")
            _entry(tar, "esc/@MARK@-through-symlink", data=b"pwned")
        elif attack == "hardlink-out":
            _entry(tar, "shadow", "h", link="/etc/shadow")
    out.flush()
    return 0
"""

ATTACKS = {
    "dotdot": "contains a '..' component",
    "absolute": "is an absolute path",
    "symlink-then-file": "goes through 'esc', which is a symlink",
    "hardlink-out": "is an absolute path",
    "huge": "more than",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(env for the CLI that selects the hostile guest, the secret's host dir, token)."""
    base = tmp_path_factory.mktemp("hostile")
    secret_dir = base / "host-secrets"
    secret_dir.mkdir()
    token = secrets.token_hex(16)
    (secret_dir / "id_rsa").write_text(f"HOST-SECRET-{token}\n")
    source = base / "guest"
    shutil.copytree(GUEST, source, ignore=shutil.ignore_patterns("__pycache__"))
    with open(source / "runtime" / "container.py", "a") as f:
        f.write(HOSTILE_START.replace("@TARGET@", repr(str(secret_dir))))
    if (source / "runtime" / "diff.py").exists():  # (absent before diffs were tars)
        with open(source / "runtime" / "diff.py", "a") as f:
            f.write(HOSTILE_DIFF.replace("@MARK@", f"vmshim-{token}"))
    env = {"VMSHIM_GUEST_SOURCE": str(source)}
    proc = vmshim("guest", "build", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    yield env, secret_dir, token
    vmshim("guest", "build", timeout=900)  # the normal image is current again


def build(env: dict, tmp_path: Path, dockerfile: str):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    return vmshim("build", "--no-cache", str(ctx), env=env, timeout=600)


def written_outside(token: str) -> list[str]:
    hits = []
    for where in (Path("/tmp"), Path("/"), paths.root()):
        hits += [str(p) for p in where.glob(f"*{token}*")]
    return hits


def test_upper_symlinked_to_a_host_directory_never_reaches_a_layer(hostile, tmp_path):
    """Fails on the code that mounted the step's disk and walked ``upper``: the host
    followed the symlink and packed its own secret into the layer."""
    env, secret_dir, token = hostile
    proc = build(env, tmp_path, "FROM busybox\nENV HOSTILE=upper-symlink\nRUN echo changed > /changed\n")
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, proc.stdout.decode(errors="replace")
    assert "cannot open the writable layer" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert not blobs_hold(f"HOST-SECRET-{token}".encode())
    assert (secret_dir / "id_rsa").read_text() == f"HOST-SECRET-{token}\n"


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_diff_is_refused_with_one_line(hostile, tmp_path, attack):
    env, _, token = hostile
    proc = build(env, tmp_path, f"FROM busybox\nRUN echo {attack} > /attack\n")
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, proc.stdout.decode(errors="replace")
    assert ATTACKS[attack] in stderr, stderr
    assert "the RUN step's changes were refused" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert not written_outside(token)
    work = paths.root() / "build" / "work"
    assert not work.is_dir() or not any(work.iterdir())


def test_the_hostile_image_still_builds_an_honest_step(hostile, tmp_path):
    """The variant differs only where asked: without an attack the step's changes land."""
    env, _, _ = hostile
    proc = build(env, tmp_path, "FROM busybox\nRUN mkdir /made && echo ok > /made/file\n")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def test_process_isolation_refuses_a_volume_a_vm_wrote():
    """Fails on the code that loop-mounted any volume image read-write in process
    isolation, guest-written or not."""
    name = f"vmshim-test-vmw-{secrets.token_hex(4)}"
    try:
        assert vmshim("volume", "create", name).returncode == 0
        proc = vmshim(
            "run", "--rm", "--isolation", "process", "-v", f"{name}:/d", "busybox", "sh", "-c", "echo host > /d/f"
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        proc = vmshim("run", "--rm", "-v", f"{name}:/d", "busybox", "sh", "-c", "cat /d/f && echo guest > /d/g")
        assert proc.returncode == 0 and proc.stdout == b"host\n", proc.stderr
        for flag in (f"{name}:/d", f"{name}:/d:ro"):
            proc = vmshim("run", "--rm", "--isolation", "process", "-v", flag, "busybox", "cat", "/d/g")
            stderr = proc.stderr.decode(errors="replace")
            assert proc.returncode != 0 and proc.stdout == b"", stderr
            assert f"volume {name} was written by a VM" in stderr, stderr
            assert len(stderr.strip().splitlines()) == 1, stderr
        # The way out the message names: the data as a tar through a VM.
        proc = vmshim("run", "--rm", "-v", f"{name}:/d", "busybox", "tar", "-C", "/d", "-c", ".")
        assert proc.returncode == 0 and b"guest" in proc.stdout
    finally:
        vmshim("volume", "rm", "-f", name)
