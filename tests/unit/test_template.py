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
