"""The minimal microVM guest kernel: built from Debian's ``linux-source-6.1`` with the
config fragment in ``kernels/microvm-x86_64.config``, cached by (source version, config).

Build: unpack ``/usr/src/linux-source-6.1.tar.xz`` into a temp dir under
``paths.cache_dir()/kernel/minimal``, ``make tinyconfig``, merge the fragment
(``scripts/kconfig/merge_config.sh``), ``make olddefconfig``, check that every option of
the fragment survived, then ``nice make -j2 bzImage``. The result lands atomically in
``cache_dir()/kernel/minimal/<key>/`` with ``bzImage``, the stripped ``vmlinux`` that QEMU
boots through its PVH entry (when the config has ``CONFIG_PVH``), the final ``.config`` (``config``)
and ``build.json``; the source tree is removed. ``<key>`` hashes the source package
version, the fragment and BUILDER_VERSION.

Public API: :func:`build_kernel`, :func:`cached_kernel`, :func:`check_config`,
:data:`REQUIRED_OPTIONS`. Failures raise :class:`shim.errors.GuestImageError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from shim import paths
from shim.errors import GuestImageError

BUILDER_VERSION = 2
"""Bump when the build steps change what comes out (it is part of the cache key)."""

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT_NAME = "microvm-x86_64.config"

REQUIRED_OPTIONS: dict[str, str] = {
    # what the agent cannot run without, and why (the text a failing check prints)
    "CONFIG_BLK_DEV_INITRD": "the initramfs holds /init and the agent",
    "CONFIG_RD_LZ4": "the initramfs is lz4-compressed",
    "CONFIG_BINFMT_ELF": "python and busybox are ELF binaries",
    "CONFIG_BINFMT_SCRIPT": "/init is a #! script",
    "CONFIG_MULTIUSER": "containers run as other users",
    "CONFIG_SERIAL_8250_CONSOLE": "the console is ttyS0",
    "CONFIG_DEVTMPFS": "init mounts devtmpfs on /dev",
    "CONFIG_TMPFS": "init mounts tmpfs on /run, /tmp and /dev/shm",
    "CONFIG_UNIX98_PTYS": "devpts for `run -t` and exec -t",
    "CONFIG_POSIX_MQUEUE": "containers get /dev/mqueue",
    "CONFIG_KEYS": "keyctl: docker lets containers use kernel keyrings (--privileged fully)",
    "CONFIG_PCI": "every virtio device is on PCI",
    "CONFIG_VIRTIO_PCI": "virtio devices on PCI",
    "CONFIG_HOTPLUG_PCI_PCIE": "network connect hot-plugs a NIC into a running VM (PCIe native hotplug)",
    "CONFIG_VIRTIO_CONSOLE": "the agent channel is a virtio-serial port",
    "CONFIG_VIRTIO_BLK": "layers, the writable layer and the config drive are virtio disks",
    "CONFIG_VIRTIO_NET": "container networks are virtio-net NICs",
    "CONFIG_VIRTIO_VSOCKETS": "the agent channel may be vsock",
    "CONFIG_VIRTIO_BALLOON": "free-page reporting returns guest memory to the host",
    "CONFIG_FUSE_FS": "virtiofs is built on FUSE",
    "CONFIG_VIRTIO_FS": "bind mounts and OCI bundle rootfs are virtiofs shares",
    "CONFIG_EXT4_FS": "the writable layer and volumes are ext4",
    "CONFIG_SQUASHFS": "image layers are squashfs",
    "CONFIG_SQUASHFS_ZSTD": "layers are zstd-compressed squashfs",
    "CONFIG_SQUASHFS_XZ": "layers may be xz-compressed squashfs",
    "CONFIG_OVERLAY_FS": "the container rootfs is an overlay of its layers",
    "CONFIG_ISO9660_FS": "the config drive is an ISO",
    "CONFIG_UNIX": "unix sockets",
    "CONFIG_INET": "container networking",
    "CONFIG_IPV6": "container networking (IPv6 loopback and addresses)",
    "CONFIG_CGROUPS": "every container runs in a cgroup",
    "CONFIG_MEMCG": "the memory controller (--memory, OOM kills, stats)",
    "CONFIG_BLK_CGROUP": "the io controller (--blkio-weight, io stats)",
    "CONFIG_CGROUP_SCHED": "the cpu controller (--cpus, --cpu-shares)",
    "CONFIG_CFS_BANDWIDTH": "cpu.max (--cpus)",
    "CONFIG_CPUSETS": "the cpuset controller (--cpuset-cpus)",
    "CONFIG_CGROUP_PIDS": "the pids controller (--pids-limit)",
    "CONFIG_CGROUP_BPF": "device rules on cgroup v2 are BPF programs",
    "CONFIG_BPF_SYSCALL": "device rules on cgroup v2 are BPF programs",
    "CONFIG_PSI": "memory/cpu/io pressure files in cgroups",
    "CONFIG_NAMESPACES": "containers are namespaces in the VM",
    "CONFIG_UTS_NS": "the uts namespace (hostname)",
    "CONFIG_IPC_NS": "the ipc namespace",
    "CONFIG_USER_NS": "the user namespace (--userns)",
    "CONFIG_PID_NS": "the pid namespace",
    "CONFIG_NET_NS": "the network namespace",
    "CONFIG_SECCOMP": "the containers' seccomp profile",
    "CONFIG_SECCOMP_FILTER": "the containers' seccomp profile (BPF filters)",
}
"""Options the agent needs, each with the reason; :func:`check_config` reports the missing ones."""


@dataclass(frozen=True)
class MinimalKernel:
    """A built minimal kernel in the cache: ``bzimage``, its final ``config`` and the record."""

    dir: Path
    key: str
    record: dict

    @property
    def bzimage(self) -> Path:
        return self.dir / "bzImage"

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF image with its PVH entry note (builder 2 on), else absent."""
        return self.dir / "vmlinux"

    @property
    def boot_image(self) -> Path:
        """What QEMU should load: the PVH ``vmlinux`` when the build made one (QEMU jumps
        straight to the 64-bit entry: no real-mode setup and no decompression, ~0.13 s
        less to the agent under TCG here), else the bzImage."""
        return self.vmlinux if self.record.get("pvh") and self.vmlinux.is_file() else self.bzimage

    @property
    def config(self) -> Path:
        return self.dir / "config"


