"""Forked children (a host agent, a monitor) log through their own stdio, not the parent's
Python stream objects (shim.containers.forked)."""

from __future__ import annotations

import io
import os
import socket
import sys

from guest.spec import BootConfig, ProcessSpec
from shim.containers.fake_isolation import PlainRuntime
from shim.containers.process_placement import _fork_agent, _reap_child
from shim.vm.agent_client import AgentClient
from tests.waiting import wait_until


def test_a_host_agent_that_logs_before_its_host_connects_survives(tmp_path, monkeypatch):
    # The parent's sys.stderr writes to a descriptor the child closes (as pytest's capture
    # does): before the fix, the agent's first log line ("the host is not connected;
    # waiting for it") raised EBADF and the agent died, resetting the host's connection.
    spare = os.dup(2)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.FileIO(spare, "w"), write_through=True))
    sock_path = str(tmp_path / "agent.sock")
    log = tmp_path / "agent.log"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)
    config = BootConfig(
        container_id="f" * 64, token="tok", hostname="h", process=ProcessSpec(args=["true"]), layer_count=0
    )
    pid = _fork_agent(listener, config, PlainRuntime(), log)
    listener.close()
    try:
        wait_until(
            lambda: (log.exists() and "waiting for it" in log.read_text()) or _reap_child(pid) is not None,
            timeout=30,
            what="the agent's first log line (or its death)",
        )
        assert _reap_child(pid) is None, "the agent died on its first log line"
        client = AgentClient.connect_unix(sock_path, timeout=5)
        client.handshake(10)
        client.close()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        wait_until(lambda: _reap_child(pid) is not None, timeout=10, what="the agent's exit")
        os.close(spare)
