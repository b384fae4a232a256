"""vmshim bench without VMs: statistics, ratios, parsing, the report, with fake samples."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from shim.bench import drivers, procmem, report, suite, workloads
from shim.bench.drivers import Capabilities, parse_help
from shim.bench.stats import Figure, Results, ratio, summarize
from shim.errors import UsageError

# -- statistics -------------------------------------------------------------------------------


def test_summarize_odd_and_even():
    s = summarize([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.runs) == (2.0, 1.0, 3.0, 3)
    assert summarize([1.0, 2.0, 4.0, 10.0]).median == 3.0


def test_summarize_empty_raises():
    with pytest.raises(ValueError):
        summarize([])


def test_ratio_handles_missing_and_zero():
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def _figure() -> Figure:
    fig = Figure("cold_start", "Cold start", "s")
    for v in (2.6, 2.5, 2.9):
        fig.add("vm", v)
    for v in (0.2, 0.21, 0.22):
        fig.add("process", v)
    for v in (1.9, 1.8, 2.0):
        fig.add("floor", v)
    fig.skip("runc", "runc: not installed")
    return fig


def test_figure_ratios_to_process_and_floor():
    fig = _figure()
    assert fig.ratio("vm", "process") == pytest.approx(2.6 / 0.21)
    assert fig.ratio("vm", "floor") == pytest.approx(2.6 / 1.9)
    assert fig.ratio("process", "process") is None
    assert fig.ratio("runc", "process") is None
    d = fig.to_dict()
    vm = d["subjects"]["vm"]
    assert (vm["median"], vm["min"], vm["max"], vm["runs"]) == (2.6, 2.5, 2.9, 3)
    assert vm["ratios"] == {"to_process": pytest.approx(2.6 / 0.21), "to_floor": pytest.approx(2.6 / 1.9)}
    assert "to_process" not in d["subjects"]["process"]["ratios"]
    assert d["subjects"]["runc"] == {"samples": [], "skipped": "runc: not installed"}


def test_figure_order_follows_subjects():
    fig = Figure("x", "x", "s")
    fig.add("floor", 1)
    fig.add("vm", 1)
    fig.add("process", 1)
    assert [s for s, _ in fig.ordered()] == ["vm", "process", "floor"]


def test_skip_after_samples_keeps_them_apart():
    fig = Figure("x", "x", "s")
    fig.add("vm", 1.0)
    fig.skip("vm", "failed in run 2: boom")
    r = fig.subjects["vm"]
    assert r.samples == [] and r.summary is None
    assert r.extra["partial_samples"] == [1.0]
    assert r.skipped == "failed in run 2: boom"


def test_results_round_trip():
    results = Results(meta={"runs": 3})
    results.figures["cold_start"] = _figure()
    again = Results.from_dict(json.loads(json.dumps(results.to_dict())))
    assert again.to_dict() == results.to_dict()
    with pytest.raises(ValueError):
        Results.from_dict({"version": 99})


# -- workload output ---------------------------------------------------------------------------


def test_parse_phases_and_modes():
    out = workloads.parse("MODE clock adjtimex\nBENCH cpu 100.250000 101.000000\nnoise\n", ("cpu",))
    assert out.phases == {"cpu": pytest.approx(0.75)}
    assert out.modes == {"clock": "adjtimex"}


def test_parse_failure_and_missing_phase():
    with pytest.raises(workloads.WorkloadError, match="seq_read failed"):
        workloads.parse("BENCH seq_write 1 2\nFAIL seq_read\n")
    with pytest.raises(workloads.WorkloadError, match="no timing for syscall"):
        workloads.parse("MODE clock uptime\n", ("syscall",))


BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed")
def test_scripts_run_under_busybox(tmp_path):
    """The scripts as a container runs them: busybox sh with busybox's applets only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in ("adjtimex", "awk", "cut", "dd", "head", "mkdir", "rm", "sha256sum", "shuf"):
        (bin_dir / applet).symlink_to(BUSYBOX)
    sizes = workloads.Sizes(cpu_mib=1, syscall_count=1000, seq_mib=1, rand_ops=5)
    data = tmp_path / "data"
    data.mkdir()
    env = {"PATH": str(bin_dir)}
    for script, phases in (
        (workloads.cpu_script(sizes), ("cpu",)),
        (workloads.syscall_script(sizes), ("syscall",)),
        (workloads.io_script(sizes, str(data)), ("seq_write", "seq_read", "rand_write", "rand_read", "spawn")),
    ):
        proc = subprocess.run(
            [BUSYBOX, "sh", "-c", script], check=False, capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = workloads.parse(proc.stdout, phases)
        assert set(phases) <= set(out.phases)
        assert out.modes["clock"] in ("adjtimex", "uptime")
    assert not (data / "vmshim-bench-io").exists()


# -- /proc -------------------------------------------------------------------------------------


def test_parse_rollup_and_meminfo():
    rollup = "55d0-7ff r 0 0:0 0 [rollup]\nRss:  2048 kB\nPss:  1024 kB\nPss_Anon: 10 kB\n"
    assert procmem.parse_rollup(rollup) == (1024 * 1024, 2048 * 1024)
    mem = procmem.parse_meminfo("MemTotal:  223748 kB\nMemAvailable: 173792 kB\nHugePages_Total: 0\n")
    assert mem == {"MemTotal": 223748 * 1024, "MemAvailable": 173792 * 1024, "HugePages_Total": 0}


def test_descendants():
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 30: 20}
    assert procmem.descendants([10], parents) == {10, 11, 12}
    assert procmem.descendants([10, 20, 999], parents) == {10, 11, 12, 20, 30}


