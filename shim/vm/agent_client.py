"""The host end of the agent channel: connect, handshake, send, receive.

The same client talks to an agent in a VM (over the virtio-serial unix socket libvirt
exposes) and to the agent run on the host for process isolation (over a socketpair).
Everything the agent sends is untrusted: frames are bounded by guest.protocol, and every
message is checked with :func:`guest.protocol.check_from_guest`; one that fails (or a
frame whose header is bad) is dropped, its reason kept in :attr:`AgentClient.rejected`
for the owner to log. Only a frame that breaks the framing itself ends the channel.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from guest import protocol
from guest.protocol import Message, ProtocolError
from shim.errors import AgentError


MAX_REJECTED_KEPT = 16


class AgentClient:
    """A connected, framed channel to one agent. Not thread-safe."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = protocol.FrameReader(lenient=True)
        self._inbox: list[Message] = []
        self.hello: Message | None = None
        self.rejected: list[str] = []
        """Why messages were dropped (at most MAX_REJECTED_KEPT; the owner may clear it)."""
        self.rejected_count = 0
        self._dropped_seen = 0

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 10.0) -> "AgentClient":
        """Connect to the channel socket at *path*, retrying while it does not exist yet.
        Raises AgentError after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return cls(sock)
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() > deadline:
                    raise AgentError(f"cannot connect to the agent channel {path}: {exc.strerror}") from None
                time.sleep(0.02)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, type: str, payload: bytes = b"", **fields) -> None:
        """Send one message; raises AgentError if the channel is gone."""
        try:
            self.sock.sendall(protocol.encode(type, payload, **fields))
        except OSError as exc:
            raise AgentError(f"agent channel closed while sending {type!r}: {exc.strerror}") from None

    def read_available(self) -> list[Message]:
        """Read what the socket has now (call when select says readable) and return the
        messages completed by it. Raises AgentError on EOF or a protocol violation."""
        try:
            data = self.sock.recv(256 * 1024)
        except OSError as exc:
            raise AgentError(f"agent channel failed: {exc.strerror}") from None
        if not data:
            raise AgentError("the agent closed the channel unexpectedly")
        try:
            messages = self._reader.feed(data)
        except ProtocolError as exc:
            raise AgentError(f"the agent broke the protocol: {exc}") from None
        for reason in self._reader.take_dropped():
            self._reject(reason)
        self.rejected_count += self._reader.dropped_count - self._dropped_seen
        self._dropped_seen = self._reader.dropped_count
        return [msg for msg in messages if self._acceptable(msg)]

    def _acceptable(self, msg: Message) -> bool:
        try:
            protocol.check_from_guest(msg)
            return True
        except ProtocolError as exc:
            self.rejected_count += 1
            self._reject(str(exc))
            return False

    def _reject(self, reason: str) -> None:
        if len(self.rejected) < MAX_REJECTED_KEPT:
            self.rejected.append(protocol.printable(reason, 200))

    def recv(self, timeout: float | None = None, alive=None) -> Message:
        """Return the next message, waiting at most *timeout* seconds (None: forever).

        *alive*, if given, is called about every 0.2 s while waiting; when it returns a
        string, AgentError is raised with that text (e.g. "the VM stopped before …").
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            wait = 0.2 if alive else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentError(f"the agent did not answer within {timeout:.0f} s")
                wait = min(wait, left) if wait else left
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                self._inbox.extend(self.read_available())
            elif alive is not None:
                problem = alive()
                if problem:
                    raise AgentError(problem)
        return self._inbox.pop(0)

    def take_pending(self) -> list[Message]:
        """Messages already decoded but not yet returned by recv (for a select loop)."""
        out, self._inbox = self._inbox, []
        return out

    def handshake(self, timeout: float, alive=None) -> Message:
        """Wait for the agent's ``hello`` and check the protocol version."""
        msg = self.recv(timeout, alive)
        if msg.type != protocol.HELLO:
            raise AgentError(f"the agent spoke {msg.type!r} before hello")
        version = msg.get("protocol", int, 0)
        if version != protocol.PROTOCOL_VERSION:
            raise AgentError(
                f"the guest agent speaks protocol {version}, this vmshim speaks "
                f"{protocol.PROTOCOL_VERSION}; rebuild the guest image with `vmshim guest build`")
        self.hello = msg
        return msg

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def wait_readable(fds: list, timeout: float | None) -> list:
    """select() on *fds*, retrying on EINTR (signals arrive through a wakeup fd)."""
    while True:
        try:
            return select.select(fds, [], [], timeout)[0]
        except InterruptedError:
            continue


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)
