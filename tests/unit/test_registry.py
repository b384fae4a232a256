"""Registry client, pull and push against an in-process fake registry on 127.0.0.1: auth
challenges, retries, resumed and corrupted downloads, multi-arch indexes, chunked uploads,
cross-repository mounts, settings and credentials."""

import json
import os
import socket
import subprocess
import sys
import stat
import time

import pytest
from click.testing import CliRunner

from shim.errors import ImageError, RegistryError
from shim.images import config as regconfig
from shim.images.distribution import Platform, pull, push
from shim.images.registry import RegistryClient, parse_challenge
from shim.images.store import ImageStore, import_image
from tests.fakeregistry import FakeRegistry, sha
from tests.tarfiles import tar_of


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("VMSHIM_REGISTRY_BACKOFF", "0.01")
    monkeypatch.setenv("VMSHIM_REGISTRY_RETRIES", "3")
    monkeypatch.delenv("VMSHIM_DEFAULT_REGISTRY", raising=False)
    monkeypatch.delenv("VMSHIM_INSECURE_REGISTRIES", raising=False)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return ImageStore()


@pytest.fixture
def reg():
    with FakeRegistry() as r:
        yield r


def layer(files: dict[str, bytes]) -> bytes:
    return tar_of(files)


def store_files(store: ImageStore) -> dict[str, list[str]]:
    ingest = store.root / "ingest"
    return {
        "blobs": sorted(os.listdir(store.blobs_dir)),
        "ingest": sorted(os.listdir(ingest)) if ingest.exists() else [],
        "names": [str(s.reference) for s in store.list_images()],
    }


# Pull ---------------------------------------------------------------------------------------
def test_pull_by_tag_then_by_digest(store, reg):
    seeded = reg.add_image("ns/app", "1", [layer({"a": b"A" * 5000}), layer({"b": b"B"})])
    res = pull(f"{reg.host}/ns/app:1", store=store)
    assert res.manifest_digest == res.digest == seeded["manifest"]
    assert res.updated
    image = store.resolve(f"{reg.host}/ns/app:1")
    assert [layer.digest for layer in image.layers] == seeded["layers"]
    assert image.config_digest == seeded["config"]
    assert store_files(store)["ingest"] == []

    gets = sum(1 for m, p, _ in reg.state.log if m == "GET" and "/blobs/" in p)
    again = pull(f"{reg.host}/ns/app:1", store=store)
    assert not again.updated
    assert sum(1 for m, p, _ in reg.state.log if m == "GET" and "/blobs/" in p) == gets

    by_digest = pull(f"{reg.host}/ns/app@{seeded['manifest']}", store=store)
    assert by_digest.reference.digest == seeded["manifest"] and by_digest.reference.tag is None
    assert store.resolve(f"{reg.host}/ns/app@{seeded['manifest']}").config_digest == seeded["config"]


def test_missing_image_is_a_clear_registry_error(store, reg):
    with pytest.raises(RegistryError, match=r"ns/nothing:1: not found"):
        pull(f"{reg.host}/ns/nothing:1", store=store)


def test_corrupted_blob_is_rejected_and_store_stays_clean(store, reg):
    seeded = reg.add_image("ns/bad", "1", [layer({"ok": b"fine"}), layer({"x": b"x" * 70000})])
    reg.state.corrupt.add(seeded["layers"][1])
    with pytest.raises(ImageError, match="digest mismatch"):
        pull(f"{reg.host}/ns/bad:1", store=store)
    assert store_files(store) == {"blobs": [], "ingest": [], "names": []}


def test_retries_on_503_and_resumes_a_broken_download(store, reg):
    big = layer({"big": os.urandom(300_000)})
    seeded = reg.add_image("ns/flaky", "1", [big])
    reg.state.fail_next[r"/manifests/"] = 2
    reg.state.drop_after[seeded["layers"][0]] = 100_000
    pull(f"{reg.host}/ns/flaky:1", store=store)
    ranges = [h.get("Range") for m, p, h in reg.state.log if m == "GET" and seeded["layers"][0] in p]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")
    assert int(ranges[-1][6:-1]) > 0
    assert store.blob_path(seeded["layers"][0]).read_bytes() == big


