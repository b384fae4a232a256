"""Network in RUN steps (issue 20): the default NAT network like ``docker build``,
``--network none|host|NAME``, ``--add-host``, and the predefined proxy build args.

A RUN step downloads a tarball from an HTTP server in a namespace standing in for the
internet (reached over a veth from the test's network namespace, as the NAT'ed
containers of tests/e2e/test_network.py reach theirs) and verifies its sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.e2e.conftest import server_in_own_netns, vmshim

SUFFIX = str(os.getpid())
FILES_IP = "203.0.113.1"
FILES_PEER_IP = "203.0.113.2"
FILES_PORT = 18199

vm = pytest.mark.vm


def text(proc) -> str:
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def files_server(tmp_path_factory):
    """An HTTP server on FILES_IP:FILES_PORT in a namespace of its own, serving
    ``payload.tgz`` (a directory ``payload`` with one file); yields the tarball's sha256."""
    root = tmp_path_factory.mktemp("files")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        info = tarfile.TarInfo("payload/hello.txt")
        body = f"downloaded-{SUFFIX}\n".encode()
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    (root / "payload.tgz").write_bytes(data.getvalue())
    with server_in_own_netns(
        [sys.executable, "-m", "http.server", str(FILES_PORT), "--bind", "0.0.0.0", "--directory", str(root)],
        f"vmsfile{SUFFIX[-6:]}",
        FILES_IP,
        FILES_PEER_IP,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ):
        yield hashlib.sha256(data.getvalue()).hexdigest()


def context(tmp_path, dockerfile: str):
    ctx = tmp_path / "ctx"
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    return str(ctx)


# (busybox-static 1.35's wget crashes with -T: timeout(1) bounds it instead.)
DOWNLOAD = f"""\
FROM busybox
ARG SHA
RUN timeout 60 wget -q -O /tmp/p.tgz http://files:{FILES_PORT}/payload.tgz \\
 && echo "$SHA  /tmp/p.tgz" | sha256sum -c \\
 && tar -C / -xzf /tmp/p.tgz && rm /tmp/p.tgz
"""


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=vm), "process"])
def test_run_step_downloads_over_the_default_network(isolation, files_server, tmp_path):
    tag = f"vmshim-test/net-{isolation}-{SUFFIX}"
    proc = vmshim(
        "build",
        "--no-cache",
        "--isolation",
        isolation,
        "--add-host",
        f"files:{FILES_IP}",
        "--build-arg",
        f"SHA={files_server}",
        "-t",
        tag,
        context(tmp_path, DOWNLOAD),
        timeout=600,
    )
    assert proc.returncode == 0, text(proc)
    assert "p.tgz: OK" in text(proc)
    run = vmshim("run", "--rm", "--isolation", "process", "--network", "none", tag, "cat", "/payload/hello.txt")
    assert run.stdout.decode() == f"downloaded-{SUFFIX}\n", text(run)
    vmshim("rmi", tag)


def test_network_none_has_no_way_out(files_server, tmp_path):
    proc = vmshim(
        "build",
        "--no-cache",
        "--isolation",
        "process",
        "--network",
        "none",
        "--add-host",
        f"files:{FILES_IP}",
        "--build-arg",
        f"SHA={files_server}",
        context(tmp_path, DOWNLOAD),
        timeout=600,
    )
    assert proc.returncode != 0
    assert "returned a non-zero code" in text(proc)


def test_proxy_build_args_reach_the_step_but_not_the_history(tmp_path):
    tag = f"vmshim-test/proxy-{SUFFIX}"
    proc = vmshim(
        "build",
        "--no-cache",
        "--isolation",
        "process",
        "--network",
        "none",
        "--build-arg",
        "HTTP_PROXY=http://proxy.example:3128",
        "--build-arg",
        "no_proxy=localhost",
        "-t",
        tag,
        context(tmp_path, 'FROM busybox\nRUN echo "$HTTP_PROXY $no_proxy" > /p\n'),
        timeout=600,
    )
    assert proc.returncode == 0, text(proc)
    assert "not consumed" not in text(proc)
    run = vmshim("run", "--rm", "--isolation", "process", "--network", "none", tag, "cat", "/p")
    assert run.stdout.decode() == "http://proxy.example:3128 localhost\n", text(run)
    history = vmshim("image", "inspect", tag)
    assert history.returncode == 0, text(history)
    assert "proxy.example" not in history.stdout.decode()
    assert json.loads(history.stdout)  # the image's record, without the proxy
    vmshim("rmi", tag)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--network", "no-such-net"], "no-such-net"),
        (["--add-host", "bad"], "invalid --add-host 'bad'"),
    ],
)
def test_bad_network_flags_are_one_line_before_any_step(tmp_path, args, message):
    proc = vmshim("build", *args, context(tmp_path, "FROM busybox\nRUN true\n"))
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and message in stderr, text(proc)
    assert len(stderr.strip().splitlines()) == 1
    assert "Step 2/2" not in proc.stdout.decode()


# Debian's apt downloads it over HTTP and checks its sha256 (apt-helper: in every Debian
# image, with apt's own HTTP client), then tar unpacks it.
DEBIAN_DOWNLOAD = f"""\
FROM node:18-bookworm
ARG SHA
RUN /usr/lib/apt/apt-helper download-file http://files:{FILES_PORT}/payload.tgz /tmp/p.tgz \\
      "SHA256:$SHA" \\
 && tar -C / -xzf /tmp/p.tgz && rm /tmp/p.tgz && echo apt-download-ok
"""


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=vm), "process"])
def test_debian_run_step_downloads_and_verifies_with_apt(isolation, files_server, tmp_path):
    if vmshim("image", "inspect", "node:18-bookworm").returncode != 0:
        pytest.skip("no Debian (node) image: scripts/test bootstraps it")
    tag = f"vmshim-test/debnet-{isolation}-{SUFFIX}"
    proc = vmshim(
        "build",
        "--no-cache",
        "--isolation",
        isolation,
        "--add-host",
        f"files:{FILES_IP}",
        "--build-arg",
        f"SHA={files_server}",
        "-t",
        tag,
        context(tmp_path, DEBIAN_DOWNLOAD),
        timeout=900,
    )
    assert proc.returncode == 0, text(proc)
    assert "apt-download-ok" in text(proc).splitlines()
    run = vmshim("run", "--rm", "--isolation", "process", "--network", "none", tag, "cat", "/payload/hello.txt")
    assert run.stdout.decode() == f"downloaded-{SUFFIX}\n", text(run)
    # a wrong checksum fails the step: apt checked it
    bad = vmshim(
        "build",
        "--no-cache",
        "--isolation",
        "process",
        "--add-host",
        f"files:{FILES_IP}",
        "--build-arg",
        f"SHA={'0' * 64}",
        context(tmp_path / "bad", DEBIAN_DOWNLOAD),
        timeout=900,
    )
    assert bad.returncode != 0 and "apt-download-ok" not in text(bad).splitlines(), text(bad)
    vmshim("rmi", tag)