def test_usage_of_this_process():
    u = procmem.usage({os.getpid(), 2**30})
    assert u.pids == (os.getpid(),)
    assert u.pss > 0 and u.rss >= u.pss
    assert sum(u.by_command.values()) == u.pss


# -- the CLI's capabilities and inspect --------------------------------------------------------

TOP_HELP = """Usage: vmshim [OPTIONS] COMMAND [ARGS]...

  Containers with the isolation of a virtual machine.

Options:
  --debug     Show tracebacks of errors.
  -h, --help  Show this message and exit.

Commands:
  exec     Run COMMAND in a running container.
  inspect  Show containers' configuration and state as JSON.
  rm       Remove containers (their writable layer and logs too).
  run      Run COMMAND in a new container from IMAGE (in the foreground...
"""

RUN_HELP = """Usage: vmshim run [OPTIONS] IMAGE [COMMAND]...

Options:
  --rm                      Remove the container when it exits.
  -d, --detach              Run in the background; print the id.
  --isolation [vm|process]  vm: a microVM per container; process: namespaces
                            on the host.  [default: vm]
  --help                    Show this message and exit.
"""


def test_parse_help_and_capabilities():
    commands, _ = parse_help(TOP_HELP)
    assert commands == {"exec", "inspect", "rm", "run"}
    _, options = parse_help(RUN_HELP)
    assert {"--rm", "-d", "--detach", "--isolation", "--help"} <= options
    caps = Capabilities(commands, options)
    assert caps.detached
    assert caps.lifecycle_missing("exec", "inspect") is None
    assert caps.lifecycle_missing("stats") == "`vmshim stats` not available"
    assert caps.volumes_missing() == "volumes: `vmshim volume` and `vmshim run -v` not available"
    bare = Capabilities({"run"}, {"--rm"})
    assert bare.lifecycle_missing("exec") == "`vmshim run -d`, `vmshim rm`, `vmshim exec` not available"


INSPECT = [
    {
        "Id": "ab" * 32,
        "State": {"Pid": 100, "MonitorPid": 100, "ContainerPid": 82, "Running": True, "ExitCode": 0},
        "Vmshim": {"Domain": "vmshim-abababababab", "QemuPid": 200, "AgentPid": 0},
    }
]


def test_owned_of_a_vm_container(monkeypatch):
    subject = drivers.VmshimSubject(["vmshim"], "vm", "t")
    monkeypatch.setattr(subject, "inspect", lambda ref: INSPECT[0])
    parents = {100: 1, 101: 100, 200: 5, 201: 200, 82: 1, 999: 1}
    monkeypatch.setattr(procmem, "parent_map", lambda: parents)
    monkeypatch.setattr(procmem, "pids_in_cgroup_matching", lambda text: {999} if text == "ab" * 32 else set())
    owned = subject.owned("c1")
    assert owned.pids == {100, 101, 200, 201, 999}  # 82 is the guest's pid, not the host's
    assert owned.roots == {"State.Pid": 100, "State.MonitorPid": 100, "Vmshim.QemuPid": 200}


