"""The agent's request loop: one channel to the host, the container's processes, one thread.

The same loop serves the guest (over the virtio-serial port, see :func:`open_port`) and
tests or the host (over a socketpair), because everything it touches comes in through
its constructor: the channel fd, the :class:`~guest.spec.BootConfig` and a *runtime* that
starts processes (a :class:`guest.runtime.container.Container`, or a fake in tests).

Every handler has the same shape: validate the message → look up what it names → act →
reply. A bad message gets an ``error`` reply and never ends the loop.

Flow control: output is read from a process only while less than OUT_HIGH bytes wait to
be written to the channel, so a fast writer is slowed to the host's pace instead of
filling the guest's memory; the channel stops being read while more than STDIN_HIGH
bytes of some process's stdin are pending. ``exit`` is sent only after the process's
output has reached end of file (all of it was sent before).

Stdlib only; imports nothing from ``shim``.
"""

from __future__ import annotations

import collections
import copy
import errno
import itertools
import os
import select
import selectors
import signal
import time
from _operator import _compare_digest as compare_digest  # hmac's, without hashlib

from guest import protocol
from guest.protocol import Message, ProtocolError
from guest.spec import AGENT_PORT_NAME, BootConfig, ProcessSpec

TYPE_CHECKING = False  # for the type checker only: importing typing costs boot time
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any, Protocol

    from guest.runtime.container import Container
    from guest.runtime.dnsrelay import DnsRelay
    from guest.runtime.member import Member
    from guest.runtime.process import Spawned

    class Runtime(Protocol):
        """What :class:`Agent` needs of its *runtime* (the rest it looks up with getattr)."""

        def start(self, process: ProcessSpec, *, stdin: bool, rows: int, cols: int) -> Spawned: ...

        def exec(self, process: ProcessSpec, *, stdin: bool, rows: int, cols: int) -> Spawned: ...


AGENT_VERSION = "vmshim-agent/0.1"
OUT_HIGH = 8 * protocol.CHUNK
"""Stop reading process output while this many bytes wait for the channel."""
STDIN_HIGH = 4 * 1024 * 1024
"""Stop reading the channel while a process has this much unwritten stdin."""
OUTPUT_GRACE = 1.0
"""After a process exited, its output fds are given up once they were silent this long
(a background child may hold them open forever)."""
RECONNECT_POLL = 0.05
"""While the host is away (reads return EOF), look again this often…"""
RECONNECT_POLL_SIGIO = 1.0
"""…or this seldom, when the port says itself that a host connected (SIGIO, see
Agent._arm_sigio): a pooled VM or a restored template then answers its host at once
instead of at the next 50 ms poll, and idles without waking 20 times a second."""
ORPHAN_SWEEP = 1.0
"""With reap_orphans, collect re-parented zombies at least this often."""
MAX_DEFERRED = 64
"""Requests kept while a pooled VM waits for its ``spec`` (the host sends ``start`` right
behind it); more are refused."""
EOT = b"\x04"
"""What a tty's stdin_close sends: ^D, end of input for a terminal in canonical mode."""


class Reject(Exception):
    """A request the agent refuses; becomes an ``error`` reply (with ``code`` if given)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


MAX_CONSOLE_REOPENS = 16
"""Hang-ups of an OS init's console in a row (no output between) before it is ended."""


class _Proc:
    """One process the host started, with the agent's ends of its stdio.

    (Plain classes rather than dataclasses in the guest: importing dataclasses pulls in
    inspect, which costs a noticeable part of the boot under TCG.)
    """

    def __init__(self, id: int, spawned: Spawned, main: bool, last_output: float = 0.0) -> None:
        self.id = id
        self.spawned = spawned  # a guest.runtime.process.Spawned (or a test's look-alike)
        self.main = main
        self.pidfd: int | None = None
        self.exit_code: int | None = None
        self.exit_signal = 0
        self.outputs: dict[int, str] = {}  # fd -> STDOUT | STDERR
        self.stdin_fd: int | None = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False  # the host sent stdin_close
        self.last_output = last_output
        self.exit_sent = False
        self.console_reopens = 0  # an OS init's console hung up without output in between
        self.member: Member | None = None  # a pod member's guest.runtime.member.Member, torn down with it

    @property
    def pid(self) -> int:
        return self.spawned.pid

    @property
    def tty(self) -> bool:
        return bool(self.spawned.tty)


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


