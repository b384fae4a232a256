"""The lecture's Express app (examples/node-hello, issue 20): a real ``npm install express``
in a RUN step, against an npm registry served inside the test run's network namespace
(shim/bench/npm_mirror.py, its packages fetched once by scripts/test into
$VMSHIM_ROOT/cache/npm). The image runs with a published port and answers; a second build
is fully cached; a one-line change of server.js re-runs only the final COPY."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shim import paths
from shim.bench import npm_mirror
from tests.e2e.conftest import server_in_own_netns, vmshim
from tests.waiting import wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node-hello"
SUFFIX = str(os.getpid())
NPM_IP = "198.51.100.1"
NPM_PEER_IP = "198.51.100.2"
NPM_PORT = 4873


def text(proc) -> str:
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def npm_registry():
    """The npm mirror on NPM_IP:NPM_PORT in a namespace of its own (reached over a veth,
    like tests/e2e/test_build_network.py's file server)."""
    root = paths.root() / "cache" / "npm"
    if not npm_mirror.ready(EXAMPLE / "package.json", root):
        pytest.skip("no npm mirror cache (scripts/test fills it while the network is up)")
    if vmshim("image", "inspect", "node:18-bookworm").returncode != 0:
        pytest.skip("no node image (scripts/test bootstraps it)")
    with server_in_own_netns(
        [sys.executable, "-m", "shim.bench.npm_mirror", "serve", str(root), "0.0.0.0", str(NPM_PORT)],
        f"vmsnpm{SUFFIX[-6:]}",
        NPM_IP,
        NPM_PEER_IP,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(EXAMPLE.parents[1]),
    ):
        yield f"http://npm:{NPM_PORT}/"


def build(ctx: Path, registry: str, tag: str, *extra: str):
    return vmshim(
        "build",
        *extra,
        "--add-host",
        f"npm:{NPM_IP}",
        "--build-arg",
        f"NPM_REGISTRY={registry}",
        "-t",
        tag,
        str(ctx),
        timeout=1800,
    )


def steps(output: str) -> list[tuple[str, bool, bool]]:
    """(instruction, cached, ran a container) per step of a classic build's output."""
    out = []
    for line in output.splitlines():
        if line.startswith("Step "):
            out.append([line.split(" : ", 1)[1], False, False])
        elif line == " ---> Using cache" and out:
            out[-1][1] = True
        elif line.startswith(" ---> Running in ") and out:
            out[-1][2] = True
    return [tuple(s) for s in out]


def answer(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


@pytest.mark.vm
@pytest.mark.slow
def test_express_example_builds_with_npm_install_runs_and_caches(npm_registry, tmp_path):
    import socket

    ctx = tmp_path / "node-hello"
    shutil.copytree(EXAMPLE, ctx)
    tag = f"vmshim-test/express-{SUFFIX}"
    started = time.monotonic()
    first = build(ctx, npm_registry, tag, "--no-cache")
    assert first.returncode == 0, text(first)
    print(f"Express example, vm, no cache: {time.monotonic() - started:.1f} s")
    assert "added" in text(first) and "packages" in text(first)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    name = f"express-{SUFFIX}"
    run = vmshim("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", tag, timeout=300)
    assert run.returncode == 0, text(run)
    try:
        assert wait_until(lambda: answer(port), 600, "the Express app's answer") == "hello from vmshim\n"
    finally:
        vmshim("rm", "-f", name, timeout=300)
    # unchanged: every step from the cache, no container
    again = build(ctx, npm_registry, tag)
    assert again.returncode == 0, text(again)
    assert all(cached for _, cached, _ in steps(text(again))[1:]), text(again)
    # one line of server.js changed: only the final COPY (and the config after it) runs
    server = ctx / "server.js"
    server.write_text(server.read_text().replace("hello from vmshim", "hello again"))
    third = build(ctx, npm_registry, tag)
    assert third.returncode == 0, text(third)
    done = steps(text(third))
    assert not any(ran for _, _, ran in done), text(third)
    assert [s for s, cached, _ in done[1:] if not cached] == ["COPY . .", "EXPOSE 8080", 'CMD ["npm","start"]'], text(
        third
    )
    vmshim("rmi", tag)