def test_retries_give_up_with_a_clear_error(store, reg, monkeypatch):
    reg.add_image("ns/down", "1", [layer({"a": b"a"})])
    reg.state.fail_next[r"/manifests/"] = 100
    with pytest.raises(RegistryError, match="503"):
        pull(f"{reg.host}/ns/down:1", store=store)


def test_leftover_partial_download_is_resumed(store, reg):
    data = layer({"f": os.urandom(200_000)})
    seeded = reg.add_image("ns/res", "1", [data])
    ingest = store.root / "ingest"
    ingest.mkdir()
    (ingest / f"{seeded['layers'][0][7:]}.partial").write_bytes(data[:50_000])
    pull(f"{reg.host}/ns/res:1", store=store)
    hdrs = [h for m, p, h in reg.state.log if m == "GET" and seeded["layers"][0] in p]
    assert [h.get("Range") for h in hdrs] == ["bytes=50000-"]
    assert store_files(store)["ingest"] == []


def test_partial_download_with_server_ignoring_range(store, reg):
    data = layer({"f": os.urandom(100_000)})
    seeded = reg.add_image("ns/norange", "1", [data])
    reg.state.ignore_range = True
    ingest = store.root / "ingest"
    ingest.mkdir()
    (ingest / f"{seeded['layers'][0][7:]}.partial").write_bytes(b"garbage" * 1000)
    pull(f"{reg.host}/ns/norange:1", store=store)
    assert store.blob_path(seeded["layers"][0]).read_bytes() == data


def _index(reg, repo):
    amd = reg.add_image(repo, "", [layer({"arch": b"amd64"})], arch="amd64")
    arm = reg.add_image(repo, "", [layer({"arch": b"arm64"})], arch="arm64")
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": arm["manifest"],
                "size": arm["size"],
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": amd["manifest"],
                "size": amd["size"],
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    digest = reg.add_manifest(repo, "multi", index, "application/vnd.oci.image.index.v1+json")
    return digest, amd, arm


def test_multi_arch_index_picks_the_platform(store, reg):
    index_digest, amd, arm = _index(reg, "ns/multi")
    res = pull(f"{reg.host}/ns/multi:multi", store=store)
    assert res.digest == index_digest and res.manifest_digest == amd["manifest"]
    assert store.resolve(f"{reg.host}/ns/multi:multi").config["architecture"] == "amd64"
    assert not store.has_blob(arm["layers"][0])

    other = ImageStore(store.root.parent / "other")
    res = pull(f"{reg.host}/ns/multi:multi", store=other, platform="linux/arm64")
    assert res.manifest_digest == arm["manifest"]

    with pytest.raises(ImageError, match="no manifest for linux/s390x.*linux/amd64"):
        pull(f"{reg.host}/ns/multi:multi", store=store, platform="linux/s390x")


def test_pull_by_index_digest_records_the_index(store, reg):
    index_digest, amd, _ = _index(reg, "ns/multi")
    res = pull(f"{reg.host}/ns/multi@{index_digest}", store=store)
    assert res.reference.digest == index_digest
    image = store.resolve(f"{reg.host}/ns/multi@{index_digest}")
    assert image.manifest_digest == amd["manifest"]
    store.remove(f"{reg.host}/ns/multi@{index_digest}")
    assert store_files(store)["blobs"] == []