def test_owned_finds_qemu_through_libvirt_when_inspect_lacks_it(monkeypatch):
    info = {"Id": "cd" * 32, "State": {"Pid": 100}, "Vmshim": {"Domain": ""}}
    subject = drivers.VmshimSubject(["vmshim"], "vm", "t")
    monkeypatch.setattr(subject, "inspect", lambda ref: info)
    monkeypatch.setattr(procmem, "parent_map", lambda: {100: 1, 300: 5})
    monkeypatch.setattr(procmem, "pids_in_cgroup_matching", lambda text: set())
    asked = []
    monkeypatch.setattr(drivers, "qemu_pid_of", lambda d: asked.append(d) or 300)
    assert subject.owned("c1").pids == {100, 300}
    assert asked == ["vmshim-" + "cd" * 6]


def test_shown_is_what_a_user_types():
    assert drivers.shown(["/venv/bin/python3", "-m", "shim.cli.main", "run", "busybox"]) == "vmshim run busybox"
    assert drivers.shown(["/venv/bin/vmshim", "exec", "x", "sh", "-c", "a\nb"]) == "vmshim exec x sh -c '<script>'"


# -- runc bundle -------------------------------------------------------------------------------


def _layer(path: Path, entries: dict[str, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_layers_applies_whiteouts(tmp_path):
    lower = _layer(
        tmp_path / "l0.tar.gz",
        {"etc": None, "etc/keep": b"k", "etc/gone": b"g", "opq": None, "opq/old": b"o", "bin": None, "bin/sh": b"sh"},
    )
    upper = _layer(tmp_path / "l1.tar.gz", {"etc/.wh.gone": b"", "opq/.wh..wh..opq": b"", "opq/new": b"n"})
    rootfs = tmp_path / "rootfs"
    drivers.unpack_layers([lower, upper], rootfs)
    assert (rootfs / "etc/keep").read_bytes() == b"k"
    assert not (rootfs / "etc/gone").exists()
    assert not (rootfs / "etc/.wh.gone").exists()
    assert sorted(p.name for p in (rootfs / "opq").iterdir()) == ["new"]
    assert (rootfs / "bin/sh").exists()


def test_unpack_layers_refuses_escapes(tmp_path):
    bad = _layer(tmp_path / "bad.tar.gz", {"../evil": b"x"})
    with pytest.raises(drivers.BenchError, match="outside the rootfs"):
        drivers.unpack_layers([bad], tmp_path / "rootfs")


# -- the runner --------------------------------------------------------------------------------


def _ctx(runs=3) -> suite.Context:
    return suite.Context(
        runs=runs,
        max_density=2,
        sizes=workloads.Sizes(),
        results=Results(),
        caps=Capabilities(),
        drivers={},
        unavailable={},
        workdir=Path("/nonexistent"),
        tag="t",
        log=lambda msg: None,
    )


def test_sample_interleaves_and_records_failures():
    ctx = _ctx(runs=3)
    fig = ctx.results.figure("f", "f", "s")
    calls = []

    def measurer(name, values):
        it = iter(values)

        def fn():
            calls.append(name)
            v = next(it)
            if isinstance(v, Exception):
                raise v
            return v

        return fn

    suite._sample(
        ctx,
        fig,
        {
            "process": measurer("process", [9, 1, 2, 3]),
            "vm": measurer("vm", [9, 10, 20, 30]),
            "runc": measurer("runc", [drivers.BenchError("runc broke")]),
            "floor": measurer("floor", [9, 5, drivers.BenchError("qemu died")]),
        },
    )
    # warm-ups first (not recorded), then vm, process, floor interleaved run by run
    assert calls[:4] == ["vm", "process", "runc", "floor"]
    assert calls[4:] == ["vm", "process", "floor", "vm", "process", "floor", "vm", "process"]
    assert fig.subjects["vm"].samples == [10, 20, 30]
    assert fig.subjects["process"].samples == [1, 2, 3]
    assert fig.subjects["runc"].skipped == "failed: runc broke"
    assert fig.subjects["floor"].skipped == "failed in run 2: qemu died"
    assert fig.subjects["floor"].extra["partial_samples"] == [5]


def test_lifecycle_missing_skips_vmshim_subjects():
    ctx = _ctx()
    ctx.caps = Capabilities({"run"}, {"--rm"})
    fig = ctx.results.figure("exec", "exec", "s")
    left = ctx.lifecycle([fig], ["vm", "process", "runc"], "exec")
    assert left == ["runc"]
    assert fig.subjects["vm"].skipped == "`vmshim run -d`, `vmshim rm`, `vmshim exec` not available"


def test_select():
    assert suite.select([]) == list(suite.BENCHMARKS)
    assert suite.select(["exec,cold_start", "memory"]) == ["cold_start", "exec", "memory"]
    with pytest.raises(UsageError, match="unknown benchmark nope"):
        suite.select(["cold_start,nope"])


# -- the report --------------------------------------------------------------------------------


def _results() -> Results:
    r = Results(
        meta={
            "runs": 3,
            "host": {
                "accel": {"kind": "tcg", "reason": "no kvm"},
                "cpus": 2,
                "cpu_model": "Test CPU",
                "host_kernel": "6.1",
                "guest_kernel": "6.1-cloud",
            },
        }
    )
    r.figures["cold_start"] = _figure()
    io_fig = r.figure("io_seq_write", "write", "MiB/s", higher_is_better=True)
    io_fig.add("vm", 120)
    io_fig.add("process", 1800)
    dens = r.figure("density", "density", "containers", higher_is_better=True)
    dens.add("vm", 3)
    dens.result("vm").extra.update(
        {
            "stopped": "container 4 missed 1 s with 4 running",
            "steps": [{"running": 1, "exec_max_s": 0.1, "pss_total_mib": 150.0}, {"running": 2, "exec_max_s": 0.3}],
        }
    )
    return r


def test_fmt():
    assert report.fmt(0.0421, "s") == "42 ms"
    assert report.fmt(2.604, "s") == "2.60 s"
    assert report.fmt(1844.3, "MiB/s") == "1844 MiB/s"
    assert report.fmt(24.86, "MiB") == "24.9 MiB"
    assert report.fmt(3, "containers") == "3"
    assert report.fmt(None, "s") == "—"
    assert report.fmt_ratio(12.38) == "12.38x"
    assert report.fmt_range(915.2, 1404.0, "MiB/s") == "[915 – 1404 MiB/s]"
    assert report.fmt_range(0.5, 2.0, "s") == "[500 ms – 2.00 s]"


def test_table_rows_and_footnotes():
    table, notes = report.table(_results())
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "2.60 s" in text and "[2.50 s – 2.90 s]" in text
    assert "12.38x" in text  # vm ÷ process
    assert "1.37x" in text  # vm ÷ floor
    assert "0.07x" in text  # a throughput below process
    assert "TCG (no kvm)" in text
    assert notes == ["[1] runc: not installed", "[2] density vm: container 4 missed 1 s with 4 running"]


def test_json_and_charts(tmp_path):
    results = _results()
    path = report.write_json(results, tmp_path / "results.json")
    data = json.loads(path.read_text())
    assert data["figures"]["cold_start"]["subjects"]["vm"]["ratios"]["to_floor"] == pytest.approx(2.6 / 1.9)
    charts = report.write_charts(results, tmp_path)
    names = sorted(p.name for p in charts)
    assert names == [
        "cold_start.png",
        "density.png",
        "density_pss.png",
        "density_steps.png",
        "io_seq_write.png",
        "summary.png",
    ]
    for p in charts:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_density_pss_chart_needs_a_measured_step(tmp_path):
    fig = _results().figures["density"]
    fig.result("vm").extra["steps"] = [{"running": 1, "exec_max_s": 0.1}]
    assert report.chart_density_pss(fig, "", tmp_path / "p.png") is None
    fig.result("vm").extra["steps"][0]["pss_total_mib"] = 145.0
    assert report.chart_density_pss(fig, "", tmp_path / "p.png") == tmp_path / "p.png"


def test_summary_chart_title_fits_its_width(tmp_path, monkeypatch):
    results = _results()
    results.meta["host"].update(
        cpu_model="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
        host_kernel="6.1.0-41-amd64",
        guest_kernel="6.1.0-57-cloud-amd64",
    )
    drawn = []
    real_save = report._save

    def keep(f, path):
        f.tight_layout()
        f.canvas.draw()
        title = f._suptitle.get_window_extent(f.canvas.get_renderer())
        drawn.append((title.x0, title.x1, f.bbox.x0, f.bbox.x1))
        return real_save(f, path)

    monkeypatch.setattr(report, "_save", keep)
    assert report.chart_summary(results, report.short_headline(results), tmp_path / "s.png")
    ((x0, x1, left, right),) = drawn
    assert left <= x0 and x1 <= right, f"title spans {x0:.0f}-{x1:.0f}, figure {left:.0f}-{right:.0f}"


def test_kernels_benchmark_measures_each_kernel_and_skips_one_not_built(monkeypatch, tmp_path):
    from shim import guestimage
    from shim.errors import GuestImageError

    def ensure(kernel=None, progress=None):
        if kernel == "minimal":
            raise GuestImageError("the minimal guest kernel is not built")
        return guestimage.GuestImage(tmp_path / "k", tmp_path / "i", "6.1.0-cloud", {})

    class FakeFloor:
        def __init__(self, workdir, accel, kernel=None):
            self.kernel, self.live = kernel, set()

        def boot_time(self):
            return 1.5

    commands = []

    class FakeSubject:
        def __init__(self, cli, isolation, tag):
            self.cli = cli

        def run_argv(self, *cmd):
            return self.cli + ["run", "--rm", "busybox", *cmd]

        def start(self):
            return "c1"

        def wait_ready(self, ref):
            pass

        def remove(self, ref):
            pass

        def cleanup(self):
            return []

    monkeypatch.setattr(guestimage, "ensure_guest_image", ensure)
    monkeypatch.setattr(suite, "Floor", FakeFloor)
    monkeypatch.setattr(suite, "VmshimSubject", FakeSubject)
    monkeypatch.setattr(suite, "timed", lambda argv: commands.append(argv) or 2.0)
    monkeypatch.setattr(suite, "_guest_used", lambda drv, ref: {"used": 40 * suite.MIB})
    monkeypatch.setattr(suite, "_settled", lambda fn: fn())
    monkeypatch.setattr(suite, "SETTLE", 0)
    ctx = _ctx(runs=2)
    ctx.drivers = {"vm": FakeSubject(["vmshim"], "vm", "t")}
    ctx.results.meta["host"] = {"accel": {"kind": "tcg"}}
    suite.bench_kernels(ctx)
    figs = ctx.results.figures
    for name in ("kernel_boot", "kernel_run", "kernel_guest_memory"):
        assert "not built" in figs[name].subjects["minimal"].skipped
    assert figs["kernel_boot"].subjects["distro"].samples == [1.5, 1.5]
    assert figs["kernel_run"].subjects["distro"].samples == [2.0, 2.0]
    assert figs["kernel_guest_memory"].subjects["distro"].samples == [40.0, 40.0]
    assert figs["kernel_boot"].subjects["distro"].extra["kernel_release"] == "6.1.0-cloud"
    assert commands[0][:2] == ["env", "VMSHIM_GUEST_KERNEL=distro"]


def test_build_express_commands_and_its_skip_without_a_mirror(tmp_path, monkeypatch):
    ctx_dir = tmp_path / "ctx"
    vm = suite.build_argv("vm", ctx_dir, 4873, "t")
    assert vm[-12:] == [
        "build",
        "--no-cache",
        "-q",
        "--isolation",
        "vm",
        "--add-host",
        "npm:host-gateway",
        "--build-arg",
        "NPM_REGISTRY=http://npm:4873/",
        "-t",
        "t-express",
        str(ctx_dir),
    ]
    podman = suite.build_argv("runc", ctx_dir, 4873, "t")
    assert podman[:4] == ["podman", "build", "--runtime", "runc"]
    assert "NPM_REGISTRY=http://127.0.0.1:4873/" in podman and podman[-1] == str(ctx_dir)
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "state"))
    ctx = _ctx()
    suite.bench_build_express(ctx)
    fig = ctx.results.figures["build_express"] if hasattr(ctx.results, "figures") else None
    data = json.dumps(ctx.results.to_dict()) if hasattr(ctx.results, "to_dict") else str(fig)
    assert "no npm mirror" in data
    assert "build_express" in suite.select([])


