"""Hostile layers that cost the host memory, stack or CPU: header bombs (refused before they
are read, memory measured with tracemalloc), header chains, sparse members, and a
directory with 200,000 entries (tar2sqfs is quadratic per directory)."""

from __future__ import annotations

import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from shim.errors import LayerError
from shim.images.layers import DEFAULT_MAX_DIR_ENTRIES, Limits, convert_layer

MiB = 1 << 20


def _header(name: str, type_=tarfile.REGTYPE, size=0, fmt=tarfile.USTAR_FORMAT, **kw) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = type_, size
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti.tobuf(fmt)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _pax_block(records: bytes, type_=tarfile.XHDTYPE) -> bytes:
    pad = -len(records) % 512
    return _header("././@PaxHeader", type_, len(records)) + records + bytes(pad)


def _sparse_file(path: Path, head: bytes, size: int) -> Path:
    """A file of *size* bytes that is *head* then a hole (no disk, reads as zeros)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _convert(tmp_path: Path, blob: Path, limits: Limits | None = None) -> LayerError:
    out = tmp_path / "out" / "layer.sqfs"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(LayerError) as exc:
        convert_layer(blob, out, limits=limits)
    assert os.listdir(out.parent) == []  # nothing half-written
    return exc.value


def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["pax", "global pax", "gnu longname", "gnu longlink"])
def test_header_bomb_refused_without_allocating_it(tmp_path, kind):
    size = 512 * MiB
    type_ = {
        "pax": tarfile.XHDTYPE,
        "global pax": tarfile.XGLTYPE,
        "gnu longname": tarfile.GNUTYPE_LONGNAME,
        "gnu longlink": tarfile.GNUTYPE_LONGLINK,
    }[kind]
    name = "././@LongLink" if kind.startswith("gnu") else "././@PaxHeader"
    head = _header("a", size=1) + b"x" + bytes(511) + _header(name, type_, size, fmt=tarfile.GNU_FORMAT)
    blob = _sparse_file(tmp_path / "bomb.tar", head, len(head) + size + 4096)
    errors = []
    peak = _peak_while(lambda: errors.append(_convert(tmp_path, blob)))
    assert peak < 4 * MiB, f"{peak} bytes allocated for a {kind} header bomb"
    assert "cap" in str(errors[0]) and "header bomb" in str(errors[0]), errors[0]


def test_header_chain_refused_cleanly(tmp_path):
    """Thousands of PAX headers in a row: tarfile recurses once per header."""
    one = _pax_block(_pax_record("comment", "x"))
    blob = tmp_path / "chain.tar"
    blob.write_bytes(one * 5000 + _header("f") + bytes(1024))
    err = _convert(tmp_path, blob)
    assert "extended headers in a row" in str(err)


def test_global_pax_headers_do_not_accumulate_without_bound(tmp_path):
    blob = tmp_path / "globals.tar"
    with open(blob, "wb") as f:
        for i in range(40):  # 40 x 64 KiB of distinct global keys, each header under its cap
            f.write(_pax_block(_pax_record(f"k{i}", "v" * (64 << 10)), tarfile.XGLTYPE))
            f.write(_header(f"f{i}"))
        f.write(bytes(1024))
    err = _convert(tmp_path, blob)
    assert "global PAX headers add up" in str(err)


@pytest.mark.parametrize("kind", ["old gnu", "pax 1.0"])
def test_sparse_members_refused(tmp_path, kind):
    if kind == "old gnu":
        data = _header("s", tarfile.GNUTYPE_SPARSE, 0, fmt=tarfile.GNU_FORMAT)
        # isextended: the extension-block loop that tarfile runs without bound
        data = data[:482] + b"\x01" + data[483:]
        chk = 256 + sum(data[:148]) + sum(data[156:512])
        data = data[:148] + b"%06o\x00 " % chk + data[156:]
        data += b"\x00" * 504 + b"\x01" + bytes(7)  # one more extension block, extended again
    else:
        data = _pax_block(
            _pax_record("GNU.sparse.major", "1")
            + _pax_record("GNU.sparse.minor", "0")
            + _pax_record("GNU.sparse.name", "s")
            + _pax_record("GNU.sparse.realsize", "1000000000")
        ) + _header("s", size=512)
        data += b"999999999999\n" + bytes(499)
    blob = tmp_path / "s.tar"
    blob.write_bytes(data + bytes(1024))
    err = _convert(tmp_path, blob)
    assert "is a GNU sparse file" in str(err), err


def _wide_layer(path: Path, n: int, whiteouts: bool = False) -> Path:
    with open(path, "wb") as f:
        f.write(_header("d", tarfile.DIRTYPE, mode=0o755))
        for i in range(n):
            name = f"d/.wh.f{i:07d}" if whiteouts and i % 2 else f"d/f{i:07d}"
            f.write(_header(name, mode=0o644, fmt=tarfile.GNU_FORMAT))
        f.write(bytes(1024))
    return path


def test_a_directory_with_200000_entries_is_refused_quickly(tmp_path):
    blob = _wide_layer(tmp_path / "wide.tar", 200_000)
    start = time.monotonic()
    err = _convert(tmp_path, blob)
    elapsed = time.monotonic() - start
    assert f"more than {DEFAULT_MAX_DIR_ENTRIES} entries" in str(err) and "'d'" in str(err)
    print(f"200,000-entry directory refused in {elapsed:.2f} s")


def test_whiteouts_count_towards_the_directory_cap_and_spread_layers_pass(tmp_path):
    limits = Limits(max_dir_entries=100)
    err = _convert(tmp_path, _wide_layer(tmp_path / "wo.tar", 101, whiteouts=True), limits)
    assert "more than 100 entries" in str(err)
    spread = tmp_path / "spread.tar"
    with open(spread, "wb") as f:
        for d in range(3):
            f.write(_header(f"d{d}", tarfile.DIRTYPE, mode=0o755))
            for i in range(100):
                f.write(_header(f"d{d}/f{i}", mode=0o644))
        f.write(bytes(1024))
    out = tmp_path / "ok.sqfs"
    convert_layer(spread, out, limits=limits)
    assert out.stat().st_size > 0


def test_names_are_bounded_one_by_one_and_in_sum(tmp_path):
    long_path = "/".join(["d" * 200] * 25)  # 5,024 bytes: components fine, path too long
    blob = tmp_path / "long.tar"
    blob.write_bytes(_pax_block(_pax_record("path", long_path)) + _header("x") + bytes(1024))
    assert "longer than 4096 bytes" in str(_convert(tmp_path, blob))
    blob = tmp_path / "many.tar"
    with open(blob, "wb") as f:
        for i in range(20):
            name = f"{i:03d}" + "n" * 200
            f.write(_header(name, mode=0o644, fmt=tarfile.GNU_FORMAT))
        f.write(bytes(1024))
    err = _convert(tmp_path, blob, Limits(max_name_bytes=2000))
    assert "names in the layer add up to more than 2000 bytes" in str(err)