def fragment_path() -> Path:
    """The config fragment: ``$VMSHIM_KERNEL_CONFIG`` when set, else ``kernels/`` of this checkout."""
    override = os.environ.get("VMSHIM_KERNEL_CONFIG")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parent.parent / "kernels" / FRAGMENT_NAME


def minimal_dir() -> Path:
    return paths.cache_dir() / "kernel" / "minimal"


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=value`` lines → {name: value}; ``# CONFIG_X is not set`` → ``"n"``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def check_config(config: Mapping[str, str], required: Mapping[str, str] = REQUIRED_OPTIONS) -> list[str]:
    """One line per required option that *config* (from :func:`parse_config`) does not
    build in, naming the option and what needs it; empty when all are there."""
    return [
        f"{name} is {config.get(name, 'missing')!s}, needs y: {why}"
        for name, why in required.items()
        if config.get(name) != "y"
    ]


def fragment_mismatches(fragment: Mapping[str, str], final: Mapping[str, str]) -> list[str]:
    """Options of the fragment that the final config does not have as asked (olddefconfig
    drops an option whose dependencies are off)."""
    bad = []
    for name, want in fragment.items():
        got = final.get(name, "n")
        if want.strip('"') != got.strip('"'):
            bad.append(f"{name}={want} became {name}={got}")
    return bad


def source_version() -> str:
    """Version of the installed linux-source package. Raises GuestImageError if missing."""
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}\t${db:Status-Status}", SOURCE_PACKAGE], capture_output=True, text=True
    )
    version, _, status = res.stdout.partition("\t")
    if res.returncode != 0 or status != "installed" or not SOURCE_TARBALL.is_file():
        raise GuestImageError(
            f"{SOURCE_PACKAGE} is not installed; apt-get install {SOURCE_PACKAGE} (the minimal kernel is built from it)"
        )
    return version


