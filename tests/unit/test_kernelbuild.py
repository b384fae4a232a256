"""The minimal kernel: its config fragment, the config check, the cache and the kernel choice
(no compiling here; tests/e2e/test_guest_kernel.py checks a built kernel and boots it)."""

from __future__ import annotations

import json
import shutil

import pytest

from shim import guestimage as gi
from shim.guestimage import cache as gi_cache
from shim.guestimage import inputs as gi_inputs
from shim.guestimage import kernel as gi_kernel
from shim import kernelbuild as kb
from shim.errors import GuestImageError


def test_fragment_builds_in_everything_the_agent_needs():
    fragment = kb.parse_config(kb.fragment_path().read_text())
    assert kb.check_config(fragment) == []
    assert fragment["CONFIG_MODULES"] == "n"  # everything built in
    assert fragment["CONFIG_ACPI"] == "n" and fragment["CONFIG_KEXEC"] == "n"


def test_parse_config_reads_set_and_unset_options():
    cfg = kb.parse_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n# comment\nCONFIG_D=64\n')
    assert cfg == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_D": "64"}


def test_check_config_names_each_missing_option_and_why():
    cfg = {name: "y" for name in kb.REQUIRED_OPTIONS}
    cfg["CONFIG_OVERLAY_FS"] = "m"
    del cfg["CONFIG_SECCOMP_FILTER"]
    missing = kb.check_config(cfg)
    assert len(missing) == 2
    assert missing[0].startswith("CONFIG_OVERLAY_FS is m, needs y: the container rootfs is an overlay")
    assert missing[1].startswith("CONFIG_SECCOMP_FILTER is missing, needs y")


