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

import socket

from guest import protocol
from guest.protocol import Message
from shim.errors import VmshimError
from shim.vm.channel import FramedChannel

REQUEST = "request"
REPLY = "reply"
READY = "ready"
TYPES = protocol.MESSAGE_TYPES | {REQUEST, REPLY, READY}
SOCKET_NAME = "monitor.sock"


class MonitorGone(VmshimError):
    """The monitor's connection broke (the monitor died or is not running)."""


def encode(type: str, payload: bytes = b"", **fields) -> bytes:
    return protocol.encode_frame(type, payload, fields, TYPES)


class MonitorClient(FramedChannel):
    """One connection to a monitor: the same framed channel as the agent's
    (shim.vm.channel), which is what StdioPump needs, plus :meth:`request`."""

    error = MonitorGone

    def __init__(self, sock: socket.socket):
        super().__init__(sock, protocol.FrameReader(TYPES))

    def _encode(self, type: str, payload: bytes, fields: dict) -> bytes:
        return encode(type, payload, **fields)

    @classmethod
    def _failure(cls, what: str, reason: str = "", subject: str = "") -> MonitorGone:
        return MonitorGone(
            {
                "connect": f"the container's monitor does not answer on {subject}: {reason}",
                "send": f"the container's monitor went away ({reason})",
                "read": f"the container's monitor went away ({reason})",
                "eof": "the container's monitor closed the connection unexpectedly",
                "protocol": f"the monitor broke the protocol: {reason}",
                "timeout": "the container's monitor did not answer in time",
            }[what]
        )

    @classmethod
    def connect(cls, path: str, timeout: float = 0.0) -> "MonitorClient":
        """Connect to the monitor socket at *path*, retrying while it does not answer
        for up to *timeout* seconds. Raises MonitorGone."""
        return cls.connect_unix(path, timeout)

    def request(self, op: str, wait: float | None = None, /, **fields) -> Message:
        """Send a request and return the first answer (reply, started or error), waiting
        at most *wait* seconds (None: for ever)."""
        self.send(REQUEST, op=op, **fields)
        return self.recv(wait)


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
        raise ContainerStateError(
            str(state.get("operation")),
            str(state.get("expected")),
            str(state.get("actual")),
            str(state.get("name", "")),
        )
    error = VmshimError(message)
    error.exit_code = code
    raise error
