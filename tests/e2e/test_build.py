"""`vmshim build` as a user runs it: Dockerfiles whose RUN steps boot real microVMs (marked
vm), the same builder with --isolation process, the cache, and the errors.

VM boots are few on purpose (~2.5 s each under TCG): each test builds once with
``--no-cache`` where steps must really run, and checks the result with a process-isolation
run unless the point is to run it in a VM.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from shim import paths
from tests.e2e.conftest import vmshim, vmshim_domains

vm = pytest.mark.vm
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def out(proc) -> str:
    return proc.stdout.decode(errors="replace")


def err(proc) -> str:
    return proc.stderr.decode(errors="replace")


def context(tmp_path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def build(*args, timeout=600):
    return vmshim("build", *args, timeout=timeout)


def built_id(proc) -> str:
    m = re.search(r"^Successfully built ([0-9a-f]{12})$", out(proc), re.M)
    assert m, out(proc) + err(proc)
    return m.group(1)


def run_process(image: str, *command: str):
    """Check a built image's content without booting a VM."""
    return vmshim("run", "--rm", "--isolation", "process", image, *command)


def store_snapshot() -> tuple[set[str], set[str]]:
    """(blobs, build-cache entries) of the state root."""
    blobs = {p.name for p in (paths.images_dir() / "blobs" / "sha256").iterdir()}
    cache_dir = paths.root() / "build" / "cache"
    cache = {p.name for p in cache_dir.iterdir()} if cache_dir.is_dir() else set()
    return blobs, cache


def leftover_mounts() -> list[str]:
    root = str(paths.root())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(root + "/build") or p.startswith(root + "/images/tmp")]


def step_domains(*procs) -> set[str]:
    """The domains of the RUN steps these builds started (``---> Running in <id>``)."""
    return {f"vmshim-{m}" for p in procs for m in re.findall(r"---> Running in ([0-9a-f]{12})", out(p))}


def assert_nothing_left(*procs, timeout: float = 15.0) -> None:
    """No step VM, mount or scratch directory of these builds is left (other users of
    the same state root may run VMs meanwhile: only ours are checked)."""
    mine = step_domains(*procs)
    deadline = time.monotonic() + timeout
    while mine & vmshim_domains() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not mine & vmshim_domains()
    assert not leftover_mounts()
    work = paths.root() / "build" / "work"
    assert not work.is_dir() or not any(work.iterdir())
    tmp = paths.images_dir() / "tmp"
    assert not tmp.is_dir() or not [p for p in tmp.iterdir() if p.name.startswith("build-")]


# ---- builds that boot VMs -------------------------------------------------------------------
@vm
def test_multi_stage_build_then_unchanged_rebuild_is_all_cached(tmp_path):
    ctx = context(
        tmp_path,
        """\
FROM busybox AS builder
RUN mkdir /out && echo "made in stage one" > /out/artifact && echo junk > /out/junk
FROM busybox
COPY --from=builder /out/artifact /app/artifact
CMD ["cat", "/app/artifact"]
""",
    )
    proc = build("--no-cache", "-t", "vmshim-test/multistage", str(ctx))
    assert proc.returncode == 0, out(proc) + err(proc)
    text = out(proc)
    assert "Step 1/5 : FROM busybox AS builder" in text and " ---> Running in " in text
    assert "Successfully tagged vmshim-test/multistage:latest" in text
    first = built_id(proc)
    result = run_process("vmshim-test/multistage")
    assert result.returncode == 0 and out(result) == "made in stage one\n", err(result)
    assert run_process("vmshim-test/multistage", "ls", "/app").stdout == b"artifact\n"

    started = time.monotonic()
    again = build("-t", "vmshim-test/multistage", str(ctx))
    elapsed = time.monotonic() - started
    assert again.returncode == 0, err(again)
    assert built_id(again) == first
    assert out(again).count(" ---> Using cache") == 3  # every step but the two FROMs
    assert " ---> Running in " not in out(again)
    assert elapsed < 5, f"unchanged rebuild took {elapsed:.1f} s"
    assert_nothing_left(proc, again)


@vm
def test_build_arg_reaches_run_and_defaults_apply(tmp_path):
    ctx = context(
        tmp_path,
        """\
ARG BASE=busybox
FROM $BASE
ARG GREETING=hello
ARG WHO
RUN echo "$GREETING, ${WHO:-nobody}" > /greeting
""",
    )
    proc = build("--no-cache", "--build-arg", "WHO=vm", "-t", "vmshim-test/buildarg", str(ctx))
    assert proc.returncode == 0, out(proc) + err(proc)
    result = run_process("vmshim-test/buildarg", "cat", "/greeting")
    assert out(result) == "hello, vm\n", err(result)
    # the build arg is not baked into the image's environment
    env = run_process("vmshim-test/buildarg", "env")
    assert "WHO=" not in out(env) and "GREETING=" not in out(env)
    assert_nothing_left(proc)


