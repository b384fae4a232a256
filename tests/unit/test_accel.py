"""Accelerator detection with fake probe pieces (no KVM needed), plus the real probe
against this host's /dev/kvm when there is one (it is quick and harmless)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from shim.errors import UsageError
from shim.vm import accel
from shim.vm.accel import AccelInfo, GuestRun, Probes, detect_accel, probe_kvm


def _fd_factory(tmp_path):
    """open_device fake that returns a real fd (probe_kvm closes it)."""
    target = tmp_path / "fd"
    target.write_text("")
    return lambda _path: os.open(target, os.O_RDONLY)


def _raise(exc):
    def fake(*_args):
        raise exc

    return fake


def _never(*_args):
    raise AssertionError("should not be called")


@pytest.fixture
def kvm_node(tmp_path):
    """A file standing in for /dev/kvm: detect_accel only stats it; the fakes do the rest."""
    node = tmp_path / "kvm"
    node.write_text("")
    return str(node)


def _probes(tmp_path, version=12, run=GuestRun(stage=3, exit="KVM_EXIT_HLT")):
    calls = []

    def run_guest(path):
        calls.append(path)
        return run

    return Probes(open_device=_fd_factory(tmp_path), api_version=lambda _fd: version, run_guest=run_guest), calls


def test_kvm_when_the_test_guest_reaches_long_mode(tmp_path, kvm_node):
    probes, calls = _probes(tmp_path)
    info = probe_kvm(kvm_node, probes)
    assert info.kind == "kvm" and info.domain_type == "kvm"
    assert "long mode" in info.reason
    assert calls == [kvm_node]


def test_tcg_when_the_test_guest_stops_early(tmp_path, kvm_node):
    probes, _ = _probes(tmp_path, run=GuestRun(stage=2, exit="KVM_EXIT_SHUTDOWN (a triple fault)"))
    info = probe_kvm(kvm_node, probes)
    assert info.kind == "tcg" and info.domain_type == "qemu"
    assert info.reason.startswith(f"{kvm_node} exists but a test guest did not run under it (")
    assert "KVM_EXIT_SHUTDOWN" in info.reason and "protected mode" in info.reason


def test_tcg_when_the_test_guest_hangs(tmp_path, kvm_node):
    probes, _ = _probes(tmp_path, run=GuestRun(stage=-1, exit="no exit within 3 s"))
    assert "no exit within 3 s" in probe_kvm(kvm_node, probes).reason


def test_missing_device(tmp_path):
    probes = Probes(open_device=_raise(FileNotFoundError(errno.ENOENT, "x")), api_version=_never, run_guest=_never)
    info = probe_kvm("/nonexistent/kvm", probes)
    assert info == AccelInfo("tcg", "/nonexistent/kvm does not exist (no KVM on this host)")


def test_device_not_openable(kvm_node):
    probes = Probes(open_device=_raise(PermissionError(errno.EACCES, "denied")), api_version=_never, run_guest=_never)
    info = probe_kvm(kvm_node, probes)
    assert info.kind == "tcg"
    assert "cannot be opened (Permission denied)" in info.reason
    assert "kvm group" in info.reason


def test_wrong_api_version(tmp_path, kvm_node):
    probes, calls = _probes(tmp_path, version=11)
    info = probe_kvm(kvm_node, probes)
    assert info.kind == "tcg" and "API version 11, expected 12" in info.reason
    assert calls == []


def test_not_a_kvm_device(kvm_node):
    # The real open + ioctl on a regular file: KVM_GET_API_VERSION fails with ENOTTY.
    probes = Probes(run_guest=_never)
    info = probe_kvm(kvm_node, probes)
    assert info.kind == "tcg" and "does not answer KVM_GET_API_VERSION" in info.reason


def test_env_override_wins_without_probing(tmp_path):
    for kind in ("kvm", "tcg", "KVM"):
        info = detect_accel(
            env={"VMSHIM_ACCEL": kind},
            cache=tmp_path / "a.json",
            probes=Probes(open_device=_never, api_version=_never, run_guest=_never),
        )
        assert info == AccelInfo(kind.lower(), "forced by VMSHIM_ACCEL")
    assert not (tmp_path / "a.json").exists()


def test_env_override_rejects_other_values(tmp_path):
    with pytest.raises(UsageError, match="VMSHIM_ACCEL must be 'kvm' or 'tcg'"):
        detect_accel(env={"VMSHIM_ACCEL": "hvf"}, cache=tmp_path / "a.json")


def test_missing_device_needs_no_probe_and_no_cache(tmp_path):
    info = detect_accel(
        path=str(tmp_path / "nokvm"),
        env={},
        cache=tmp_path / "a.json",
        probes=Probes(open_device=_never, api_version=_never, run_guest=_never),
    )
    assert info.kind == "tcg" and "does not exist" in info.reason
    assert not (tmp_path / "a.json").exists()


def test_result_is_cached_and_keyed_by_the_device(tmp_path, kvm_node):
    cache = tmp_path / "state" / "accel.json"
    probes, calls = _probes(tmp_path)
    first = detect_accel(path=kvm_node, env={}, cache=cache, probes=probes)
    second = detect_accel(path=kvm_node, env={}, cache=cache, probes=probes)
    assert first == second and first.kind == "kvm"
    assert len(calls) == 1
    stored = json.loads(cache.read_text())
    assert stored["kind"] == "kvm" and os.uname().release in stored["key"]

    # A changed node (chmod changes ctime; a reboot makes a new inode) is probed again.
    os.chmod(kvm_node, 0o600)
    detect_accel(path=kvm_node, env={}, cache=cache, probes=probes)
    assert len(calls) == 2


def test_corrupt_cache_is_ignored(tmp_path, kvm_node):
    cache = tmp_path / "accel.json"
    cache.write_text("{not json")
    probes, calls = _probes(tmp_path)
    assert detect_accel(path=kvm_node, env={}, cache=cache, probes=probes).kind == "kvm"
    assert len(calls) == 1


def test_unwritable_cache_is_not_an_error(tmp_path, kvm_node):
    blocker = tmp_path / "file"
    blocker.write_text("")
    probes, _ = _probes(tmp_path)
    info = detect_accel(path=kvm_node, env={}, cache=blocker / "accel.json", probes=probes)
    assert info.kind == "kvm"


def test_default_cache_lives_under_vmshim_root(tmp_path, kvm_node, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    probes, _ = _probes(tmp_path)
    detect_accel(path=kvm_node, env={}, probes=probes)
    assert (tmp_path / "root" / "accel.json").exists()


def test_guest_run_ok_only_at_the_final_stage():
    assert GuestRun(3, "KVM_EXIT_HLT").ok
    assert not GuestRun(2, "KVM_EXIT_HLT").ok
    assert not GuestRun(3, "KVM_EXIT_SHUTDOWN").ok


def test_test_guest_layout():
    guest = accel.TEST_GUEST
    assert len(guest) == 142
    assert guest[0x88:0x8E] == bytes.fromhex("1f0068100000")  # gdtr -> gdt at 0x1068
    assert guest[0x60] == 0xF4  # hlt after the stage-3 out


def test_run_test_guest_on_a_non_kvm_file_reports_the_failing_step(kvm_node):
    run = accel.run_test_guest(kvm_node)
    assert not run.ok
    assert run.stage == 0 and "KVM_CREATE_VM" in run.exit


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
def test_real_probe_on_this_host_is_quick_and_decides(tmp_path):
    import time

    start = time.monotonic()
    info = probe_kvm()
    assert time.monotonic() - start < 1.0
    assert info.kind in ("kvm", "tcg") and info.reason


def test_libvirt_permission_hint(tmp_path):
    assert accel.libvirt_kvm_problem(str(tmp_path / "absent")) is None
    assert accel.libvirt_kvm_problem(str(tmp_path)) is None  # not a char device


def test_cpu_readback_is_words_unless_the_environment_says_per_feature():
    from shim.vm.accel import cpu_readback

    assert cpu_readback(env={}) == "words"
    assert cpu_readback(env={"VMSHIM_CPU_READBACK": " Per-Feature "}) == "per-feature"
    with pytest.raises(UsageError, match="VMSHIM_CPU_READBACK must be one of words, per-feature, not 'fast'"):
        cpu_readback(env={"VMSHIM_CPU_READBACK": "fast"})
