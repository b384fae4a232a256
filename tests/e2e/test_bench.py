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
