"""The guest kernel arguments that depend on the accelerator (shim.vm.accel)."""

from shim.guestimage import GuestImage, boot_floor_command
from shim.vm.accel import guest_cmdline, host_tsc_khz, kernel_args

FLAGS = "fpu tsc msr constant_tsc rep_good nopl tsc_known_freq hypervisor"


def cpuinfo(tmp_path, flags=FLAGS, mhz="2596.128"):
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\ncpu MHz\t\t: 9999.000\nflags\t\t: {flags}\n"
    )
    return str(path)


def test_tsc_rate_read_when_the_host_knows_it(tmp_path):
    assert host_tsc_khz(cpuinfo(tmp_path), str(tmp_path / "no-cpufreq")) == 2596128


def test_tsc_rate_unknown_without_tsc_known_freq(tmp_path):
    info = cpuinfo(tmp_path, flags=FLAGS.replace("tsc_known_freq", ""))
    assert host_tsc_khz(info, str(tmp_path / "no-cpufreq")) is None


def test_tsc_rate_unknown_when_cpu_mhz_is_a_live_frequency(tmp_path):
    # aperfmperf or cpufreq: "cpu MHz" is the current clock, not the TSC's rate
    assert host_tsc_khz(cpuinfo(tmp_path, flags=FLAGS + " aperfmperf"), str(tmp_path / "no-cpufreq")) is None
    (tmp_path / "cpufreq").mkdir()
    assert host_tsc_khz(cpuinfo(tmp_path), str(tmp_path / "cpufreq")) is None


def test_tsc_rate_refuses_nonsense(tmp_path):
    for mhz in ("abc", "0.5", "99999999"):
        assert host_tsc_khz(cpuinfo(tmp_path, mhz=mhz), str(tmp_path / "x")) is None
    assert host_tsc_khz(str(tmp_path / "missing"), str(tmp_path / "x")) is None


def test_tcg_gets_timer_arguments_kvm_none():
    assert kernel_args("tcg", 2596128) == ["noapictimer", "tsc_early_khz=2596128"]
    assert kernel_args("tcg", None) == ["noapictimer"]
    assert kernel_args("kvm", 2596128) == []


def test_cmdline_keeps_the_image_arguments_and_adds_each_once():
    base = "console=ttyS0 quiet noapictimer"
    assert guest_cmdline(base, "tcg", 1000000) == base + " tsc_early_khz=1000000"
    assert guest_cmdline(base, "kvm", 1000000) == base


def test_floor_uses_the_same_arguments_and_accelerator(tmp_path):
    image = GuestImage(
        kernel=tmp_path / "k", initramfs=tmp_path / "i", kernel_release="6.1", manifest={}, cmdline="console=ttyS0"
    )
    tcg = boot_floor_command(image, "s", "log", accel_kind="tcg")
    assert tcg[tcg.index("-accel") + 1].startswith("tcg")
    assert "noapictimer" in tcg[tcg.index("-append") + 1]
    kvm = boot_floor_command(image, "s", "log", accel_kind="kvm")
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    assert kvm[kvm.index("-append") + 1] == "console=ttyS0"
