"""The fake backend keeps the Backend contract, so tests of the modules above can trust it."""

from __future__ import annotations

import threading

import pytest

from shim.errors import HypervisorError
from shim.vm.backend import Backend, VmHandle, VmNotFound
from shim.vm.domain import AgentChannel, Domain, KernelBoot, SerialLog
from shim.vm.fake_backend import FakeBackend


def _domain(name="vmshim-one", **kw) -> Domain:
    return Domain(
        name=name,
        uuid="11111111-2222-3333-4444-555555555555",
        memory_mib=64,
        vcpus=1,
        domain_type="qemu",
        boot=KernelBoot(kernel="/k/vmlinuz", initrd="/k/initrd"),
        channels=[AgentChannel(socket_path=f"/run/x/{name}.sock")],
        serial=SerialLog(path=f"/var/x/{name}.log"),
        **kw,
    )


def test_is_a_backend():
    assert isinstance(FakeBackend(), Backend)


def test_create_records_xml_and_returns_handle():
    backend = FakeBackend()
    handle = backend.create(_domain(metadata={"container-id": "abc"}))
    assert handle == VmHandle(
        name="vmshim-one",
        uuid="11111111-2222-3333-4444-555555555555",
        agent_socket="/run/x/vmshim-one.sock",
        serial_log="/var/x/vmshim-one.log",
    )
    assert backend.created == [_domain(metadata={"container-id": "abc"}).to_xml()]
    assert backend.vms["vmshim-one"].root.find("memory").text == "64"
    assert backend.is_running("vmshim-one")
    assert backend.list_domains() == ["vmshim-one"]
    assert isinstance(backend.qemu_pid("vmshim-one"), int)


def test_duplicate_name_is_refused():
    backend = FakeBackend()
    backend.create(_domain())
    with pytest.raises(HypervisorError, match="still running"):
        backend.create(_domain())


def test_simulated_exit_makes_the_vm_vanish():
    backend = FakeBackend()
    backend.create(_domain())
    backend.simulate_exit("vmshim-one")
    assert not backend.is_running("vmshim-one")
    assert backend.qemu_pid("vmshim-one") is None
    assert backend.list_domains() == []
    assert backend.wait_gone("vmshim-one", timeout=0)


def test_wait_gone_wakes_on_exit_from_another_thread():
    backend = FakeBackend()
    backend.create(_domain())
    timer = threading.Timer(0.05, backend.simulate_exit, args=("vmshim-one",))
    timer.start()
    assert backend.wait_gone("vmshim-one", timeout=5)
    timer.join()
    assert backend.wait_gone("vmshim-never", timeout=0)  # absent: true at once


def test_wait_gone_times_out():
    backend = FakeBackend()
    backend.create(_domain())
    assert backend.wait_gone("vmshim-one", timeout=0.01) is False


def test_destroy_is_idempotent():
    backend = FakeBackend()
    backend.create(_domain())
    backend.destroy("vmshim-one")
    backend.destroy("vmshim-one")
    backend.destroy("vmshim-never", wait=False)
    assert backend.list_domains() == []
    assert ("destroy", "vmshim-never") in backend.calls


def test_fail_next_create():
    backend = FakeBackend()
    backend.fail_next_create("out of memory")
    with pytest.raises(HypervisorError, match="cannot start VM vmshim-one: out of memory"):
        backend.create(_domain())
    backend.create(_domain())  # only the next one fails
    assert backend.is_running("vmshim-one")


def test_suspend_resume():
    backend = FakeBackend()
    backend.create(_domain())
    backend.suspend("vmshim-one")
    assert backend.is_paused("vmshim-one") and backend.is_running("vmshim-one")
    backend.resume("vmshim-one")
    assert not backend.is_paused("vmshim-one")
    with pytest.raises(VmNotFound, match="cannot pause VM vmshim-gone: no such VM"):
        backend.suspend("vmshim-gone")
    with pytest.raises(HypervisorError):
        backend.resume("vmshim-gone")


def test_list_filters_by_prefix():
    backend = FakeBackend()
    for name in ("vmshim-b", "vmshim-a", "other"):
        backend.create(_domain(name=name))
    assert backend.list_domains() == ["vmshim-a", "vmshim-b"]
    assert backend.list_domains(prefix="oth") == ["other"]


def test_unreachable_hypervisor():
    backend = FakeBackend(unreachable="Connection refused")
    with pytest.raises(HypervisorError, match="cannot reach libvirtd"):
        backend.list_domains()