def test_engine_network_skips_with_the_reason_where_dockerd_cannot_run(monkeypatch):
    from shim.bench import engine_net

    monkeypatch.setattr(engine_net, "unavailable", lambda: "/usr/sbin/dockerd is not installed")
    ctx = _ctx()
    suite.bench_engine_network(ctx)
    data = ctx.results.to_dict()["figures"]
    for name in ("engine_rtt", "engine_throughput"):
        subjects = data[name]["subjects"]
        assert "dockerd is not installed" in subjects["oci"]["skipped"]
        assert "dockerd is not installed" in subjects["runc"]["skipped"]
        assert subjects["vm"]["skipped"].startswith("n/a")
    assert "engine_network" in suite.select([])


def test_start_benchmark_times_cold_and_pooled_and_restores_the_pool(monkeypatch):
    import json
    from types import SimpleNamespace

    class FakeSubject:
        def argv(self, *args):
            return ["vmshim", *args]

        def run_argv(self, *cmd, extra=()):
            return ["vmshim", "run", "--rm", *extra, "busybox", *cmd]

    pool_calls, timed_argv = [], []
    ready = {"size": 0, "memory_mib": 256, "vcpus": 1, "vms": [{"state": "ready", "id": "a"}]}
    seq = iter(range(1000))

    pool_network = {"now": ""}

    def fake_run(argv, timeout=300, check=True, input=None):
        if argv[1:3] == ["pool", "ls"]:
            # each look: a new VM, of the kind the pool was last set to
            ready["vms"] = [{"state": "ready", "id": str(next(seq)), "network": pool_network["now"]}]
            return SimpleNamespace(stdout=json.dumps(ready))
        if argv[1:3] == ["pool", "set"]:
            pool_network["now"] = argv[argv.index("--network") + 1] if "--network" in argv else ""
        pool_calls.append(argv[1:])
        return SimpleNamespace(stdout="k1\n" if argv[1:3] == ["template", "create"] else "")

    def fake_timed(argv, timeout=300):
        timed_argv.append(argv)
        if "VMSHIM_TEMPLATES=off" in argv:
            return 2.0
        if "none" in argv:
            return 0.4  # restored from the template
        return 3.0 if argv[0] == "env" else 0.5

    monkeypatch.setattr(suite, "run", fake_run)
    monkeypatch.setattr(suite, "timed", fake_timed)
    monkeypatch.setattr(suite, "_settled", lambda fn: fn())
    # A VM of the sample before is still going away at each sample's first look.
    looks = {"n": 0}

    def fake_vm_names():
        looks["n"] += 1
        left = {"vmshim-previous"} if looks["n"] % 2 == 0 and timed_argv else set()
        return {"vmshim-user-ctr", "vmshim-pool-abc"} | left

    monkeypatch.setattr(suite, "_vm_names", fake_vm_names)
    monkeypatch.setattr(suite.time, "sleep", lambda s: None)
    monkeypatch.setenv("VMSHIM_DEFAULT_NETWORK", "bridge")
    ctx = _ctx(runs=3)
    ctx.caps = Capabilities({"run", "rm", "pool", "template"}, {"-d", "--rm"})
    ctx.drivers = {"vm": FakeSubject()}
    suite.bench_start(ctx)
    fig = ctx.results.figures["start"]
    assert fig.subjects["cold"].samples == [3.0] * 3
    assert fig.subjects["pooled"].samples == [0.5] * 3
    assert fig.subjects["pooled"].extra["speedup_vs_cold"] == 6.0
    assert fig.subjects["primed"].samples == [0.5] * 3
    assert fig.subjects["primed"].extra["speedup_vs_cold"] == 6.0
    assert fig.subjects["cold_nonet"].samples == [2.0] * 3
    assert fig.subjects["restored"].samples == [0.4] * 3
    assert fig.subjects["restored"].extra["speedup_vs_cold_nonet"] == 5.0
    assert all(a[:2] == ["env", "VMSHIM_POOL=off"] for a in timed_argv if a[0] == "env")
    # Each sample looked until the VM before it was gone (twice: once it was still there);
    # the user's VM and the pool's, there before, were not waited for.
    assert looks["n"] >= 1 + 2 * len(timed_argv)
    plain = ["pool", "set", "--size", "1"]
    primed = [*plain, "--image", "busybox", "--network", "bridge"]
    # plain, then switched before each pooled and primed sample (the warm-up too); all gone again after
    assert pool_calls == [plain, ["template", "create", "busybox"], *[primed, plain] * 3, primed] + [
        ["template", "rm", "k1"],
        ["pool", "rm"],
    ]
    # Without `vmshim pool`, only the cold row.
    ctx = _ctx(runs=1)
    ctx.caps = Capabilities({"run", "rm"}, {"-d", "--rm"})
    ctx.drivers = {"vm": FakeSubject()}
    suite.bench_start(ctx)
    assert "`vmshim pool` not available" in ctx.results.figures["start"].subjects["pooled"].skipped
    assert "`vmshim template` not available" in ctx.results.figures["start"].subjects["restored"].skipped


