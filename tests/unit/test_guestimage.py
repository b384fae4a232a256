"""Guest image builder: cpio writer, module ordering, input hashing and the build cache.
No VM; the one test that runs a whole build uses a fake kernel and takes a couple of seconds."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from shim import guestimage as gi
from shim import paths
from shim.guestimage import cache as gi_cache
from shim.guestimage import inputs as gi_inputs
from shim.errors import GuestImageError


# ---------------------------------------------------------------------------------- cpio


def _archive(build) -> bytes:
    buf = io.BytesIO()
    w = gi.CpioWriter(buf)
    build(w)
    w.close()
    return buf.getvalue()


def _sample(w: gi.CpioWriter) -> None:
    w.add_dir("etc")
    w.add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    w.add_file("etc/odd", b"abc", mode=0o600)  # length not a multiple of 4
    w.add_file("empty", b"")
    w.add_symlink("bin", "usr/bin")
    w.add_dir("dev")
    w.add_device("dev/console", "c", 5, 1, 0o600)
    w.add_device("dev/vda", "b", 254, 0, 0o660)


def test_cpio_round_trip():
    entries = {e.name: e for e in gi.read_cpio(_archive(_sample))}
    assert list(entries) == ["etc", "etc/passwd", "etc/odd", "empty", "bin", "dev", "dev/console", "dev/vda"]
    assert entries["etc"].kind == "dir" and stat.S_IMODE(entries["etc"].mode) == 0o755
    assert entries["etc/passwd"].data == b"root:x:0:0::/root:/bin/sh\n"
    assert entries["etc/odd"].data == b"abc" and stat.S_IMODE(entries["etc/odd"].mode) == 0o600
    assert entries["empty"].data == b"" and entries["empty"].kind == "file"
    assert entries["bin"].kind == "symlink" and entries["bin"].data == b"usr/bin"
    con = entries["dev/console"]
    assert con.kind == "chr" and (con.rdevmajor, con.rdevminor) == (5, 1)
    assert entries["dev/vda"].kind == "blk" and entries["dev/vda"].rdevmajor == 254
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())
    assert len({e.ino for e in entries.values()}) == len(entries)


def test_cpio_is_reproducible_and_block_padded():
    a, b = _archive(_sample), _archive(_sample)
    assert a == b
    assert len(a) % 512 == 0


def test_cpio_add_file_from_streams_host_file(tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 3))
    src.chmod(0o751)
    data = _archive(lambda w: w.add_file_from("blob", src))
    (entry,) = gi.read_cpio(data)
    assert entry.data == src.read_bytes() and stat.S_IMODE(entry.mode) == 0o751


@pytest.mark.skipif(not shutil.which("cpio"), reason="GNU cpio not installed")
def test_cpio_readable_by_gnu_cpio(tmp_path):
    out = subprocess.run(["cpio", "-t", "--quiet"], input=_archive(_sample), capture_output=True, check=True)
    assert out.stdout.decode().split() == [
        "etc",
        "etc/passwd",
        "etc/odd",
        "empty",
        "bin",
        "dev",
        "dev/console",
        "dev/vda",
    ]


def test_cpio_refuses_duplicates_and_escapes():
    w = gi.CpioWriter(io.BytesIO())
    w.add_file("a", b"")
    with pytest.raises(ValueError):
        w.add_file("a", b"")
    for bad in ("", "/", "../x", "a/../../x"):
        with pytest.raises(ValueError):
            w.add_file(bad, b"")


def test_read_cpio_rejects_garbage():
    with pytest.raises(ValueError):
        gi.read_cpio(b"nonsense" * 20)
    truncated = _archive(lambda w: w.add_file("f", b"x" * 100))[:150]
    with pytest.raises(ValueError):
        gi.read_cpio(truncated)


# ------------------------------------------------------------------------------- modules


def make_ko(modinfo: dict[str, str]) -> bytes:
    """A minimal ELF64 file with a .modinfo section, like a kernel module's."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    shstr_off = info_off + len(info)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    head = bytearray(64)
    head[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HHH", head, 0x3A, 64, 3, 2)
    body = bytes(head) + info + shstr
    body += b"\0" * (shoff - len(body))
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, info_off, len(info), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    return body + sections


def test_read_modinfo():
    ko = make_ko({"license": "GPL", "depends": "virtio,virtio_ring", "name": "virtio_pci"})
    info = gi.read_modinfo(ko)
    assert info["depends"] == ["virtio,virtio_ring"] and info["name"] == ["virtio_pci"]
    with pytest.raises(ValueError):
        gi.read_modinfo(b"not an elf file at all")


def test_module_name():
    assert gi.module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert gi.module_name("kernel/fs/overlayfs/overlay.ko.xz") == "overlay"


DEPS = {
    "virtio": ["virtio_ring"],
    "virtio_ring": [],
    "virtio_pci_modern_dev": [],
    "virtio_pci": ["virtio_pci_modern_dev", "virtio", "virtio_ring"],
    "virtio_console": ["virtio", "virtio_ring"],
    "fuse": [],
    "virtiofs": ["fuse", "virtio"],
}


def test_module_load_order_puts_dependencies_first_and_keeps_order():
    order, missing = gi.module_load_order(
        ["virtio_pci", "virtio_console", "virtiofs", "ext4", "nope"], DEPS.get, builtin=["ext4"]
    )
    assert order == [
        "virtio_pci_modern_dev",
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "virtio_console",
        "fuse",
        "virtiofs",
    ]
    assert missing == ["nope"]
    for i, name in enumerate(order):
        assert all(order.index(d) < i for d in DEPS[name])


def test_module_load_order_detects_cycles():
    with pytest.raises(GuestImageError, match="cycle"):
        gi.module_load_order(["a"], {"a": ["b"], "b": ["a"]}.get)


def _fake_modules(root: Path, with_dep_file: bool) -> Path:
    mdir = root / "lib/modules/9.9.9-test"
    files = {
        "virtio_ring": ("drivers/virtio", ""),
        "virtio": ("drivers/virtio", "virtio_ring"),
        "virtio_console": ("drivers/char", "virtio,virtio_ring"),
        "virtio-rng": ("drivers/char/hw_random", "virtio,virtio_ring"),
    }
    for name, (sub, deps) in files.items():
        p = mdir / "kernel" / sub / f"{name}.ko"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(make_ko({"name": name.replace("-", "_"), "depends": deps}))
    (mdir / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    if with_dep_file:
        (mdir / "modules.dep").write_text(
            "kernel/drivers/virtio/virtio_ring.ko:\n"
            "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
            "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko\n"
            "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n"
        )
    return mdir


@pytest.mark.parametrize("with_dep_file", [False, True])
def test_module_tree_resolves_from_modinfo_or_modules_dep(tmp_path, with_dep_file):
    tree = gi.ModuleTree(_fake_modules(tmp_path, with_dep_file))
    order, missing = tree.resolve(["virtio_console", "virtio-rng", "overlay", "squashfs"])
    assert order == ["virtio_ring", "virtio", "virtio_console", "virtio_rng"]
    assert missing == ["squashfs"]  # overlay is built in
    assert tree.files["virtio_rng"] == "kernel/drivers/char/hw_random/virtio-rng.ko"


def test_bzimage_release(tmp_path):
    img = bytearray(0x4000)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x1000)
    version = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0"
    img[0x1200 : 0x1200 + len(version)] = version
    (tmp_path / "bz").write_bytes(img)
    assert gi.bzimage_release(tmp_path / "bz") == "6.1.0-56-cloud-amd64"
    (tmp_path / "junk").write_bytes(b"\0" * 4096)
    with pytest.raises(GuestImageError):
        gi.bzimage_release(tmp_path / "junk")


# ------------------------------------------------------------------------- inputs, cache


def test_hash_tree_skips_bytecode(tmp_path):
    (tmp_path / "pkg/__pycache__").mkdir(parents=True)
    (tmp_path / "pkg/a.py").write_text("x = 1\n")
    before = gi.hash_tree(tmp_path)
    (tmp_path / "pkg/__pycache__/a.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "pkg/b.pyc").write_bytes(b"junk")
    assert gi.hash_tree(tmp_path) == before == {"pkg/a.py": gi.hash_tree(tmp_path)["pkg/a.py"]}
    (tmp_path / "pkg/a.py").write_text("x = 2\n")
    assert gi.hash_tree(tmp_path) != before


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """VMSHIM_ROOT in tmp, a fake guest package and an override kernel; apt/dpkg stubbed."""
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    guest = tmp_path / "src/guest"
    guest.mkdir(parents=True)
    (guest / "__init__.py").write_text("")
    (guest / "init.py").write_text("import json, os\n\ndef main():\n    print('hi')\n")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"kernel")
    monkeypatch.setenv("VMSHIM_KERNEL", str(kernel))
    monkeypatch.setenv("VMSHIM_KERNEL_MODULES", str(_fake_modules(tmp_path, False)))
    calls = {"dpkg": 0, "apt": 0}

    def versions(names):
        calls["dpkg"] += 1
        return {n: "1.0" for n in names}

    def kernel_pkg():
        calls["apt"] += 1
        return {"package": "linux-image-x-cloud-amd64", "version": "1.0"}

    monkeypatch.setattr(gi_inputs, "_package_versions", versions)
    monkeypatch.setattr(gi_inputs, "_resolve_kernel_package", kernel_pkg)
    monkeypatch.setattr(gi_inputs, "guest_source_dir", lambda: guest)
    monkeypatch.setattr(gi_cache, "guest_source_dir", lambda: guest)
    return {"guest": guest, "kernel": kernel, "calls": calls, "root": tmp_path / "root"}


def _fake_build(inputs: dict) -> Path:
    d = paths.guest_dir() / gi.inputs_hash(inputs)
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(b"k")
    (d / "initramfs.img").write_bytes(b"i")
    (d / "manifest.json").write_text(json.dumps({"kernel": {"release": "9.9.9-test"}, "cmdline": gi.CMDLINE}))
    return d


def test_current_guest_image_follows_inputs(sandbox):
    assert gi.current_guest_image() is None
    d = _fake_build(gi.collect_inputs())
    image = gi.current_guest_image()
    assert image is not None and image.kernel == d / "vmlinuz" and image.kernel_release == "9.9.9-test"
    assert image.cmdline == gi.CMDLINE
    # package versions were looked up once, then taken from the fingerprint cache
    assert sandbox["calls"] == {"dpkg": 1, "apt": 0}
    (sandbox["guest"] / "agent.py").write_text("# new file\n")
    assert gi.current_guest_image() is None


def test_override_kernel_mtime_makes_image_stale(sandbox):
    _fake_build(gi.collect_inputs())
    assert gi.current_guest_image() is not None
    os.utime(sandbox["kernel"], ns=(1, 1))
    assert gi.current_guest_image() is None


def test_debian_kernel_pinned_until_a_build_refreshes_it(sandbox, monkeypatch):
    """An apt-get update changes nothing for `run` (which may have no network to fetch a
    new kernel); `vmshim guest build` (refresh_kernel) asks apt again."""
    monkeypatch.delenv("VMSHIM_KERNEL")
    monkeypatch.delenv("VMSHIM_KERNEL_MODULES")
    sig = [["lists", 1, 2, 3]]
    monkeypatch.setattr(gi_inputs, "_apt_sig", lambda: sig)
    first = gi.collect_inputs()
    assert first["kernel"] == {"source": "debian", "package": "linux-image-x-cloud-amd64", "version": "1.0"}
    assert gi.inputs_hash(gi.collect_inputs()) == gi.inputs_hash(first)
    assert sandbox["calls"]["apt"] == 1
    sig[0][1] = 99  # apt-get update happened
    assert gi.inputs_hash(gi.collect_inputs()) == gi.inputs_hash(first)
    assert sandbox["calls"]["apt"] == 1
    gi.collect_inputs(refresh_kernel=True)
    assert sandbox["calls"]["apt"] == 2
    gi.collect_inputs(refresh_kernel=True)  # lists unchanged since: the cached answer
    assert sandbox["calls"]["apt"] == 2


def test_modules_without_kernel_is_an_error(sandbox, monkeypatch):
    monkeypatch.delenv("VMSHIM_KERNEL")
    with pytest.raises(GuestImageError, match="VMSHIM_KERNEL"):
        gi.collect_inputs()


def test_boot_floor_command(tmp_path):
    image = gi.GuestImage(
        kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initramfs.img", kernel_release="r", manifest={}
    )
    cmd = gi.boot_floor_command(image, "/run/x.sock", "/tmp/serial.log")
    assert cmd[0] == "qemu-system-x86_64"
    assert cmd[cmd.index("-kernel") + 1] == str(image.kernel)
    assert cmd[cmd.index("-initrd") + 1] == str(image.initramfs)
    # the image's command line first, then the accelerator's (shim.vm.accel.kernel_args)
    assert cmd[cmd.index("-append") + 1].startswith(gi.CMDLINE + " noapictimer")
    assert "file:/tmp/serial.log" in cmd
    assert "socket,id=agent,path=/run/x.sock,server=on,wait=off" in cmd
    assert "virtserialport,chardev=agent,name=org.vmshim.agent" in cmd


# ----------------------------------------------------------------------- a whole build

needs_host_tools = pytest.mark.skipif(
    not (gi.PYTHON.is_file() and gi.BUSYBOX.is_file() and shutil.which("lz4") and shutil.which("ldd")),
    reason="needs the Debian python3.11, busybox-static, lz4 and ldd",
)


@needs_host_tools
def test_build_with_override_kernel(sandbox, monkeypatch):
    kernel_bytes = bytearray(0x2000)
    sandbox["kernel"].write_bytes(kernel_bytes)
    steps = []
    image = gi_cache._ensure(steps.append, False, sandbox["guest"], "none")
    assert image.kernel.read_bytes() == kernel_bytes and image.kernel_release == "9.9.9-test"
    assert any("squashfs" in s for s in steps)  # missing module is reported, not fatal
    m = image.manifest
    assert m["initramfs"]["compression"] == "none"
    assert m["modules_missing"] and "virtio_console" not in m["modules_missing"]

    entries = {e.name: e for e in gi.read_cpio(image.initramfs.read_bytes())}
    init = entries["init"]
    assert init.data.startswith(b"#!/usr/bin/python3 -S\n") and init.mode & 0o111
    assert b"from guest.init import main" in init.data
    con = entries["dev/console"]
    assert con.kind == "chr" and (con.rdevmajor, con.rdevminor) == (5, 1)
    urandom = entries["dev/urandom"]
    assert (urandom.rdevmajor, urandom.rdevminor) == (1, 9)
    for d in ("proc", "sys", "run", "tmp", "mnt", "etc"):
        assert entries[d].kind == "dir"
    canon = {n: n for n in entries}
    lib = "usr/lib" if entries.get("lib") and entries["lib"].kind == "symlink" else "lib"
    bindir = "usr/bin" if entries.get("bin") and entries["bin"].kind == "symlink" else "bin"
    assert entries[f"{bindir}/python3"].data == b"python3.11"
    assert entries[f"{bindir}/sh"].data == b"busybox"
    assert f"{lib}/python3.11/os.pyc" in canon and f"{lib}/python3.11/json/__init__.pyc" in canon
    assert not any("/test/" in n or "tkinter" in n or n.endswith(".py") and "python3.11" in n for n in entries)
    assert f"{lib}/vmshim/guest/init.py" in canon
    assert f"{lib}/vmshim/guest/__pycache__/init.cpython-311.pyc" in canon
    assert any(n.endswith("ld-linux-x86-64.so.2") for n in entries)
    listed = entries[f"{lib}/modules/vmshim-modules.txt"].data.decode().split()
    assert [p.rsplit("/", 1)[-1] for p in listed][:3] == ["virtio_ring.ko", "virtio.ko", "virtio_console.ko"]
    for p in listed:
        assert p.replace("/lib/", f"{lib}/", 1).lstrip("/") in entries

    # cached: same inputs return the same build without rebuilding
    assert gi_cache._ensure(steps.append, False, sandbox["guest"], "none").initramfs == image.initramfs
    # reproducible: a forced rebuild writes the same bytes; older builds are cleaned up
    sha = m["initramfs"]["sha256"]
    again = gi_cache._ensure(lambda _: None, True, sandbox["guest"], "none")
    assert again.manifest["initramfs"]["sha256"] == sha
    original = (sandbox["guest"] / "init.py").read_text()
    (sandbox["guest"] / "init.py").write_text("def main():\n    pass\n")
    newer = gi_cache._ensure(lambda _: None, False, sandbox["guest"], "none")
    assert newer.kernel.parent != image.kernel.parent
    # the superseded build survives the grace period (a VM may be starting from it) ...
    assert (image.kernel.parent / ".superseded").is_file() and image.kernel.is_file()
    # (and is unmarked if the inputs go back to it)
    (sandbox["guest"] / "init.py").write_text(original)
    assert gi_cache._ensure(lambda _: None, False, sandbox["guest"], "none").kernel == image.kernel
    assert not (image.kernel.parent / ".superseded").exists()
    (sandbox["guest"] / "init.py").write_text("def main():\n    pass\n")
    assert gi_cache._ensure(lambda _: None, False, sandbox["guest"], "none").kernel == newer.kernel
    # ... and goes at a build after it (marked again first: it was current in between)
    for _ in range(2):
        gi_cache._retire_old_builds(
            paths.guest_dir(), newer.kernel.parent.name, now=time.time() + gi_cache.RETIRE_GRACE + 1
        )
    assert [p.name for p in paths.guest_dir().iterdir() if not p.name.startswith(".")] == [newer.kernel.parent.name]


@needs_host_tools
def test_build_refuses_guest_code_the_trimmed_stdlib_cannot_import(sandbox):
    (sandbox["guest"] / "init.py").write_text("import tkinter\n")
    with pytest.raises(GuestImageError, match="tkinter"):
        gi_cache._ensure(lambda _: None, False, sandbox["guest"], "none")


def test_guest_source_override(monkeypatch, tmp_path):
    monkeypatch.delenv("VMSHIM_GUEST_SOURCE", raising=False)
    assert (gi.guest_source_dir() / "protocol.py").is_file()
    monkeypatch.setenv("VMSHIM_GUEST_SOURCE", str(tmp_path / "hostile" / ".." / "hostile"))
    assert gi.guest_source_dir() == (tmp_path / "hostile").resolve()


@needs_host_tools
def test_a_variant_build_never_retires_the_normal_image(sandbox, monkeypatch):
    """VMSHIM_GUEST_SOURCE (the malicious-guest suite) builds a variant while other tests
    boot the normal image: the variant must not mark it superseded."""
    normal = gi_cache._ensure(lambda _: None, False, sandbox["guest"], "none")
    variant_src = sandbox["guest"].parent / "variant"
    shutil.copytree(sandbox["guest"], variant_src)
    (variant_src / "init.py").write_text("def main():\n    pass\n")
    monkeypatch.setenv("VMSHIM_GUEST_SOURCE", str(variant_src))
    variant = gi_cache._ensure(lambda _: None, False, variant_src, "none")
    assert variant.kernel.parent != normal.kernel.parent
    assert not (normal.kernel.parent / ".superseded").exists()
    # the next normal build retires the variant as usual
    monkeypatch.delenv("VMSHIM_GUEST_SOURCE")
    gi_cache._ensure(lambda _: None, True, sandbox["guest"], "none")
    assert (variant.kernel.parent / ".superseded").is_file()
