"""shim/bench/npm_mirror.py: npm's range rules (the subset used) and the served registry."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from shim.bench import npm_mirror
from shim.bench.npm_mirror import best, satisfies


@pytest.mark.parametrize(
    "version, spec, expected",
    [
        ("1.3.8", "~1.3.8", True),
        ("1.4.0", "~1.3.8", False),
        ("1.9.0", "^1.3.8", True),
        ("2.0.0", "^1.3.8", False),
        ("0.5.9", "^0.5.2", True),
        ("0.6.0", "^0.5.2", False),
        ("2.6.9", "2.6.9", True),
        ("2.6.8", "2.6.9", False),
        ("1.2.3", ">=1.0.0 <2", True),
        ("3.0.0", "1.x || >=3", True),
        ("2.1.0", "1.x || >=3", False),
        ("4.0.0", "*", True),
        ("1.0.0-beta", "^1.0.0", False),
        ("1.5.0", "1.0.0 - 1.5", True),
        ("1.6.0", "1.0.0 - 1.5", False),
        ("not-a-version", "*", False),
    ],
)
def test_ranges(version, spec, expected):
    assert satisfies(version, spec) is expected


def test_best_prefers_latest_then_the_highest():
    versions = ["4.21.2", "4.22.3", "5.1.0", "5.2.0-rc.1"]
    assert best(versions, "^4.21.2", latest="5.1.0") == "4.22.3"
    assert best(versions, "*", latest="5.1.0") == "5.1.0"
    assert best(versions, "^6") is None


def test_served_packuments_point_at_the_server_and_names_are_checked(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "tarballs" / "ms").mkdir(parents=True)
    (tmp_path / "tarballs" / "ms" / "ms-2.1.3.tgz").write_bytes(b"tgz")
    (tmp_path / "secret.tgz").write_bytes(b"no")
    (tmp_path / "meta" / "ms.json").write_text(
        json.dumps(
            {
                "name": "ms",
                "dist-tags": {"latest": "2.1.3"},
                "versions": {"2.1.3": {"dist": {"tarball": "https://registry.npmjs.org/ms/-/ms-2.1.3.tgz"}}},
            }
        )
    )
    server = npm_mirror.make_server(tmp_path, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        doc = json.loads(urllib.request.urlopen(f"{base}/ms", timeout=5).read())
        url = doc["versions"]["2.1.3"]["dist"]["tarball"]
        assert url == f"{base}/ms/-/ms-2.1.3.tgz"
        assert urllib.request.urlopen(url, timeout=5).read() == b"tgz"
        for bad in ("/..%2fsecret.tgz", "/ms/-/..%2f..%2fsecret.tgz", "/ms/-/../../secret.tgz", "/nothere"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base + bad, timeout=5)
    finally:
        server.shutdown()


def test_the_mirror_binds_one_address_even_before_it_exists(tmp_path):
    """The bench serves on the default network's gateway, which exists only once the
    bridge is up: binding must not need the address yet, and must not widen to every
    address. (192.0.2.1, TEST-NET-1, is only bound here, never sent to.)"""
    server = npm_mirror.make_server(tmp_path, "192.0.2.1", 0)
    try:
        assert server.server_address[0] == "192.0.2.1"
    finally:
        server.server_close()


def test_fetch_refuses_bad_names_and_tarball_urls(tmp_path, monkeypatch):
    package = tmp_path / "package.json"
    package.write_text(json.dumps({"dependencies": {"../etc": "1"}}))
    with pytest.raises(npm_mirror.MirrorError, match="invalid package name"):
        npm_mirror.fetch(package, tmp_path / "m")
    package.write_text(json.dumps({"dependencies": {"evil": "1.0.0"}}))
    monkeypatch.setattr(
        npm_mirror,
        "_get_json",
        lambda url: {
            "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {"dist": {"tarball": "https://x/evil/-/..%2f..%2fx"}}},
        },
    )
    with pytest.raises(npm_mirror.MirrorError, match="unexpected tarball URL"):
        npm_mirror.fetch(package, tmp_path / "m")