def test_fragment_mismatches_reports_dropped_options():
    frag = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "64"}
    assert kb.fragment_mismatches(frag, {"CONFIG_A": "y", "CONFIG_C": "64"}) == []
    bad = kb.fragment_mismatches(frag, {"CONFIG_A": "n", "CONFIG_B": "y", "CONFIG_C": "64"})
    assert bad == ["CONFIG_A=y became CONFIG_A=n", "CONFIG_B=n became CONFIG_B=y"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("VMSHIM_KERNEL", raising=False)
    monkeypatch.delenv("VMSHIM_KERNEL_MODULES", raising=False)
    monkeypatch.delenv(gi.KERNEL_ENV, raising=False)
    return tmp_path / "root"


def _fake_minimal(key: str = "k1", fragment_sha: str | None = None, built_at: str = "2026-01-01T00:00:00Z"):
    import hashlib

    d = kb.minimal_dir() / key
    d.mkdir(parents=True)
    (d / "bzImage").write_bytes(b"\0" * 0x2000)
    (d / "config").write_text("".join(f"{n}=y\n" for n in kb.REQUIRED_OPTIONS))
    sha = fragment_sha or hashlib.sha256(kb.fragment_path().read_bytes()).hexdigest()
    (d / "build.json").write_text(
        json.dumps(
            {
                "builder": kb.BUILDER_VERSION,
                "fragment_sha256": sha,
                "release": "6.1.192-vmshim",
                "source_package": kb.SOURCE_PACKAGE,
                "source_version": "6.1.192-3",
                "built_at": built_at,
            }
        )
    )
    return d


def test_cached_kernel_only_matches_todays_fragment(root):
    assert kb.cached_kernel() is None
    _fake_minimal("stale", fragment_sha="0" * 64)
    assert kb.cached_kernel() is None
    _fake_minimal("old", built_at="2026-01-01T00:00:00Z")
    new = _fake_minimal("new", built_at="2026-02-01T00:00:00Z")
    assert kb.cached_kernel().dir == new
    (new / "bzImage").unlink()  # half-present builds do not count
    assert kb.cached_kernel().key == "old"


def test_kernel_choice_auto_explicit_env_and_saved(root, monkeypatch):
    choice, why = gi.kernel_choice()
    assert choice == "distro" and "vmshim guest kernel build" in why
    built = _fake_minimal()
    assert gi.kernel_choice() == ("minimal", f"the minimal kernel is built ({built})")
    gi.save_kernel_choice("distro")
    assert gi.kernel_choice()[0] == "distro" and "--kernel" in gi.kernel_choice()[1]
    monkeypatch.setenv(gi.KERNEL_ENV, "minimal")
    assert gi.kernel_choice() == ("minimal", f"{gi.KERNEL_ENV} is set")
    assert gi.kernel_choice("distro")[0] == "distro"
    monkeypatch.setenv(gi.KERNEL_ENV, "tiny")
    with pytest.raises(GuestImageError, match="unknown guest kernel 'tiny'"):
        gi.kernel_choice()
    monkeypatch.delenv(gi.KERNEL_ENV)
    gi.save_kernel_choice(None)
    assert gi.kernel_choice()[0] == "minimal"
    monkeypatch.setenv("VMSHIM_KERNEL", "/some/bzImage")
    assert gi.kernel_choice()[0] == "override"


def test_minimal_kernel_asked_for_but_not_built_is_a_clear_error(root):
    with pytest.raises(GuestImageError, match="minimal guest kernel is not built; run `vmshim guest kernel build`"):
        gi.collect_inputs(kernel_request="minimal")


def test_kernel_choice_is_part_of_the_image_hash(root, monkeypatch):
    monkeypatch.setattr(gi_inputs, "_package_versions", lambda names: {n: "1.0" for n in names})
    monkeypatch.setattr(
        gi_inputs, "_resolve_kernel_package", lambda: {"package": "linux-image-x-cloud-amd64", "version": "1.0"}
    )
    _fake_minimal()
    minimal = gi.collect_inputs(kernel_request="minimal")
    distro = gi.collect_inputs(kernel_request="distro")
    assert minimal["kernel"]["source"] == "minimal" and distro["kernel"]["source"] == "debian"
    assert gi.inputs_hash(minimal) != gi.inputs_hash(distro)
    assert gi.inputs_hash(gi.collect_inputs()) == gi.inputs_hash(minimal)  # auto: built → minimal


def test_build_kernel_without_linux_source_says_what_to_install(root, monkeypatch, tmp_path):
    monkeypatch.setattr(kb, "SOURCE_TARBALL", tmp_path / "nope.tar.xz")
    with pytest.raises(GuestImageError, match="apt-get install linux-source-6.1"):
        kb.build_kernel()


@pytest.mark.skipif(
    not (gi.PYTHON.is_file() and gi.BUSYBOX.is_file() and shutil.which("ldd")),
    reason="needs the Debian python3.11, busybox-static and ldd",
)
def test_image_with_minimal_kernel_carries_no_modules(root, monkeypatch, tmp_path):
    monkeypatch.setattr(gi_inputs, "_package_versions", lambda names: {n: "1.0" for n in names})
    guest = tmp_path / "src/guest"
    guest.mkdir(parents=True)
    (guest / "__init__.py").write_text("")
    (guest / "init.py").write_text("import json, os\n\ndef main():\n    print('hi')\n")
    built = _fake_minimal()
    image = gi_cache._ensure(lambda _: None, False, guest, "none")
    assert image.kernel.read_bytes() == (built / "bzImage").read_bytes()
    assert image.kernel_release == "6.1.192-vmshim"
    assert image.manifest["kernel"]["source"] == "minimal" and image.manifest["modules"] == []
    entries = gi.read_cpio(image.initramfs.read_bytes())
    assert not [e.name for e in entries if ".ko" in e.name]
    listing = [e for e in entries if e.name.endswith("modules/vmshim-modules.txt")]
    assert listing and listing[0].data == b""


def test_a_pvh_build_boots_its_vmlinux_an_older_one_its_bzimage(root):
    plain = _fake_minimal("plain", built_at="2026-01-01T00:00:00Z")
    assert kb.cached_kernel().boot_image == plain / "bzImage"
    pvh = _fake_minimal("pvh", built_at="2026-02-01T00:00:00Z")
    record = json.loads((pvh / "build.json").read_text())
    (pvh / "build.json").write_text(json.dumps({**record, "pvh": True}))
    assert kb.cached_kernel().boot_image == pvh / "bzImage", "no vmlinux: the bzImage"
    (pvh / "vmlinux").write_bytes(b"\x7fELF")
    assert kb.cached_kernel().boot_image == pvh / "vmlinux"
    assert gi_kernel._minimal_kernel_inputs()["kernel"] == str(pvh / "vmlinux")


def test_the_fragment_asks_for_the_pvh_entry():
    assert kb.parse_config(kb.fragment_path().read_text()).get("CONFIG_PVH") == "y"
