"""VmPlacement (the monitor's view of a container's microVM) against the FakeBackend:
domain with the writable disk, kill, teardown, reattach, pause, usage, the rw disk."""

import subprocess
import threading
import time
from types import SimpleNamespace


from guest.spec import BootConfig, ProcessSpec, WRITABLE_SERIAL
from shim.containers.vm_placement import VmPlacement, domain_name, make_rw_disk
from shim.vm.accel import AccelInfo
from shim.vm.fake_backend import FakeBackend

CID = "ab" * 32


def placement(tmp_path, backend, rw=True):
    boot = BootConfig(
        container_id=CID, token="t", hostname="h", process=ProcessSpec(args=["true"]), layer_count=1, writable="disk"
    )
    layer = tmp_path / "l0.sqfs"
    layer.write_bytes(b"")
    return VmPlacement(
        boot, [layer], tmp_path / "run", name="web", rw_disk=tmp_path / "rw.img" if rw else None, backend=backend
    )


def guest(tmp_path):
    return SimpleNamespace(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initrd", cmdline="console=ttyS0")


def test_domain_has_the_writable_disk_last_and_writable(tmp_path):
    p = placement(tmp_path, FakeBackend())
    dom = p.build_domain(guest(tmp_path), AccelInfo("tcg", "test"))
    assert dom.name == domain_name(CID) == "vmshim-abababababab"
    rw = dom.disks[-1]
    assert (rw.serial, rw.readonly, rw.source) == (WRITABLE_SERIAL, False, str(tmp_path / "rw.img"))
    assert [d.readonly for d in dom.disks[:-1]] == [True, True]
    assert "vmshim-rw" in dom.to_xml()
    without = placement(tmp_path, FakeBackend(), rw=False)
    assert all(d.serial != WRITABLE_SERIAL for d in without.build_domain(guest(tmp_path), AccelInfo("tcg", "t")).disks)


def test_kill_teardown_and_reattach(tmp_path):
    backend = FakeBackend()
    p = placement(tmp_path, backend)
    backend.create(p.build_domain(guest(tmp_path), AccelInfo("tcg", "t")))
    p.run_dir.mkdir()
    assert p.running() and p.info()["QemuPid"] > 0
    p.pause()
    assert backend.is_paused(p.domain)
    p.resume()
    assert not backend.is_paused(p.domain)
    assert p.usage()["memory_limit"] == 256 << 20
    p.kill()
    assert not p.running()
    assert p.reattach() is None  # nothing to re-attach to
    p.teardown(grace=0)
    assert not p.run_dir.exists()


def test_teardown_kills_a_vm_that_does_not_power_off(tmp_path):
    backend = FakeBackend()
    p = placement(tmp_path, backend)
    backend.create(p.build_domain(guest(tmp_path), AccelInfo("tcg", "t")))
    begin = time.monotonic()
    p.teardown(grace=0.3, timeout=5)
    assert not backend.vms and 0.25 < time.monotonic() - begin < 3
    assert ("destroy", p.domain) in backend.calls


def test_teardown_survives_an_unreachable_libvirtd(tmp_path):
    backend = FakeBackend()
    p = placement(tmp_path, backend)
    backend.unreachable = "connection refused"
    p.teardown(grace=0, timeout=0.6)  # retries, then gives up without raising
    assert not p.run_dir.exists()


def test_rw_disk_is_a_sparse_ext4(tmp_path):
    path = tmp_path / "rw.img"
    make_rw_disk(path)
    assert path.stat().st_size == 8 << 30
    assert path.stat().st_blocks * 512 < 64 << 20  # sparse
    probe = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True)
    assert "Filesystem volume name:   vmshim-rw" in probe.stdout
    assert not (tmp_path / "rw.img.tmp").exists()


def test_teardown_returns_once_qemu_is_gone_without_waiting_for_libvirt(tmp_path):
    """libvirt keeps knowing the domain 1-2 s after QEMU exited; stop must not wait on it."""
    backend = FakeBackend()
    p = placement(tmp_path, backend)
    backend.create(p.build_domain(guest(tmp_path), AccelInfo("tcg", "t")))
    backend.simulate_exit(p.domain)
    never = threading.Event()  # libvirt that never forgets: a wait on it lasts its whole timeout
    backend.wait_gone = lambda name, timeout=10.0: never.wait(timeout)
    begin = time.monotonic()
    p.teardown(grace=3, timeout=5)
    assert time.monotonic() - begin < 1
    assert not p.run_dir.exists()
