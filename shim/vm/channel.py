"""One framed channel: a connected unix stream socket carrying guest.protocol frames.

Both ends the host talks to speak it: a container's agent
(:class:`shim.vm.agent_client.AgentClient`, whose every message is untrusted) and a
container's monitor (:class:`shim.containers.monitor_api.MonitorClient`). A subclass says
who the peer is (for error texts), which error it raises, how it encodes frames, and what
it keeps of what arrives; connecting, sending, reading, the inbox and waiting live here.
``shim.containers.attach.StdioPump`` works on either.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Callable, TypeVar

from guest import protocol
from guest.protocol import Message, ProtocolError
from shim.errors import VmshimError

READ_SIZE = 256 * 1024
ALIVE_POLL = 0.2
"""Seconds between calls of a recv's *alive* check."""

C = TypeVar("C", bound="FramedChannel")


class FramedChannel:
    """A connected, framed channel. Not thread-safe."""

    error: type[VmshimError] = VmshimError

    def __init__(self, sock: socket.socket, reader: protocol.FrameReader):
        self.sock = sock
        self._reader = reader
        self._inbox: list[Message] = []

    # ---- what a subclass says --------------------------------------------------------

    def _encode(self, type: str, payload: bytes, fields: dict) -> bytes:
        return protocol.encode(type, payload, **fields)

    def _keep(self, messages: list[Message]) -> list[Message]:
        """What of the decoded *messages* reaches the caller (all, by default)."""
        return messages

    @classmethod
    def _failure(cls, what: str, reason: str = "", subject: str = "") -> VmshimError:
        """The error for *what* went wrong: ``connect`` (subject: the path), ``send``
        (subject: the message type), ``read``, ``eof``, ``protocol`` or ``timeout``
        (subject: the seconds waited); *reason* says why, where there is one."""
        return cls.error(f"channel {what} {subject} failed: {reason}")

    # ---- the channel -------------------------------------------------------------------

    @classmethod
    def connect_unix(cls: type[C], path: str, timeout: float = 10.0) -> C:
        """Connect to the unix socket at *path*, retrying while it does not exist or does
        not accept yet, for up to *timeout* seconds; then raise the class's error."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock)  # type: ignore[call-arg]  # subclasses take the socket alone
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() >= deadline:
                    raise cls._failure("connect", exc.strerror or str(exc), path) from None
                time.sleep(0.02)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, type: str, payload: bytes = b"", **fields) -> None:
        """Send one message; raises the class's error if the channel is gone."""
        try:
            self.sock.sendall(self._encode(type, payload, fields))
        except OSError as exc:
            raise self._failure("send", exc.strerror or str(exc), type) from None

    def read_available(self) -> list[Message]:
        """Read what the socket has now (call when select says readable) and return the
        messages it completed. Raises the class's error on end of file or a frame that
        breaks the framing."""
        try:
            data = self.sock.recv(READ_SIZE)
        except InterruptedError:
            return []
        except OSError as exc:
            raise self._failure("read", exc.strerror or str(exc)) from None
        if not data:
            raise self._failure("eof")
        try:
            messages = self._reader.feed(data)
        except ProtocolError as exc:
            raise self._failure("protocol", str(exc)) from None
        return self._keep(messages)

    def recv(self, timeout: float | None = None, alive: Callable[[], str | None] | None = None) -> Message:
        """The next message, waiting at most *timeout* seconds (None: for ever). *alive*,
        if given, is asked about every 0.2 s while waiting; a string it returns is raised
        as the class's error (e.g. "the VM stopped before …")."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            wait = ALIVE_POLL if alive else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._failure("timeout", subject=f"{timeout:.0f}")
                wait = min(wait, left) if wait else left
            try:
                ready = select.select([self.sock], [], [], wait)[0]
            except InterruptedError:
                continue
            if ready:
                self._inbox.extend(self.read_available())
            elif alive is not None:
                problem = alive()
                if problem:
                    raise self.error(problem)
        return self._inbox.pop(0)

    def take_pending(self) -> list[Message]:
        """Messages already decoded but not yet returned by recv (for a select loop)."""
        out, self._inbox = self._inbox, []
        return out

    def push(self, messages: list[Message]) -> None:
        """Queue *messages* (read elsewhere) after those already waiting for recv."""
        self._inbox.extend(messages)

    def unread(self, messages: list[Message]) -> None:
        """Put *messages* back before those waiting, so recv returns them first."""
        self._inbox[:0] = messages

    @property
    def has_pending(self) -> bool:
        return bool(self._inbox)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
