"""``vmshim stats`` rows: the container's own cgroup figures (checked: they come from the
guest) next to QEMU's host-side cost, docker's NET I/O and BLOCK I/O columns."""

from types import SimpleNamespace

from shim.cli.stats import rows
from shim.containers.limits import checked_figures


def test_guest_figures_are_checked_not_trusted():
    hostile = {
        "memory": -1,
        "cpu_ns": 2**64,
        "pids": "7",
        "net_rx_bytes": 10,
        "block_write_bytes": True,
        "evil": 1,
        "memory_limit": 1.5,
    }
    assert checked_figures(hostile) == {"net_rx_bytes": 10}
    assert checked_figures(["not", "a", "dict"]) == {}


def test_vm_row_shows_the_cgroup_and_qemu_separately():
    record = SimpleNamespace(id="c" * 64, short_id="c" * 12, name="web", isolation="vm", vm_memory_mib=256)
    guest0 = {"cpu_ns": 1_000_000_000, "memory": 8 << 20, "memory_limit": 0, "pids": 3}
    guest1 = dict(
        guest0,
        cpu_ns=1_500_000_000,
        net_rx_bytes=2048,
        net_tx_bytes=1024,
        block_read_bytes=4 << 20,
        block_write_bytes=8 << 20,
    )
    host0 = {"cpu_ns": 5_000_000_000, "memory": 200 << 20}
    host1 = {"cpu_ns": 6_000_000_000, "memory": 201 << 20}
    before = {record.id: (10.0, {"guest": guest0, "host": host0})}
    after = {record.id: (11.0, {"guest": guest1, "host": host1})}
    (row,) = rows([record], before, after)
    assert row["CPUPerc"] == "50.00%"  # the container's cgroup: 0.5 s of CPU in 1 s
    assert row["MemUsage"] == "8.0MiB / 256.0MiB" and row["MemoryLimit"] == 256 << 20
    assert row["NetIO"] == "2.0KiB / 1.0KiB" and row["BlockIO"] == "4.0MiB / 8.0MiB"
    assert row["PIDs"] == "3"
    assert row["Host"] == {"CPUPerc": "100.00%", "Memory": 201 << 20, "MemUsage": "201.0MiB"}


def test_a_paused_vm_falls_back_to_the_host_figures():
    record = SimpleNamespace(id="d" * 64, short_id="d" * 12, name="p", isolation="vm", vm_memory_mib=256)
    after = {record.id: (1.0, {"guest": None, "host": {"cpu_ns": 1, "memory": 100 << 20}})}
    (row,) = rows([record], {}, after)
    assert row["Memory"] == 100 << 20 and row["CPUPerc"] == "--" and row["NetIO"] == "-- / --"
