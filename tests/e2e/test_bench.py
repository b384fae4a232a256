"""`vmshim bench` as a user runs it: each kind of figure once, with --runs 1 and --max 2
(about 1.5 min under TCG), real VMs."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import vmshim, wait_no_new_domains


FIGURES = ("cold_start", "memory", "exec", "density", "io")
IO = ("io_seq_write", "io_seq_read", "io_rand_write", "io_rand_read")
MEASURED_HERE = {
    # figure -> the subjects that can run on this machine, so must have been measured
    # (runc and QEMU are installed; the floor is a bare QEMU boot of the guest image).
    "cold_start": ("vm", "process", "runc", "floor", "oci"),
    "memory": ("vm", "process", "runc", "floor"),
    "memory_guest": ("vm",),
    "exec": ("vm", "process", "runc"),
    "density": ("vm", "process", "runc"),
    **{name: ("vm", "process", "runc") for name in IO},
}


@pytest.mark.vm
def test_bench_every_figure_kind_in_one_short_run(tmp_path, domains_before):
    """One run of each kind of figure (timings, PSS, a density pass, I/O rates), every
    subject that can run here measured: a "skipped" is accepted only as "n/a"."""
    out = tmp_path / "bench"
    proc = vmshim("bench", "--runs", "1", "--only", ",".join(FIGURES), "--max", "2", "--output", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    print(proc.stdout.decode(errors="replace"))  # the table, in the CI log
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["host"]["accel"]["kind"] in ("kvm", "tcg")
    assert data["meta"]["leftovers"] == []
    figures = data["figures"]
    for name, subjects in MEASURED_HERE.items():
        for subject in subjects:
            result = figures[name]["subjects"][subject]
            assert result.get("runs") == 1 and "skipped" not in result, (name, subject, result)
            assert result["median"] > 0, (name, subject, result)
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    for name, figure in figures.items():
        for subject, result in figure["subjects"].items():
            if "skipped" in result:
                assert result["skipped"].startswith("n/a"), (name, subject, result)
    # Each kind measures what it says: a VM costs more host memory than a process, its
    # guest sees its own kernel's memory, density steps were recorded.
    memory = figures["memory"]["subjects"]
    assert memory["vm"]["median"] > memory["process"]["median"]
    assert (
        0
        < figures["memory_guest"]["subjects"]["vm"]["median"]
        < figures["memory_guest"]["subjects"]["vm"]["extra"]["guest_total_mib"]
    )
    assert 1 <= figures["density"]["subjects"]["vm"]["median"] <= 2
    assert figures["cold_start"]["subjects"]["vm"]["ratios"]["to_process"] > 0
    assert (out / "density_steps.png").is_file() and (out / "summary.png").is_file()
    assert all(name.encode() in proc.stdout for name in FIGURES)  # the printed table
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
    proc = vmshim("bench", "--runs", "1", "--only", "build_express", "--output", str(out), timeout=2400)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    subjects = json.loads((out / "results.json").read_text())["figures"]["build_express"]["subjects"]
    print({k: v.get("median", v.get("skipped")) for k, v in subjects.items()})
    for name in ("vm", "process"):
        assert subjects[name]["runs"] == 1 and subjects[name]["median"] > 0, subjects[name]
    assert subjects["runc"].get("runs") == 1 or subjects["runc"].get("skipped"), subjects["runc"]
    assert not wait_no_new_domains(domains_before)
