"""OS containers (``--os``): the host's decisions (shim.containers.osmode, options, compose,
the OCI annotation) and the guest's pieces (guest.runtime.osinit, BootConfig ``os``)."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from guest.runtime import osinit
from guest.runtime.cgroups import Cgroup
from guest.spec import BootConfig, ProcessSpec
from shim.compose import planner
from shim.compose.model import load_project
from shim.containers import osmode
from shim.containers.options import RunOptions, build_process_spec, parse_signal
from shim.errors import UsageError
from shim.oci.bundle import BundleError, load_bundle

# /proc/self/mounts of this machine (hybrid: v1 controllers, an empty v2 "unified")
HYBRID = textwrap.dedent("""\
    tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
    cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
    cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
    cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
    cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
    """)
V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
V2_NO_NSDELEGATE = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"


def test_a_cgroup_v2_only_host_with_nsdelegate_can_delegate():
    assert osmode.delegation_problem(V2, "0::/user.slice/session-1.scope\n", True) is None


@pytest.mark.parametrize(
    "mounts, own, writable, needle",
    [
        (HYBRID, "12:memory:/\n0::/\n", True, "cgroup v1 hierarchies"),
        ("proc /proc proc rw 0 0\n", "0::/\n", True, "no cgroup v2 hierarchy"),
        (V2_NO_NSDELEGATE, "0::/\n", True, "nsdelegate"),
        (V2, "1:name=systemd:/\n0::/\n", True, "single cgroup v2 hierarchy"),
        (V2, "0::/\n", False, "cannot be written"),
    ],
)
def test_hosts_that_cannot_delegate_say_why(mounts, own, writable, needle):
    assert needle in osmode.delegation_problem(mounts, own, writable)


def test_process_isolation_refuses_with_one_line_unless_the_host_can_delegate():
    with pytest.raises(UsageError) as exc:
        osmode.check_isolation("process", lambda: "it mounts cgroup v1 hierarchies (memory)")
    text = str(exc.value)
    assert "\n" not in text and "cgroup v1" in text and "--isolation vm" in text
    osmode.check_isolation("process", lambda: None)  # a host that can: accepted
    osmode.check_isolation("vm", lambda: "anything")  # the VM's kernel always can


def test_this_hybrid_host_is_refused():
    with open("/proc/self/mounts") as f:
        mounts = f.read()
    if " cgroup " not in mounts:
        pytest.skip("this host has no cgroup v1 hierarchies")
    assert "cgroup v1" in osmode.host_delegation_problem()


def test_os_options_run_the_init_with_more_capabilities():
    options = RunOptions(image="debian-systemd", command=["--log-level=debug"], os_container=True)
    spec = build_process_spec({"Cmd": ["bash"], "Entrypoint": ["/x"]}, options)
    assert spec.args == ["/sbin/init", "--log-level=debug"]
    assert "CAP_SYS_ADMIN" in spec.capabilities["bounding"]
    assert "CAP_SYS_MODULE" not in spec.capabilities["bounding"]
    spec = build_process_spec({}, RunOptions(image="x", os_container=True, init="/lib/systemd/systemd"))
    assert spec.args == ["/lib/systemd/systemd"]
    plain = build_process_spec({"Cmd": ["bash"]}, RunOptions(image="x"))
    assert "CAP_SYS_ADMIN" not in plain.capabilities["bounding"]


def test_os_option_errors():
    with pytest.raises(UsageError, match="add --os"):
        RunOptions(image="x", init="/sbin/init")
    with pytest.raises(UsageError, match="absolute"):
        build_process_spec({}, RunOptions(image="x", os_container=True, init="sbin/init"))


def test_cap_drop_still_applies_to_an_init():
    from shim.containers.security import SecurityOptions

    options = RunOptions(image="x", os_container=True, security=SecurityOptions(cap_drop=["SYS_ADMIN"]))
    assert "CAP_SYS_ADMIN" not in build_process_spec({}, options).capabilities["bounding"]


@pytest.mark.parametrize("text, number", [("SIGRTMIN+3", 37), ("RTMIN", 34), ("rtmax-1", 63)])
def test_realtime_signal_names(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["SIGRTMIN+40", "SIGRTMAX+1", "RTMIN+x"])
def test_bad_realtime_signal_names(text):
    with pytest.raises(UsageError):
        parse_signal(text)


def test_compose_os_true(tmp_path):
    (tmp_path / "compose.yaml").write_text(
        textwrap.dedent("""\
        services:
          machine:
            image: debian-systemd
            os: true
        """)
    )
    project = load_project(cwd=tmp_path, project_name="app")
    options = planner.run_options(project, project.services["machine"], 1, 1)
    assert options.os_container is True


def _bundle(tmp_path, annotations):
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "process": {"args": ["/sbin/init"], "cwd": "/"},
                "annotations": annotations,
            }
        )
    )
    return load_bundle(str(tmp_path))


def test_oci_annotation(tmp_path):
    assert _bundle(tmp_path, {"org.vmshim.os": "true"}).os_container is True
    assert _bundle(tmp_path, {}).os_container is False


def test_oci_annotation_hostile_value_is_refused(tmp_path):
    with pytest.raises(BundleError, match="org.vmshim.os"):
        _bundle(tmp_path, {"org.vmshim.os": "yes; rm -rf /"})


# ---- guest side -------------------------------------------------------------------------------


def _boot(**extra) -> dict:
    config = BootConfig(
        container_id="c" * 64, token="t", hostname="h", process=ProcessSpec(args=["/sbin/init"]), layer_count=1, **extra
    )
    return config.to_dict()


def test_boot_config_os_round_trips_and_is_omitted_when_false():
    assert "os" not in _boot()
    assert BootConfig.from_dict(_boot(os=True)).os is True


def test_boot_config_os_must_be_a_boolean():
    data = _boot(os=True)
    data["os"] = "true"
    with pytest.raises(ValueError, match="'os'"):
        BootConfig.from_dict(data)


def test_init_process_gets_container_env_and_a_tty():
    spec = osinit.init_process(ProcessSpec(args=["/sbin/init"], env=["container=docker", "A=1"]))
    assert spec.tty is True
    assert spec.env == ["A=1", "container=vmshim"]


def test_exec_cgroup_is_a_leaf_below_the_container(tmp_path):
    cgroup = Cgroup("vmshim/c1", 2, {"unified": str(tmp_path)})
    leaf = osinit.exec_cgroup(cgroup)
    assert leaf.paths["unified"] == str(tmp_path / "vmshim.exec")
    assert (tmp_path / "vmshim.exec").is_dir()
    assert osinit.exec_cgroup(None) is None


def test_power_off_is_exit_code_zero():
    assert osinit.exit_code(osinit.EXIT_POWER_OFF) == 0
    assert osinit.exit_code(137) == 137


def test_a_hung_up_console_is_held_again_without_a_path():
    from guest.runtime.process import reopen_console

    master, slave = os.openpty()
    try:
        os.close(slave)  # the init closed its console: the master reads EIO
        with pytest.raises(OSError):
            os.read(master, 10)
        held = reopen_console(master)
        assert held is not None
        os.write(held, b"journal line\n")
        assert b"journal line" in os.read(master, 100)
        os.close(held)
    finally:
        os.close(master)
    assert reopen_console(master) is None  # a closed master: refused, not raised


def test_v2_pids_count_the_whole_subtree(tmp_path):
    (tmp_path / "cgroup.procs").write_text("")  # an init keeps its services in child cgroups
    (tmp_path / "pids.current").write_text("17\n")
    (tmp_path / "memory.current").write_text("4096\n")
    assert Cgroup("vmshim/c1", 2, {"unified": str(tmp_path)}).usage()["pids"] == 17
    (tmp_path / "pids.current").unlink()  # no pids controller: the cgroup's own processes
    (tmp_path / "cgroup.procs").write_text("3\n4\n")
    assert Cgroup("vmshim/c1", 2, {"unified": str(tmp_path)}).usage()["pids"] == 2


def test_the_cli_refuses_process_isolation_here_in_one_line_before_pulling(tmp_path):
    import subprocess
    import sys

    if osmode.host_delegation_problem() is None:
        pytest.skip("this host can delegate a cgroup")
    proc = subprocess.run(
        [sys.executable, "-m", "shim.cli.main", "run", "--os", "--isolation", "process", "no-such-image-anywhere"],
        capture_output=True,
        text=True,
        env={**os.environ, "VMSHIM_ROOT": str(tmp_path)},
        timeout=60,
    )
    assert proc.returncode == 125
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "delegate a cgroup" in lines[0], proc.stderr
    assert "pull" not in proc.stderr  # refused before the image is looked for
