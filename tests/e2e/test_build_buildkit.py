"""BuildKit-era Dockerfile syntax with real RUN steps (issue 20): ``# syntax=`` ignored,
heredocs in RUN and COPY."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.e2e.conftest import blobs_hold, server_in_own_netns, vmshim

SUFFIX = str(os.getpid())

HEREDOCS = """\
# syntax=docker/dockerfile:1.7
FROM busybox
ENV WHO=heredoc
RUN <<EOF
set -e
mkdir -p /out
echo "script ran as $(id -u)" > /out/script
EOF
RUN cat <<'RAW' > /out/raw && cat <<-TABS > /out/tabs
$WHO stays literal
RAW
\tindented $WHO
\tTABS
COPY <<conf.ini /out/
name = $WHO
conf.ini
"""


def text(proc) -> str:
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=pytest.mark.vm), "process"])
def test_heredocs_run_and_copy(isolation, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(HEREDOCS)
    tag = f"vmshim-test/heredoc-{isolation}-{SUFFIX}"
    iidfile = tmp_path / "iid"
    proc = vmshim(
        "build",
        "--no-cache",
        "--network",
        "none",
        "--isolation",
        isolation,
        "--label",
        "org.example.kind=heredoc",
        "--iidfile",
        str(iidfile),
        "-t",
        tag,
        str(ctx),
        timeout=600,
    )
    assert proc.returncode == 0, text(proc)
    image = json.loads(vmshim("image", "inspect", tag).stdout)
    image = image[0] if isinstance(image, list) else image
    assert iidfile.read_text() == image["Id"]
    assert image["Config"]["Labels"] == {"org.example.kind": "heredoc"}
    run = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        "none",
        tag,
        "sh",
        "-c",
        "cat /out/script /out/raw /out/tabs /out/conf.ini",
    )
    assert run.stdout.decode() == ("script ran as 0\n$WHO stays literal\nindented heredoc\nname = heredoc\n"), text(run)
    vmshim("rmi", tag)


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=pytest.mark.vm), "process"])
def test_cache_and_secret_mounts(isolation, tmp_path):
    secret_value = f"s3cr3t-{SUFFIX}-{isolation}"
    secret = tmp_path / "token"
    secret.write_text(secret_value)
    digest = hashlib.sha256(secret_value.encode()).hexdigest()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"""\
FROM busybox
RUN --mount=type=cache,id=t{SUFFIX},target=/cache \\
    n=$(cat /cache/n 2>/dev/null || echo 0); echo $((n+1)) > /cache/n; echo "count=$((n+1))"
RUN --mount=type=secret,id=tok \\
    echo "{digest}  /run/secrets/tok" | sha256sum -c && echo secret-ok && cp /run/secrets/tok /tmp/gone && rm /tmp/gone
""")
    tag = f"vmshim-test/mounts-{isolation}-{SUFFIX}"
    counts = []
    for _ in range(2):
        proc = vmshim(
            "build",
            "--no-cache",
            "--network",
            "none",
            "--isolation",
            isolation,
            "--secret",
            f"id=tok,src={secret}",
            "-t",
            tag,
            str(ctx),
            timeout=600,
        )
        assert proc.returncode == 0, text(proc)
        assert "secret-ok" in text(proc)
        counts.append([ln for ln in text(proc).splitlines() if ln.startswith("count=")])
    assert counts == [["count=1"], ["count=2"]]  # the second build found the cache warm
    run = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        "none",
        tag,
        "sh",
        "-c",
        "ls -A /cache /run/secrets 2>&1; echo end",
    )
    listing = run.stdout.decode()
    assert listing.count("No such file or directory") == 2 and listing.endswith("end\n"), listing
    history = vmshim("image", "history", "--no-trunc", tag)
    assert "secret" in text(history) and secret_value not in text(history)
    assert not blobs_hold(secret_value.encode())
    vmshim("rmi", tag)


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=pytest.mark.vm), "process"])
def test_bind_mounts_read_only_from_context_and_stage(isolation, tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    (ctx / "src" / "input.txt").write_text(f"bound-{SUFFIX}\n")
    (ctx / "Dockerfile").write_text("""\
FROM busybox AS tools
RUN echo tool-made > /tool.txt
FROM busybox
RUN --mount=type=bind,source=src,target=/src \\
    --mount=type=bind,from=tools,source=/tool.txt,target=/opt/tool.txt \\
    cat /src/input.txt /opt/tool.txt > /result \\
 && if touch /src/new 2>/dev/null; then echo WRITABLE; else echo read-only-ok; fi
