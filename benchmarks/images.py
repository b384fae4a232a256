"""Image benchmarks: pull throughput from a local registry, and layer → squashfs conversion
time per 100 MiB.

Usage: python benchmarks/images.py [--runs N] [--size-mib M] [--json FILE]

pull        Debian's docker-registry on 127.0.0.1 (temporary config and storage, stopped
            by PID at the end) holds one image with a single M MiB layer of random bytes
            (incompressible, stored as a plain tar). Each run pulls it into an empty store
            (``shim.images.distribution.pull``: HTTP, sha256 while streaming, fsync, rename)
            and reports MiB/s of layer bytes.
convert     a plain tar of M MiB of real files (from /usr/lib and /usr/share, in sorted
            order) and its gzip form, each converted by ``convert_layer`` (scan + rewrite into
            tar2sqfs zstd). Reported as seconds per 100 MiB of uncompressed tar.

Every figure is the median of N runs, with min and max.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from common import save_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shim.images.distribution import pull, push  # noqa: E402
from shim.images.layers import convert_layer  # noqa: E402
from shim.images.store import ImageStore, import_image  # noqa: E402

MIB = 1 << 20


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(base: Path) -> tuple[subprocess.Popen, str]:
    if shutil.which("docker-registry") is None:
        raise SystemExit("docker-registry is not installed (scripts/setup installs it)")
    port = free_port()
    (base / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {base / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(base / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=1):
                return proc, host
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("docker-registry did not start") from None
            time.sleep(0.1)


def random_layer(path: Path, size: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("payload")
        ti.size = size

        class Random(io.RawIOBase):
            left = size

            def read(self, n=-1):
                n = min(self.left, MIB if n is None or n < 0 else n)
                self.left -= n
                return os.urandom(n)

        tar.addfile(ti, Random())


def real_files_layer(path: Path, size: int) -> int:
    """A plain tar of real files up to ``size`` bytes of content; returns the tar size."""
    total = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for top in ("/usr/lib", "/usr/share"):
            for dirpath, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    p = os.path.join(dirpath, name)
                    try:
                        if not os.path.isfile(p) or os.path.islink(p):
                            continue
                        tar.add(p, arcname=p.lstrip("/"), recursive=False)
                        total += os.path.getsize(p)
                    except OSError:
                        continue
                    if total >= size:
                        return path.stat().st_size if path.exists() else total
    return total


def bench_pull(runs: int, size: int, work: Path) -> dict:
    proc, host = start_registry(work / "registry")
    try:
        layer = work / "random.tar"
        random_layer(layer, size)
        ref = f"{host}/bench/random:1"
        src = ImageStore(work / "src")
        image = import_image([layer], {}, ref, store=src)
        layer.unlink()
        push(ref, store=src)
        layer_bytes = image.layers[0].size
        rates, secs = [], []
        for i in range(runs):
            dest = ImageStore(work / f"pull-{i}")
            start = time.perf_counter()
            pull(ref, store=dest)
            elapsed = time.perf_counter() - start
            secs.append(elapsed)
            rates.append(layer_bytes / MIB / elapsed)
            shutil.rmtree(dest.root)
        return {"layer_mib": layer_bytes / MIB, "mib_per_s": stats(rates), "seconds": stats(secs)}
    finally:
        proc.terminate()
        proc.wait(10)


def bench_convert(runs: int, size: int, work: Path) -> dict:
    plain = work / "real.tar"
    real_files_layer(plain, size)
    tar_mib = plain.stat().st_size / MIB
    gz = work / "real.tar.gz"
    with open(plain, "rb") as f, gzip.open(gz, "wb", compresslevel=6) as g:
        shutil.copyfileobj(f, g, MIB)
    out: dict = {"tar_mib": tar_mib, "gzip_mib": gz.stat().st_size / MIB}
    for label, blob in (("plain", plain), ("gzip", gz)):
        per100 = []
        for _ in range(runs):
            target = work / f"{label}.sqfs"
            start = time.perf_counter()
            convert_layer(blob, target)
            per100.append((time.perf_counter() - start) * 100 / tar_mib)
            out[f"{label}_sqfs_mib"] = target.stat().st_size / MIB
            target.unlink()
        out[f"{label}_seconds_per_100mib"] = stats(per100)
    return out


def show(label: str, s: dict, unit: str) -> None:
    print(
        f"  {label:<34} median {s['median']:8.2f} {unit}   min {s['min']:8.2f}   max {s['max']:8.2f}   (n={s['runs']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmshim-bench-images-") as tmp:
        work = Path(tmp)
        os.environ["VMSHIM_ROOT"] = str(work / "root")
        (work / "registry").mkdir()
        result = {
            "pull": bench_pull(args.runs, args.size_mib * MIB, work),
            "convert": bench_convert(args.runs, args.size_mib * MIB, work),
        }
    p, c = result["pull"], result["convert"]
    print(f"pull from docker-registry on 127.0.0.1 ({p['layer_mib']:.0f} MiB layer, random bytes):")
    show("throughput", p["mib_per_s"], "MiB/s")
    show("wall time", p["seconds"], "s")
    print(
        f"layer -> squashfs (tar2sqfs zstd), {c['tar_mib']:.0f} MiB tar of real files (gzip {c['gzip_mib']:.0f} MiB):"
    )
    show("plain tar, per 100 MiB", c["plain_seconds_per_100mib"], "s")
    show("gzip tar, per 100 MiB", c["gzip_seconds_per_100mib"], "s")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
