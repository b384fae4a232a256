"""Images against real peers: Debian's docker-registry on 127.0.0.1 (temporary config and
storage, started here and stopped by PID), skopeo and podman. No VM: running a container
from the pulled image is the containers suite's part.

Each test that needs a tool is skipped, naming it, only when the tool is absent
(scripts/setup installs all three)."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from shim.images.distribution import pull, push
from shim.images.layers import layer_disk
from shim.images.store import ImageStore, import_image
from tests.fakeregistry import FakeRegistry
from tests.overlay import overlay_of
from tests.tarfiles import write_tar

REPO = Path(__file__).resolve().parents[2]


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed (scripts/setup installs it)")


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="needs root and loop devices"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A docker-registry on 127.0.0.1:<free port>; yields (host, storage dir)."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (scripts/setup installs it)")
    base = tmp_path_factory.mktemp("registry")
    port = free_port()
    storage = base / "data"
    (base / "config.yml").write_text(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""")
    log = open(base / "registry.log", "wb")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(base / "config.yml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    host = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "docker-registry did not start: " + (base / "registry.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)
        yield host, storage
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("VMSHIM_REGISTRY_BACKOFF", "0.05")
    monkeypatch.delenv("VMSHIM_DEFAULT_REGISTRY", raising=False)
    return tmp_path / "root"


def vmshim(*args, env=None, check=True, **kw):
    res = subprocess.run(
        [sys.executable, "-m", "shim.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"vmshim {' '.join(args)} failed ({res.returncode}): {res.stderr}{res.stdout}")
    return res


def bootstrap_busybox() -> ImageStore:
    vmshim("image", "bootstrap", "busybox", "-q")
    return ImageStore()


def registry_digest(host: str, name: str) -> str:
    """sha256 of the manifest bytes the registry serves (what skopeo reports)."""
    req = urllib.request.Request(
        f"http://{host}/v2/{name.split(':')[0]}/manifests/{name.split(':')[1]}",
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
        },
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return "sha256:" + hashlib.sha256(r.read()).hexdigest()


def blob_names(store: ImageStore) -> list[str]:
    return sorted(os.listdir(store.blobs_dir))


# Push / pull ------------------------------------------------------------------------------
def test_push_rmi_pull_by_tag_and_digest(registry, root):
    host, _ = registry
    store = bootstrap_busybox()
    image = store.resolve("busybox")
    target = f"{host}/library/busybox:latest"
    vmshim("tag", "busybox", target)
    out = vmshim("push", target).stdout
    assert f"latest: digest: {image.manifest_digest}" in out
    assert registry_digest(host, "library/busybox:latest") == image.manifest_digest
    vmshim("rmi", "busybox", target)
    assert blob_names(store) == []

    out = vmshim("pull", target).stdout
    assert f"Digest: {image.manifest_digest}" in out
    assert store.resolve(target).manifest_digest == image.manifest_digest
    assert store.resolve(target).config_digest == image.config_digest
    vmshim("rmi", target)
    by_digest = f"{host}/library/busybox@{image.manifest_digest}"
    assert vmshim("pull", "-q", by_digest).stdout.strip() == by_digest
    assert store.resolve(by_digest).manifest_digest == image.manifest_digest
    assert [x.digest for x in store.resolve(by_digest).layers] == [x.digest for x in image.layers]


def _tar(path: Path, entries) -> Path:
    return write_tar(path, entries)


@needs("tar2sqfs")
def test_whiteout_image_round_trip(registry, root, tmp_path):
    host, _ = registry
    lower = _tar(
        tmp_path / "lower.tar",
        [
            ("etc", None),
            ("etc/keep", b"kept\n"),
            ("etc/gone", b"deleted later\n"),
            ("data", None),
            ("data/old", b"old\n"),
        ],
    )
    upper = _tar(
        tmp_path / "upper.tar",
        [("etc", None), ("etc/.wh.gone", b""), ("data", None), ("data/.wh..wh..opq", b""), ("data/new", b"new\n")],
    )
    ref = f"{host}/test/whiteout:1"
    src = ImageStore(tmp_path / "src")
    image = import_image([lower, upper], {"config": {"Cmd": ["sh"]}}, ref, store=src)
    push(ref, store=src)

    store = ImageStore()  # empty
    res = pull(ref, store=store)
    assert res.manifest_digest == image.manifest_digest
    pulled = store.resolve(ref)
    assert [(x.digest, x.diff_id) for x in pulled.layers] == [(x.digest, x.diff_id) for x in image.layers]
    disks = [layer_disk(store, x) for x in pulled.layers]
    listing = subprocess.run(
        ["rdsquashfs", "-l", "/etc", str(disks[1])], capture_output=True, text=True, check=True
    ).stdout
    assert "gone" in listing  # the whiteout, as a 0/0 char device

    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("the overlay check needs root and loop devices")
    with overlay_of(disks[0], disks[1], tmp_path / "mnt") as merged:
        assert (merged / "etc" / "keep").read_text() == "kept\n"
        assert not (merged / "etc" / "gone").exists()
        assert sorted(os.listdir(merged / "data")) == ["new"]


def test_corrupted_blob_in_registry_storage(registry, root, tmp_path):
    host, storage = registry
    payload = os.urandom(200_000)
    layer = _tar(tmp_path / "l.tar", [("blob", payload)])
    ref = f"{host}/test/corrupt:1"
    src = ImageStore(tmp_path / "src")
    image = import_image([layer], {}, ref, store=src)
    push(ref, store=src)
    hexd = image.layers[0].digest[7:]
    data_file = storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data_file.write_bytes(bytes(raw))

    store = ImageStore()
    res = vmshim("pull", "-q", ref, check=False)
    assert res.returncode == 125
    assert res.stderr.startswith("Error: digest mismatch") and res.stderr.count("\n") == 1
    assert blob_names(store) == [] and store.list_images() == []
    assert not any((store.root / "ingest").iterdir())


def test_killed_pull_completes_when_pulled_again(root, tmp_path):
    big = _tar(tmp_path / "big.tar", [("big", os.urandom(3 << 20))])
    with FakeRegistry() as reg:
        seeded = reg.add_image("slow/img", "1", [big.read_bytes()])
        reg.state.slow = 1 << 20  # 1 MiB/s: the pull takes ~3 s
        ref = f"{reg.host}/slow/img:1"
        proc = subprocess.Popen(
            [sys.executable, "-m", "shim.cli.main", "pull", "-q", ref],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        partial = root / "images" / "ingest" / f"{seeded['layers'][0][7:]}.partial"
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size > 300_000):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = partial.stat().st_size
        assert 0 < kept < big.stat().st_size
        reg.state.slow = 0
        vmshim("pull", "-q", ref)
        ranges = [h.get("Range") for m, p, h in reg.state.log if m == "GET" and seeded["layers"][0] in p]
        assert ranges[-1] is not None and int(ranges[-1][6:-1]) >= kept
    store = ImageStore()
    assert store.blob_path(seeded["layers"][0]).read_bytes() == big.read_bytes()
    assert not partial.exists()


# skopeo -----------------------------------------------------------------------------------
def skopeo(*args):
    subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True, timeout=120)


@needs("skopeo")
@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_skopeo_copies_our_save_into_the_registry(registry, root, tmp_path, fmt):
    host, _ = registry
    store = bootstrap_busybox()
    image = store.resolve("busybox")
    archive_path = tmp_path / "busybox.tar"
    vmshim("save", "--format", fmt, "-o", str(archive_path), "busybox")
    name = f"skopeo/{fmt}:1"
    skopeo("copy", "--dest-tls-verify=false", f"{fmt}:{archive_path}", f"docker://{host}/{name}")
    want = registry_digest(host, name)
    res = pull(f"{host}/{name}", store=store)
    assert res.digest == res.manifest_digest == want
    assert store.resolve(f"{host}/{name}").config_digest == image.config_digest


@needs("skopeo")
def test_skopeo_copies_from_the_registry_into_archives_we_load(registry, root, tmp_path):
    host, _ = registry
    store = bootstrap_busybox()
    image = store.resolve("busybox")
    ref = f"{host}/from/skopeo:1"
    vmshim("tag", "busybox", ref)
    vmshim("push", "-q", ref)
    vmshim("rmi", "busybox", ref)
    layout, oci_tar, docker_tar = tmp_path / "layout", tmp_path / "o.tar", tmp_path / "d.tar"
    # our layers are uncompressed tars: the oci transport would gzip them (new digests)
    # unless told to keep them
    keep = ["--preserve-digests", "--dest-oci-accept-uncompressed-layers"]
    skopeo("copy", *keep, "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:{ref}")
    skopeo("copy", *keep, "--src-tls-verify=false", f"docker://{ref}", f"oci-archive:{oci_tar}")
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"docker-archive:{docker_tar}:{ref}")

    out = vmshim("load", "-q", "-i", str(layout)).stdout
    assert out == f"Loaded image: {ref}\n"
    assert store.resolve(ref).manifest_digest == image.manifest_digest
    vmshim("rmi", ref)
    out = vmshim("load", "-q", "-i", str(oci_tar)).stdout  # no name in the archive
    assert out == f"Loaded image ID: {image.config_digest}\n"
    assert store.resolve(image.config_digest).manifest_digest == image.manifest_digest
    out = vmshim("load", "-i", str(docker_tar)).stdout
    assert out.endswith(f"Loaded image: {ref}\n")
    assert store.resolve(ref).config_digest == image.config_digest


