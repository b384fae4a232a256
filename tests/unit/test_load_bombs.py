"""``vmshim load`` against hostile archives: a decompression bomb stops at the spool cap
with one clear line, a header bomb is refused without being read, and nothing is left in
the store either way. The CLI runs for real (gzip and zstd are the real tools)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tarfile
import tracemalloc

import pytest

from shim.errors import ImageError
from shim.images import archive
from shim.images.store import ImageStore

MiB = 1 << 20


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    return ImageStore()


def _zeros_gz(path, size: int):
    """A gzip of *size* zero bytes (a few KiB per 100 MiB), streamed."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        block = bytes(MiB)
        for _ in range(size // MiB):
            f.write(block)
    return path


def _left_in(store: ImageStore) -> list[str]:
    found = []
    for sub in ("tmp", "blobs/sha256"):
        d = store.root / sub
        if d.exists():
            found += [f"{sub}/{p}" for p in os.listdir(d)]
    return found


@pytest.mark.parametrize("tool", ["gzip", "zstd"])
def test_decompression_bomb_stops_at_the_cap(store, tmp_path, tool):
    bomb = _zeros_gz(tmp_path / "bomb.tar.gz", 64 * MiB)
    if tool == "zstd":
        raw = subprocess.run(["gzip", "-dc", str(bomb)], capture_output=True, check=True).stdout
        bomb = tmp_path / "bomb.tar.zst"
        bomb.write_bytes(subprocess.run(["zstd", "-q", "-19", "-c"], input=raw, capture_output=True, check=True).stdout)
    with pytest.raises(ImageError, match=r"larger than 8388608 bytes uncompressed"):
        archive.load(store, bomb, max_bytes=8 * MiB)
    with open(bomb, "rb") as f, pytest.raises(ImageError, match="decompression bomb"):
        archive.load(store, stdin=f, max_bytes=8 * MiB)
    assert _left_in(store) == []
    assert store.list_images() == []


def test_plain_stdin_is_capped_too(store, tmp_path):
    data = tmp_path / "big.tar"
    with open(data, "wb") as f:
        f.truncate(20 * MiB)
    with open(data, "rb") as f, pytest.raises(ImageError, match="larger than"):
        archive.load(store, stdin=f, max_bytes=4 * MiB)
    assert _left_in(store) == []


def test_cli_reports_the_cap_in_one_line(store, tmp_path):
    bomb = _zeros_gz(tmp_path / "bomb.tar.gz", 16 * MiB)
    env = dict(os.environ, VMSHIM_LOAD_MAX_BYTES=str(MiB))
    proc = subprocess.run(
        [sys.executable, "-m", "shim.cli.main", "load", "-i", str(bomb)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "larger than 1048576 bytes" in lines[0], proc.stderr
    assert "VMSHIM_LOAD_MAX_BYTES" in lines[0]
    bad = subprocess.run(
        [sys.executable, "-m", "shim.cli.main", "load", "-i", str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, VMSHIM_LOAD_MAX_BYTES="lots"),
    )
    assert bad.returncode != 0 and "VMSHIM_LOAD_MAX_BYTES must be" in bad.stderr


def test_pax_header_bomb_in_an_archive_is_not_read(store, tmp_path):
    size = 512 * MiB
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, size
    path = tmp_path / "bomb.tar"
    with open(path, "wb") as f:
        f.write(ti.tobuf(tarfile.USTAR_FORMAT))
        f.truncate(512 + size + 1024)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as exc:
            archive.load(store, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"{peak} bytes allocated"
    assert "header bomb" in str(exc.value)
    assert _left_in(store) == []