RUN --mount=type=bind,source=src,target=/rw,rw touch /rw/scratch && echo rw-ok
""")
    tag = f"vmshim-test/bind-{isolation}-{SUFFIX}"
    proc = vmshim(
        "build", "--no-cache", "--network", "none", "--isolation", isolation, "-t", tag, str(ctx), timeout=900
    )
    assert proc.returncode == 0, text(proc)
    lines = text(proc).splitlines()
    assert "read-only-ok" in lines and "WRITABLE" not in lines and "rw-ok" in lines
    assert not (ctx / "src" / "new").exists() and not (ctx / "src" / "scratch").exists()
    run = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        "none",
        tag,
        "sh",
        "-c",
        "cat /result; ls -A /src /opt /rw 2>&1; echo end",
    )
    out = run.stdout.decode()
    assert out.startswith(f"bound-{SUFFIX}\ntool-made\n"), text(run)
    assert out.count("No such file or directory") == 3 and out.endswith("end\n"), out
    vmshim("rmi", tag)


MEET_IP = "192.0.2.1"
MEET_PEER_IP = "192.0.2.2"
MEET_PORT = 18299
MEETING_SERVER = """\
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
arrived, cond = set(), threading.Condition()
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        who = self.path.rsplit("/", 1)[-1]
        with cond:
            arrived.add(who)
            cond.notify_all()
            met = cond.wait_for(lambda: {"a", "b"} <= arrived, timeout=600)
        body = b"met\\n" if met else b"alone\\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def meeting_point():
    """An HTTP server (in a namespace of its own, over a veth, like test_build_network's
    file server) whose ``/meet/a`` and ``/meet/b`` answer "met" only once both were asked
    (else "alone" after 600 s): a barrier for two RUN steps."""
    import subprocess
    import sys

    with server_in_own_netns(
        [sys.executable, "-c", MEETING_SERVER, str(MEET_PORT)],
        f"vmsmeet{SUFFIX[-6:]}",
        MEET_IP,
        MEET_PEER_IP,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ):
        yield f"meet:{MEET_IP}"


def meeting_stage(name: str) -> str:
    """A stage whose RUN step asks the meeting point for the other stage's step, which
    answers only once both asked: built one after the other, the first gets "alone"."""
    return f"""\
FROM busybox AS {name}
RUN timeout 700 wget -q -O /{name}.txt http://meet:{MEET_PORT}/meet/{name} \\
 && grep -qx met /{name}.txt && sleep 3
"""


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=pytest.mark.vm), "process"])
def test_independent_stages_run_in_parallel(isolation, meeting_point, tmp_path):
    """Each stage's RUN waits at a barrier for the other's: built one after the other,
    the first would be alone and fail. The build's wall time is printed, not asserted
    (2 shared cores under TCG)."""
    import time

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        meeting_stage("a")
        + meeting_stage("b")
        + "FROM busybox\nCOPY --from=a /a.txt /a.txt\nCOPY --from=b /b.txt /b.txt\n"
    )
    tag = f"vmshim-test/parallel-{isolation}-{SUFFIX}"
    started = time.monotonic()
    proc = vmshim(
        "build",
        "--no-cache",
        "--add-host",
        meeting_point,
        "--isolation",
        isolation,
        "-t",
        tag,
        str(ctx),
        timeout=900,
        env={"VMSHIM_BUILD_JOBS": "2"},
    )
    print(f"two independent 3-second stages ({isolation}): {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, text(proc)
    run = vmshim("run", "--rm", "--isolation", "process", "--network", "none", tag, "cat", "/a.txt", "/b.txt")
    assert run.stdout.decode() == "met\nmet\n", text(run)
    vmshim("rmi", tag)


def test_progress_tty_collapses_steps_and_cache_from_reuses_history(tmp_path):
    """``--progress tty``: step lines with times, RUN output collapsed once the step ended,
    CACHED steps; ``--cache-from`` an image: its steps are cache hits with the build cache
    gone, and the same image comes out."""
    from shim import paths

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f'FROM busybox\nRUN echo noisy-{SUFFIX} > /n && echo step-output-$((40+2))\nCMD ["cat", "/n"]\n'
    )
    tag = f"vmshim-test/progress-{SUFFIX}"
    proc = vmshim(
        "build",
        "--progress",
        "tty",
        "--no-cache",
        "--isolation",
        "process",
        "--network",
        "none",
        "-t",
        tag,
        str(ctx),
        timeout=600,
    )
    assert proc.returncode == 0, text(proc)
    out = proc.stdout.decode()
    final = out[out.rindex("[+] Building") :]
    assert "FINISHED" in final.splitlines()[0], final
    assert " => [2/3] RUN echo noisy" in final and "step-output-42" not in final
    assert "\x1b[" in out and "step-output-42" in out  # shown while it ran, then redrawn
    first = json.loads(vmshim("image", "inspect", tag).stdout)
    first = first[0] if isinstance(first, list) else first
    import shutil

    shutil.rmtree(paths.root() / "build" / "cache", ignore_errors=True)  # another machine
    again = vmshim(
        "build",
        "--progress",
        "tty",
        "--cache-from",
        tag,
        "--isolation",
        "process",
        "--network",
        "none",
        "-t",
        tag + "-2",
        str(ctx),
        timeout=600,
    )
    assert again.returncode == 0, text(again)
    final = again.stdout.decode()[again.stdout.decode().rindex("[+] Building") :]
    assert " => CACHED [2/3] RUN echo noisy" in final and " => CACHED [3/3] CMD" in final
    second = json.loads(vmshim("image", "inspect", tag + "-2").stdout)
    second = second[0] if isinstance(second, list) else second
    assert second["Id"] == first["Id"]
    plain = vmshim("build", "--progress", "plain", "--isolation", "process", "--network", "none", str(ctx), timeout=600)
    assert "Step 2/3 : RUN echo noisy" in text(plain) and "\x1b[" not in text(plain)
    bad = vmshim("build", "--progress", "fancy", str(ctx))
    assert bad.returncode != 0 and "fancy" in text(bad)
    vmshim("rmi", tag, tag + "-2")
