"""The host end of the agent channel: connect, handshake, send, receive.

The same client talks to an agent in a VM (over the virtio-serial unix socket libvirt
exposes) and to the agent run on the host for process isolation (over a socketpair).
Everything the agent sends is untrusted: frames are bounded by guest.protocol, and every
message is checked with :func:`guest.protocol.check_from_guest`; one that fails (or a
frame whose header is bad) is dropped, its reason kept in :attr:`AgentClient.rejected`
for the owner to log. Only a frame that breaks the framing itself ends the channel.
"""

from __future__ import annotations

import os
import select
import socket

from guest import protocol
from guest.protocol import Message, ProtocolError
from shim.errors import AgentError
from shim.vm.channel import FramedChannel


MAX_REJECTED_KEPT = 16


class AgentClient(FramedChannel):
    """A connected, framed channel to one agent. Not thread-safe."""

    error = AgentError

    def __init__(self, sock: socket.socket):
        super().__init__(sock, protocol.FrameReader(lenient=True))
        self.hello: Message | None = None
        self.rejected: list[str] = []
        """Why messages were dropped (at most MAX_REJECTED_KEPT; the owner may clear it)."""
        self.rejected_count = 0
        self._dropped_seen = 0

    @classmethod
    def _failure(cls, what: str, reason: str = "", subject: str = "") -> AgentError:
        return AgentError(
            {
                "connect": f"cannot connect to the agent channel {subject}: {reason}",
                "send": f"agent channel closed while sending {subject!r}: {reason}",
                "read": f"agent channel failed: {reason}",
                "eof": "the agent closed the channel unexpectedly",
                "protocol": f"the agent broke the protocol: {reason}",
                "timeout": f"the agent did not answer within {subject} s",
            }[what]
        )

    def _keep(self, messages: list[Message]) -> list[Message]:
        """Count and drop what the lenient reader skipped and what fails the checks of
        guest.protocol.check_from_guest."""
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

    def handshake(self, timeout: float, alive=None) -> Message:
        """Wait for the agent's ``hello`` and check the protocol version."""
        msg = self.recv(timeout, alive)
        if msg.type != protocol.HELLO:
            raise AgentError(f"the agent spoke {msg.type!r} before hello")
        version = msg.get("protocol", int, 0)
        if version != protocol.PROTOCOL_VERSION:
            raise AgentError(
                f"the guest agent speaks protocol {version}, this vmshim speaks "
                f"{protocol.PROTOCOL_VERSION}; rebuild the guest image with `vmshim guest build`"
            )
        self.hello = msg
        return msg


def wait_readable(fds: list, timeout: float | None) -> list:
    """select() on *fds*, retrying on EINTR (signals arrive through a wakeup fd)."""
    while True:
        try:
            return select.select(fds, [], [], timeout)[0]
        except InterruptedError:
            continue


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)
