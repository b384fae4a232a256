"""The host end of the channel (AgentClient + StdioPump) against a scripted fake agent."""

import os
import socket
import threading

import pytest

from guest import protocol
from shim.containers.attach import StdioPump
from shim.errors import AgentError
from shim.vm.agent_client import AgentClient


class FakeAgent(threading.Thread):
    """Speaks the guest side of the protocol: echoes stdin to stdout, then exits 3."""

    def __init__(self, sock, version=protocol.PROTOCOL_VERSION, big=b""):
        super().__init__(daemon=True)
        self.sock, self.version, self.big = sock, version, big
        self.got: list[protocol.Message] = []

    def send(self, *a, **kw):
        self.sock.sendall(protocol.encode(*a, **kw))

    def run(self):
        reader = protocol.FrameReader()
        self.send("hello", protocol=self.version, agent="fake", uptime=0.1)
        echoed = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            for msg in reader.feed(data):
                self.got.append(msg)
                if msg.type == "stdin":
                    echoed += msg.payload
                    self.send("stdout", msg.payload, id=1)
                elif msg.type == "stdin_close":
                    for i in range(0, len(self.big), protocol.CHUNK):
                        self.send("stdout", self.big[i : i + protocol.CHUNK], id=1)
                    self.send("stderr", b"bye\n", id=1)
                    self.send("exit", id=1, code=3)
                    return


def make_pair(**kw):
    host, guest = socket.socketpair()
    agent = FakeAgent(guest, **kw)
    agent.start()
    return AgentClient(host), agent


def test_stdin_stdout_stderr_and_exit_code(tmp_path):
    big = os.urandom(3 * 1024 * 1024 + 17)
    client, agent = make_pair(big=big)
    client.handshake(5)
    r, w = os.pipe()
    os.write(w, b"abc\n")
    os.close(w)
    out = open(tmp_path / "out", "wb")
    err = open(tmp_path / "err", "wb")
    code = StdioPump(client, 1, stdin_fd=r, stdout_fd=out.fileno(), stderr_fd=err.fileno()).run()
    out.close(), err.close()
    assert code == 3
    assert (tmp_path / "out").read_bytes() == b"abc\n" + big
    assert (tmp_path / "err").read_bytes() == b"bye\n"
    assert [m.type for m in agent.got] == ["stdin", "stdin_close"]


def test_version_mismatch_is_a_clear_error():
    client, _ = make_pair(version=99)
    with pytest.raises(AgentError, match="protocol 99"):
        client.handshake(5)


def test_channel_closed_is_an_agent_error():
    host, guest = socket.socketpair()
    guest.close()
    with pytest.raises(AgentError, match="closed"):
        AgentClient(host).recv(1)


def test_alive_callback_ends_the_wait():
    host, _guest = socket.socketpair()
    with pytest.raises(AgentError, match="VM stopped"):
        AgentClient(host).recv(5, alive=lambda: "the VM stopped")


def test_timeout():
    host, _guest = socket.socketpair()
    with pytest.raises(AgentError, match="did not answer"):
        AgentClient(host).recv(0.1)


def test_detach_keys_parse_like_docker():
    from shim.containers.attach import parse_detach_keys
    from shim.errors import UsageError

    assert parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert parse_detach_keys("ctrl-a,x") == b"\x01x"
    assert parse_detach_keys("ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_") == bytes([0, 27, 28, 29, 30, 31])
    for bad in ("", "ctrl-", "ctrl-1", "xy", "ctrl-p,,ctrl-q"):
        with pytest.raises(UsageError, match="--detach-keys"):
            parse_detach_keys(bad)


def test_detach_scanner_holds_partial_matches_across_reads():
    from shim.containers.attach import DetachScanner

    s = DetachScanner(b"\x10\x11")
    assert s.feed(b"ab\x10") == b"ab" and not s.detached  # held back: maybe the sequence
    assert s.feed(b"c") == b"\x10c" and not s.detached  # it was not: ^P goes through
    assert s.feed(b"\x10\x10") == b"\x10" and not s.detached
    assert s.feed(b"\x11tail") == b"" and s.detached  # nothing after the sequence is sent
    one = DetachScanner(b"\x01")
    assert one.feed(b"x\x01y") == b"x" and one.detached
