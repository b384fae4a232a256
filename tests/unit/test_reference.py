"""Image reference parsing: docker's normalisation and clear errors."""

import pytest

from shim.errors import InvalidReference
from shim.images.reference import Reference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest, canonical, familiar",
    [
        (
            "busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
            "busybox:latest",
        ),
        (
            "busybox:1.36",
            "docker.io",
            "library/busybox",
            "1.36",
            None,
            "docker.io/library/busybox:1.36",
            "busybox:1.36",
        ),
        (
            "library/busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
            "busybox:latest",
        ),
        (
            "docker.io/busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
            "busybox:latest",
        ),
        (
            "index.docker.io/library/busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
            "busybox:latest",
        ),
        ("ns/x:tag", "docker.io", "ns/x", "tag", None, "docker.io/ns/x:tag", "ns/x:tag"),
        ("ns/sub/x", "docker.io", "ns/sub/x", "latest", None, "docker.io/ns/sub/x:latest", "ns/sub/x:latest"),
        ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest", "localhost/x:latest"),
        (
            "localhost:5000/ns/x:v1",
            "localhost:5000",
            "ns/x",
            "v1",
            None,
            "localhost:5000/ns/x:v1",
            "localhost:5000/ns/x:v1",
        ),
        (f"host:5000/ns/x@{D}", "host:5000", "ns/x", None, D, f"host:5000/ns/x@{D}", f"host:5000/ns/x@{D}"),
        (
            f"busybox:1@{D}",
            "docker.io",
            "library/busybox",
            "1",
            D,
            f"docker.io/library/busybox:1@{D}",
            f"busybox:1@{D}",
        ),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D, f"docker.io/library/busybox@{D}", f"busybox@{D}"),
        (
            "quay.io/a-b/c_d.e__f:T_1.x-y",
            "quay.io",
            "a-b/c_d.e__f",
            "T_1.x-y",
            None,
            "quay.io/a-b/c_d.e__f:T_1.x-y",
            "quay.io/a-b/c_d.e__f:T_1.x-y",
        ),
        (
            "127.0.0.1:5000/x",
            "127.0.0.1:5000",
            "x",
            "latest",
            None,
            "127.0.0.1:5000/x:latest",
            "127.0.0.1:5000/x:latest",
        ),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, "[::1]:5000/x:latest", "[::1]:5000/x:latest"),
        ("Registry/x", "Registry", "x", "latest", None, "Registry/x:latest", "Registry/x:latest"),
        ("x:5000", "docker.io", "library/x", "5000", None, "docker.io/library/x:5000", "x:5000"),
        ("a--b", "docker.io", "library/a--b", "latest", None, "docker.io/library/a--b:latest", "a--b:latest"),
    ],
)
def test_valid(text, registry, repository, tag, digest, canonical, familiar):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert str(ref) == canonical
    assert ref.familiar == familiar
    assert parse_reference(str(ref)) == ref  # canonical form round-trips
    assert Reference.parse(text) == ref


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("BusyBox", "lowercase"),
        ("ns/X", "lowercase"),
        ("busybox:", "tag"),
        ("busybox:.hidden", "tag"),
        ("busybox:" + "t" * 129, "tag"),
        ("busybox@sha256:abc", "digest"),
        ("busybox@md5:" + "a" * 32, "digest"),
        (f"busybox@sha256:{'A' * 64}", "digest"),
        ("busy box", "whitespace"),
        (" busybox", "whitespace"),
        ("-x", "component"),
        ("x-", "component"),
        ("a/../b", "component"),
        ("a//b", "component"),
        ("a/", "component"),
        ("x..y", "component"),
        ("x___y", "component"),
        ("bad_host.:5000/x", "registry"),
        ("host:port/x", "registry"),
        (":tag", "empty"),
        ("@" + D, "empty"),
        ("a/" * 130 + "x", "longer than 255"),
    ],
)
def test_invalid(text, reason):
    with pytest.raises(InvalidReference) as exc:
        parse_reference(text)
    msg = str(exc.value)
    assert reason in msg
    assert "invalid reference format" in msg


def test_familiar_name_and_name():
    ref = parse_reference("busybox")
    assert ref.familiar_name == "busybox"
    assert ref.name == "docker.io/library/busybox"
    assert parse_reference("ns/x").familiar_name == "ns/x"
    assert parse_reference("docker.io/library/a/b").familiar_name == "library/a/b"