@vm
def test_files_deleted_in_a_later_layer_are_absent_when_run(tmp_path):
    ctx = context(
        tmp_path,
        """\
FROM busybox
RUN mkdir -p /data/sub /opaque && echo a > /data/a && echo b > /data/b && \
    echo s > /data/sub/s && echo old > /opaque/old && rm /bin/vi
RUN rm /data/a && rm -r /data/sub && rm -r /opaque && mkdir /opaque && \
    echo new > /opaque/new
""",
    )
    proc = build("--no-cache", "-t", "vmshim-test/deleted", str(ctx))
    assert proc.returncode == 0, out(proc) + err(proc)
    result = vmshim("run", "--rm", "vmshim-test/deleted", "sh", "-c", "ls /data; ls /opaque; ls /bin/vi 2>&1; true")
    assert result.returncode == 0, err(result)
    lines = out(result).splitlines()
    assert lines[0] == "b"
    assert lines[1] == "new"
    assert "No such file" in lines[2]
    assert_nothing_left(proc, result)


@vm
def test_failing_run_shows_output_and_code_and_leaves_nothing(tmp_path):
    ctx = context(tmp_path, "FROM busybox\nRUN echo to-stdout; echo to-stderr >&2; exit 3\n")
    blobs, cache = store_snapshot()
    proc = build("--no-cache", "-t", "vmshim-test/failing", str(ctx))
    assert proc.returncode == 1
    assert "to-stdout" in out(proc) and "to-stderr" in out(proc)
    assert err(proc).strip() == (
        "Error: The command '/bin/sh -c echo to-stdout; echo to-stderr >&2; exit 3' returned a non-zero code: 3"
    )
    assert store_snapshot() == (blobs, cache)
    assert vmshim("image", "inspect", "vmshim-test/failing").returncode != 0
    assert_nothing_left(proc)


# The lecture's node example (now an Express app that needs an npm registry):
# tests/e2e/test_build_express.py.


# ---- process isolation and errors (no VM) ---------------------------------------------------
@pytest.mark.host_root
def test_process_isolation_build_and_cache(tmp_path):
    ctx = context(
        tmp_path,
        """\
FROM busybox
ENV DIR=/srv
WORKDIR $DIR/app
COPY hello.txt ./
RUN cat hello.txt > copied && rm /etc/group
USER 1000
CMD ["cat", "copied"]
""",
        {"hello.txt": "hello\n"},
    )
    proc = build("--no-cache", "--isolation", "process", "-t", "vmshim-test/process", str(ctx))
    assert proc.returncode == 0, out(proc) + err(proc)
    result = run_process("vmshim-test/process")
    assert out(result) == "hello\n", err(result)
    assert out(run_process("vmshim-test/process", "pwd")) == "/srv/app\n"
    assert out(run_process("vmshim-test/process", "id", "-u")) == "1000\n"
    assert run_process("vmshim-test/process", "ls", "/etc/group").returncode != 0
    again = build("-q", "--isolation", "process", "-t", "vmshim-test/process", str(ctx))
    assert again.returncode == 0 and out(again).strip() == "sha256:" + out(again).strip()[7:]
    assert out(again).strip()[7:19] == built_id(proc)
    # a changed file invalidates its COPY and everything after it
    (ctx / "hello.txt").write_text("changed\n")
    third = build("--isolation", "process", "-t", "vmshim-test/process", str(ctx))
    assert third.returncode == 0, err(third)
    assert out(third).count("Using cache") == 2  # ENV and WORKDIR
    assert out(run_process("vmshim-test/process")) == "changed\n"


@pytest.mark.parametrize(
    "dockerfile, message",
    [
        ("FROM busybox\nRUN echo 'unbalanced\nCOPY a\n", "Dockerfile:3: COPY needs at least one source"),
        ("FROM busybox\nFOO bar\n", "Dockerfile:2: unknown instruction: FOO"),
        ("FROM busybox\nCOPY ../outside /x\n", "forbidden path outside the build context: ../outside"),
        ("FROM busybox\nCOPY missing.txt /x\n", "file not found in build context"),
        ("FROM busybox\nADD http://127.0.0.1:9/file /x\n", "ADD failed: cannot fetch http://127.0.0.1:9/file"),
        ("FROM busybox\nCOPY --from=nostage /a /b\n", "nostage"),
        ("FROM busybox AS a\nFROM busybox AS a\n", "duplicate stage name"),
    ],
)
def test_errors_are_one_clear_line_and_leave_nothing(tmp_path, dockerfile, message):
    ctx = context(tmp_path, dockerfile)
    blobs, cache = store_snapshot()
    proc = build("-t", "vmshim-test/bad", str(ctx), timeout=120)
    assert proc.returncode == 1, out(proc) + err(proc)
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert store_snapshot()[0] == blobs
    assert_nothing_left(proc)


def test_unknown_target_and_missing_dockerfile(tmp_path):
    ctx = context(tmp_path, "FROM busybox AS one\n")
    proc = build("--target", "two", str(ctx))
    assert proc.returncode == 1 and "target stage 'two' could not be found" in err(proc)
    proc = build("-f", str(tmp_path / "nope"), str(ctx))
    assert proc.returncode == 1 and "cannot find the Dockerfile" in err(proc)
