"""--privileged / --cap-add / --cap-drop / --security-opt / --device, and the device rules
(the cgroup v2 program is attached for real where this host has a v2 mount)."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest

from guest.runtime import devices
from guest.spec import CAPABILITIES, DEFAULT_CAPABILITIES, BootConfig, ProcessSpec
from shim.containers.options import RunOptions, build_process_spec
from shim.containers.security import (
    SecurityOptions,
    capability_set,
    parse_device,
    parse_security_opts,
)
from shim.errors import UsageError


def test_default_capability_set_is_dockers():
    mask = sum(1 << CAPABILITIES.index(c) for c in capability_set(SecurityOptions()))
    assert f"{mask:016x}" == "00000000a80425fb"


def test_cap_add_and_drop():
    caps = capability_set(SecurityOptions(cap_drop=["ALL"], cap_add=["net_admin", "CAP_KILL"]))
    assert sorted(caps) == ["CAP_KILL", "CAP_NET_ADMIN"]
    caps = capability_set(SecurityOptions(cap_drop=["chown", "MKNOD"]))
    assert "CAP_CHOWN" not in caps and "CAP_MKNOD" not in caps and "CAP_KILL" in caps
    assert capability_set(SecurityOptions(cap_add=["ALL"])) == list(CAPABILITIES)
    assert capability_set(SecurityOptions(privileged=True)) == list(CAPABILITIES)
    with pytest.raises(UsageError, match="not a Linux capability"):
        capability_set(SecurityOptions(cap_add=["SYS_NOPE"]))


def test_security_opts(tmp_path):
    assert parse_security_opts([], []) == ("default", False)
    assert parse_security_opts(["no-new-privileges"], []) == ("default", True)
    assert parse_security_opts(["no-new-privileges:true"], []) == ("default", True)
    assert parse_security_opts(["seccomp=unconfined"], []) == (None, False)
    profile = tmp_path / "p.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_SYS_ADMIN"]}}],
            }
        )
    )
    oci, _ = parse_security_opts([f"seccomp={profile}"], list(DEFAULT_CAPABILITIES))
    assert oci["syscalls"] == [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]
    for bad in (["seccomp=/nonexistent"], ["nope"], ["no-new-privileges=maybe"]):
        with pytest.raises(UsageError):
            parse_security_opts(bad, [])


def test_process_spec_of_a_run_carries_the_defaults():
    spec = build_process_spec({"Cmd": ["sh"]}, RunOptions(image="busybox"))
    assert spec.capabilities == {"bounding": list(DEFAULT_CAPABILITIES)}
    assert spec.seccomp == "default" and spec.no_new_privs is False
    again = ProcessSpec.from_dict(spec.to_dict())
    assert again == spec
    privileged = build_process_spec(
        {"Cmd": ["sh"]}, RunOptions(image="busybox", security=SecurityOptions(privileged=True))
    )
    assert privileged.seccomp is None
    assert privileged.capabilities == {"bounding": list(CAPABILITIES)}


def test_device_flag():
    device = parse_device("/dev/null:/dev/mine:rw", "vm")
    assert device == {"path": "/dev/mine", "type": "c", "major": 1, "minor": 3, "permissions": "rw"}
    assert parse_device("/dev/null", "process")["path"] == "/dev/null"
    assert parse_device("/dev/null:r", "process")["permissions"] == "r"
    with pytest.raises(UsageError, match="not a device node"):
        parse_device("/etc/passwd", "process")
    with pytest.raises(UsageError, match="absolute"):
        parse_device("/dev/null:relative", "process")


def test_boot_config_devices_are_checked():
    good = {
        "container_id": "c",
        "token": "t",
        "hostname": "h",
        "layer_count": 1,
        "process": {"args": ["sh"]},
        "privileged": True,
        "devices": [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "permissions": "rwm"}],
    }
    config = BootConfig.from_dict(good)
    assert config.privileged and BootConfig.from_dict(config.to_dict()) == config
    for device in (
        {"path": "/dev/../x", "type": "c", "major": 1, "minor": 3, "permissions": "r"},
        {"path": "/dev/x", "type": "p", "major": 1, "minor": 3, "permissions": "r"},
        {"path": "/dev/x", "type": "c", "major": -1, "minor": 3, "permissions": "r"},
    ):
        with pytest.raises(ValueError, match="devices"):
            BootConfig.from_dict(dict(good, devices=[device]))


def test_v1_lines():
    assert devices.v1_lines([("c", -1, -1, "m"), ("c", 1, 3, "rwm")]) == ["c *:* m", "c 1:3 rwm"]


def test_device_program_shape():
    code = devices.program(devices.rules_for([]))
    assert len(code) % 8 == 0
    last_two = [struct.unpack("<BBhi", code[i : i + 8]) for i in (len(code) - 16, len(code) - 8)]
    assert last_two == [(0xB7, 0, 0, 0), (0x95, 0, 0, 0)]  # r0 = 0 (deny); exit


V2 = "/sys/fs/cgroup/unified"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(os.path.join(V2, "cgroup.procs")),
    reason="needs root and a cgroup v2 mount at " + V2,
)
def test_device_program_for_real(tmp_path):
    """Attach the program to a v2 cgroup, move a child in: it can mknod a block device
    and use /dev/null, but not open the block device; a --device rule opens it."""
    for extra, expected in (
        ([], b"denied"),
        ([{"path": "/x", "type": "b", "major": 7, "minor": 0, "permissions": "r"}], b"opened"),
    ):
        group = os.path.join(V2, f"vmshim-unit-{os.getpid()}")
        os.mkdir(group)
        try:
            devices.apply_v2(group, devices.rules_for(extra))
            node = tmp_path / "blk"
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                answer = b"?"
                try:
                    with open(os.path.join(group, "cgroup.procs"), "w") as f:
                        f.write(str(os.getpid()))
                    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
                    with open("/dev/null", "w") as f:
                        f.write("x")
                    try:
                        os.close(os.open(node, os.O_RDONLY))
                        answer = b"opened"
                    except PermissionError:
                        answer = b"denied"
                    except OSError:
                        answer = b"opened"  # got past the cgroup (ENXIO: no loop0)
                finally:
                    os.write(write_end, answer)
                    os._exit(0)
            os.close(write_end)
            answer = os.read(read_end, 64)
            os.close(read_end)
            os.waitpid(pid, 0)
            node.unlink(missing_ok=True)
            assert answer == expected
        finally:
            os.rmdir(group)
