"""The agent's ``member`` (a pod member beside the container, guest.runtime.member),
driven like tests/unit/test_agent.py with plain processes: its replies and streams are
exec's, a bad config is refused with ``error``, and its share and directory go when its
process ends."""

from __future__ import annotations

import os

import pytest

from guest import protocol
from guest.runtime import member as member_mod
from guest.runtime.process import spawn_container
from guest.spec import BootConfig, ProcessSpec
from tests.unit.test_agent import TOKEN, FakeRuntime, make_host  # noqa: F401 - fixture

MEMBER_ID = "ab" * 32


class FakeCgroup:
    def __init__(self, log):
        self.log = log

    def freeze(self, frozen=True):
        self.log.append(("freeze", frozen))


class FakeContainer:
    def __init__(self, config, rootfs, log):
        self.config, self.rootfs, self.log = config, rootfs, log
        self.main = None
        self.cgroup = FakeCgroup(log)

    def start(self, process, *, stdin, rows, cols):
        self.log.append(("start", self.rootfs, process.args))
        spec = process.replace(user=f"{os.getuid()}:{os.getgid()}")
        self.main = spawn_container(None, spec, "", None, namespaces=(), stdin=stdin, rows=rows, cols=cols)
        return self.main

    def exec(self, process, *, stdin, rows, cols):
        self.log.append(("exec", self.rootfs, process.args))
        spec = process.replace(user=f"{os.getuid()}:{os.getgid()}")
        return spawn_container(None, spec, "", None, namespaces=(), stdin=stdin, rows=rows, cols=cols)

    def destroy(self):
        self.log.append(("destroy", self.rootfs))


class MemberRuntime(FakeRuntime):
    def __init__(self, base):
        super().__init__()
        self.base = str(base)
        self.log = []

    def start_member(self, config, *, stdin, rows, cols):
        def mount(tag, target, readonly):
            self.log.append(("mount", tag, target))
            os.makedirs(target, exist_ok=True)

        return member_mod.start_member(
            config,
            lambda c, rootfs, files: FakeContainer(c, rootfs, self.log),
            stdin=stdin,
            rows=rows,
            cols=cols,
            base_dir=self.base,
            mount=mount,
            wait=0.2,
        )


def member_config(args, **changes):
    values = dict(
        container_id=MEMBER_ID,
        token="t",
        hostname="pod",
        process=ProcessSpec(args=list(args)),
        layer_count=0,
        rootfs_share="vmshim-mab12",
    )
    values.update(changes)
    return BootConfig(**values).to_dict()


def test_a_member_runs_beside_the_container_and_is_torn_down(make_host, tmp_path):
    runtime = MemberRuntime(tmp_path / "members")
    host = make_host(["sleep", "30"], runtime=runtime)
    host.recv()
    assert host.start().type == protocol.STARTED
    host.send(
        protocol.MEMBER,
        token=TOKEN,
        id=7,
        stdin=False,
        tty=False,
        config=member_config(["sh", "-c", "echo member; exit 3"]),
    )
    assert host.recv().type == protocol.STARTED
    out, _, exit_msg, _ = host.collect(7)
    assert out == b"member\n" and exit_msg.get("code", int) == 3
    share = str(tmp_path / "members" / MEMBER_ID / "rootfs")
    assert runtime.log[0] == ("mount", "vmshim-mab12", share)
    assert runtime.log[1][:2] == ("start", share)
    host.send(protocol.SIGNAL, id=1, signal=9)
    host.collect(1)
    assert ("destroy", share) in runtime.log
    assert not (tmp_path / "members" / MEMBER_ID).exists()


@pytest.mark.parametrize(
    "change, why",
    [
        ({"rootfs_share": "vmshim-root"}, "rootfs share must be named"),
        ({"rootfs_share": "vmshim-m../../x"}, "rootfs share must be named"),
        ({"container_id": "../../etc"}, "container id must be 16-64 hex"),
        ({"layer_count": 2}, "takes no layers"),
    ],
)
def test_a_bad_member_config_is_refused(make_host, tmp_path, change, why):
    runtime = MemberRuntime(tmp_path / "members")
    host = make_host(["sleep", "30"], runtime=runtime)
    host.recv()
    assert host.start().type == protocol.STARTED
    host.send(protocol.MEMBER, token=TOKEN, id=7, config=member_config(["true"], **change))
    reply = host.recv()
    assert reply.type == protocol.ERROR and why in reply.get("message", str)
    assert not runtime.log
    host.send(protocol.MEMBER, token=TOKEN, id=8, config={"hostname": 5})
    reply = host.recv()
    assert reply.type == protocol.ERROR and "bad pod member config" in reply.get("message", str)
    host.send(protocol.MEMBER, token="wrong", id=9, config=member_config(["true"]))
    assert host.recv().type == protocol.ERROR
    host.send(protocol.SIGNAL, id=1, signal=9)
    host.collect(1)


def test_a_member_needs_a_running_container_and_a_runtime_that_runs_members(make_host, tmp_path):
    host = make_host(["sleep", "30"], runtime=MemberRuntime(tmp_path))
    host.recv()
    host.send(protocol.MEMBER, token=TOKEN, id=7, config=member_config(["true"]))
    assert "not running" in host.recv().get("message", str)
    assert host.start().type == protocol.STARTED
    host.send(protocol.SIGNAL, id=1, signal=9)
    host.collect(1)
    plain = make_host(["sleep", "30"])
    plain.recv()
    assert plain.start().type == protocol.STARTED
    plain.send(protocol.MEMBER, token=TOKEN, id=7, config=member_config(["true"]))
    assert "cannot run pod members" in plain.recv().get("message", str)
    plain.send(protocol.SIGNAL, id=1, signal=9)
    plain.collect(1)


