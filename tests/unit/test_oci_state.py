"""shim.oci.state (OCI status from the vmshim lifecycle), shim.oci.hooks, signal names,
and the guest-spec fields the runtime adds."""

from __future__ import annotations

import os
import subprocess

import click
import pytest

from guest.spec import BootConfig, MountSpec, ProcessSpec
from shim.cli.runtime import parse_signal
from shim.containers.store import Container, process_start_time
from shim.oci.hooks import HookError, run_hooks
from shim.oci.state import OciInfo, RuntimeStore, oci_status, record_id, state_of


def record(status: str) -> Container:
    rec = Container(
        id=record_id("c1"),
        name="c1",
        image="",
        image_id="",
        isolation="vm",
        process=ProcessSpec(args=["sh"]),
        hostname="c1",
        token="t",
        layer_disks=[],
    )
    rec.state.status = status
    return rec


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "30"])
    yield proc.pid, process_start_time(proc.pid)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    "status, alive, expected",
    [
        ("created", None, "creating"),
        ("created", True, "created"),
        ("created", False, "stopped"),
        ("running", True, "running"),
        ("paused", True, "paused"),
        ("exited", True, "stopped"),
        ("removing", False, "stopped"),
    ],
)
def test_oci_status(status, alive, expected, live_pid):
    pid, start = live_pid if alive else (999999, 1)
    if status == "created" and alive is None:
        pid, start = 0, 0  # create is still on its way
    info = OciInfo(id="c1", bundle="/b", rootfs="/b/rootfs", created="now", standin_pid=pid, standin_start=start)
    assert oci_status(record(status), info) == expected


def test_state_json(live_pid):
    pid, start = live_pid
    info = OciInfo(
        id="c1",
        bundle="/b",
        rootfs="/b/rootfs",
        created="2026-01-01T00:00:00Z",
        annotations={"a": "b"},
        standin_pid=pid,
        standin_start=start,
    )
    state = state_of(record("running"), info)
    assert state["ociVersion"].startswith("1.")
    assert (state["id"], state["status"], state["pid"], state["bundle"]) == ("c1", "running", pid, "/b")
    assert state["annotations"] == {"a": "b"}
    assert state_of(record("exited"), info)["pid"] == 0


def test_store_roundtrip_and_exact_lookup(tmp_path):
    rt = RuntimeStore(tmp_path)
    rt.containers.create(record("created"))
    info = OciInfo(id="c1", bundle="/b", rootfs="/b/r", created="now")
    rt.save_info(info)
    rec, loaded = rt.load("c1")
    assert loaded == info and rec.name == "c1"
    assert rt.ids() == ["c1"]
    from shim.errors import ContainerNotFound

    with pytest.raises(ContainerNotFound, match="c does not exist"):
        rt.load("c")  # never a prefix match


def test_exec_pids_forget_dead_ones(tmp_path, live_pid):
    rt = RuntimeStore(tmp_path)
    rt.containers.create(record("running"))
    rt.save_info(OciInfo(id="c1", bundle="/b", rootfs="/b/r", created="now"))
    rt.add_exec("c1", live_pid[0])
    (rt.dir("c1") / "execs" / "999999").write_text("1")
    assert rt.exec_pids("c1") == [live_pid[0]]
    assert not (rt.dir("c1") / "execs" / "999999").exists()


def test_hooks_run_in_order_with_state(tmp_path):
    log = tmp_path / "log"
    script = tmp_path / "hook.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $X $(cat)" >> {log}\n')
    script.chmod(0o755)
    hooks = {
        "prestart": [
            {"path": str(script), "args": ["hook", "first"], "env": ["X=1"]},
            {"path": str(script), "args": ["hook", "second"], "env": ["X=2"]},
        ]
    }
    run_hooks("prestart", hooks, {"id": "c1"})
    assert log.read_text().splitlines() == ['first 1 {"id": "c1"}', 'second 2 {"id": "c1"}']


