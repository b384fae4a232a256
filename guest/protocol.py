"""The wire contract between the host (shim) and the guest agent. Stdlib only.

One channel (a virtio-serial port, or vsock) carries every message. A frame is::

    u32 header_len | u32 payload_len | header (UTF-8 JSON object) | payload (bytes)

The header always has ``"t"`` (the message type); most messages name the process they are
about with ``"id"`` (a small int chosen by the host). Payloads carry stdio bytes and file
data, never structured data.

Conversation (``h`` = host, ``g`` = guest)::

    g: hello   {protocol, agent, uptime}          first frame the agent writes
    h: start   {token, id, process, stdin, tty, rows, cols[, hold]}   run the container's
                                                  process; hold: keep serving after it
                                                  exits, until ``shutdown`` (for ``diff``)
    h: exec    {token, id, process, stdin, tty, rows, cols[, member]}   run another process
                                                  in it; member: the container id of a
                                                  running pod member (see ``member``):
                                                  the process joins that member's
                                                  namespaces and cgroup instead
    h: member  {token, id, config, stdin, tty, rows, cols}   run a pod member beside the
                                                  container (same replies and streams as
                                                  exec): config is the member's
                                                  guest.spec.BootConfig.to_dict(); its
                                                  ``rootfs_share`` names a virtiofs share the
                                                  host plugged in for it (MEMBER_TAG_PREFIX);
                                                  the agent mounts it, makes the member's
                                                  cgroup and new mount/pid/uts/ipc/cgroup
                                                  namespaces, and shares the VM's network
                                                  with the container; when the process ends
                                                  its cgroup goes and the share is unmounted
    h: freeze  {token, id, member, frozen}       freeze (or thaw) a running pod member's
                                                  cgroup (cgroup.freeze); *member* is its
                                                  container id, *id* a request id:
                                                  updated {id} | error {id, message}
    g: started {id, pid} | error {id, message, code}   code (optional): 127 not found,
                                      126 not executable, 125 other setup failure
    h: stdin {id} + bytes · stdin_close {id} · resize {id, rows, cols} · signal {id, signal}
    g: stdout {id} + bytes · stderr {id} + bytes
    g: exit    {id, code, signal[, oom_killed]}   code is 128+N when killed by signal N;
                                                  oom_killed (main process only): the
                                                  container's cgroup saw an OOM kill
    h: builtin {token, id, name, args, stdin}     run one of the agent's own helpers in the
                                                  running container, like exec (same replies
                                                  and streams): ``ps`` (process table on
                                                  stdout), ``tar-out PATH`` (a tar of PATH on
                                                  stdout), ``tar-in DEST`` (extract the tar
                                                  read from stdin at DEST)
    h: update  {token, id, limits}                change the running container's cgroup
                                                  limits (guest.spec.Limits.to_dict(); unset
                                                  fields stay); *id* is a request id the host
                                                  picks (no process's): updated {id} |
                                                  error {id, message}
    h: stats   {token, id}                        g: stats {id, usage}: the container
                                                  cgroup's figures now (see
                                                  guest.runtime.container.Container.stats)
                                                  | error {id, message}
    h: diff    {token, id}                        after the main process exited (start it
                                                  with ``hold: true`` so the agent waits
                                                  for ``shutdown`` instead of ending):
                                                  the container's changes as an OCI layer
                                                  tar (guest.runtime.diff), with the
                                                  replies and streams of ``builtin``: the
                                                  host checks it like a registry layer
    h: netconf {token, id, interfaces[, resolv_conf]}   bring up NICs plugged into the
                                                  running VM (``network connect``): each
                                                  entry as in BootConfig.network (found by
                                                  MAC, waiting for it to appear; no
                                                  gateway); resolv_conf: the container's
                                                  new /etc/resolv.conf (its first network
                                                  with a resolver): updated {id} |
                                                  error {id, message}
    g: dnsq    {id, server} + query               a DNS query (UDP payload, at most
                                                  MAX_DNS_QUERY bytes) a container process
                                                  sent to a relayed nameserver address
                                                  (BootConfig.network ``dns_relay``); the
                                                  host asks that nameserver in the
                                                  container's network namespace (only the
                                                  addresses it configured, rate-bounded)
    h: dnsa    {id} + answer                      its answer (at most MAX_DNS_ANSWER bytes);
                                                  none when the host dropped the query
    h: identity {token, id, new_token, hostname, process, hosts, resolv_conf} + entropy
                                                  before ``start``, in a VM restored from
                                                  a snapshot template: become this
                                                  container (new token, hostname, process,
                                                  /etc files) and mix the payload (32-512
                                                  host random bytes) into the kernel's RNG
                                                  and reseed it: updated {id} | error {id}
    h: prefork {token, id}                     before ``start``, in a snapshot template's
                                                  VM about to be saved: make the container's
                                                  process up to its execve (cgroup,
                                                  namespaces, mounts, root) and hold it for
                                                  the ``start`` of a restored copy:
                                                  updated {id} | error {id, message}
    h: spec    {config, entropy}                  a pooled VM (booted with ``vmshim.pool``,
                                                  no config drive) becomes one container:
                                                  config is a guest.spec.BootConfig.to_dict(),
                                                  entropy fresh host randomness (hex, at most
                                                  MAX_ENTROPY_HEX) mixed into the guest's RNG
                                                  before anything of the container runs. No
                                                  reply: ``start`` follows and is answered
                                                  once the container is assembled; a second
                                                  ``spec`` gets ``error``
    h: shutdown {}                                the agent powers the VM off
    g: error {message} (no id)                    a frame the agent could not use, or a
                                                  boot failure (then the VM powers off)

The agent says ``hello`` again whenever a host (re)connects to the port.

Compatibility: fields and message types are only ever added. An agent that does not
know a message type answers ``error`` (so a host can tell an older guest image); a host
ignores fields it does not know. The host side (``shim``) also frames its own
CLI-to-monitor messages with :func:`encode_frame` and a :class:`FrameReader` that knows
its extra types; those never cross into the guest.

Everything read from the other side is untrusted: sizes are bounded (MAX_HEADER,
MAX_PAYLOAD, JSON nesting MAX_DEPTH), fields are checked with :meth:`Message.get`, nothing
is unpickled. The host checks every message from the guest against :data:`FROM_GUEST`
(:func:`check_from_guest`: type allowed in that direction, field types, ranges, stream ids
in ``0..MAX_ID``) and drops, with a logged line, whatever breaks it; a
``FrameReader(lenient=True)`` skips a frame whose header is bad (framing intact) instead
of giving up on the channel. These are checks on what is sent already, so the protocol
version did not change.
"""

