"""Snapshot templates (issue 15): two containers started from one saved VM are fresh:
their files, processes, hostnames, agent tokens and RNG output differ (there is no NIC,
and so no MAC, in a template's VM: they run with --network none). Boots the template's
VM once (marked vm); the containers are restored copies of it."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.conftest import err, ok, vmshim, wait_no_new_domains
from tests.waiting import wait_until

pytestmark = pytest.mark.vm
PREFIX = f"tp{os.getpid()}"


def state_root():
    from shim import paths

    return paths.root()


def monitor_log(cid: str) -> str:
    try:
        return (state_root() / "containers" / cid / "monitor.log").read_text()
    except OSError:
        return ""


def test_containers_from_one_template_are_fresh(domains_before):
    key = ok("template", "create", "busybox", timeout=600).strip()
    names = [f"{PREFIX}-a", f"{PREFIX}-b"]
    try:
        assert key in ok("template", "ls")
        ids = []
        for name in names:
            proc = vmshim(
                "run", "-d", "--rm", "--network", "none", "--name", name, "busybox", "sleep", "600", timeout=300
            )
            assert proc.returncode == 0, err(proc)
            ids.append(ok("inspect", "-f", "{{.Id}}", name).strip())
        for cid in ids:
            wait_until(
                lambda cid=cid: f"started from snapshot template {key}" in monitor_log(cid),
                30,
                "the monitor's note of the template",
            )
        for name in names:  # the process held since the save took the container's (guest.runtime.process.Held)
            console_log = json.loads(ok("inspect", name))[0]["Vmshim"]["ConsoleLog"]
            console = open(console_log, errors="replace").read()
            assert "the process held since the template's save became the container's" in console, console[-2000:]
        hostnames = [ok("exec", n, "hostname").strip() for n in names]
        assert hostnames == [cid[:12] for cid in ids]
        assert ok("exec", names[0], "cat", "/etc/hostname").strip() == ids[0][:12]
        tokens = [json.loads((state_root() / "containers" / cid / "state.json").read_text())["token"] for cid in ids]
        assert tokens[0] != tokens[1]  # and each agent took its own: exec works in both
        rng = [ok("exec", n, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1").strip() for n in names]
        assert rng[0] != rng[1]
        ok("exec", names[0], "sh", "-c", "echo mine > /tmp/only-a")
        assert vmshim("exec", names[1], "test", "-e", "/tmp/only-a").returncode == 1
        ok("exec", "-d", names[1], "sleep", "777")
        wait_until(lambda: "sleep 777" in ok("exec", names[1], "ps"), 30, "b's own process")
        assert "sleep 777" not in ok("exec", names[0], "ps")
        ifaces = ok("exec", names[0], "ls", "/sys/class/net").split()
        assert ifaces == ["lo"]
    finally:
        for name in names:
            vmshim("rm", "-f", name)
        vmshim("template", "rm", key)
    wait_no_new_domains(domains_before)
