"""The busybox base image, end to end on the host: recipe → store → layer disk → loop
mount → run busybox in a chroot. No VM."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from shim.images.layers import layer_disk, mount_layer, umount_layer
from shim.images.store import ImageStore, bootstrap

pytestmark = pytest.mark.skipif(
    not Path("/bin/busybox").is_file() or shutil.which("tar2sqfs") is None,
    reason="needs busybox-static and squashfs-tools-ng",
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="needs root and loop devices"
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return ImageStore()


def rd(sqfs, *args):
    return subprocess.run(["rdsquashfs", *args, str(sqfs)], capture_output=True, text=True, check=True).stdout


def test_build_is_deterministic_and_configured(store, tmp_path):
    image = bootstrap("busybox", store)
    assert str(image.reference) == "docker.io/library/busybox:latest"
    assert image.reference.familiar == "busybox:latest"
    assert image.cmd == ["sh"] and image.entrypoint is None
    assert image.env == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert image.config["os"] == "linux" and image.config["architecture"] == "amd64"
    assert image.created and image.config["history"][0]["created"] == image.created
    assert "busybox-static" in image.config["history"][0]["created_by"]
    assert len(image.layers) == 1
    assert image.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar"
    assert image.layers[0].diff_id == image.layers[0].digest

    other = ImageStore(tmp_path / "other")
    again = bootstrap("busybox", other)
    assert (again.manifest_digest, again.config_digest) == (image.manifest_digest, image.config_digest)
    assert store.resolve("busybox").manifest_digest == image.manifest_digest


def test_layer_disk_content(store):
    image = bootstrap("busybox", store)
    sqfs = layer_disk(store, image.layers[0])
    names = {line.split()[-1] for line in rd(sqfs, "-l", "/").splitlines()}
    assert names == {"bin", "dev", "etc", "home", "proc", "root", "sbin", "sys", "tmp", "usr", "var"}
    assert "sh -> /bin/busybox" in rd(sqfs, "-l", "/bin")
    assert "Access: 01777" in rd(sqfs, "-s", "/tmp")
    assert "Access: 0700" in rd(sqfs, "-s", "/root")
    assert "UID: 1000" in rd(sqfs, "-s", "/home/user")
    passwd = rd(sqfs, "-c", "/etc/passwd")
    assert passwd.splitlines()[0] == "root:x:0:0:root:/root:/bin/sh"
    assert "user:x:1000:1000" in passwd and "nobody" in passwd
    assert rd(sqfs, "-c", "/etc/hostname") == ""


@pytest.mark.host_root
@needs_root
def test_chroot_runs_busybox_from_the_mounted_layer(store, tmp_path):
    image = bootstrap("busybox", store)
    sqfs = layer_disk(store, image.layers[0])
    mnt = tmp_path / "mnt"
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    mount_layer(sqfs, mnt)
    try:
        out = subprocess.run(
            [chroot, str(mnt), "/bin/busybox", "echo", "hi"], capture_output=True, text=True, check=True, timeout=30
        )
        assert out.stdout == "hi\n"
        out = subprocess.run(
            [chroot, str(mnt), "/bin/sh", "-c", "id -un; ls /bin | wc -l"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={"PATH": "/bin:/usr/bin"},
        )
        name, count = out.stdout.split()
        assert name == "root" and int(count) > 50
    finally:
        umount_layer(mnt)
    assert not os.path.ismount(mnt)


def test_cli_commands(store):
    from shim.cli.images import image_group, images_cmd, rmi_cmd

    runner = CliRunner()
    res = runner.invoke(image_group, ["bootstrap", "busybox"])
    assert res.exit_code == 0, res.output
    image_id = res.output.split()[1]
    res = runner.invoke(images_cmd, [])
    lines = res.output.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert lines[1].split()[:3] == ["busybox", "latest", image_id[7:19]]
    assert runner.invoke(images_cmd, ["-q"]).output == image_id[7:19] + "\n"
    row = json.loads(runner.invoke(images_cmd, ["--format", "json"]).output)
    assert row["Repository"] == "busybox" and row["Tag"] == "latest"
    info = json.loads(runner.invoke(image_group, ["inspect", "busybox"]).output)
    assert info[0]["Id"] == image_id and info[0]["Config"]["Cmd"] == ["sh"]
    assert runner.invoke(rmi_cmd, ["busybox"]).exit_code == 0
    assert runner.invoke(images_cmd, ["-q"]).output == ""
    res = runner.invoke(image_group, ["inspect", "busybox"])
    assert res.exit_code != 0 and "vmshim image bootstrap busybox" in str(res.exception)
