"""`vmshim bench` as a user runs it: the cheapest benchmark, one run, real VMs."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import vmshim, wait_no_new_domains


@pytest.mark.vm
def test_bench_cold_start_writes_results_and_charts(tmp_path, domains_before):
    out = tmp_path / "bench"
    proc = vmshim("bench", "--runs", "1", "--only", "cold_start", "--output", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["host"]["accel"]["kind"] in ("kvm", "tcg")
    assert data["meta"]["leftovers"] == []
    subjects = data["figures"]["cold_start"]["subjects"]
    for name in ("vm", "process"):
        assert subjects[name]["runs"] == 1, subjects[name]
        assert subjects[name]["median"] > 0
    assert subjects["vm"]["ratios"]["to_process"] > 0
    for name in ("runc", "floor"):  # measured, or a reason why not
        assert subjects[name].get("runs") == 1 or subjects[name].get("skipped"), subjects[name]
    assert subjects["oci"]["runs"] == 1, subjects["oci"]  # vmshim-runtime: in the venv
    assert (out / "cold_start.png").read_bytes()[:4] == b"\x89PNG"
    assert b"cold_start" in proc.stdout
    assert not wait_no_new_domains(domains_before)


@pytest.mark.vm
@pytest.mark.slow
def test_bench_build_express_next_to_podman(tmp_path, domains_before):
    """The Express example's build time, vm and process, next to podman build with runc
    (or the reason podman could not), from the npm mirror scripts/test fetched."""
    from pathlib import Path

    from shim import paths
    from shim.bench import npm_mirror

    example = Path(__file__).resolve().parents[2] / "examples" / "node-hello"
    if not npm_mirror.ready(example / "package.json", paths.root() / "cache" / "npm"):
        pytest.skip("no npm mirror cache (scripts/test fills it)")
    out = tmp_path / "bench"
    proc = vmshim("bench", "--runs", "1", "--only", "build_express", "--output", str(out),
                  timeout=2400)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    subjects = json.loads((out / "results.json").read_text())["figures"]["build_express"]["subjects"]
    print({k: v.get("median", v.get("skipped")) for k, v in subjects.items()})
    for name in ("vm", "process"):
        assert subjects[name]["runs"] == 1 and subjects[name]["median"] > 0, subjects[name]
    assert subjects["runc"].get("runs") == 1 or subjects["runc"].get("skipped"), subjects["runc"]
    assert not wait_no_new_domains(domains_before)
