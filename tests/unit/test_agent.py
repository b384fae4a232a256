"""The agent's request loop, driven over a socketpair with a runtime that runs plain
processes (no namespaces, no root): hello, start, streaming, stdin, exit, errors."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from guest import protocol
from guest.agent import Agent
from guest.runtime.process import spawn_container
from guest.spec import BootConfig, ProcessSpec

TOKEN = "s3cret-token"


class FakeRuntime:
    """Starts processes as the current user in the current root (no namespaces)."""

    def __init__(self):
        self.calls = []

    def start(self, process, *, stdin, rows, cols):
        self.calls.append(("start", process, stdin))
        spec = process.replace(user=f"{os.getuid()}:{os.getgid()}")
        return spawn_container(None, spec, "", None, namespaces=(), stdin=stdin, rows=rows, cols=cols)

    def exec(self, process, *, stdin, rows, cols):
        self.calls.append(("exec", process, stdin))
        spec = process.replace(user=f"{os.getuid()}:{os.getgid()}")
        return spawn_container(None, spec, "", None, namespaces=(), stdin=stdin, rows=rows, cols=cols)


class Host:
    """The test's end of the channel: send frames, receive decoded messages."""

    def __init__(self, sock: socket.socket, agent: Agent, thread: threading.Thread):
        self.sock = sock
        self.agent = agent
        self.thread = thread
        self.reader = protocol.FrameReader()
        self.inbox: list[protocol.Message] = []
        self.result = []

    def send(self, type: str, payload: bytes = b"", **fields) -> None:
        self.sock.sendall(protocol.encode(type, payload, **fields))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> protocol.Message:
        deadline = time.monotonic() + timeout
        while not self.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the agent")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise EOFError("the agent closed the channel")
                self.inbox.extend(self.reader.feed(data))
        return self.inbox.pop(0)

    def start(self, proc_id: int = 1, **fields) -> protocol.Message:
        fields.setdefault("token", TOKEN)
        fields.setdefault("stdin", False)
        fields.setdefault("tty", False)
        self.send(protocol.START, id=proc_id, **fields)
        return self.recv()

    def collect(self, proc_id: int, timeout: float = 20.0):
        """Read until *proc_id*'s exit: (stdout bytes, stderr bytes, exit message, others)."""
        out, err, others = bytearray(), bytearray(), []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if msg.type == protocol.STDOUT and msg.fields.get("id") == proc_id:
                out += msg.payload
            elif msg.type == protocol.STDERR and msg.fields.get("id") == proc_id:
                err += msg.payload
            elif msg.type == protocol.EXIT and msg.fields.get("id") == proc_id:
                return bytes(out), bytes(err), msg, others
            else:
                others.append(msg)

    def kill_main(self) -> protocol.Message:
        """SIGKILL the main process (id 1) and read until its exit message."""
        self.send(protocol.SIGNAL, id=1, signal=9)
        return self.collect(1)[2]

    def wait_done(self, timeout: float = 10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent loop did not end"
        return self.result[0] if self.result else None


@pytest.fixture
def make_host():
    hosts = []

    def make(args, *, tty=False, exit_grace=0.05, runtime=None) -> Host:
        host_sock, guest_sock = socket.socketpair()
        config = BootConfig(
            container_id="c0ffee",
            token=TOKEN,
            hostname="box",
            process=ProcessSpec(args=list(args), tty=tty),
            layer_count=0,
        )
        agent = Agent(guest_sock.fileno(), config, runtime or FakeRuntime(), exit_grace=exit_grace)
        host = Host(host_sock, agent, None)
        host.guest_sock = guest_sock

        def run():
            try:
                host.result.append(agent.run())
            finally:
                agent.close()

        host.thread = threading.Thread(target=run, daemon=True)
        host.thread.start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.sock.close()
        host.thread.join(10)
        host.guest_sock.close()


def test_hello_comes_first(make_host):
    host = make_host(["true"])
    hello = host.recv()
    assert hello.type == protocol.HELLO
    assert hello.get("protocol", int) == protocol.PROTOCOL_VERSION
    assert hello.get("agent", str).startswith("vmshim-agent")
    assert isinstance(hello.fields["uptime"], (int, float))


def test_start_streams_output_then_exit(make_host):
    host = make_host(["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    host.recv()  # hello
    started = host.start()
    assert started.type == protocol.STARTED, started
    assert started.get("id", int) == 1 and started.get("pid", int) > 0
    out, err, exit_msg, others = host.collect(1)
    assert out == b"hello\n" and err == b"oops\n"
    assert exit_msg.get("code", int) == 7 and exit_msg.get("signal", int) == 0
    assert not others
    assert host.wait_done() == 7


def test_ten_mib_of_stdout_arrive_byte_exact(make_host, tmp_path):
    data = os.urandom(10 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(data)
    host = make_host(["cat", str(path)])
    host.recv()
    assert host.start().type == protocol.STARTED
    out, err, exit_msg, _ = host.collect(1, timeout=60)
    assert err == b""
    assert len(out) == len(data) and out == data
    assert exit_msg.get("code", int) == 0


def test_stdin_is_forwarded_and_closed(make_host):
    host = make_host(["sh", "-c", "cat; echo done"])
    host.recv()
    assert host.start(stdin=True).type == protocol.STARTED
    blob = os.urandom(3 * protocol.CHUNK + 123)
    for i in range(0, len(blob), protocol.CHUNK):
        host.send(protocol.STDIN, blob[i : i + protocol.CHUNK], id=1)
    host.send(protocol.STDIN_CLOSE, id=1)
    out, _, exit_msg, _ = host.collect(1)
    assert out == blob + b"done\n"
    assert exit_msg.get("code", int) == 0


def test_without_stdin_the_process_reads_dev_null(make_host):
    host = make_host(["sh", "-c", "cat; echo eof"])
    host.recv()
    assert host.start(stdin=False).type == protocol.STARTED
    out, _, exit_msg, _ = host.collect(1)
    assert out == b"eof\n" and exit_msg.get("code", int) == 0


def test_exit_waits_for_output_but_not_for_ever(make_host):
    # The background sleep keeps stdout open after sh exits; the agent gives up on it
    # after a silent second instead of waiting for the sleep.
    host = make_host(["sh", "-c", "sleep 5 & echo hi; exit 3"])
    host.recv()
    assert host.start().type == protocol.STARTED
    begin = time.monotonic()
    out, _, exit_msg, _ = host.collect(1)
    assert out == b"hi\n" and exit_msg.get("code", int) == 3
    assert time.monotonic() - begin < 4


def test_signal_reaches_the_process(make_host):
    host = make_host(["sleep", "30"])
    host.recv()
    assert host.start().type == protocol.STARTED
    host.send(protocol.SIGNAL, id=1, signal=15)
    _, _, exit_msg, _ = host.collect(1)
    assert exit_msg.get("code", int) == 143 and exit_msg.get("signal", int) == 15


def test_bad_token_is_refused_and_the_agent_keeps_serving(make_host):
    host = make_host(["echo", "ok"])
    host.recv()
    reply = host.start(token="wrong")
    assert reply.type == protocol.ERROR and "token" in reply.get("message", str)
    assert reply.get("id", int) == 1
    assert host.start().type == protocol.STARTED
    out, _, exit_msg, _ = host.collect(1)
    assert out == b"ok\n" and exit_msg.get("code", int) == 0


def test_bad_messages_get_error_replies(make_host):
    host = make_host(["sleep", "30"])
    host.recv()
    host.send(protocol.STDIN, b"x", id=42)
    reply = host.recv()
    assert reply.type == protocol.ERROR and reply.get("id", int) == 42
    assert "no process" in reply.get("message", str)
    host.send(protocol.START, token=TOKEN, id="one")
    reply = host.recv()
    assert reply.type == protocol.ERROR and "wrong type" in reply.get("message", str)
    host.send(protocol.HELLO, protocol=1)  # guest-to-host only
    assert host.recv().type == protocol.ERROR
    host.send(protocol.SIGNAL, id=1, signal=15)
    assert host.recv().type == protocol.ERROR
    host.send_raw(b"\x00\x00\x00\x05\x00\x00\x00\x00{bad}")  # header is not JSON
    reply = host.recv()
    assert reply.type == protocol.ERROR and "protocol error" in reply.get("message", str)
    # Still alive and serving.
    assert host.start().type == protocol.STARTED
    host.send(protocol.SIGNAL, id=1, signal=99)
    assert host.recv().type == protocol.ERROR
    assert host.kill_main().get("code", int) == 137


def test_start_twice_is_refused(make_host):
    host = make_host(["sleep", "30"])
    host.recv()
    assert host.start().type == protocol.STARTED
    reply = host.start(proc_id=2)
    assert reply.type == protocol.ERROR and "already started" in reply.get("message", str)
    host.kill_main()


@pytest.mark.parametrize(
    "args,code,text",
    [
        (["/nope"], 127, 'exec: "/nope": no such file or directory'),
        (["nope-not-here"], 127, 'exec: "nope-not-here": executable file not found in $PATH'),
        (["{tmp}/plain.txt"], 126, "permission denied"),
        (["{tmp}"], 126, "permission denied"),
    ],
)
def test_exec_failures_report_docker_exit_codes(make_host, tmp_path, args, code, text):
    (tmp_path / "plain.txt").write_text("not a program\n")
    (tmp_path / "plain.txt").chmod(0o644)
    args = [a.format(tmp=tmp_path) for a in args]
    host = make_host(args)
    host.recv()
    reply = host.start()
    assert reply.type == protocol.ERROR
    assert reply.get("code", int) == code
    assert text in reply.get("message", str)
    assert host.wait_done() == code  # the container is over: the loop ends


def test_tty_size_resize_and_eof(make_host):
    host = make_host(["sh", "-c", "stty size; read line; echo got:$line; stty size"], tty=True)
    host.recv()
    assert host.start(tty=True, stdin=True, rows=30, cols=100).type == protocol.STARTED
    seen = bytearray()
    while b"30 100" not in seen:
        msg = host.recv()
        assert msg.type == protocol.STDOUT, msg
        seen += msg.payload
    host.send(protocol.RESIZE, id=1, rows=40, cols=120)
    host.send(protocol.STDIN, b"abc\n", id=1)
    out, err, exit_msg, _ = host.collect(1)
    text = (bytes(seen) + out).replace(b"\r\n", b"\n")
    assert b"got:abc" in text and b"40 120" in text
    assert err == b"" and exit_msg.get("code", int) == 0


def test_exec_runs_beside_the_main_process(make_host):
    host = make_host(["sleep", "30"])
    host.recv()
    assert host.start().type == protocol.STARTED
    host.send(
        protocol.EXEC,
        token=TOKEN,
        id=2,
        stdin=False,
        tty=False,
        process={"args": ["sh", "-c", "echo from exec; exit 4"]},
    )
    assert host.recv().type == protocol.STARTED
    out, _, exit_msg, _ = host.collect(2)
    assert out == b"from exec\n" and exit_msg.get("code", int) == 4
    host.send(protocol.EXEC, token="bad", id=3, process={"args": ["true"]})
    assert host.recv().type == protocol.ERROR
    host.send(protocol.EXEC, token=TOKEN, id=3, process={"args": []})
    assert host.recv().type == protocol.ERROR
    assert host.kill_main().get("code", int) == 137


def test_shutdown_ends_the_loop_and_kills_the_process(make_host):
    host = make_host(["sleep", "30"])
    host.recv()
    started = host.start()
    host.send(protocol.SHUTDOWN)
    host.wait_done()
    with pytest.raises(ProcessLookupError):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.kill(started.get("pid", int), 0)  # killed; reaped by the agent
            time.sleep(0.05)


def test_host_closing_the_channel_ends_the_loop(make_host):
    host = make_host(["true"])
    host.recv()
    host.sock.close()
    host.wait_done()


def test_exit_report_never_gives_up_on_unread_output():
    """White-box: after the process exited, its output is abandoned only when it was
    silent while being read, not while the agent was not reading (backpressure) and not
    while data is waiting in the pipe."""
    from guest import agent as agent_mod
    from guest.runtime.process import Spawned

    host_sock, guest_sock = socket.socketpair()
    config = BootConfig(container_id="c", token=TOKEN, hostname="h", process=ProcessSpec(args=["true"]), layer_count=0)
    agent = Agent(guest_sock.fileno(), config, FakeRuntime())
    r, w = os.pipe()
    try:
        proc = agent_mod._Proc(id=7, spawned=Spawned(pid=12345, tty=False, stdout=r), main=False)
        proc.outputs[r] = protocol.STDOUT
        proc.exit_code = 0
        agent._procs[7] = proc
        now = time.monotonic()
        os.write(w, b"pending")

        proc.last_output = now - 10
        agent._out_bytes = agent_mod.OUT_HIGH  # backpressure: not reading
        agent._maybe_report_exit(proc, now)
        assert not proc.exit_sent and proc.last_output == now

        agent._out_bytes = 0
        proc.last_output = now - 10
        agent._maybe_report_exit(proc, now)  # silent, but data waits in the pipe
        assert not proc.exit_sent

        os.read(r, 100)  # drained; w is still open (a background child, say)
        agent._maybe_report_exit(proc, now)
        assert proc.exit_sent and not proc.outputs
    finally:
        os.close(w)
        agent.close()
        host_sock.close()
        guest_sock.close()


class DiffRuntime(FakeRuntime):
    """FakeRuntime whose container's changes are the directory *upper*."""

    def __init__(self, upper):
        super().__init__()
        self.upper = str(upper)

    def diff(self):
        from guest.runtime import diff

        return diff.spawn(self.upper)


def test_diff_after_exit_with_hold_streams_the_changes_as_a_tar(make_host, tmp_path):
    import io
    import tarfile

    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "d" / "f").write_bytes(b"data")
    host = make_host(["true"], runtime=DiffRuntime(upper))
    host.recv()
    host.send(protocol.DIFF, token=TOKEN, id=2)
    early = host.recv()
    assert early.type == protocol.ERROR and "not exited" in early.get("message", str)
    assert host.start(hold=True).type == protocol.STARTED
    host.collect(1)
    host.thread.join(0.3)  # longer than exit_grace: with hold the agent must stay
    assert host.thread.is_alive()
    host.send(protocol.DIFF, token="wrong", id=2)
    assert host.recv().type == protocol.ERROR
    host.send(protocol.DIFF, token=TOKEN, id=2)
    assert host.recv().type == protocol.STARTED
    out, err, exit_msg, _ = host.collect(2)
    assert exit_msg.get("code", int) == 0, err
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert [m.name for m in tar] == ["d", "d/f"]
        assert tar.extractfile("d/f").read() == b"data"
    host.send(protocol.SHUTDOWN)
    host.wait_done()


def test_without_hold_the_agent_ends_after_the_exit(make_host, tmp_path):
    host = make_host(["true"], runtime=DiffRuntime(tmp_path))
    host.recv()
    host.start()
    host.collect(1)
    assert host.wait_done() == 0


def test_identity_makes_a_restored_template_this_container(make_host, monkeypatch):
    """Snapshot templates (issue 15): the template's token asks, the new token, hostname
    and process take over, the entropy is mixed in (here: a plain file stands for
    /dev/urandom), and only before start."""
    import guest.agent as agent_mod

    seeded = []
    monkeypatch.setattr(agent_mod, "reseed", lambda entropy: seeded.append(entropy))
    host = make_host(["echo", "template"])
    host.recv()
    fields = dict(
        id=9, new_token="n" * 32, hostname="fresh", process={"args": ["echo", "mine"]}, hosts="", resolv_conf=""
    )
    host.send(protocol.IDENTITY, b"e" * 64, token="wrong", **fields)
    assert "token" in host.recv().get("message", str)
    host.send(protocol.IDENTITY, b"e" * 8, token=TOKEN, **fields)
    assert "entropy" in host.recv().get("message", str)
    host.send(protocol.IDENTITY, b"e" * 64, token=TOKEN, **{**fields, "new_token": "short"})
    assert "token" in host.recv().get("message", str)
    host.send(protocol.IDENTITY, b"e" * 64, token=TOKEN, **fields)
    reply = host.recv()
    assert reply.type == protocol.UPDATED and reply.get("id", int) == 9
    assert seeded == [b"e" * 64]
    assert host.agent.config.hostname == "fresh"
    assert host.start().type == protocol.ERROR  # the template's token is no longer good
    assert host.start(token="n" * 32).type == protocol.STARTED
    out, _, _, _ = host.collect(1)
    assert out == b"mine\n"
    host.send(protocol.IDENTITY, b"e" * 64, token="n" * 32, **fields)
    assert "before start" in host.recv().get("message", str)


def test_reseed_writes_the_entropy(tmp_path):
    from guest.agent import reseed

    target = tmp_path / "urandom"
    target.write_bytes(b"")
    reseed(b"x" * 32, device=str(target))  # the ioctls fail on a file: a plain write
    assert target.read_bytes() == b"x" * 32


def test_reseed_reseeds_pythons_random_only_when_it_was_imported(tmp_path, monkeypatch):
    """A restored template's agent must not share ``random``'s state with its siblings
    (when something imported it before the save); it must not import it either (60 ms
    under an empty translation cache, for a module nothing in the guest uses)."""
    import random
    import sys

    from guest.agent import reseed

    target = tmp_path / "urandom"
    target.write_bytes(b"")
    random.seed(1)
    reseed(b"y" * 32, device=str(target))
    after_reseed = random.random()
    random.seed(b"y" * 32)
    assert after_reseed == random.random()
    monkeypatch.delitem(sys.modules, "random")
    reseed(b"z" * 32, device=str(target))
    assert "random" not in sys.modules


def test_a_pooled_agent_waits_for_its_spec_and_keeps_the_start_behind_it():
    """A pooled VM's agent has no config until ``spec``; the ``start`` the host sends
    right behind it (same write) is answered once the container is attached. Bad specs
    are refused and the loop survives them."""
    host_sock, guest_sock = socket.socketpair()
    agent = Agent(guest_sock.fileno(), None, None, exit_grace=0.05)
    host = Host(host_sock, agent, None)
    got = []
    waiter = threading.Thread(target=lambda: got.append(agent.wait_for_spec()), daemon=True)
    waiter.start()
    try:
        assert host.recv().type == protocol.HELLO
        host.send(protocol.SPEC, config={"container_id": "c0ffee"}, entropy="00")
        assert "lacks 'token'" in host.recv().get("message", str)
        host.send(protocol.SPEC, config={}, entropy="abc")
        assert "hex digits" in host.recv().get("message", str)
        config = BootConfig(
            container_id="c0ffee",
            token=TOKEN,
            hostname="pooled",
            process=ProcessSpec(args=["echo", "hi"]),
            layer_count=0,
        )
        host.send_raw(
            protocol.encode(protocol.SPEC, config=config.to_dict(), entropy="ab" * 32)
            + protocol.encode(protocol.START, id=1, token=TOKEN, stdin=False, tty=False)
        )
        waiter.join(10)
        spec, entropy = got[0]
        assert spec.hostname == "pooled" and entropy == b"\xab" * 32
        agent.attach(spec, FakeRuntime())
        host.thread = threading.Thread(target=lambda: host.result.append(agent.run()), daemon=True)
        host.thread.start()
        assert host.recv().type == protocol.STARTED  # the deferred start
        out, _, exit_msg, _ = host.collect(1)
        assert out == b"hi\n" and exit_msg.get("code", int) == 0
        assert host.wait_done() == 0
    finally:
        host_sock.close()
        agent.close()
        guest_sock.close()


def test_an_away_host_is_looked_for_on_sigio_not_every_50_ms():
    """A character-device channel (a virtio-serial port; a pty stands in) whose host is
    away: SIGIO (what the port sends when a host connects) wakes the loop at once, and
    the fallback poll is a second, not 50 ms. Connected again, SIGIO is off."""
    import fcntl
    import signal

    from guest import agent as agent_mod

    master, fd = os.openpty()
    old_handler = signal.getsignal(signal.SIGIO)
    try:
        agent = Agent(fd, None, None, reconnect=True)
        assert agent._sigio_r >= 0
        agent._host_gone()  # what reading EOF from the port does
        assert agent._away and agent._sigio_armed
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ASYNC
        assert agent._retry_at <= time.monotonic()  # armed just now: one more look at once
        agent._host_gone()  # that look found no host either
        assert agent._away and agent._retry_at - time.monotonic() > agent_mod.RECONNECT_POLL
        probes = []
        agent._probe_channel = lambda: probes.append(1)
        agent._sync_selector()
        os.kill(os.getpid(), signal.SIGIO)
        woke = [key.data for key, _mask in agent._sel.select(2.0)]
        assert woke and woke[0].__name__ == "_on_sigio"
        woke[0](0)
        assert probes == [1] and not agent._away
        agent._arm_sigio(False)  # what a read from a connected host does
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ASYNC
        agent.close()
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGIO, old_handler)
        os.close(fd)
        os.close(master)


def test_a_socket_channel_keeps_polling(make_host):
    host = make_host(["true"])
    assert host.agent._sigio_r == -1


class HoldingRuntime(FakeRuntime):
    def __init__(self, fail: Exception | None = None):
        super().__init__()
        self.fail = fail

    def hold(self):
        self.calls.append(("hold",))
        if self.fail is not None:
            raise self.fail


def test_prefork_holds_the_containers_process_before_start_only(make_host):
    """Snapshot templates (issue 15): ``prefork`` asks the runtime to hold the main
    process before the save; the template's token only, and never after start."""
    from guest.runtime.process import SpawnError

    runtime = HoldingRuntime()
    host = make_host(["echo", "mine"], runtime=runtime)
    host.recv()
    host.send(protocol.PREFORK, token="wrong", id=7)
    assert "token" in host.recv().get("message", str)
    host.send(protocol.PREFORK, token=TOKEN, id=7)
    reply = host.recv()
    assert reply.type == protocol.UPDATED and reply.get("id", int) == 7
    assert runtime.calls == [("hold",)]
    assert host.start().type == protocol.STARTED
    host.collect(1)
    host.send(protocol.PREFORK, token=TOKEN, id=8)
    assert "before start" in host.recv().get("message", str)

    failing = make_host(["true"], runtime=HoldingRuntime(SpawnError("no user namespaces held")))
    failing.recv()
    failing.send(protocol.PREFORK, token=TOKEN, id=7)
    reply = failing.recv()
    assert reply.type == protocol.ERROR and "no user namespaces held" in reply.get("message", str)
    plain = make_host(["true"])  # a runtime without hold
    plain.recv()
    plain.send(protocol.PREFORK, token=TOKEN, id=7)
    assert "cannot hold" in plain.recv().get("message", str)
