"""shim.vm.memory against a fake /sys/kernel/mm/ksm: KSM off and free page reporting on by
default, KSM
started with the measured scan rate and stopped with an unmerge, a host without KSM, and
what reaches the domain XML."""

from __future__ import annotations

import pytest

from shim.errors import VmshimError
from shim.vm import memory


@pytest.fixture
def ksm(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    d = tmp_path / "ksm"
    d.mkdir()
    for name, value in (("run", "0"), ("pages_to_scan", "100"), ("sleep_millisecs", "200"),
                        ("pages_shared", "10"), ("pages_sharing", "512")):
        (d / name).write_text(value)
    return d


def test_defaults_and_ksm_on_then_off(ksm):
    assert memory.load() == memory.MemorySettings(ksm=False, free_page_reporting=True)
    assert memory.status(ksm)["ksm_host"] == {"available": True, "running": False,
                                              "pages_shared": 10, "pages_sharing": 512}
    memory.save(memory.MemorySettings(ksm=True, free_page_reporting=True), ksm)
    assert (ksm / "run").read_text() == "1"
    assert (ksm / "pages_to_scan").read_text() == str(memory.KSM_PAGES_TO_SCAN)
    assert memory.load() == memory.MemorySettings(ksm=True, free_page_reporting=True)
    memory.save(memory.MemorySettings(free_page_reporting=True), ksm)
    assert (ksm / "run").read_text() == "2"  # stopped and unmerged


def test_a_host_without_ksm(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    with pytest.raises(VmshimError, match="no KSM"):
        memory.save(memory.MemorySettings(ksm=True), tmp_path / "nothing")
    assert memory.load().ksm is False
    assert memory.ksm_host(tmp_path / "nothing")["available"] is False


def test_a_garbled_setting_is_the_default(ksm):
    memory.settings_path().parent.mkdir(parents=True, exist_ok=True)
    for text in ('{"ksm": "yes", "free_page_reporting": 0}', "[1, 2", "[1, 2]", "{}"):
        memory.settings_path().write_text(text)
        assert memory.load() == memory.MemorySettings(ksm=False, free_page_reporting=True), text


def test_free_page_reporting_turned_off_stays_off(ksm):
    memory.save(memory.MemorySettings(free_page_reporting=False), ksm)
    assert memory.load().free_page_reporting is False
    memory.settings_path().write_text('{"free_page_reporting": false}')
    assert memory.load() == memory.MemorySettings(ksm=False, free_page_reporting=False)


def test_settings_reach_the_container_domain(tmp_path):
    from types import SimpleNamespace

    from guest.spec import BootConfig, ProcessSpec
    from shim.containers.vm_placement import VmPlacement
    from shim.vm.accel import AccelInfo

    boot = BootConfig(container_id="ef" * 32, token="t", hostname="h",
                      process=ProcessSpec(args=["true"]), layer_count=0)
    p = VmPlacement(boot, [], tmp_path / "run", name="m")
    guest = SimpleNamespace(kernel=tmp_path / "k", initramfs=tmp_path / "i", cmdline="x")
    default = p.build_domain(guest, AccelInfo("tcg", "t")).to_xml()
    assert "<nosharepages />" in default and 'freePageReporting="on"' in default
    off = p.build_domain(guest, AccelInfo("tcg", "t"),
                         memory.MemorySettings(free_page_reporting=False)).to_xml()
    assert "<nosharepages />" in off and '<memballoon model="none" />' in off
    on = p.build_domain(guest, AccelInfo("tcg", "t"),
                        memory.MemorySettings(ksm=True, free_page_reporting=True)).to_xml()
    assert "nosharepages" not in on and 'freePageReporting="on"' in on
