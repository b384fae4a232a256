"""The guest's end of the DNS relay: nameserver addresses the container's resolv.conf
names but that only exist in its network namespace on the host (docker's embedded
resolver at 127.0.0.11). Stdlib only.

The agent binds a UDP socket on port 53 of each relayed address (loopback addresses:
they are local in the VM too) and passes each query to the host as a ``dnsq`` frame
(guest.protocol); the host asks the real resolver in the container's namespace and sends
the answer back as ``dnsa``, which goes out from the same socket to the asker. Bounded:
at most MAX_PENDING queries wait for an answer (the oldest is forgotten), and a query
waits at most ANSWER_TIMEOUT seconds.
"""

from __future__ import annotations

import collections
import socket
import time

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from typing import Any

DNS_PORT = 53
MAX_PENDING = 64
ANSWER_TIMEOUT = 10.0
MAX_QUERY = 4096


class DnsRelay:
    """UDP listeners on *addresses* port 53 (see the module doc)."""

    def __init__(self, addresses: list[str]):
        self.sockets: dict[int, tuple[socket.socket, str]] = {}
        # id -> (socket fd, asker's address as recvfrom gave it, when asked)
        self._pending: collections.OrderedDict[int, tuple[int, Any, float]] = collections.OrderedDict()
        self._next = 1
        for address in addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((address, DNS_PORT))
            except OSError:
                sock.close()
                self.close()
                raise
            self.sockets[sock.fileno()] = (sock, address)

    def fds(self) -> list[int]:
        return list(self.sockets)

    def receive(self, fd: int) -> list[tuple[int, str, bytes]]:
        """Read the queries waiting on socket *fd*: ``(id, server, payload)`` each."""
        sock, server = self.sockets[fd]
        out = []
        for _ in range(32):
            try:
                data, addr = sock.recvfrom(MAX_QUERY + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not 12 <= len(data) <= MAX_QUERY:
                continue
            qid = self._next
            self._next = self._next + 1 if self._next < (1 << 31) - 1 else 1
            self._pending[qid] = (fd, addr, time.monotonic())
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
            out.append((qid, server, data))
        return out

    def answer(self, qid: int, payload: bytes) -> None:
        """Send the host's answer to query *qid* back to whoever asked (unknown: ignored)."""
        entry = self._pending.pop(qid, None)
        if entry is None or entry[0] not in self.sockets:
            return
        try:
            self.sockets[entry[0]][0].sendto(payload, entry[1])
        except OSError:
            pass

    def expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            qid, (_fd, _addr, at) = next(iter(self._pending.items()))
            if now - at < ANSWER_TIMEOUT:
                break
            del self._pending[qid]

    def close(self) -> None:
        for sock, _ in self.sockets.values():
            sock.close()
        self.sockets = {}
