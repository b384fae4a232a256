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
    for name, value in (
        ("run", "0"),
        ("pages_to_scan", "100"),
        ("sleep_millisecs", "200"),
        ("pages_shared", "10"),
        ("pages_sharing", "512"),
    ):
        (d / name).write_text(value)
    return d


def test_defaults_and_ksm_on_then_off(ksm):
    assert memory.load() == memory.MemorySettings(ksm=False, free_page_reporting=True)
    assert memory.status(ksm)["ksm_host"] == {
        "available": True,
        "running": False,
        "pages_shared": 10,
        "pages_sharing": 512,
    }
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

    boot = BootConfig(
        container_id="ef" * 32, token="t", hostname="h", process=ProcessSpec(args=["true"]), layer_count=0
    )
    p = VmPlacement(boot, [], tmp_path / "run", name="m")
    guest = SimpleNamespace(kernel=tmp_path / "k", initramfs=tmp_path / "i", cmdline="x")
    default = p.build_domain(guest, AccelInfo("tcg", "t")).to_xml()
    assert "<nosharepages />" in default and 'freePageReporting="on"' in default
    off = p.build_domain(guest, AccelInfo("tcg", "t"), memory.MemorySettings(free_page_reporting=False)).to_xml()
    assert "<nosharepages />" in off and '<memballoon model="none" />' in off
    on = p.build_domain(
        guest, AccelInfo("tcg", "t"), memory.MemorySettings(ksm=True, free_page_reporting=True)
    ).to_xml()
    assert "nosharepages" not in on and 'freePageReporting="on"' in on


class FakeKsmd:
    """A fake ksmd: each sleep is one poll; *scans* lists (full_scans, pages_sharing) per poll."""

    def __init__(self, d, scans):
        self.d, self.scans, self.t = d, list(scans), 0.0
        self.write()

    def write(self):
        scan, sharing = self.scans[0]
        (self.d / "full_scans").write_text(str(scan))
        (self.d / "pages_sharing").write_text(str(sharing))

    def sleep(self, s):
        self.t += s
        if len(self.scans) > 1:
            self.scans.pop(0)
        self.write()

    def clock(self):
        return self.t


def test_settle_waits_two_scans_and_a_stable_sharing(ksm):
    # scan 5 -> 6 merges a lot (not stable), 6 -> 7 still growing, 7 -> 8 stable
    fake = FakeKsmd(ksm, [(5, 0), (5, 0), (6, 9000), (6, 9000), (7, 20000), (8, 20050)])
    got = memory.ksm_settle(ksm, timeout=120, poll=1, sleep=fake.sleep, clock=fake.clock)
    assert got.settled and got.full_scans == 8 and got.pages_sharing == 20050


def test_settle_needs_two_scans_even_when_stable(ksm):
    fake = FakeKsmd(ksm, [(5, 100), (6, 100), (6, 100), (7, 100)])
    got = memory.ksm_settle(ksm, timeout=120, poll=1, sleep=fake.sleep, clock=fake.clock)
    assert got.settled and got.full_scans == 7


def test_settle_gives_up_at_the_timeout(ksm):
    # ksmd never finishes a scan (or keeps merging): the wait is bounded
    fake = FakeKsmd(ksm, [(5, 100)])
    got = memory.ksm_settle(ksm, timeout=10, poll=1, sleep=fake.sleep, clock=fake.clock)
    assert not got.settled and fake.t <= 11
    growing = FakeKsmd(ksm, [(i, i * 10000) for i in range(50)])
    got = memory.ksm_settle(ksm, timeout=10, poll=1, sleep=growing.sleep, clock=growing.clock)
    assert not got.settled


def test_ksm_off_restores_the_hosts_scan_rate(ksm):
    memory.save(memory.MemorySettings(ksm=True), ksm)
    assert (ksm / "sleep_millisecs").read_text() == str(memory.KSM_SLEEP_MS)
    memory.save(memory.MemorySettings(ksm=False), ksm)
    assert (ksm / "pages_to_scan").read_text() == "100"
    assert (ksm / "sleep_millisecs").read_text() == "200"
    # a garbled saved value is not written to sysfs
    memory.save(memory.MemorySettings(ksm=True), ksm)
    (memory.paths.root() / "ksm-previous.json").write_text('{"pages_to_scan": "-1 junk"}')
    memory.save(memory.MemorySettings(ksm=False), ksm)
    assert (ksm / "pages_to_scan").read_text() == str(memory.KSM_PAGES_TO_SCAN)