def test_schema1_and_non_images_are_refused(store, reg):
    reg.add_manifest(
        "ns/old",
        "1",
        {"schemaVersion": 1, "name": "ns/old", "fsLayers": []},
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
    with pytest.raises(ImageError, match="schema 1"):
        pull(f"{reg.host}/ns/old:1", store=store)
    cfg = reg.add_blob("ns/art", b"{}")
    reg.add_manifest(
        "ns/art",
        "1",
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": cfg, "size": 2},
            "layers": [],
        },
    )
    with pytest.raises(ImageError, match="not a container image"):
        pull(f"{reg.host}/ns/art:1", store=store)


def test_manifest_digest_mismatch_is_refused(store, reg):
    seeded = reg.add_image("ns/lie", "1", [layer({"a": b"a"})])
    body, ctype = reg.state.manifests[("ns/lie", "1")]
    reg.state.manifests[("ns/lie", seeded["manifest"])] = (body + b" ", ctype)
    with pytest.raises(ImageError, match="digest mismatch"):
        pull(f"{reg.host}/ns/lie@{seeded['manifest']}", store=store)
    assert store_files(store)["blobs"] == []


# Auth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_auth_challenges(store, scheme):
    with FakeRegistry(auth=scheme, users={"alice": "s3cret"}) as reg:
        reg.add_image("priv/app", "1", [layer({"a": b"a"})])
        with pytest.raises(RegistryError, match=f"vmshim login {reg.host}"):
            pull(f"{reg.host}/priv/app:1", store=store)
        regconfig.store_credentials(reg.host, "alice", "wrong")
        with pytest.raises(RegistryError, match="unauthorized|refused to issue a token"):
            pull(f"{reg.host}/priv/app:1", store=store)
        regconfig.store_credentials(reg.host, "alice", "s3cret")
        res = pull(f"{reg.host}/priv/app:1", store=store)
        assert res.updated
        store.tag(f"{reg.host}/priv/copy:2", res.manifest_digest)
        push(f"{reg.host}/priv/copy:2", store=store)
        assert ("priv/copy", "2") in reg.state.manifests
        if scheme == "bearer":
            token_reqs = [(p, h) for m, p, h in reg.state.log if p.startswith("/token")]
            assert any("scope=repository%3Apriv%2Fapp%3Apull" in p for p, _ in token_reqs)
            assert all(h.get("Authorization", "").startswith("Basic ") for _, h in token_reqs[-2:])


def test_anonymous_bearer_token(store):
    with FakeRegistry(auth="bearer") as reg:  # tokens for anyone, as Docker Hub's pulls
        reg.add_image("pub/app", "1", [layer({"a": b"a"})])
        assert pull(f"{reg.host}/pub/app:1", store=store).updated


