"""Restart policies' back-off (docker's: 100 ms doubling, reset after 10 s up, at most a
minute) and the ``restarting`` status that ps and inspect show while it waits."""

import os

import pytest

from guest.spec import ProcessSpec
from shim.containers.inspect import inspect_data
from shim.containers.listing import ps_entry, status_text
from shim.containers.monitor import restart_delay
from shim.containers.store import Container, ContainerStore, process_start_time


def test_back_off_doubles_resets_after_ten_seconds_up_and_stops_at_a_minute():
    waits, previous = [], None
    for _ in range(12):
        previous = restart_delay(previous, ran_seconds=0.5)
        waits.append(previous)
    assert waits[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert waits[-1] == 60.0
    assert restart_delay(25.6, ran_seconds=10.0) == 0.1  # ran long enough: start over
    assert restart_delay(25.6, ran_seconds=9.9) == 51.2


@pytest.fixture
def restarting(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    record = Container(
        id="b" * 64,
        name="flaky",
        image="busybox",
        image_id="sha256:abc",
        isolation="process",
        process=ProcessSpec(args=["false"]),
        hostname="b" * 12,
        token="t",
        layer_disks=[],
    )
    record.state.status = "exited"
    record.state.exit_code = 1
    record.state.restarting = True
    record.state.finished_at = "2026-12-04T16:00:00Z"
    record.state.monitor_pid = os.getpid()  # a live "monitor"
    record.state.monitor_start = process_start_time(os.getpid())
    ContainerStore().create(record)
    return record


def test_ps_and_inspect_show_restarting_while_the_monitor_waits(restarting):
    assert status_text(restarting).startswith("Restarting (1) ")
    assert ps_entry(restarting)["State"] == "restarting"
    state = inspect_data(restarting)["State"]
    assert (state["Status"], state["Restarting"], state["Running"]) == ("restarting", True, False)


def test_a_stale_restarting_flag_without_a_monitor_is_exited(restarting):
    restarting.state.monitor_pid = 0
    assert status_text(restarting).startswith("Exited (1) ")
    assert inspect_data(restarting)["State"]["Restarting"] is False