from __future__ import annotations

import json
import struct

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from typing import Any


PROTOCOL_VERSION = 1
"""Bumped on any incompatible change. The agent announces it in ``hello``."""

MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 1024 * 1024
CHUNK = 64 * 1024
"""Size of the stdio chunks both sides send; well under MAX_PAYLOAD."""
MAX_DEPTH = 32
"""Deepest JSON nesting a header may have (the real ones nest 4 deep); deeper is refused
before parsing, so a hostile peer cannot make the parser recurse."""
MAX_ID = (1 << 31) - 1
"""Process and request ids are in 0..MAX_ID."""
MAX_DROPPED_KEPT = 16
"""A lenient FrameReader keeps the reasons of at most this many skipped frames."""

_PREFIX = struct.Struct(">II")

# Message types, named once so typos fail loudly.
HELLO = "hello"
START = "start"
EXEC = "exec"
STARTED = "started"
ERROR = "error"
STDIN = "stdin"
STDIN_CLOSE = "stdin_close"
STDOUT = "stdout"
STDERR = "stderr"
RESIZE = "resize"
SIGNAL = "signal"
EXIT = "exit"
SHUTDOWN = "shutdown"
LOG = "log"
BUILTIN = "builtin"
UPDATE = "update"
UPDATED = "updated"
STATS = "stats"
DIFF = "diff"
NETCONF = "netconf"
DNS_QUERY = "dnsq"
DNS_ANSWER = "dnsa"
MAX_DNS_QUERY = 4096
MAX_DNS_ANSWER = 65535
IDENTITY = "identity"
SPEC = "spec"
MEMBER = "member"
FREEZE = "freeze"
PREFORK = "prefork"
MEMBER_TAG_PREFIX = "vmshim-m"
"""The virtiofs tag of a pod member's rootfs share starts with this (then 1-16 hex)."""
MAX_ENTROPY_HEX = 512
"""Most hex digits of ``spec``'s entropy (256 bytes)."""