def test_failing_hooks(tmp_path):
    hooks = {
        "createRuntime": [{"path": "/bin/false"}],
        "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", "sleep 5"], "timeout": 1}],
    }
    with pytest.raises(HookError, match="createRuntime hook #0 .* exited with 1"):
        run_hooks("createRuntime", hooks, {})
    warnings = []
    run_hooks("poststop", hooks, {}, warn=warnings.append)
    assert warnings and "did not finish within 1 s" in warnings[0]


@pytest.mark.parametrize("text, number", [("9", 9), ("KILL", 9), ("SIGKILL", 9), ("term", 15), ("SIGUSR1", 10)])
def test_parse_signal(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("bad", ["SIGNOPE", "0", "999", "-1"])
def test_parse_signal_refuses(bad):
    with pytest.raises(click.BadParameter):
        parse_signal(bad)


def test_guest_spec_new_fields_roundtrip():
    process = ProcessSpec(
        args=["sh"], capabilities={"bounding": ["CAP_KILL"]}, no_new_privs=True, additional_gids=[5], umask=0o22
    )
    boot = BootConfig(
        container_id="c" * 64,
        token="t",
        hostname="h",
        process=process,
        layer_count=0,
        rootfs_share="vmshim-root",
        masked_paths=["/proc/kcore"],
        readonly_paths=[],
        sysctl={"kernel.shmmax": "1"},
        mounts=[MountSpec(type="bind", source="vmshim-b0", target="/etc/hosts", subpath="hosts")],
    )
    assert BootConfig.from_dict(boot.to_dict()) == boot
    plain = BootConfig(container_id="c" * 64, token="t", hostname="h", process=ProcessSpec(args=["sh"]), layer_count=1)
    data = plain.to_dict()
    for name in ("rootfs_share", "masked_paths", "readonly_paths", "sysctl"):
        assert name not in data  # older agents never see them
    assert "capabilities" not in data["process"]


@pytest.mark.parametrize("bad", [{"subpath": "../x"}, {"subpath": "/abs"}])
def test_mount_subpath_must_stay_inside(bad):
    with pytest.raises(ValueError, match="subpath"):
        MountSpec.from_dict({"type": "bind", "source": "t", "target": "/x", **bad})


def test_capability_masks_in_a_child():
    """The guest's capability code, run for real in a forked child on this host."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from guest.runtime import syscalls
    from guest.runtime.process import _drop_bounding, _set_capabilities

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _drop_bounding(["CAP_KILL", "CAP_CHOWN"])
            _set_capabilities(
                {"effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "inheritable": [], "ambient": ["CAP_KILL"]}
            )
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            with open("/proc/self/status") as f:
                os.write(w, f.read().encode())
        finally:
            os._exit(0)
    os.close(w)
    status = b""
    while chunk := os.read(r, 65536):
        status += chunk
    os.waitpid(pid, 0)
    fields = dict(line.split(":\t", 1) for line in status.decode().splitlines() if ":\t" in line)
    assert int(fields["CapBnd"], 16) == (1 << 5) | (1 << 0)
    assert int(fields["CapEff"], 16) == 1 << 5
    assert int(fields["CapAmb"], 16) == 0  # not inheritable: left out, as runc does
    assert fields["NoNewPrivs"].strip() == "1"


@pytest.mark.parametrize(
    "alive, started, paused, expected",
    [
        (None, False, False, "creating"),
        (True, False, False, "created"),
        (True, True, False, "running"),
        (True, True, True, "paused"),
        (False, True, False, "stopped"),
        (False, True, True, "stopped"),
        (False, False, False, "stopped"),
    ],
)
def test_a_pod_members_status_is_its_standins(alive, started, paused, expected, live_pid):
    pid, start = live_pid
    info = OciInfo(
        id="m1",
        bundle="/b",
        rootfs="/r",
        created="",
        sandbox="infra",
        member_tag="vmshim-m1",
        member_started=started,
        member_paused=paused,
    )
    if alive is not None:
        info.standin_pid, info.standin_start = pid, (start if alive else start + 1)
    assert oci_status(record("created"), info) == expected
