"""Escape tests: real containers in both isolations are unprivileged by default (docker's
capabilities, seccomp profile, device rules, masked paths) and ``--privileged`` opens
what docker's does.

busybox cannot make raw system calls (keyctl, kexec_load, ptrace …), so the test builds
``data/security_probe.c`` with ``gcc -static`` and bind-mounts it read-only at /probe.
Each isolation boots one default container, one ``--privileged`` and one
``--security-opt no-new-privileges`` container, and runs every probe in them with
``exec`` (one VM each, shared by the tests through module fixtures).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import vmshim

PROBE_SOURCE = Path(__file__).parent / "data" / "security_probe.c"
DOCKER_CAPEFF = "00000000a80425fb"
EPERM = "errno=1 "


def ok(*args, timeout=180) -> str:
    return vmshim(*args, check=True, timeout=timeout).stdout.decode()


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the probe (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("probe")
    subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(out / "probe"), str(PROBE_SOURCE)], check=True, capture_output=True
    )
    out.chmod(0o755)
    return out


class Box:
    """One running container and the probe inside it."""

    def __init__(self, name: str, ro_dir: Path):
        self.name = name
        self.ro_dir = ro_dir

    def sh(self, script: str, user: str | None = None) -> str:
        extra = ["-u", user] if user else []
        proc = vmshim("exec", *extra, self.name, "sh", "-c", script)
        return proc.stdout.decode() + proc.stderr.decode()

    def probe(self, *args: str, user: str | None = None) -> str:
        return self.sh("/probe/probe " + " ".join(args), user=user)

    def status(self, field: str, pid: str = "self") -> str:
        out = self.sh(f"grep '^{field}:' /proc/{pid}/status")
        return out.split(":", 1)[1].strip()


def _start(isolation: str, probe_dir: Path, tmp_path_factory, *flags) -> Box:
    name = f"sec-{isolation}-{uuid.uuid4().hex[:8]}"
    ro_dir = tmp_path_factory.mktemp("ro")
    ro_dir.chmod(0o777)
    ok(
        "run",
        "-d",
        "--name",
        name,
        "--isolation",
        isolation,
        "--network",
        "none",
        "-v",
        f"{probe_dir}:/probe:ro",
        "-v",
        f"{ro_dir}:/data:ro",
        *flags,
        "busybox",
        "sleep",
        "3600",
        timeout=300,
    )
    return Box(name, ro_dir)


def _boxes(isolation, probe_dir, tmp_path_factory):
    boxes = {}
    try:
        for kind, flags in (
            ("default", ()),
            ("privileged", ("--privileged",)),
            ("nnp", ("--security-opt", "no-new-privileges")),
        ):
            boxes[kind] = _start(isolation, probe_dir, tmp_path_factory, *flags)
        yield boxes
    finally:
        for box in boxes.values():
            vmshim("rm", "-f", box.name, timeout=120)


@pytest.fixture(scope="module")
def process_boxes(probe_dir, tmp_path_factory):
    yield from _boxes("process", probe_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def vm_boxes(probe_dir, tmp_path_factory):
    yield from _boxes("vm", probe_dir, tmp_path_factory)


@pytest.fixture(params=["process", pytest.param("vm", marks=pytest.mark.vm)])
def boxes(request):
    return request.getfixturevalue(f"{request.param}_boxes")


# ---- the defaults --------------------------------------------------------------------------


def test_default_capabilities_and_seccomp(boxes):
    box = boxes["default"]
    assert box.status("CapEff") == DOCKER_CAPEFF
    assert box.status("CapBnd") == DOCKER_CAPEFF
    assert box.status("Seccomp") == "2"
    assert box.status("CapEff", pid="1") == DOCKER_CAPEFF  # the main process too
    assert box.status("Seccomp", pid="1") == "2"
    # Another user gets no capabilities at all (docker's rule).
    assert box.sh("grep '^CapEff:' /proc/self/status", user="1000").split()[-1] == "0" * 16


def test_default_blocks_what_docker_blocks(boxes):
    box = boxes["default"]
    for call in ("keyctl", "kexec", "unshare-user", "init-module", "mount"):
        assert box.probe(call).startswith(f"{call}: {EPERM}"), call
    # busybox's own tools hit the same walls.
    assert "Operation not permitted" in box.sh("unshare -U true")
    assert "denied" in box.sh("mount -t tmpfs none /mnt") or "not permitted" in box.sh("mount -t tmpfs none /mnt")


def test_default_cannot_use_a_block_device_it_made(boxes):
    out = boxes["default"].probe("blockdev")
    assert "mknod: ok" in out  # docker allows mknod …
    assert f"read-open: {EPERM}" in out  # … but not using the node
    assert f"write-open: {EPERM}" in out


def test_default_cannot_ptrace_another_users_process(boxes):
    assert boxes["default"].probe("ptrace-other").startswith(f"ptrace: {EPERM}")


def test_default_cannot_remount_a_readonly_bind(boxes):
    box = boxes["default"]
    out = box.probe("remount-rw", "/data")
    assert f"remount: {EPERM}" in out
    assert "write: errno=30 " in out  # EROFS
    assert not list(box.ro_dir.iterdir())


def test_masked_and_readonly_paths(boxes):
    box = boxes["default"]
    out = box.sh(
        "for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do "
        '[ -e $f ] && echo "$f $(wc -c < $f)"; done; true'
    )
    sizes = dict(line.split() for line in out.splitlines())
    assert sizes and set(sizes.values()) == {"0"}, out  # what the kernel has is masked
    assert "Read-only" in box.sh("echo 1 > /proc/sys/kernel/domainname")
    assert "Read-only" in box.sh("[ ! -e /proc/sysrq-trigger ] && echo Read-only || echo 1 > /proc/sysrq-trigger")


def test_setuid_binary_works_without_nnp_and_not_with_it(boxes):
    for kind, euid in (("default", "0"), ("nnp", "1000")):
        box = boxes[kind]
        box.sh("cp /probe/probe /tmp/suid && chmod 4755 /tmp/suid")
        assert box.sh("/tmp/suid euid", user="1000").strip() == f"euid: {euid}", kind
    assert boxes["nnp"].status("NoNewPrivs") == "1"


# ---- --privileged ------------------------------------------------------------------------


def test_privileged_can(boxes):
    box = boxes["privileged"]
    assert box.status("Seccomp") == "0"
    assert int(box.status("CapEff"), 16) & int(DOCKER_CAPEFF, 16) == int(DOCKER_CAPEFF, 16)
    assert int(box.status("CapEff"), 16) & (1 << 21)  # CAP_SYS_ADMIN
    for call in ("keyctl", "unshare-user", "init-module", "mount"):
        assert box.probe(call) == f"{call}: ok\n", call
    assert not box.probe("kexec").startswith(f"kexec: {EPERM}")  # EINVAL/ENOSYS: got through
    out = box.probe("blockdev")
    # A read-only disk may refuse a write open (EROFS/EACCES): only the rules must not.
    assert "read-open: ok" in out and f"write-open: {EPERM}" not in out, out
    assert box.probe("ptrace-other") == "ptrace: ok\n"
    assert box.probe("remount-rw", "/data").startswith("remount: ok")


# ---- flags ---------------------------------------------------------------------------------


def test_exec_privileged_gets_every_capability_but_keeps_seccomp(boxes):
    box = boxes["default"]
    proc = vmshim(
        "exec",
        "--privileged",
        box.name,
        "sh",
        "-c",
        "grep -E '^(CapEff|Seccomp):' /proc/self/status; /probe/probe mount",
    )
    out = proc.stdout.decode()
    assert int(out.split("CapEff:")[1].split()[0], 16) & (1 << 21)  # CAP_SYS_ADMIN
    assert "Seccomp:\t2" in out
    assert f"mount: {EPERM}" in out  # the container's profile still refuses it


def test_cap_add_drop_and_seccomp_unconfined_process(tmp_path):
    out = ok(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "net_admin",
        "--cap-add",
        "CAP_KILL",
        "--security-opt",
        "seccomp=unconfined",
        "busybox",
        "sh",
        "-c",
        "grep -E '^(CapEff|Seccomp):' /proc/self/status",
    )
    lines = dict(line.split(":\t") for line in out.splitlines())
    assert int(lines["CapEff"], 16) == (1 << 12) | (1 << 5)
    assert lines["Seccomp"] == "0"


def test_seccomp_profile_file_process(tmp_path, probe_dir):
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    proc = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--network",
        "none",
        "--security-opt",
        f"seccomp={path}",
        "busybox",
        "sh",
        "-c",
        "mkdir /tmp/x; grep '^Seccomp:' /proc/self/status",
    )
    text = proc.stdout.decode() + proc.stderr.decode()
    assert "Permission denied" in text and "Seccomp:\t2" in text


def test_bad_security_flags_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_NOPE"}')
    for flags, words in (
        (["--cap-add", "NOT_A_CAP"], "not a Linux capability"),
        (["--security-opt", "apparmor-nope"], "invalid --security-opt"),
        (["--security-opt", f"seccomp={bad}"], "defaultAction"),
        (["--security-opt", "seccomp=/nonexistent.json"], "cannot read"),
        (["--device", "/etc/passwd"], "not a device node"),
    ):
        proc = vmshim("run", "--rm", "--isolation", "process", "--network", "none", *flags, "busybox", "true")
        err = proc.stderr.decode().strip()
        assert proc.returncode != 0 and words in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("isolation", ["process", pytest.param("vm", marks=pytest.mark.vm)])
def test_device_flag_gives_that_device(isolation):
    """/dev/kmsg (1:11) is not one of docker's default devices (see the next test): the
    node --device gives can be opened (for writing, which needs no CAP_SYSLOG; nothing is
    written)."""
    out = ok(
        "run",
        "--rm",
        "--isolation",
        isolation,
        "--network",
        "none",
        "--device",
        "/dev/kmsg:/dev/given",
        "busybox",
        "sh",
        "-c",
        "(exec 3>/dev/given && echo given-opened) 2>&1; true",
        timeout=300,
    )
    assert "given-opened" in out, out


def test_default_cannot_open_a_char_device_outside_the_rules(boxes):
    out = boxes["default"].sh("mknod /tmp/kmsg c 1 11 && (exec 3>/tmp/kmsg && echo opened)")
    assert "opened" not in out and "Operation not permitted" in out, out