def test_a_share_that_never_mounts_is_reported_and_cleaned_up(tmp_path):
    def mount(tag, target, readonly):
        raise OSError("no such tag")

    with pytest.raises(member_mod.MemberError, match="did not appear"):
        member_mod.start_member(
            BootConfig.from_dict(member_config(["true"])),
            lambda *a: None,
            stdin=False,
            base_dir=str(tmp_path),
            mount=mount,
            wait=0.1,
        )
    assert os.listdir(tmp_path) == []


def test_the_guest_may_not_send_member():
    msg = protocol.Message(protocol.MEMBER, {"id": 1, "config": {}})
    with pytest.raises(protocol.ProtocolError, match="may not send"):
        protocol.check_from_guest(msg)


def test_exec_into_a_running_member_runs_in_that_member(make_host, tmp_path):
    """``exec`` with ``member``: the process starts through that member's container (its
    namespaces and cgroup), with exec's replies and streams; a member that is not (or no
    longer) running, or an id that is no member's, is refused with ``error``."""
    runtime = MemberRuntime(tmp_path / "members")
    host = make_host(["sleep", "30"], runtime=runtime)
    host.recv()
    assert host.start().type == protocol.STARTED
    host.send(protocol.MEMBER, token=TOKEN, id=7, stdin=True, tty=False, config=member_config(["sleep", "30"]))
    assert host.recv().type == protocol.STARTED
    share = str(tmp_path / "members" / MEMBER_ID / "rootfs")
    exec_process = ProcessSpec(args=["sh", "-c", "echo inside; exit 4"]).to_dict()
    host.send(protocol.EXEC, token=TOKEN, id=8, process=exec_process, member=MEMBER_ID)
    assert host.recv().type == protocol.STARTED
    out, _, exit_msg, _ = host.collect(8)
    assert out == b"inside\n" and exit_msg.get("code", int) == 4
    assert ("exec", share, ["sh", "-c", "echo inside; exit 4"]) in runtime.log
    for bad_id in ("cd" * 32, "../../proc/1", "a" * 65):
        host.send(protocol.EXEC, token=TOKEN, id=9, process=exec_process, member=bad_id)
        reply = host.recv()
        assert reply.type == protocol.ERROR and "pod member" in reply.get("message", str)
    host.send(protocol.EXEC, token=TOKEN, id=9, process=exec_process, member=5)
    assert host.recv().type == protocol.ERROR
    host.send(protocol.SIGNAL, id=7, signal=9)
    host.collect(7)
    host.send(protocol.EXEC, token=TOKEN, id=10, process=exec_process, member=MEMBER_ID)
    reply = host.recv()
    assert reply.type == protocol.ERROR and "no pod member" in reply.get("message", str)
    host.send(protocol.SIGNAL, id=1, signal=9)
    host.collect(1)


def test_freeze_and_thaw_a_running_member(make_host, tmp_path):
    """``freeze``: the member's cgroup is frozen or thawed (``updated``); an id that is no
    running member's, a missing ``frozen`` or a wrong token is refused with ``error``."""
    runtime = MemberRuntime(tmp_path / "members")
    host = make_host(["sleep", "30"], runtime=runtime)
    host.recv()
    assert host.start().type == protocol.STARTED
    host.send(protocol.MEMBER, token=TOKEN, id=7, stdin=True, tty=False, config=member_config(["sleep", "30"]))
    assert host.recv().type == protocol.STARTED
    for frozen in (True, False):
        host.send(protocol.FREEZE, token=TOKEN, id=20, member=MEMBER_ID, frozen=frozen)
        reply = host.recv()
        assert reply.type == protocol.UPDATED and reply.get("id", int) == 20
    assert [e for e in runtime.log if e[0] == "freeze"] == [("freeze", True), ("freeze", False)]
    for fields in (
        {"token": TOKEN, "member": "cd" * 32, "frozen": True},
        {"token": TOKEN, "member": "../../sys/fs/cgroup", "frozen": True},
        {"token": TOKEN, "member": MEMBER_ID},
        {"token": "wrong", "member": MEMBER_ID, "frozen": True},
    ):
        host.send(protocol.FREEZE, id=21, **fields)
        assert host.recv().type == protocol.ERROR
    assert len([e for e in runtime.log if e[0] == "freeze"]) == 2
    host.send(protocol.SIGNAL, id=7, signal=9)
    host.collect(7)
    host.send(protocol.SIGNAL, id=1, signal=9)
    host.collect(1)


def test_the_guest_may_not_send_freeze():
    msg = protocol.Message(protocol.FREEZE, {"id": 1, "member": MEMBER_ID, "frozen": True})
    with pytest.raises(protocol.ProtocolError, match="may not send"):
        protocol.check_from_guest(msg)


@pytest.mark.parametrize("value", ["uts", ["net"], ["uts", "uts"], ["mnt"], [1], {"uts": 1}])
def test_sandbox_namespaces_are_only_uts_and_ipc(value):
    with pytest.raises(ValueError, match="sandbox_namespaces"):
        BootConfig.from_dict(member_config(["true"]) | {"sandbox_namespaces": value})


def test_sandbox_namespaces_round_trip():
    config = BootConfig.from_dict(member_config(["true"], sandbox_namespaces=["ipc", "uts"]))
    assert config.sandbox_namespaces == ["ipc", "uts"]
    assert "sandbox_namespaces" not in BootConfig.from_dict(member_config(["true"])).to_dict()
