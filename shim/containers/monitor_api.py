"""The monitor's socket API: how the CLI talks to a container's monitor. Host only.

Each container's monitor listens on ``<run dir>/monitor.sock`` (a unix stream socket,
root only). Frames are guest.protocol's (u32 header length, u32 payload length, JSON
header, payload), with three message types of its own beside the agent's stream types.
One connection carries one request; its first frame is::

    request {op, ...}

and the monitor answers with ``reply {...}`` (done), ``error {message, code}`` (refused or
failed; *code* is the exit status the CLI should use), or, for the ops that run a
process, ``started {id, pid}`` followed by the process's stream, exactly as the agent
sends it: ``stdout``/``stderr {id}`` + bytes, then ``exit {id, code[, error]}`` (*error*:
why the main process ended when it did not end by itself, e.g. the agent broke the
protocol; the CLI prints it). On such a stream
the client may send ``stdin {id}`` + bytes, ``stdin_close {id}``, ``resize {id, rows,
cols}`` and ``signal {id, signal}``. So :class:`shim.containers.attach.StdioPump` works on
a monitor connection as it works on an agent channel.

Ops::

    start    {attach, stdin, rows, cols}  only on the socketpair of the monitor's spawner:
                                          boot, start the main process (id 1); started …
    attach   {stdin}                      started {id: 1, tty}; the main process's stream
    exec     {process, stdin, tty, rows, cols, detach}   started {id}; its stream
    builtin  {name, args, stdin}          like exec, for the agent's helpers (ps, tar-…)
    stop     {timeout}                    stop signal, SIGKILL after timeout; reply
                                          {exit_code} once it exited
    kill     {signal}                     reply {}
    pause · unpause                       reply {}
    wait                                  reply {exit_code} once it exited
    remove                                kill if running, tear down, delete the record;
                                          reply {} when nothing is left
    status                                reply {status, pid, …}
    netconf  {interfaces}                 the agent brings up NICs just plugged into the VM
                                          (guest.protocol ``netconf``); reply {} once it
                                          answered ``updated``, error otherwise

A freshly spawned monitor first writes ``ready {pid, start}`` on its spawner's socketpair.
"""

from __future__ import annotations

import errno
import socket
import time

from guest import protocol
from guest.protocol import Message, ProtocolError
from shim.errors import VmshimError

REQUEST = "request"
REPLY = "reply"
READY = "ready"
TYPES = protocol.MESSAGE_TYPES | {REQUEST, REPLY, READY}
SOCKET_NAME = "monitor.sock"


class MonitorGone(VmshimError):
    """The monitor's connection broke (the monitor died or is not running)."""


def encode(type: str, payload: bytes = b"", **fields) -> bytes:
    return protocol.encode_frame(type, payload, fields, TYPES)


class MonitorClient:
    """One connection to a monitor. Same surface as shim.vm.agent_client.AgentClient
    (``sock``, ``send``, ``read_available``, ``take_pending``, ``recv``), which is what
    StdioPump needs."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = protocol.FrameReader(TYPES)
        self._inbox: list[Message] = []

    @classmethod
    def connect(cls, path: str, timeout: float = 0.0) -> "MonitorClient":
        """Connect to the monitor socket at *path*, retrying while it does not answer
        for up to *timeout* seconds. Raises MonitorGone."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock)
            except OSError as exc:
                sock.close()
                if (exc.errno not in (errno.ENOENT, errno.ECONNREFUSED)
                        or time.monotonic() >= deadline):
                    raise MonitorGone(f"the container's monitor does not answer on {path}: "
                                      f"{exc.strerror}") from None
                time.sleep(0.02)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, type: str, payload: bytes = b"", **fields) -> None:
        try:
            self.sock.sendall(encode(type, payload, **fields))
        except OSError as exc:
            raise MonitorGone(f"the container's monitor went away ({exc.strerror})") from None

    def read_available(self) -> list[Message]:
        try:
            data = self.sock.recv(256 * 1024)
        except InterruptedError:
            return []
        except OSError as exc:
            raise MonitorGone(f"the container's monitor went away ({exc.strerror})") from None
        if not data:
            raise MonitorGone("the container's monitor closed the connection unexpectedly")
        try:
            return self._reader.feed(data)
        except ProtocolError as exc:
            raise MonitorGone(f"the monitor broke the protocol: {exc}") from None

    def take_pending(self) -> list[Message]:
        out, self._inbox = self._inbox, []
        return out

    def push(self, messages: list[Message]) -> None:
        """Queue *messages* (read elsewhere) for the next :meth:`recv`."""
        self._inbox.extend(messages)

    @property
    def has_pending(self) -> bool:
        return bool(self._inbox)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message (waiting up to *timeout* s; None: for ever). Raises
        MonitorGone on end of file or timeout."""
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise MonitorGone("the container's monitor did not answer in time")
            try:
                ready = select.select([self.sock], [], [], left)[0]
            except InterruptedError:
                continue
            if ready:
                self._inbox.extend(self.read_available())
        return self._inbox.pop(0)

    def request(self, op: str, wait: float | None = None, /, **fields) -> Message:
        """Send a request and return the first answer (reply, started or error), waiting
        at most *wait* seconds (None: for ever)."""
        self.send(REQUEST, op=op, **fields)
        return self.recv(wait)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "MonitorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raise_for_error(reply: Message) -> Message:
    """Turn an ``error`` answer into the VmshimError the CLI shows (with its exit code)."""
    if reply.type != protocol.ERROR:
        return reply
    from shim.errors import CommandNotExecutable, CommandNotFound, ContainerStateError

    message = reply.get("message", str, "the monitor refused the request")
    code = reply.get("code", int, 125)
    if code == 127:
        raise CommandNotFound(message)
    if code == 126:
        raise CommandNotExecutable(message)
    if reply.fields.get("ended") is True:
        raise MonitorGone(message)
    state = reply.fields.get("state")
    if isinstance(state, dict):
        raise ContainerStateError(str(state.get("operation")), str(state.get("expected")),
                                  str(state.get("actual")), str(state.get("name", "")))
    error = VmshimError(message)
    error.exit_code = code
    raise error