def test_parse_challenge():
    c = parse_challenge('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge("Negotiate abc") is None and parse_challenge("") is None


def test_credentials_file_is_private_and_docker_shaped(store):
    regconfig.store_credentials("Registry.Example:5000", "bob", "pw:with:colons")
    regconfig.store_credentials("docker.io", "hub", "x")
    path = regconfig.auth_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert set(data["auths"]) == {"registry.example:5000", "https://index.docker.io/v1/"}
    assert regconfig.get_credentials("registry.example:5000") == ("bob", "pw:with:colons")
    assert regconfig.get_credentials("index.docker.io") == ("hub", "x")
    assert regconfig.remove_credentials("registry.example:5000")
    assert not regconfig.remove_credentials("registry.example:5000")
    assert regconfig.get_credentials("registry.example:5000") is None


def test_login_and_logout_cli(store):
    from shim.cli.main import cli

    runner = CliRunner()
    with FakeRegistry(auth="bearer", users={"alice": "s3cret"}) as reg:
        res = runner.invoke(cli, ["login", "-u", "alice", "--password-stdin", reg.host], input="wrong\n")
        assert res.exit_code == 125
        assert res.output.count("\n") == 1 and res.output.startswith("Error: ")
        assert not regconfig.auth_file().exists()
        res = runner.invoke(cli, ["login", "-u", "alice", "--password-stdin", reg.host], input="s3cret\n")
        assert res.exit_code == 0 and "Login Succeeded" in res.output
        assert regconfig.get_credentials(reg.host) == ("alice", "s3cret")
        res = runner.invoke(cli, ["logout", reg.host])
        assert res.exit_code == 0 and "Removing login credentials" in res.output
        assert regconfig.get_credentials(reg.host) is None


# Transport policy and settings --------------------------------------------------------------
def test_plain_http_only_for_loopback_or_when_asked(store, monkeypatch):
    assert regconfig.plain_http_allowed("localhost:5000")
    assert regconfig.plain_http_allowed("127.0.0.2:80")
    assert regconfig.plain_http_allowed("[::1]:5000")
    assert not regconfig.plain_http_allowed("registry.example:5000")
    assert regconfig.plain_http_allowed("registry.example:5000", insecure=True)
    monkeypatch.setenv("VMSHIM_INSECURE_REGISTRIES", "registry.example:5000, other.example")
    assert regconfig.plain_http_allowed("registry.example:5000")
    assert regconfig.plain_http_allowed("other.example:443")
    monkeypatch.delenv("VMSHIM_INSECURE_REGISTRIES")
    (store.root.parent / "registries.json").write_text(json.dumps({"insecure_registries": ["conf.example"]}))
    assert regconfig.plain_http_allowed("conf.example")
    client = RegistryClient("secure.example")
    assert client.base_url == "https://secure.example"  # decided without any traffic


def test_default_registry_serves_short_names(store, reg, monkeypatch):
    reg.add_image("library/tool", "2", [layer({"t": b"t"})])
    monkeypatch.setenv("VMSHIM_DEFAULT_REGISTRY", reg.host)
    res = pull("tool:2", store=store)
    assert str(res.reference) == "docker.io/library/tool:2"
    assert store.resolve("tool:2").config["os"] == "linux"
    monkeypatch.delenv("VMSHIM_DEFAULT_REGISTRY")
    (store.root.parent / "registries.json").write_text(json.dumps({"default_registry": reg.host}))
    assert regconfig.endpoint_host("docker.io") == reg.host
    assert regconfig.endpoint_host("quay.io") == "quay.io"


def test_platform_parsing():
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("amd64") == Platform("linux", "amd64")
    with pytest.raises(Exception, match="invalid platform"):
        Platform.parse("a/b/c/d")


# Push ---------------------------------------------------------------------------------------
def _local_image(store, tmp_path, ref, payload=b"p" * 300_000):
    tar = tmp_path / "l.tar"
    tar.write_bytes(layer({"payload": payload}))
    return import_image([tar], {"config": {"Cmd": ["sh"]}}, ref, store=store)


@pytest.mark.parametrize("chunk", [0, 65536])
def test_push_monolithic_and_chunked(store, reg, tmp_path, chunk):
    image = _local_image(store, tmp_path, f"{reg.host}/ns/pushed:v1")
    res = push(f"{reg.host}/ns/pushed:v1", store=store, chunk_size=chunk)
    assert res.digest == image.manifest_digest
    body, ctype = reg.state.manifests[("ns/pushed", "v1")]
    assert sha(body) == image.manifest_digest and ctype == json.loads(body)["mediaType"]
    assert reg.state.blobs[image.layers[0].digest] == store.blob_path(image.layers[0].digest).read_bytes()
    assert (reg.state.patches > 0) == bool(chunk)
    # a second push finds every blob there (HEAD) and uploads nothing
    posts = sum(1 for m, p, _ in reg.state.log if m == "POST")
    push(f"{reg.host}/ns/pushed:v1", store=store, chunk_size=chunk)
    assert sum(1 for m, p, _ in reg.state.log if m == "POST") == posts


def test_push_mounts_blobs_across_repositories(store, reg, tmp_path):
    image = _local_image(store, tmp_path, f"{reg.host}/ns/one:1")
    push(f"{reg.host}/ns/one:1", store=store)
    store.tag(f"{reg.host}/ns/two:1", image.manifest_digest)
    push(f"{reg.host}/ns/two:1", store=store)
    assert reg.state.mounts == 2, [(m, p) for m, p, _ in reg.state.log]  # layer and config
    assert ("ns/two", "1") in reg.state.manifests


def test_push_retries_an_upload_after_a_5xx(store, reg, tmp_path):
    _local_image(store, tmp_path, f"{reg.host}/ns/retry:1")
    reg.state.fail_next[r"/blobs/uploads/.+digest="] = 1
    push(f"{reg.host}/ns/retry:1", store=store)
    assert ("ns/retry", "1") in reg.state.manifests


def test_push_of_a_missing_image(store, reg):
    with pytest.raises(Exception, match="not found in the local store"):
        push(f"{reg.host}/ns/none:1", store=store)


def test_pull_and_push_cli(store, reg, tmp_path):
    from shim.cli.main import cli

    _local_image(store, tmp_path, f"{reg.host}/ns/cli:1")
    runner = CliRunner()
    res = runner.invoke(cli, ["push", "-q", f"{reg.host}/ns/cli:1"])
    assert res.exit_code == 0, res.output
    digest = res.output.strip().split("@")[1]
    res = runner.invoke(cli, ["rmi", f"{reg.host}/ns/cli:1"])
    assert res.exit_code == 0
    res = runner.invoke(cli, ["pull", f"{reg.host}/ns/cli:1"])
    assert res.exit_code == 0, res.output
    assert f"Digest: {digest}" in res.output
    assert "Status: Downloaded newer image" in res.output
    res = runner.invoke(cli, ["pull", "-q", f"{reg.host}/ns/cli:1"])
    assert res.output == f"{reg.host}/ns/cli:1\n"
    res = runner.invoke(cli, ["pull", "-q", f"{reg.host}/ns/cli:nope"])
    assert res.exit_code == 125 and res.output.startswith("Error: ") and res.output.count("\n") == 1


def test_concurrent_pulls_of_the_same_image(store, reg):
    import threading

    data = layer({"f": os.urandom(400_000)})
    seeded = reg.add_image("ns/same", "1", [data])
    reg.state.slow = 2_000_000
    errors = []

    def one():
        try:
            pull(f"{reg.host}/ns/same:1", store=ImageStore(store.root))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert store.blob_path(seeded["layers"][0]).read_bytes() == data
    assert store_files(store)["ingest"] == []


def test_a_5xx_on_get_is_retried_by_one_layer_only(store, reg):
    reg.add_image("ns/down", "1", [layer({"a": b"a"})])
    reg.state.fail_next[r"/manifests/"] = 100
    with pytest.raises(RegistryError, match="503"):
        pull(f"{reg.host}/ns/down:1", store=store)
    gets = [p for m, p, _ in reg.state.log if m == "GET" and "/manifests/" in p]
    assert len(gets) == 4, gets  # the first try and VMSHIM_REGISTRY_RETRIES=3, not 4 x 4


@pytest.mark.parametrize("kind", ["refusing", "silent"])
def test_a_registry_that_does_not_answer_fails_in_seconds_naming_it(tmp_path, kind):
    """With the default retries and timeouts (no VMSHIM_REGISTRY_* in the environment): a
    closed port, and a port that accepts connections but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        if kind == "silent":
            listener.listen(16)  # the kernel completes handshakes; nobody ever reads
        else:
            listener.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMSHIM_REGISTRY_")}
        env["VMSHIM_ROOT"] = str(tmp_path / "root")
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "shim.cli.main", "pull", f"{host}/x:1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        took = time.monotonic() - started
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"registry {host} does not answer" in lines[0], proc.stderr
    assert took < 10, f"{kind} registry: failed after {took:.1f}s"