# podman -----------------------------------------------------------------------------------
@pytest.fixture
def podman():
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/setup installs it)")
    base = Path(tempfile.mkdtemp(prefix="vmshim-pm-", dir="/tmp"))  # runroot: <= 50 chars

    def run(*args):
        res = subprocess.run(
            [
                "podman",
                "--root",
                str(base / "root"),
                "--runroot",
                str(base / "run"),
                "--storage-driver",
                "vfs",
                "--events-backend",
                "none",
                "--cgroup-manager",
                "cgroupfs",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {res.stderr}")
        return res.stdout

    yield run
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_podman_loads_our_save_and_we_load_podmans(root, tmp_path, podman, fmt):
    store = bootstrap_busybox()
    image = store.resolve("busybox")
    ours = tmp_path / "ours.tar"
    vmshim("save", "--format", fmt, "-o", str(ours), "busybox")
    out = podman("load", "-q", "-i", str(ours))
    assert "docker.io/library/busybox:latest" in out
    ids = podman("images", "--no-trunc", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}")
    assert f"{image.config_digest} docker.io/library/busybox:latest" in ids

    theirs = tmp_path / "theirs.tar"
    podman("save", "--format", fmt, "-o", str(theirs), "docker.io/library/busybox:latest")
    vmshim("rmi", "busybox")
    out = vmshim("load", "-q", "-i", str(theirs)).stdout
    assert out == "Loaded image: busybox:latest\n"
    again = store.resolve("busybox")
    assert again.config_digest == image.config_digest
    assert [x.diff_id for x in again.layers] == [x.diff_id for x in image.layers]
