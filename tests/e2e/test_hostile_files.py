"""What a hostile guest can make the host do with files, run for real: ``cp`` out of a
container whose tree holds tricks, the modes of what vmshim keeps for a container, and
spoofed addresses on a bridge network. Every test here boots microVMs (marked vm)."""

from __future__ import annotations

import os
import stat

import pytest

from tests.e2e.conftest import ok, vmshim

pytestmark = pytest.mark.vm
PREFIX = f"hf{os.getpid()}"


@pytest.fixture(scope="module")
def box():
    name = f"{PREFIX}-box"
    ok("run", "-d", "--name", name, "--network", "none", "busybox", "sleep", "3600", timeout=600)
    yield name
    vmshim("rm", "-f", name)


def test_cp_out_never_follows_what_the_guest_made(box, tmp_path):
    """The container's tree: a symlink to /etc, a setuid root file owned by 1234, a hard
    link to it. The host side of the destination holds a symlink to a directory outside
    it where the copy's top directory goes."""
    ok(
        "exec",
        box,
        "sh",
        "-c",
        "mkdir -p /srv/d && ln -s /etc /srv/d/etc && echo '#!/bin/sh' > /srv/d/su && "
        "chown 1234:1234 /srv/d/su && chmod 4755 /srv/d/su && ln /srv/d/su /srv/d/h && "
        "chmod 1777 /srv/d",
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(outside, 0o700)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "d")
    ok("cp", f"{box}:/srv/d", str(dest))
    assert os.listdir(outside) == [] and stat.S_IMODE(os.stat(outside).st_mode) == 0o700
    d = dest / "d"
    assert d.is_dir() and not d.is_symlink()
    assert os.readlink(d / "etc") == "/etc"  # a link was made; nothing copied through it
    su = os.stat(d / "su")
    assert stat.S_IMODE(su.st_mode) == 0o755  # no setuid from the guest
    assert (su.st_uid, su.st_gid) == (os.getuid(), os.getgid())
    assert su.st_ino == os.stat(d / "h").st_ino
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777  # no sticky bit either


def test_cp_out_refuses_a_symlink_that_climbs_out(box, tmp_path):
    ok("exec", box, "sh", "-c", "mkdir -p /srv/e && ln -s ../../../../../../tmp/x /srv/e/up")
    proc = vmshim("cp", f"{box}:/srv/e", str(tmp_path))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "leads outside" in err and "Traceback" not in err


def _world_readable(top) -> list[str]:
    """Files under *top* that other users could read, and directories they could list."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                continue
            if st.st_mode & stat.S_IROTH:
                found.append(f"{path} {oct(st.st_mode & 0o7777)}")
    return found


def test_container_data_is_private_and_the_vm_still_boots(tmp_path):
    """rw.img, the volume image, layer disks, blobs and the config drive are 0600 (libvirt's
    DAC driver chowns the ones it attaches to QEMU's user) and the VM boots and writes
    to both disks."""
    from shim import paths

    name, volume = f"{PREFIX}-modes", f"{PREFIX}-vol"
    ok(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        "-v",
        f"{volume}:/data",
        "busybox",
        "sleep",
        "3600",
        timeout=600,
    )
    try:
        ok("exec", name, "sh", "-c", "echo secret > /data/s && echo mine > /root-file")
        assert ok("exec", name, "cat", "/data/s", "/root-file") == "secret\nmine\n"
        cid = ok("inspect", "-f", "{{.Id}}", name).strip()
        root = paths.root()
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
        container_dir = root / "containers" / cid
        rw = os.stat(container_dir / "rw.img")
        assert stat.S_IMODE(rw.st_mode) == 0o600
        run_dirs = [p for p in (root / "run").iterdir() if cid.startswith(p.name)]
        assert run_dirs and stat.S_IMODE(os.stat(run_dirs[0]).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(run_dirs[0] / "config.iso").st_mode) == 0o600
        image = root / "volumes" / volume / "volume.img"
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o600
        # this container's own places (others' may be mid-teardown in a full run)
        for place in (
            root / "layers",
            root / "images" / "blobs",
            root / "volumes" / volume,
            container_dir,
            run_dirs[0],
        ):
            assert _world_readable(place) == [], place
    finally:
        vmshim("rm", "-f", name)
        vmshim("volume", "rm", volume)