class Agent:
    """Serve one host over *channel_fd* (set non-blocking here) until the main process
    has exited and its exit was reported, or the host sends ``shutdown``.

    *config* and *runtime* may be None at first and given later with :meth:`attach`, so
    the guest can say ``hello`` (:meth:`greet`) before it has mounted the container: the
    host's ``start`` then waits in the channel while the rootfs is assembled.

    *runtime* needs ``start(process, *, stdin, rows, cols)`` and ``exec(…)`` returning a
    Spawned, raising ``SpawnError`` (with ``exit_code``) or any exception on failure.

    *reconnect*: end of file on the channel means "host away" (virtio-serial): keep
    running and look again; otherwise it ends the loop. *listener*: a listening unix
    socket (the host agent of ``--isolation process``): *channel_fd* may be -1 (no host
    yet); a host that goes away is replaced by the next connection accepted on it, so a
    new monitor can re-attach like it does to a VM's virtio-serial port. *reap_orphans*: also collect
    processes re-parented to us (PID 1); otherwise only the pids we started are waited
    for, so other children of the calling process are left alone.
    """

    def __init__(
        self,
        channel_fd: int,
        config: BootConfig | None,
        runtime: Runtime | None,
        *,
        reconnect: bool = False,
        listener: socket.socket | None = None,
        reap_orphans: bool = False,
        exit_grace: float = 1.0,
        orphan_exit_timeout: float = 30.0,
        log: Callable[[str], None] | None = None,
        trace: Callable[[str], None] | None = None,
        uptime: Callable[[], float] = _uptime,
    ) -> None:
        self.fd = channel_fd
        self.config = config
        self.runtime = runtime
        self.reconnect = reconnect or listener is not None
        self.listener = listener
        self._conn: socket.socket | None = None  # the accepted socket object, with a listener
        self.reap_orphans = reap_orphans
        self.exit_grace = exit_grace
        self.orphan_exit_timeout = orphan_exit_timeout
        self.log = log or (lambda text: None)
        """Problems worth the operator's attention."""
        self.trace = trace or (lambda text: None)
        """Progress and timings, for debugging (the guest prints them with vmshim.debug)."""
        self.uptime = uptime

        self._sel = selectors.DefaultSelector()
        self._registered: dict[int, int] = {}  # fd -> event mask currently in the selector
        self._reader = protocol.FrameReader()
        self._out: collections.deque[bytes] = collections.deque()  # whole frames, first may be partly sent
        self._out_offset = 0
        self._out_bytes = 0
        self._away = False
        self._retry_at = 0.0
        self._need_hello = True
        self._waiting_logged = False
        self._procs: dict[int, _Proc] = {}  # by host-chosen id
        self._by_pid: dict[int, _Proc] = {}
        self._main: _Proc | None = None
        self.main_exit_code: int | None = None
        self._main_done_at: float | None = None  # when its exit was queued
        self._exit_frame: bytes | None = None  # the frame reporting the main exit…
        self._exit_written_at: float | None = None  # …and when it left the buffer
        self._shutdown = False
        self._shutdown_deadline = 0.0
        self._hold = False  # start's ``hold``: after the main exit, wait for shutdown
        self._stopped = False
        self._greeted = False
        self._last_sweep = 0.0
        self._dns: DnsRelay | None = None  # guest.runtime.dnsrelay.DnsRelay, when the config asks for one
        self._spec: tuple[BootConfig, bytes] | None = None  # a pooled VM's, once given
        self._deferred: list[Message] = []  # requests that came before the container
        self._sigio_r = -1  # read end of the SIGIO wake-up pipe (-1: poll the port instead)
        self._sigio_armed = False

        if self.fd >= 0:
            os.set_blocking(self.fd, False)
            if self.reconnect and self.listener is None:
                self._setup_sigio()
        self._handlers = {
            protocol.START: self._handle_start,
            protocol.EXEC: self._handle_exec,
            protocol.STDIN: self._handle_stdin,
            protocol.STDIN_CLOSE: self._handle_stdin_close,
            protocol.RESIZE: self._handle_resize,
            protocol.SIGNAL: self._handle_signal,
            protocol.SHUTDOWN: self._handle_shutdown,
            protocol.BUILTIN: self._handle_builtin,
            protocol.UPDATE: self._handle_update,
            protocol.STATS: self._handle_stats,
            protocol.DIFF: self._handle_diff,
            protocol.NETCONF: self._handle_netconf,
            protocol.DNS_ANSWER: self._handle_dns_answer,
            protocol.IDENTITY: self._handle_identity,
            protocol.SPEC: self._handle_spec,
            protocol.MEMBER: self._handle_member,
            protocol.FREEZE: self._handle_freeze,
            protocol.PREFORK: self._handle_prefork,
        }

    # ---- the loop ---------------------------------------------------------------------------

    def greet(self) -> None:
        """Send ``hello`` now if the host is there (else as soon as it connects)."""
        self._probe_channel()
        self._greeted = True

    def attach(self, config: BootConfig, runtime: Runtime) -> None:
        """Provide what :meth:`run` needs, if the constructor did not have it yet."""
        self.config = config
        self.runtime = runtime

    def run(self) -> int | None:
        """Serve until done; return the main process's exit code (None if never started).
        Precondition: config and runtime are set."""
        if self.config is None or self.runtime is None:
            raise ValueError("Agent.run needs a config and a runtime (see attach)")
        if not self._greeted:
            self.greet()
        self._start_dns_relay()
        deferred, self._deferred = self._deferred, []
        for message in deferred:
            self._dispatch(message)
        while not self._stopped:
            self._sync_selector()
            for key, mask in self._sel.select(self._timeout()):
                key.data(mask)
            self._reap()
            self._tick()
        self._final_flush()
        return self.main_exit_code

    def wait_for_spec(self) -> tuple[BootConfig, bytes] | None:
        """A pooled VM: serve the channel (hello to each host that connects) until a host
        sends ``spec``; return its (BootConfig, entropy). None when the loop was told to
        stop first (``shutdown``). Requests other than ``spec`` that arrive meanwhile are
        kept for :meth:`run`. Precondition: no config yet."""
        if not self._greeted:
            self.greet()
        while self._spec is None and not self._stopped:
            self._sync_selector()
            for key, mask in self._sel.select(self._timeout()):
                key.data(mask)
            self._reap()
            self._tick()
        if self._shutdown:
            return None
        return self._spec

    @property
    def hello_sent(self) -> bool:
        """Whether the current host connection has been greeted."""
        return not self._need_hello

    def stop(self) -> None:
        self._stopped = True

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process still running (for callers tearing the container down)."""
        for proc in list(self._procs.values()):
            if proc.exit_code is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        """Release every fd the agent holds except the channel (the caller's)."""
        for proc in list(self._procs.values()):
            self._forget(proc)
        for fd in list(self._registered):
            self._sel.unregister(fd)
        self._registered.clear()
        self._sel.close()
        if self._dns is not None:
            self._dns.close()
            self._dns = None

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        if self._away:
            deadlines.append(self._retry_at)
        if self.reap_orphans:
            deadlines.append(self._last_sweep + ORPHAN_SWEEP)
        for proc in self._procs.values():
            if proc.exit_code is None and proc.pidfd is None:
                deadlines.append(now + 0.05)  # no pidfd: poll for its exit
            elif proc.exit_code is not None and proc.outputs:
                deadlines.append(proc.last_output + OUTPUT_GRACE)
        if self._main_done_at is not None and not self._hold:
            deadlines.append(now + 0.1)
        if self._shutdown:
            deadlines.append(now + 0.05)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _sync_selector(self) -> None:
        """Make the selector watch exactly what is wanted now (flow control lives here)."""
        wanted: dict[int, tuple[int, Callable[[int], None]]] = {}

        def want(fd: int, mask: int, handler: Callable[[int], None]) -> None:
            old_mask = wanted[fd][0] if fd in wanted else 0
            wanted[fd] = (old_mask | mask, handler)

        if not self._away and not self._stopped:
            stdin_backlog = any(len(p.stdin_buf) > STDIN_HIGH for p in self._procs.values())
            mask = 0 if stdin_backlog else selectors.EVENT_READ
            if self._out:
                mask |= selectors.EVENT_WRITE
            if mask:
                want(self.fd, mask, self._on_channel)
        elif self._away and self._sigio_armed and not self._stopped:
            want(self._sigio_r, selectors.EVENT_READ, self._on_sigio)
        elif self._away and self.listener is not None and not self._stopped:
            want(self.listener.fileno(), selectors.EVENT_READ, self._on_listener)
        out_ok = self._out_bytes < OUT_HIGH
        for proc in self._procs.values():
            handler = self._proc_handler(proc)
            if out_ok:
                for fd in proc.outputs:
                    want(fd, selectors.EVENT_READ, handler)
            if proc.stdin_fd is not None and proc.stdin_buf:
                want(proc.stdin_fd, selectors.EVENT_WRITE, handler)
            if proc.pidfd is not None:
                want(proc.pidfd, selectors.EVENT_READ, self._on_pidfd)
        if self._dns is not None and out_ok and not self._away:
            for fd in self._dns.fds():
                want(fd, selectors.EVENT_READ, self._dns_handler(fd))
        for fd in list(self._registered):
            if fd not in wanted:
                self._sel.unregister(fd)
                del self._registered[fd]
        for fd, (mask, handler) in wanted.items():
            if fd not in self._registered:
                self._sel.register(fd, mask, handler)
            elif self._registered[fd] != mask:
                self._sel.modify(fd, mask, handler)
            self._registered[fd] = mask

    def _proc_handler(self, proc: _Proc) -> Callable[[int], None]:
        return lambda mask: self._on_proc_ready(proc, mask)

    def _dns_handler(self, fd: int) -> Callable[[int], None]:
        return lambda mask: self._on_dns_query(fd)

    @property
    def _config(self) -> BootConfig:
        """The config, for a handler (they run once it is set: see :meth:`attach`)."""
        if self.config is None:
            raise Reject("the agent has no container config yet")
        return self.config

    @property
    def _runtime(self) -> Runtime:
        """The runtime, for a handler (they run once it is set: see :meth:`attach`)."""
        if self.runtime is None:
            raise Reject("the agent has no container runtime yet")
        return self.runtime

    def _tick(self) -> None:
        """Timers: reconnect, giving up silent outputs, reporting exits, ending the loop."""
        now = time.monotonic()
        if self._away and now >= self._retry_at:
            self._away = False
            self._probe_channel()
        for proc in list(self._procs.values()):
            self._maybe_report_exit(proc, now)
        if self._shutdown:
            reaped = all(p.exit_code is not None for p in self._procs.values())
            if (reaped and (not self._out or self._away)) or now > self._shutdown_deadline:
                self._stopped = True
            return
        if self._main_done_at is not None and not self._hold:
            if self._exit_written_at is not None:
                if now - self._exit_written_at >= self.exit_grace:
                    self._stopped = True
            elif now - self._main_done_at >= self.orphan_exit_timeout:
                self.log("the host did not take the exit message; giving up")
                self._stopped = True

    # ---- the channel ------------------------------------------------------------------------

    def _on_channel(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self._away and not self._stopped:
            self._read_channel()

    def _probe_channel(self) -> None:
        """Read once without waiting: tells whether the host is there (EOF: not yet)."""
        if self.fd < 0 and not self._accept():
            self._host_gone()
            return
        self._read_channel()

    def _on_listener(self, mask: int) -> None:
        self._away = False
        self._probe_channel()

    def _accept(self) -> bool:
        """With a listener: take the next waiting host, if any, as the channel."""
        if self.listener is None:
            return False
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.log(f"accepting a host failed: {exc}")
            return False
        conn.setblocking(False)
        self._conn = conn
        self.fd = conn.fileno()
        return True

    def _setup_sigio(self) -> None:
        """A virtio-serial port (a character device) signals SIGIO to its owner when a
        host connects (VIRTIO_CONSOLE_PORT_OPEN) once O_ASYNC is set: route SIGIO to a
        pipe the selector watches while the host is away. Anything unusual (not a
        character device, not the main thread): keep polling."""
        import fcntl
        import stat

        try:
            if not stat.S_ISCHR(os.fstat(self.fd).st_mode):
                return
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                signal.signal(signal.SIGIO, lambda signum, frame: None)
                signal.set_wakeup_fd(w, warn_on_full_buffer=False)
                fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            except (OSError, ValueError):
                os.close(r)
                os.close(w)
                return
        except OSError:
            return
        self._sigio_r = r

    def _arm_sigio(self, on: bool) -> bool:
        """Ask for SIGIO from the port while the host is away (on) and not while it is
        connected (every chunk of data would signal too). True when it was switched on
        now."""
        if self._sigio_r < 0 or self.fd < 0 or self._sigio_armed == on:
            return False
        import fcntl

        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC))
        except OSError:
            return False
        self._sigio_armed = on
        return on

    def _on_sigio(self, mask: int) -> None:
        try:
            while os.read(self._sigio_r, 256):
                pass
        except BlockingIOError:
            pass
        if self._away:
            self._away = False
            self._probe_channel()

    def _drop_connection(self) -> None:
        """With a listener: close the channel of a host that went away."""
        if self.listener is None or self.fd < 0:
            return
        if self.fd in self._registered:
            self._sel.unregister(self.fd)
            del self._registered[self.fd]
        try:
            if self._conn is not None:
                self._conn.close()
        except OSError:
            pass
        self._conn = None
        self.fd = -1

    def _read_channel(self) -> None:
        try:
            data = os.read(self.fd, 256 * 1024)
        except BlockingIOError:
            data = None  # the host is there, it just has nothing to say
        except OSError as exc:
            self.log(f"reading the channel failed: {exc}")
            data = b""
        if data == b"":
            self._host_gone()
            return
        self._waiting_logged = False
        self._arm_sigio(False)
        if self._need_hello:
            self._need_hello = False
            self._send_hello()
        if not data:
            return
        try:
            messages = self._reader.feed(data)
        except ProtocolError as exc:
            self._reader = protocol.FrameReader()  # what is buffered cannot be trusted
            self._reply_error(None, f"protocol error: {exc}")
            return
        for message in messages:
            self._dispatch(message)

    def _host_gone(self) -> None:
        if not self.reconnect:
            self._stopped = True
            return
        if not self._waiting_logged:
            self.log("the host is not connected; waiting for it")
            self._waiting_logged = True
        self._drop_connection()
        self._away = True
        if self._arm_sigio(True):
            # Armed just now: a host that connected before that sent no signal; look once more.
            self._retry_at = time.monotonic()
        else:
            self._retry_at = time.monotonic() + (RECONNECT_POLL_SIGIO if self._sigio_armed else RECONNECT_POLL)
        # A frame cut in the middle goes again whole, after the next host's hello.
        self._out_bytes += self._out_offset
        self._out_offset = 0
        self._reader = protocol.FrameReader()
        self._need_hello = True

    def _send_hello(self) -> None:
        frame = protocol.encode(
            protocol.HELLO, protocol=protocol.PROTOCOL_VERSION, agent=AGENT_VERSION, uptime=round(self.uptime(), 3)
        )
        # A hello goes first, before anything queued while nobody listened.
        self._out.appendleft(frame)
        self._out_bytes += len(frame)
        self._flush()

    def _send(self, type: str, payload: bytes = b"", **fields: Any) -> bytes:
        frame = protocol.encode(type, payload, **fields)
        self._out.append(frame)
        self._out_bytes += len(frame)
        if not self._away:
            self._flush()
        return frame

    def _flush(self) -> None:
        """Write as much of the queued frames as the channel takes now."""
        while self._out and not self._away:
            views = [memoryview(self._out[0])[self._out_offset :]]
            views.extend(memoryview(f) for f in itertools.islice(self._out, 1, 64))
            try:
                written = os.writev(self.fd, views)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENXIO):
                    self.log(f"writing the channel failed: {exc}")
                self._host_gone()
                return
            self._out_bytes -= written
            while written:
                left = len(self._out[0]) - self._out_offset
                if written >= left:
                    written -= left
                    frame = self._out.popleft()
                    self._out_offset = 0
                    if frame is self._exit_frame:
                        self._exit_written_at = time.monotonic()
                else:
                    self._out_offset += written
                    written = 0

    # ---- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        if self.runtime is None and message.type not in (protocol.SPEC, protocol.SHUTDOWN):
            # A pooled VM between ``spec`` and its container: answered by run().
            if len(self._deferred) < MAX_DEFERRED:
                self._deferred.append(message)
                return
        handler = self._handlers.get(message.type)
        proc_id = message.fields.get("id")
        if not isinstance(proc_id, int) or isinstance(proc_id, bool):
            proc_id = None
        try:
            if handler is None:
                raise Reject(f"the agent does not accept {message.type!r} messages")
            handler(message)
        except Reject as exc:
            self._reply_error(proc_id, str(exc), exc.code)
        except (ProtocolError, ValueError) as exc:
            self._reply_error(proc_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - a handler bug must not end the agent
            import traceback

            self.log("handler failed:\n" + traceback.format_exc())
            self._reply_error(proc_id, f"internal agent error handling {message.type!r}: {exc}")

    def _reply_error(self, proc_id: int | None, message: str, code: int | None = None) -> bytes:
        fields: dict[str, Any] = {"message": message}
        if proc_id is not None:
            fields["id"] = proc_id
        if code is not None:
            fields["code"] = code
        return self._send(protocol.ERROR, **fields)

    def _final_flush(self, timeout: float = 1.0) -> None:
        """Give what is still queued a last chance to reach the host."""
        deadline = time.monotonic() + timeout
        while self._out and not self._away and time.monotonic() < deadline:
            select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
            self._flush()

    def _lookup(self, message: Message) -> _Proc:
        proc_id = message.get("id", int)
        proc = self._procs.get(proc_id)
        if proc is None:
            raise Reject(f"no process with id {proc_id}")
        return proc

    def _check_token(self, message: Message) -> None:
        token = message.get("token", str)
        if not compare_digest(token.encode(), self._config.token.encode()):
            raise Reject("bad token")

    @staticmethod
    def _size(message: Message) -> tuple[int, int]:
        rows = message.get("rows", int, 24)
        cols = message.get("cols", int, 80)
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise Reject(f"bad terminal size {rows}x{cols}")
        return rows, cols

    # ---- handlers: validate → look up → act → reply ----------------------------------------

    def _handle_start(self, message: Message) -> None:
        self._check_token(message)
        proc_id = message.get("id", int)
        stdin = message.get("stdin", bool, False)
        tty = message.get("tty", bool, self._config.process.tty)
        rows, cols = self._size(message)
        hold = message.get("hold", bool, False)
        if self._main is not None or self.main_exit_code is not None:
            raise Reject("the container's process was already started")
        if proc_id in self._procs:
            raise Reject(f"process id {proc_id} is in use")
        process = copy.copy(self._config.process)
        process.tty = tty
        self._hold = hold
        begin = time.monotonic()
        try:
            spawned = self._runtime.start(process, stdin=stdin, rows=rows, cols=cols)
        except Exception as exc:  # noqa: BLE001 - SpawnError, or any runtime failure
            # The container's life ends here: report why, then end like after an exit.
            code = getattr(exc, "exit_code", None)
            self.log(f"starting the container's process failed: {exc}")
            self.main_exit_code = code if code is not None else 125
            self._main_done_at = time.monotonic()
            self._exit_frame = self._reply_error(proc_id, str(exc), code)
            if not any(f is self._exit_frame for f in self._out):
                self._exit_written_at = time.monotonic()
            return
        self._main = self._add(proc_id, spawned, main=True)
        self._send(protocol.STARTED, id=proc_id, pid=spawned.pid)
        if getattr(self._runtime, "took_held", False):
            self.log("start: the process held since the template's save became the container's")
        self.trace(f"started process {proc_id} (pid {spawned.pid}) in {(time.monotonic() - begin) * 1000:.0f} ms")

    def _handle_exec(self, message: Message) -> None:
        self._check_token(message)
        proc_id = message.get("id", int)
        stdin = message.get("stdin", bool, False)
        rows, cols = self._size(message)
        try:
            process = ProcessSpec.from_dict(message.get("process", dict))
        except ValueError as exc:
            raise Reject(str(exc)) from None
        process.tty = message.get("tty", bool, process.tty)
        member_id = message.get("member", str, "")
        if proc_id in self._procs:
            raise Reject(f"process id {proc_id} is in use")
        if self._main is None or self._main.exit_code is not None:
            raise Reject("the container is not running")
        if member_id:
            container = self._member_container(member_id)
            self._start_extra(proc_id, lambda: container.exec(process, stdin=stdin, rows=rows, cols=cols))
            return
        self._start_extra(proc_id, lambda: self._runtime.exec(process, stdin=stdin, rows=rows, cols=cols))

    def _member_container(self, member_id: str) -> Container:
        """The guest Container of the running pod member *member_id* (its container id).
        Raises Reject."""
        if len(member_id) > 64:
            raise Reject("a pod member's id is at most 64 characters")
        for proc in self._procs.values():
            container: Container | None = getattr(proc.member, "container", None)
            if container is not None and proc.exit_code is None:
                if getattr(container.config, "container_id", None) == member_id:
                    return container
        raise Reject(f"no pod member {member_id} runs in this VM")

    def _handle_member(self, message: Message) -> None:
        from guest.spec import BootConfig

        self._check_token(message)
        proc_id = message.get("id", int)
        stdin = message.get("stdin", bool, False)
        rows, cols = self._size(message)
        try:
            config = BootConfig.from_dict(message.get("config", dict))
        except (ValueError, TypeError) as exc:
            raise Reject(f"bad pod member config: {exc}") from None
        config.process.tty = message.get("tty", bool, config.process.tty)
        if proc_id in self._procs:
            raise Reject(f"process id {proc_id} is in use")
        if self._main is None or self._main.exit_code is not None:
            raise Reject("the container is not running")
        start_member = getattr(self.runtime, "start_member", None)
        if start_member is None:
            raise Reject("this runtime cannot run pod members")
        try:
            member = start_member(config, stdin=stdin, rows=rows, cols=cols)
        except Exception as exc:  # noqa: BLE001 - MemberError, SpawnError, any failure
            raise Reject(str(exc), getattr(exc, "exit_code", None)) from None
        proc = self._add(proc_id, member.spawned, main=False)
        proc.member = member
        self._send(protocol.STARTED, id=proc_id, pid=member.spawned.pid)

    def _handle_builtin(self, message: Message) -> None:
        self._check_token(message)
        proc_id = message.get("id", int)
        stdin = message.get("stdin", bool, False)
        name = message.get("name", str)
        args = message.get("args", list, [])
        if name not in protocol.BUILTINS:
            raise Reject(f"unknown builtin {name!r}")
        if not all(isinstance(a, str) for a in args) or len(args) > 16:
            raise Reject("builtin args must be a short list of strings")
        if proc_id in self._procs:
            raise Reject(f"process id {proc_id} is in use")
        if self._main is not None and self._main.exit_code is not None:
            raise Reject("the container is not running")  # (not started yet is fine: cp)
        builtin = getattr(self.runtime, "builtin", None)
        if builtin is None:
            raise Reject("this runtime has no builtins")
        self._start_extra(proc_id, lambda: builtin(name, list(args), stdin=stdin))

    def _handle_diff(self, message: Message) -> None:
        self._check_token(message)
        proc_id = message.get("id", int)
        if proc_id in self._procs:
            raise Reject(f"process id {proc_id} is in use")
        if self.main_exit_code is None:
            raise Reject("the container's process has not exited yet")
        diff = getattr(self.runtime, "diff", None)
        if diff is None:
            raise Reject("this runtime cannot write the container's changes")
        self._start_extra(proc_id, diff)

    def _start_extra(self, proc_id: int, spawn: Callable[[], Spawned]) -> None:
        """Start a process besides the main one (exec, a builtin, the diff) with *spawn()*,
        which returns its Spawned; reply STARTED, or Reject with the failure."""
        try:
            spawned = spawn()
        except Exception as exc:  # noqa: BLE001 - SpawnError, or any runtime failure
            raise Reject(str(exc), getattr(exc, "exit_code", None)) from None
        self._add(proc_id, spawned, main=False)
        self._send(protocol.STARTED, id=proc_id, pid=spawned.pid)

    def _handle_update(self, message: Message) -> None:
        from guest.spec import Limits

        self._check_token(message)
        request = message.get("id", int)
        limits = Limits.from_dict(message.get("limits", dict))  # ValueError → error reply
        update = getattr(self.runtime, "update", None)
        if update is None:
            raise Reject("this runtime cannot change limits")
        try:
            update(limits)
        except Exception as exc:  # noqa: BLE001 - CgroupError, or any runtime failure
            raise Reject(str(exc)) from None
        self._send(protocol.UPDATED, id=request)

    def _handle_freeze(self, message: Message) -> None:
        self._check_token(message)
        request = message.get("id", int)
        frozen = message.get("frozen", bool)
        container = self._member_container(message.get("member", str))
        cgroup = getattr(container, "cgroup", None)
        if cgroup is None:
            raise Reject("the pod member has no cgroup to freeze")
        try:
            cgroup.freeze(frozen)
        except Exception as exc:  # noqa: BLE001 - CgroupError, or any failure
            raise Reject(str(exc)) from None
        self._send(protocol.UPDATED, id=request)

    def _handle_netconf(self, message: Message) -> None:
        from guest.spec import check_network

        self._check_token(message)
        request = message.get("id", int)
        interfaces = message.get("interfaces", list)
        check_network({"interfaces": interfaces})  # ValueError → error reply
        if any("gateway" in iface for iface in interfaces):
            raise Reject("a plugged-in NIC cannot take the default route")
        resolv_conf = message.get("resolv_conf", str, None)
        if resolv_conf is not None and (len(resolv_conf) > 16 * 1024 or "\0" in resolv_conf):
            raise Reject("resolv_conf must be text of at most 16 KiB")
        netconf = getattr(self.runtime, "netconf", None)
        if netconf is None:
            raise Reject("this runtime cannot configure network interfaces")
        try:
            netconf(interfaces, resolv_conf=resolv_conf)
        except Exception as exc:  # noqa: BLE001 - NetworkError, or any runtime failure
            raise Reject(str(exc)) from None
        self._send(protocol.UPDATED, id=request)

    # ---- the DNS relay (guest.runtime.dnsrelay) ----------------------------------------------

    def _start_dns_relay(self) -> None:
        network = getattr(self.config, "network", None) or {}
        addresses = network.get("dns_relay") or []
        if not addresses or self._dns is not None:
            return
        from guest.runtime.dnsrelay import DnsRelay

        try:
            self._dns = DnsRelay(addresses)
        except OSError as exc:
            self.log(f"cannot relay DNS on {', '.join(addresses)}: {exc}")

    def _on_dns_query(self, fd: int) -> None:
        dns = self._dns
        if dns is None:
            return
        dns.expire()
        for qid, server, payload in dns.receive(fd):
            self._send(protocol.DNS_QUERY, payload, id=qid, server=server)

    def _handle_dns_answer(self, message: Message) -> None:
        if self._dns is not None and len(message.payload) <= protocol.MAX_DNS_ANSWER:
            self._dns.answer(message.get("id", int), message.payload)

    def _handle_identity(self, message: Message) -> None:
        """A VM restored from a snapshot template becomes its container: new token,
        hostname, process and /etc files; the kernel's RNG (and ours) reseeded from the
        host's entropy, so no two containers of one template share RNG state."""
        self._check_token(message)
        proc_id = message.get("id", int)
        if self._main is not None or self.main_exit_code is not None:
            raise Reject("identity comes before start")
        entropy = message.payload
        if not 32 <= len(entropy) <= 512:
            raise Reject("identity needs 32 to 512 bytes of entropy")
        token = message.get("new_token", str)
        if not 16 <= len(token) <= 128:
            raise Reject("bad new token")
        config = self._config.replace(
            token=token,
            hostname=message.get("hostname", str),
            process=ProcessSpec.from_dict(message.get("process", dict)),
            hosts=message.get("hosts", str, ""),
            resolv_conf=message.get("resolv_conf", str, ""),
        )
        reseed(entropy)
        apply = getattr(self.runtime, "set_identity", None)
        if apply is not None:
            apply(config)
        self.config = config
        self._send(protocol.UPDATED, id=proc_id)

    def _handle_prefork(self, message: Message) -> None:
        """A snapshot template's VM, before its save: the container's process is made up
        to its execve now, so that a restored copy's ``start`` only hands it the process."""
        self._check_token(message)
        request = message.get("id", int)
        if self._main is not None or self.main_exit_code is not None:
            raise Reject("prefork comes before start")
        hold = getattr(self.runtime, "hold", None)
        if hold is None:
            raise Reject("this runtime cannot hold a process")
        try:
            hold()
        except Exception as exc:  # noqa: BLE001 - SpawnError, or any runtime failure
            raise Reject(str(exc), getattr(exc, "exit_code", None)) from None
        self._send(protocol.UPDATED, id=request)

    def _handle_stats(self, message: Message) -> None:
        self._check_token(message)
        request = message.get("id", int)
        stats = getattr(self.runtime, "stats", None)
        if stats is None:
            raise Reject("this runtime has no statistics")
        try:
            usage = stats()
        except Exception as exc:  # noqa: BLE001 - CgroupError, or any runtime failure
            raise Reject(str(exc)) from None
        self._send(protocol.STATS, id=request, usage=usage)

    def _handle_spec(self, message: Message) -> None:
        if self.config is not None or self._spec is not None:
            raise Reject("this VM has its container already")
        raw = message.get("config", dict)
        entropy = message.get("entropy", str)
        if len(entropy) > protocol.MAX_ENTROPY_HEX or len(entropy) % 2:
            raise Reject(f"spec: entropy must be at most {protocol.MAX_ENTROPY_HEX} hex digits, an even number")
        try:
            seed = bytes.fromhex(entropy)
            config = BootConfig.from_dict(raw)
        except ValueError as exc:
            raise Reject(f"spec: {exc}") from None
        self._spec = (config, seed)

    def _handle_stdin(self, message: Message) -> None:
        proc = self._lookup(message)
        if proc.stdin_fd is None or proc.stdin_eof:
            return  # stdin closed (or never opened): data has nowhere to go
        proc.stdin_buf += message.payload
        self._write_stdin(proc)

    def _handle_stdin_close(self, message: Message) -> None:
        proc = self._lookup(message)
        if proc.stdin_fd is None or proc.stdin_eof:
            return
        proc.stdin_eof = True
        if proc.tty:
            proc.stdin_buf += EOT  # the terminal stays open: output still flows through it
        self._write_stdin(proc)

    def _handle_resize(self, message: Message) -> None:
        proc = self._lookup(message)
        rows, cols = self._size(message)
        if proc.tty and proc.spawned.master is not None and proc.exit_code is None:
            from guest.runtime.process import set_window_size

            set_window_size(proc.spawned.master, rows, cols)

    def _handle_signal(self, message: Message) -> None:
        proc = self._lookup(message)
        signum = message.get("signal", int)
        if not 0 < signum < signal.NSIG:
            raise Reject(f"bad signal number {signum}")
        if proc.exit_code is None:
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass

    def _handle_shutdown(self, message: Message) -> None:
        self.log("shutdown requested by the host")
        self.kill_all()
        self._shutdown = True
        self._shutdown_deadline = time.monotonic() + 1.0

    # ---- processes --------------------------------------------------------------------------

    def _add(self, proc_id: int, spawned: Spawned, main: bool) -> _Proc:
        proc = _Proc(id=proc_id, spawned=spawned, main=main, last_output=time.monotonic())
        if spawned.tty and spawned.master is not None:  # a tty process has its pty master
            proc.outputs[spawned.master] = protocol.STDOUT
            proc.stdin_fd = spawned.master
        else:
            if spawned.stdout is not None:
                proc.outputs[spawned.stdout] = protocol.STDOUT
            if spawned.stderr is not None:
                proc.outputs[spawned.stderr] = protocol.STDERR
            proc.stdin_fd = spawned.stdin
        for fd in spawned.fds():
            os.set_blocking(fd, False)
        try:
            proc.pidfd = os.pidfd_open(spawned.pid)
        except (AttributeError, OSError):
            proc.pidfd = None  # exited and reaped already, or an old kernel: polled instead
        self._procs[proc_id] = proc
        self._by_pid[spawned.pid] = proc
        return proc

    def _on_proc_ready(self, proc: _Proc, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and proc.stdin_fd is not None:
            self._write_stdin(proc)
        if mask & selectors.EVENT_READ:
            for fd in list(proc.outputs):
                if fd in self._registered:
                    self._read_output(proc, fd)

    def _read_output(self, proc: _Proc, fd: int) -> None:
        try:
            data = os.read(fd, protocol.CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's last slave fd was closed, its end of file
            if self._reopen_console(proc, fd):
                return
            data = b""
        if data:
            proc.console_reopens = 0
            proc.last_output = time.monotonic()
            self._send(proc.outputs[fd], data, id=proc.id)
            return
        del proc.outputs[fd]
        if fd != proc.stdin_fd:
            self._close_fd(fd)
        else:  # the tty master: no more output, so input is pointless too
            proc.stdin_fd = None
            proc.stdin_buf.clear()
            self._close_fd(fd)
        self._maybe_report_exit(proc, time.monotonic())

    def _reopen_console(self, proc: _Proc, fd: int) -> bool:
        """An OS container's init hung up its console (vhangup): hold a new slave so the
        console lives on, instead of ending the log. Bounded: a console that keeps
        failing with no output in between is ended."""
        console = getattr(proc.spawned, "console", None)
        if (
            console is None
            or fd != proc.spawned.master
            or proc.exit_code is not None
            or proc.console_reopens >= MAX_CONSOLE_REOPENS
        ):
            return False
        from guest.runtime.process import reopen_console

        new = reopen_console(fd)
        if new is None:
            return False
        proc.console_reopens += 1
        self._close_fd(console)
        proc.spawned.console = new
        return True

    def _write_stdin(self, proc: _Proc) -> None:
        """Precondition: ``proc.stdin_fd`` is open (every caller checks)."""
        while proc.stdin_buf and proc.stdin_fd is not None:
            try:
                written = os.write(proc.stdin_fd, proc.stdin_buf[: protocol.CHUNK])
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the process closed its stdin; drop what is left
                proc.stdin_buf.clear()
                if not proc.tty:
                    self._close_stdin(proc)
                return
            del proc.stdin_buf[:written]
        if proc.stdin_eof and not proc.tty:
            self._close_stdin(proc)

    def _close_stdin(self, proc: _Proc) -> None:
        if proc.stdin_fd is not None and proc.stdin_fd not in proc.outputs:
            self._close_fd(proc.stdin_fd)
        proc.stdin_fd = None

    def _close_fd(self, fd: int) -> None:
        if fd in self._registered:
            self._sel.unregister(fd)
            del self._registered[fd]
        try:
            os.close(fd)
        except OSError:
            pass

    def _on_pidfd(self, mask: int) -> None:
        pass  # a wakeup only: _reap() runs after every select

    def _reap(self) -> None:
        """The one place that waits for children; hands each status to its owner."""
        now = time.monotonic()
        if self.reap_orphans:
            self._last_sweep = now
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                self._exited(pid, status)
        else:
            for proc in list(self._procs.values()):
                if proc.exit_code is None:
                    try:
                        pid, status = os.waitpid(proc.pid, os.WNOHANG)
                    except ChildProcessError:
                        pid, status = proc.pid, 255 << 8  # reaped behind our back
                    if pid:
                        self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        proc = self._by_pid.pop(pid, None)
        if proc is None:
            return  # an orphan we inherited: reaped, nothing more to do
        proc.exit_code = protocol.exit_code_from_status(status)
        proc.exit_signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        if proc.main and getattr(self.config, "os", False):
            from guest.runtime.osinit import exit_code

            proc.exit_code = exit_code(proc.exit_code)  # init powered off: 0
            proc.exit_signal = proc.exit_signal if proc.exit_code else 0
        proc.last_output = max(proc.last_output, time.monotonic())
        console = getattr(proc.spawned, "console", None)
        if console is not None:  # an init's held console slave: its end of file is now
            self._close_fd(console)
            proc.spawned.console = None
        if proc.pidfd is not None:
            self._close_fd(proc.pidfd)
            proc.pidfd = None
        if proc.stdin_fd is not None and not proc.tty:
            proc.stdin_buf.clear()
            self._close_stdin(proc)

    def _maybe_report_exit(self, proc: _Proc, now: float) -> None:
        if proc.exit_code is None or proc.exit_sent:
            return
        if proc.outputs:
            if self._out_bytes >= OUT_HIGH:
                proc.last_output = now  # we are not reading it: its silence means nothing
                return
            if now - proc.last_output < OUTPUT_GRACE:
                return
            if select.select(list(proc.outputs), [], [], 0)[0]:
                return  # data still waiting: the loop will read it
            for fd in list(proc.outputs):  # held open by something else; stop waiting
                del proc.outputs[fd]
                self._close_fd(fd)
            proc.stdin_fd = None
        proc.exit_sent = True
        extra: dict[str, Any] = {}
        if proc.main:
            oom = getattr(self.runtime, "oom_killed", None)
            try:
                extra["oom_killed"] = bool(oom()) if oom is not None else False
            except Exception:  # noqa: BLE001 - a report, not a reason to fail
                extra["oom_killed"] = False
        frame = self._send(protocol.EXIT, id=proc.id, code=proc.exit_code, signal=proc.exit_signal, **extra)
        if proc.main:
            self.main_exit_code = proc.exit_code
            self._main_done_at = now
            self._exit_frame = frame
            if not any(f is frame for f in self._out):
                self._exit_written_at = now
        self._forget(proc)

    def _forget(self, proc: _Proc) -> None:
        """Close every fd of *proc* (each once) and drop it from the tables."""
        fds = set(proc.outputs) | {fd for fd in (proc.stdin_fd, proc.pidfd) if fd is not None}
        for fd in fds:
            self._close_fd(fd)
        proc.outputs.clear()
        proc.stdin_fd = proc.pidfd = None
        self._procs.pop(proc.id, None)
        self._by_pid.pop(proc.pid, None)
        if proc.member is not None:  # a pod member's cgroup and rootfs share go with it
            member, proc.member = proc.member, None
            member.destroy()


# ---- the guest's channel ------------------------------------------------------------------

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed(entropy: bytes, device: str = "/dev/urandom") -> None:
    """Credit *entropy* to the kernel's input pool and make the CRNG reseed from it (a
    restored snapshot carries its template's RNG state); reseed Python's ``random`` too
    if it was imported (nothing in the guest uses it; importing it here took 60 ms of a
    restored template's start). Falls back to a plain write (mixed in, not credited)
    where the ioctls are refused."""
    import fcntl
    import struct
    import sys

    random = sys.modules.get("random")
    if random is not None:
        random.seed(entropy)
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        except OSError:
            os.write(fd, entropy)
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError:
            pass
    finally:
        os.close(fd)


def find_port(name: str = AGENT_PORT_NAME, sys_dir: str = "/sys/class/virtio-ports") -> str | None:
    """The /dev path of the virtio-serial port called *name*, or None if there is none."""
    try:
        entries = sorted(os.listdir(sys_dir))
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(sys_dir, entry, "name")) as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


def open_port(timeout: float = 10.0, name: str = AGENT_PORT_NAME) -> int:
    """Open the agent's virtio-serial port (waiting up to *timeout* s for it to appear).
    Raises OSError when it does not."""
    deadline = time.monotonic() + timeout
    while True:
        path = find_port(name)
        if path is not None:
            try:
                return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except FileNotFoundError:
                pass  # sysfs knows it, devtmpfs not yet
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, f"no virtio-serial port named {name}")
        time.sleep(0.01)