MESSAGE_TYPES = frozenset(
    {
        HELLO,
        START,
        EXEC,
        STARTED,
        ERROR,
        STDIN,
        STDIN_CLOSE,
        STDOUT,
        STDERR,
        RESIZE,
        SIGNAL,
        EXIT,
        SHUTDOWN,
        LOG,
        BUILTIN,
        UPDATE,
        UPDATED,
        STATS,
        DIFF,
        NETCONF,
        DNS_QUERY,
        DNS_ANSWER,
        IDENTITY,
        SPEC,
        MEMBER,
        FREEZE,
        PREFORK,
    }
)
BUILTINS = ("ps", "tar-out", "tar-in", "sync")
"""Names a ``builtin`` message may ask for."""


class ProtocolError(Exception):
    """The peer sent something that breaks the contract; the channel cannot be trusted."""


class Message:
    """One decoded frame: its type, its header fields and its payload."""

    __slots__ = ("type", "fields", "payload")

    def __init__(self, type: str, fields: dict[str, Any], payload: bytes = b""):
        self.type = type
        self.fields = fields
        self.payload = payload

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """Return header field *name*, checked to be of *kind*.

        Raises ProtocolError when it is missing (and no default was given) or has the
        wrong type. ``bool`` is never accepted where ``int`` is asked for.
        """
        if name not in self.fields:
            if default is ...:
                raise ProtocolError(f"{self.type!r} message lacks field {name!r}")
            return default
        value = self.fields[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ProtocolError(f"{self.type!r} field {name!r} has the wrong type")
        if not isinstance(value, kinds):
            raise ProtocolError(f"{self.type!r} field {name!r} has the wrong type")
        return value

    def __repr__(self) -> str:
        return f"Message({self.type!r}, {self.fields!r}, <{len(self.payload)} bytes>)"


def encode(type: str, payload: bytes = b"", **fields: Any) -> bytes:
    """Return the frame for one message. Raises ValueError for an unknown type or a
    payload over MAX_PAYLOAD (split stdio into CHUNK-sized pieces first)."""
    return encode_frame(type, payload, fields, MESSAGE_TYPES)


def encode_frame(type: str, payload: bytes, fields: dict[str, Any], known: frozenset[str]) -> bytes:
    """:func:`encode` for a channel whose message types are *known*."""
    if type not in known:
        raise ValueError(f"unknown message type {type!r}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    header = dict(fields)
    header["t"] = type
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise ValueError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    return _PREFIX.pack(len(raw), len(payload)) + raw + payload


class FrameReader:
    """Incremental decoder: feed it bytes as they arrive, take whole messages out.

    *lenient*: a whole frame whose header is bad (not JSON, too deep, unknown type) is
    skipped and its reason kept for :meth:`take_dropped`, instead of raising; a frame
    whose sizes break the limits still raises (the stream cannot be resynchronised).
    """

    def __init__(self, known: frozenset[str] = MESSAGE_TYPES, lenient: bool = False):
        self._buf = bytearray()
        self._known = known
        self._lenient = lenient
        self._dropped: list[str] = []
        self.dropped_count = 0

    def feed(self, data: bytes) -> list[Message]:
        """Add *data*; return every message now complete. Raises ProtocolError on a
        frame that is oversized or not a JSON object with a known ``t``."""
        self._buf += data
        out = []
        while len(self._buf) >= _PREFIX.size:
            hlen, plen = _PREFIX.unpack_from(self._buf)
            if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
                raise ProtocolError(f"frame too large (header {hlen}, payload {plen})")
            end = _PREFIX.size + hlen + plen
            if len(self._buf) < end:
                break
            raw = bytes(self._buf[_PREFIX.size : _PREFIX.size + hlen])
            payload = bytes(self._buf[_PREFIX.size + hlen : end])
            del self._buf[:end]
            try:
                out.append(_decode_header(raw, payload, self._known))
            except ProtocolError as exc:
                if not self._lenient:
                    raise
                self.dropped_count += 1
                if len(self._dropped) < MAX_DROPPED_KEPT:
                    self._dropped.append(str(exc))
        return out

    def take_dropped(self) -> list[str]:
        """Reasons for the frames skipped since the last call (lenient mode; at most
        MAX_DROPPED_KEPT of them, ``dropped_count`` counts all)."""
        out, self._dropped = self._dropped, []
        return out

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)


def json_depth_exceeds(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when the JSON text *raw* nests arrays/objects deeper than *limit* (brackets
    inside strings do not count). Linear, no recursion."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _decode_header(raw: bytes, payload: bytes, known: frozenset[str] = MESSAGE_TYPES) -> Message:
    if json_depth_exceeds(raw):
        raise ProtocolError(f"frame header nests deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}"[:200]) from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    kind = header.pop("t", None)
    if not isinstance(kind, str) or kind not in known:
        raise ProtocolError(f"unknown message type {printable(repr(kind), 60)}")
    return Message(kind, header, payload)


# ---- what the host accepts from the guest ---------------------------------------------------


class Field:
    """One header field of a message from the guest: its type, whether it must be there,
    and for ints the allowed range."""

    __slots__ = ("kind", "required", "low", "high")

    def __init__(
        self, kind: type | tuple[type, ...], required: bool = False, low: int | None = None, high: int | None = None
    ):
        self.kind = kind
        self.required = required
        self.low = low
        self.high = high


_ID = Field(int, True, 0, MAX_ID)
_STREAM = {"id": _ID}
FROM_GUEST: dict[str, dict[str, Field]] = {
    HELLO: {"protocol": Field(int, True, 0, MAX_ID), "agent": Field(str), "uptime": Field((int, float))},
    STARTED: {"id": _ID, "pid": Field(int, False, 0, MAX_ID)},
    ERROR: {"id": Field(int, False, 0, MAX_ID), "message": Field(str), "code": Field(int, False, 0, 255)},
    STDOUT: _STREAM,
    STDERR: _STREAM,
    EXIT: {"id": _ID, "code": Field(int, True, 0, 255), "signal": Field(int, False, 0, 255), "oom_killed": Field(bool)},
    UPDATED: {"id": _ID},
    STATS: {"id": _ID, "usage": Field(dict, True)},
    LOG: {"message": Field(str)},
    DNS_QUERY: {"id": _ID, "server": Field(str, True)},
}
"""The messages a guest may send, and their fields (others are ignored, as the
compatibility rule says). Anything else from the guest breaks the protocol."""


def check_from_guest(msg: Message) -> Message:
    """Return *msg* when it is a message the guest may send with well-typed, in-range
    fields (see FROM_GUEST); raise ProtocolError naming what is wrong otherwise."""
    fields = FROM_GUEST.get(msg.type)
    if fields is None:
        raise ProtocolError(f"the guest may not send {msg.type!r} messages")
    for name, field in fields.items():
        value = msg.get(name, field.kind, None if not field.required else ...)
        if value is None or isinstance(value, bool) or not isinstance(value, int):
            continue
        if (field.low is not None and value < field.low) or (field.high is not None and value > field.high):
            raise ProtocolError(f"{msg.type!r} field {name!r} is out of range")
    if msg.type == DNS_QUERY and not 12 <= len(msg.payload) <= MAX_DNS_QUERY:
        raise ProtocolError(f"a DNS query must be 12..{MAX_DNS_QUERY} bytes")
    return msg


def printable(text: str, limit: int = 500) -> str:
    """*text* from the other side made safe to show on a terminal or in a log line:
    control characters escaped, at most *limit* characters."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return out + ("…" if len(text) > limit else "")


def exit_code_from_status(status: int) -> int:
    """Translate an ``os.waitpid`` status into a shell-style exit code (128+N on signal N)."""
    import os

    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255
