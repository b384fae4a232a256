"""The guest kernel: the built minimal kernel has what the agent needs, the running guest
boots the kernel `vmshim info` names, and `vmshim bench` compares both kernels.

Checks of the minimal kernel need it built in the test root (`vmshim guest kernel build`;
scripts/test builds it); without it they are skipped with that reason.
"""

from __future__ import annotations

import gzip
import json

import pytest

from shim import guestimage, kernelbuild
from shim.vm.accel import detect_accel, host_tsc_khz
from tests.e2e.conftest import vmshim, wait_no_new_domains


def _minimal_or_skip() -> kernelbuild.MinimalKernel:
    built = kernelbuild.cached_kernel()
    if built is None:
        pytest.skip("the minimal kernel is not built in this state root (vmshim guest kernel build)")
    return built


def test_built_minimal_kernel_config_has_what_the_agent_needs():
    built = _minimal_or_skip()
    config = kernelbuild.parse_config(built.config.read_text())
    missing = kernelbuild.check_config(config)
    assert not missing, "the minimal kernel lacks what the agent needs:\n" + "\n".join(missing)
    assert config.get("CONFIG_MODULES") == "n"
    proc = vmshim("guest", "kernel", "check")
    assert proc.returncode == 0 and b"all" in proc.stdout, proc.stderr


def test_kernel_check_names_the_missing_option(tmp_path):
    config = tmp_path / "config"
    config.write_text(
        "".join(f"{name}=y\n" for name in kernelbuild.REQUIRED_OPTIONS if name != "CONFIG_OVERLAY_FS")
        + "CONFIG_OVERLAY_FS=m\n"
    )
    proc = vmshim("guest", "kernel", "check", str(config))
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "CONFIG_OVERLAY_FS is m, needs y: the container rootfs is an overlay" in err
    assert "Traceback" not in err


def test_info_says_which_kernel_and_why():
    choice, reason = guestimage.kernel_choice()
    info = json.loads(vmshim("info", "--format", "json", check=True).stdout)
    assert (info["guest_kernel"], info["guest_kernel_reason"]) == (choice, reason)
    ginfo = json.loads(vmshim("guest", "info", "--format", "json", check=True).stdout)
    assert ginfo["kernel_choice"] == choice
    assert ginfo["kernel"]["source"] == {"minimal": "minimal", "distro": "debian"}.get(choice, "override")
    text = vmshim("guest", "info", check=True).stdout.decode()
    assert f"kernel choice  {choice}: {reason}" in text


@pytest.mark.vm
def test_running_minimal_guest_has_the_config_and_no_modules(domains_before):
    _minimal_or_skip()
    env = {guestimage.KERNEL_ENV: "minimal"}
    proc = vmshim(
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "cat /proc/config.gz; test -e /proc/modules && echo MODULES >&2; "
        "echo clocksource=$(cat /sys/devices/system/clocksource/clocksource0/"
        "current_clocksource) >&2; true",
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"MODULES" not in proc.stderr  # no module support: nothing to load
    config = kernelbuild.parse_config(gzip.decompress(proc.stdout).decode())
    assert kernelbuild.check_config(config) == []
    assert config.get("CONFIG_MODULES") == "n"
    if detect_accel().kind == "tcg" and host_tsc_khz() is not None:
        # told the host's TSC rate (tsc_early_khz), the guest keeps the TSC, not jiffies
        assert b"clocksource=tsc" in proc.stderr, proc.stderr.decode(errors="replace")
    assert not wait_no_new_domains(domains_before)


@pytest.mark.vm
def test_bench_compares_both_kernels(tmp_path, domains_before):
    _minimal_or_skip()
    out = tmp_path / "bench"
    proc = vmshim("bench", "--runs", "1", "--only", "kernels", "--output", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["leftovers"] == []
    for name in ("kernel_boot", "kernel_run", "kernel_guest_memory"):
        subjects = data["figures"][name]["subjects"]
        for kernel in ("minimal", "distro"):
            assert subjects[kernel].get("runs") == 1, (name, kernel, subjects[kernel])
            assert subjects[kernel]["median"] > 0
    boot = data["figures"]["kernel_boot"]["subjects"]
    assert boot["minimal"]["extra"]["kernel_release"] != boot["distro"]["extra"]["kernel_release"]
    assert "distro_over_minimal" in boot["minimal"]["extra"]
    assert not wait_no_new_domains(domains_before)
