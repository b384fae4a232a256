"""Snapshot templates without a VM: which containers may start from one, and that the
template key follows everything a saved VM depends on."""

from __future__ import annotations

import pytest

from guest.spec import ProcessSpec
from shim.containers import template
from shim.containers.netrequest import NetworkRequest
from shim.containers.resources import Resources
from shim.containers.store import Container
from shim.volumes.specs import MountRequest


def record(**kw) -> Container:
    values = dict(
        id="a" * 64,
        name="t",
        image="busybox",
        image_id="sha256:abc",
        isolation="vm",
        process=ProcessSpec(args=["true"]),
        hostname="aaaaaaaaaaaa",
        token="0" * 32,
        layer_disks=["/l/0.sqfs"],
        writable="tmpfs",
        auto_remove=True,
        network=NetworkRequest(networks=["none"]),
    )
    values.update(kw)
    return Container(**values)


def test_identity_does_not_change_the_shape():
    one = template.shape_of(record())
    other = template.shape_of(
        record(
            id="b" * 64,
            hostname="other",
            token="1" * 32,
            process=ProcessSpec(args=["sleep", "9"], env=["A=1"]),
            name="u",
            hosts="127.0.0.1 other\n",
        )
    )
    assert one is not None and one == other
    guest = {"guest_image": "g", "kernel_release": "6.1", "accel": "tcg"}
    assert template.key_of(one, guest) == template.key_of(other, guest)
    assert template.key_of(one, guest) != template.key_of(one, {**guest, "guest_image": "h"})
    assert template.shape_of(record(layer_disks=["/l/1.sqfs"])) != one


@pytest.mark.parametrize(
    "change",
    [
        {"writable": "disk"},
        {"isolation": "process"},
        {"network": NetworkRequest(networks=["bridge"])},
        {"mounts": [MountRequest(type="tmpfs", target="/x")]},
        {"rootfs": "/bundle"},
        {"privileged": True},
        {"os_container": True},
        {"sysctl": {"kernel.x": "1"}},
        {"devices": [{"path": "/dev/fuse"}]},
        {"resources": Resources(memory=64 << 20)},
    ],
)
def test_what_cannot_start_from_a_template(change):
    assert template.shape_of(record(**change)) is None


def test_templates_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path))
    monkeypatch.setenv("VMSHIM_TEMPLATES", "off")
    assert template.find(record()) is None


def test_a_template_vm_is_booted_for_it_never_taken_from_the_warm_pool(monkeypatch, tmp_path):
    """A saved pooled VM would name the pool's domain, not the template's: every restore
    of it failed ("the save image … does not name …") and booted cold."""
    from shim.containers import template_build
    from shim.containers.vm_placement import VmPlacement

    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path))
    monkeypatch.setattr(template_build, "guest_identity", lambda: {"guest_image": "g"})
    asked = []

    def boot(self, alive=None):
        asked.append(self.pool_ok)
        raise template_build.VmshimError("no VM in a unit test")

    monkeypatch.setattr(VmPlacement, "boot", boot)
    monkeypatch.setattr(VmPlacement, "teardown", lambda self, grace=0.0: None)
    monkeypatch.setattr(VmPlacement, "kill", lambda self: None)
    with pytest.raises(template_build.VmshimError, match="no VM"):
        template_build.create(record())
    assert asked == [False]


def test_a_restored_template_gets_its_identity_as_soon_as_the_socket_connects(monkeypatch, tmp_path):
    """restore_into hands the identity to the placement to send right after connecting,
    before the agent's hello is read (the agent takes it right behind the hello), and
    takes it back whatever happens: a placement that boots cold after a failed restore
    must never send it."""
    from guest import protocol
    from guest.spec import BootConfig
    from shim.containers import template
    from shim.vm import saveimage

    monkeypatch.setattr(saveimage, "clone", lambda src, dst, replacements: dst.write_bytes(b"image"))
    boot = BootConfig(
        container_id="c" * 64, token="t" * 32, hostname="h", process=ProcessSpec(args=["true"]), layer_count=1
    )
    meta = {"dir": str(tmp_path), "id": "a" * 64, "uuid": "u" * 36, "token": "o" * 32}

    class Client:
        closed = False

        def recv(self, timeout, alive=None):
            return protocol.Message(protocol.UPDATED, {"id": template.IDENTITY_ID}, b"")

        def close(self):
            self.closed = True

    class Placement:
        run_dir = tmp_path / "run"
        boot_config = boot
        send_before_hello: list = []
        seen: list = []
        fail = False

        def restore(self, image, alive=None):
            self.seen = list(self.send_before_hello)
            if self.fail:
                raise template.VmshimError("restore failed")
            return Client()

        def kill(self):
            pass

    placement = Placement()
    assert isinstance(template.restore_into(placement, meta), Client)
    [(kind, entropy, fields)] = placement.seen
    assert kind == protocol.IDENTITY and len(entropy) == 64
    assert fields["new_token"] == "t" * 32 and fields["token"] == "o" * 32 and fields["hostname"] == "h"
    assert placement.send_before_hello == []
    placement.fail = True
    with pytest.raises(template.VmshimError):
        template.restore_into(placement, meta)
    assert placement.seen and placement.send_before_hello == []
