"""Checkpoint and restore (issue 15), as a user drives them: a container counting in
memory is checkpointed (in place, with --leave-running, and exported), removed, restored,
and counts on from where it was; a volume write synced before the checkpoint is there
after restore; foreign, corrupt and missing checkpoints fail with one line and leave no
domain and no record. Boots one microVM (marked vm); the saves and restores reuse it."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from tests.e2e.conftest import err, ok, out, vmshim, vmshim_domains, wait_no_new_domains
from tests.waiting import wait_until

pytestmark = pytest.mark.vm
PREFIX = f"ck{os.getpid()}"
SLOW = {"VMSHIM_BOOT_TIMEOUT": "600"}
# The count lives in the shell's memory only: after a restore it goes on, after a cold
# boot it would start at 0 again.
COUNTER = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"


def ticks(name: str) -> list[int]:
    proc = vmshim("logs", name)
    return [int(n) for n in re.findall(r"tick (\d+)", out(proc))]


def last_tick(name: str) -> int:
    seen = ticks(name)
    return seen[-1] if seen else -1


def status(name: str) -> str:
    return ok("inspect", "-f", "{{.State.Status}}", name).strip()


def one_line_error(proc, text: str) -> str:
    assert proc.returncode != 0, out(proc)
    lines = [ln for ln in err(proc).splitlines() if ln.strip()]
    assert len(lines) == 1, err(proc)
    assert text in lines[0], lines[0]
    return lines[0]


def test_vm_checkpoint_restore_counts_on(tmp_path, domains_before):
    name, volume = f"{PREFIX}-count", f"{PREFIX}-vol"
    archive = tmp_path / "count.ckpt"
    ok("volume", "create", volume)
    try:
        proc = vmshim(
            "run",
            "-d",
            "--network",
            "none",
            "--name",
            name,
            "-v",
            f"{volume}:/data",
            "busybox",
            "sh",
            "-c",
            COUNTER,
            env=SLOW,
        )
        assert proc.returncode == 0, err(proc)
        wait_until(lambda: last_tick(name) >= 2, 300, "the counter's first ticks")
        ok("exec", name, "sh", "-c", "echo precious > /data/kept && sync")

        # --leave-running: saved, and it runs on (same memory, same counter).
        before = last_tick(name)
        ok("checkpoint", "--leave-running", "--name", "live", name, timeout=600)
        assert status(name) == "running"
        wait_until(lambda: last_tick(name) > before + 1, 120, "ticks after --leave-running")
        assert ok("exec", name, "cat", "/data/kept").strip() == "precious"

        # In place: the VM is saved and gone; restore brings the same counter back.
        ok("checkpoint", name, timeout=600)
        assert status(name) == "checkpointed"
        assert f"vmshim-{ok('inspect', '-f', '{{.Id}}', name).strip()[:12]}" not in vmshim_domains()
        stopped_at = last_tick(name)
        one_line_error(vmshim("start", name), "it is checkpointed")
        ok("restore", name, timeout=600)
        assert status(name) == "running"
        wait_until(lambda: last_tick(name) > stopped_at + 1, 120, "ticks after restore")
        new = [t for t in ticks(name) if t > 0]
        assert stopped_at + 1 in ticks(name), (stopped_at, new[-10:])
        assert ticks(name).count(0) == 1, "the counter started over instead of going on"

        # Exported, removed, imported: it counts on; the synced volume write is there.
        ok("checkpoint", "--export", str(archive), name, timeout=600)
        exported_at = last_tick(name)
        ok("rm", name)
        wait_no_new_domains(domains_before)
        _foreign_and_broken_checkpoints_fail(archive, tmp_path, name, domains_before)
        ok("restore", "--import", str(archive), timeout=600)
        assert status(name) == "running"
        wait_until(lambda: ticks(name), 120, "ticks after the import")
        first = ticks(name)[0]
        assert exported_at < first <= exported_at + 5, (exported_at, ticks(name)[:5])
        assert ok("exec", name, "cat", "/data/kept").strip() == "precious"
        assert ok("exec", name, "hostname").strip()
    finally:
        vmshim("rm", "-f", name)
        vmshim("volume", "rm", volume)
    wait_no_new_domains(domains_before)


def _foreign_and_broken_checkpoints_fail(archive: Path, tmp_path: Path, name: str, domains_before) -> None:
    """Restoring another guest image's (or kernel's) checkpoint, a corrupt file and a
    missing one: one line each, and no domain or record is left."""
    foreign = tmp_path / "foreign.ckpt"
    _rewrite_meta(archive, foreign, guest_image="0123456789abcdef", kernel_release="5.10.0-other")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(archive.read_bytes()[:600_000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(100_000))
    cases = [
        (foreign, "made with guest image 0123456789abcdef (kernel 5.10.0-other)"),
        (corrupt, "cannot import"),
        (garbage, "cannot import"),
        (tmp_path / "missing.ckpt", "No such file"),
    ]
    for path, text in cases:
        one_line_error(vmshim("restore", "--import", str(path), timeout=300), text)
        assert vmshim("inspect", name).returncode != 0, f"{path.name} left a record"
        wait_no_new_domains(domains_before)


def _rewrite_meta(src: Path, dst: Path, **change) -> None:
    """A copy of the archive *src* whose checkpoint.json has *change*."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            data = tin.extractfile(member)
            if member.name == "checkpoint.json":
                meta = json.loads(data.read())
                meta.update(change)
                raw = json.dumps(meta).encode()
                member.size = len(raw)
                data = io.BytesIO(raw)
            tout.addfile(member, data)


def test_bind_mounts_cannot_be_checkpointed(tmp_path):
    """virtiofs (vhost-user-fs) cannot be saved by QEMU 7.2: one line naming the mount,
    before anything happens to the container (no VM needed to show it)."""
    name = f"{PREFIX}-bind"
    ok("create", "--network", "none", "--name", name, "-v", f"{tmp_path}:/mnt", "busybox", "true")
    try:
        line = one_line_error(vmshim("checkpoint", name), f"bind mount {tmp_path} -> /mnt")
        assert "vhost-user-fs" in line
        assert status(name) == "created"
    finally:
        vmshim("rm", "-f", name)