def test_density_pss_per_container_at_20_and_at_the_max():
    steps = [{"running": k, "pss_total_mib": 100.0 * k} for k in range(1, 24)]
    steps[-1] = {"running": 23}  # the last step's PSS could not be read
    assert suite.pss_per_container(steps) == {
        "pss_per_container_mib_at_20": 100.0,
        "max_running": 22,
        "pss_per_container_mib_at_max": 100.0,
    }
    assert suite.pss_per_container([]) == {}


SMAPS = """\
55d0a000-55d0b000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
Rss:                   4 kB
Pss:                   2 kB
55d0c000-55d10000 rw-p 00000000 00:00 0 [heap]
Rss:                  16 kB
Pss:                  16 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               40960 kB
Pss:               40000 kB
7f0010000000-7f0012000000 rwxp 00000000 00:00 0
Rss:                8192 kB
Pss:                8192 kB
7f0012000000-7f0012100000 rw-p 00000000 00:00 0
Rss:                 100 kB
Pss:                 100 kB
7f0020000000-7f0030000000 rw-s 00000000 00:01 9 /memfd:pc.ram (deleted)
Rss:                1024 kB
Pss:                1024 kB
garbage line
"""


def test_smaps_breakdown_sorts_qemu_memory_by_kind():
    maps = procmem.parse_smaps(SMAPS)
    assert [m.size for m in maps] == [0x1000, 0x4000, 256 << 20, 32 << 20, 1 << 20, 256 << 20]
    assert maps[1].path == "[heap]" and maps[2].path == "" and maps[2].pss == 40000 * 1024
    kib = {k: v // 1024 for k, v in procmem.breakdown(maps, 256 << 20).items()}
    assert kib == {"guest_ram": 40000 + 1024, "tcg_code": 8192, "heap": 16, "anon_other": 100, "files": 2}
    # a smaller guest-RAM threshold would not change the rwx buffer's class
    assert procmem.breakdown(maps, 1 << 20)["tcg_code"] == 8192 * 1024


def test_smaps_breakdown_of_this_process():
    b = procmem.smaps_breakdown(os.getpid(), 1 << 40)
    assert b["guest_ram"] == 0 and b["files"] > 0
    assert sum(b.values()) > 0


def test_subjects_left_out_are_skipped_with_the_reason():
    assert suite.left_out(None) == {}
    assert suite.left_out(["vm"]) == {s: suite.LEFT_OUT for s in ("process", "runc", "oci", "floor")}
    ctx = _ctx(runs=1)
    ctx.unavailable = suite.left_out(["vm"])
    fig = ctx.results.figure("density", "d", "containers")
    assert ctx.available([fig], "vm", "process") == ["vm"]
    assert fig.subjects["process"].skipped == suite.LEFT_OUT


def test_bench_refuses_an_unknown_subject():
    from click.testing import CliRunner

    from shim.cli.bench import bench

    result = CliRunner().invoke(bench, ["--subjects", "vm,kvm", "--only", "density"])
    assert result.exit_code != 0
    assert "unknown subject 'kvm'" in str(result.exception or result.output)