def cache_key(version: str, fragment: bytes) -> str:
    raw = json.dumps(
        {
            "builder": BUILDER_VERSION,
            "source": SOURCE_PACKAGE,
            "version": version,
            "fragment": hashlib.sha256(fragment).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _load(d: Path) -> MinimalKernel | None:
    try:
        record = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return None
    k = MinimalKernel(dir=d, key=d.name, record=record)
    return k if k.bzimage.is_file() and k.config.is_file() else None


def cached_kernel() -> MinimalKernel | None:
    """The newest cached build made from today's fragment (any source version), or None.

    Cheap (hash one small file, list one directory): it runs on every container start.
    """
    try:
        digest = hashlib.sha256(fragment_path().read_bytes()).hexdigest()
        entries = list(minimal_dir().iterdir())
    except OSError:
        return None
    found = []
    for d in entries:
        if d.name.startswith("."):
            continue
        k = _load(d)
        if k and k.record.get("fragment_sha256") == digest and k.record.get("builder") == BUILDER_VERSION:
            found.append(k)
    return max(found, key=lambda k: k.record.get("built_at", "")) if found else None


def _run(cmd: list[str], cwd: Path, log, what: str) -> None:
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    res = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise GuestImageError(f"{what} failed (exit {res.returncode}); see {log.name}")


def build_kernel(
    jobs: int = 2, force: bool = False, progress: Callable[[str], None] = lambda _m: None
) -> MinimalKernel:
    """Build the minimal kernel unless today's (source version, fragment) is cached.

    Needs ``linux-source-6.1`` and the kernel build tools (gcc, make, flex, bison, bc,
    libelf-dev). Runs make niced with *jobs* jobs. Concurrent builds are serialised by a
    lock; a build appears atomically. Raises GuestImageError with what to do.
    """
    import fcntl

    fragment = fragment_path()
    try:
        fragment_bytes = fragment.read_bytes()
    except OSError as exc:
        raise GuestImageError(f"cannot read the kernel config fragment {fragment}: {exc.strerror}") from None
    version = source_version()
    for tool in ("make", "gcc", "flex", "bison", "bc", "tar", "xz", "strip"):
        if not shutil.which(tool):
            raise GuestImageError(f"{tool} is not installed; it is needed to build the kernel (run scripts/setup)")
    key = cache_key(version, fragment_bytes)
    mdir = minimal_dir()
    try:
        mdir.mkdir(parents=True, exist_ok=True)
        lock = open(mdir / ".lock", "a+")
    except OSError as exc:
        raise GuestImageError(f"cannot write {mdir}: {exc.strerror} (run as root or set VMSHIM_ROOT)") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = mdir / key
        if not force and (existing := _load(final)):
            return existing
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=mdir))
        log_path = mdir / f"build-{key}.log"
        try:
            with open(log_path, "wb") as log:
                progress(f"unpacking {SOURCE_TARBALL.name} ({SOURCE_PACKAGE} {version})")
                _run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp)], tmp, log, "unpacking the kernel source")
                src = tmp / SOURCE_TARBALL.name.split(".tar")[0]
                if not src.is_dir():
                    raise GuestImageError(f"{SOURCE_TARBALL} did not unpack to {src.name}/")
                progress("configuring: make tinyconfig + " + fragment.name)
                make = ["nice", "-n", "10", "make", "ARCH=x86_64"]
                _run(make + ["tinyconfig"], src, log, "make tinyconfig")
                _run(
                    ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
                    src,
                    log,
                    "merging the config fragment",
                )
                _run(make + ["olddefconfig"], src, log, "make olddefconfig")
                final_config = parse_config((src / ".config").read_text())
                bad = fragment_mismatches(parse_config(fragment_bytes.decode()), final_config)
                if bad:
                    raise GuestImageError(
                        f"the kernel config fragment {fragment} does not apply: "
                        + "; ".join(bad[:5])
                        + " (an option it needs is off)"
                    )
                missing = check_config(final_config)
                if missing:
                    raise GuestImageError(f"the kernel config lacks what the agent needs: {missing[0]}")
                progress(f"compiling the kernel with {jobs} jobs (a few minutes; log: {log_path})")
                compile_started = time.monotonic()
                _run(make + [f"-j{jobs}", "bzImage"], src, log, "compiling the kernel")
                compile_seconds = time.monotonic() - compile_started
                out = tmp / "out"
                out.mkdir()
                shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
                pvh = final_config.get("CONFIG_PVH") == "y"
                if pvh:  # QEMU boots an ELF with the PVH note directly; symbols not needed
                    _run(["strip", "-o", str(out / "vmlinux"), str(src / "vmlinux")], src, log, "stripping vmlinux")
                shutil.copyfile(src / ".config", out / "config")
                release = (src / "include/config/kernel.release").read_text().strip()
            shutil.rmtree(src)
            record = {
                "builder": BUILDER_VERSION,
                "key": key,
                "source_package": SOURCE_PACKAGE,
                "source_version": version,
                "release": release,
                "fragment": str(fragment),
                "fragment_sha256": hashlib.sha256(fragment_bytes).hexdigest(),
                "jobs": jobs,
                "size": (out / "bzImage").stat().st_size,
                "pvh": pvh,
                "build_seconds": round(time.monotonic() - started, 1),
                "compile_seconds": round(compile_seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (out / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            for p in out.iterdir():
                os.chmod(p, 0o644)
            os.chmod(out, 0o755)
            if final.exists():
                old = mdir / f".old-{key}-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        kernel = _load(final)
        assert kernel is not None
        progress(f"minimal kernel ready: {kernel.bzimage} ({record['build_seconds']:.0f} s)")
        return kernel
