"""Connect a terminal (or pipes) to a process in a container, through a framed channel
(an AgentClient, or a MonitorClient that relays to the agent).

One pump serves every placement and verb that streams a process: ``run`` in the
foreground now; ``attach`` and ``exec`` reuse it. It forwards stdin, writes stdout/stderr
as they arrive, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT (unless a TTY carries ^C itself),
sends the window size on SIGWINCH, and returns the process's exit code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import termios
import tty
from collections.abc import Iterator

from guest import protocol
from shim.errors import AgentError
from shim.vm.agent_client import wait_readable
from shim.vm.channel import FramedChannel

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
_CTRL_PUNCTUATION = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}


def parse_detach_keys(text: str) -> bytes:
    """docker's ``--detach-keys`` (``ctrl-p,ctrl-q``: comma-separated single characters
    or ``ctrl-X`` with X a letter or one of ``@ [ \\ ] ^ _``) as the bytes a terminal
    sends. Raises UsageError."""
    from shim.errors import UsageError

    keys = bytearray()
    for key in text.split(","):
        low = key.lower()
        if low.startswith("ctrl-") and len(key) == 6:
            char = low[5]
            if "a" <= char <= "z":
                keys.append(ord(char) - ord("a") + 1)
                continue
            if char in _CTRL_PUNCTUATION:
                keys.append(_CTRL_PUNCTUATION[char])
                continue
        elif len(key) == 1 and key.isascii():
            keys.append(ord(key))
            continue
        raise UsageError(f"invalid --detach-keys {text!r}: {key!r} is not a key (use e.g. ctrl-p,ctrl-q or ctrl-a,x)")
    return bytes(keys)


class DetachScanner:
    """Finds the detach sequence in what is typed, across reads: ``feed`` returns the
    bytes to forward (a partial match is held back until it is known not to be one)
    and sets :attr:`detached` once the whole sequence was typed."""

    def __init__(self, keys: bytes):
        self.keys = keys
        self.matched = 0
        self.detached = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self.detached:
                break
            if byte == self.keys[self.matched]:
                self.matched += 1
                if self.matched == len(self.keys):
                    self.detached = True
                continue
            out += self.keys[: self.matched]  # a false start: those keys were meant
            self.matched = 0
            if byte == self.keys[0]:
                self.matched = 1
                self.detached = len(self.keys) == 1
            else:
                out.append(byte)
        return bytes(out)


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on *fd*, or (24, 80) when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    if size.lines <= 0 or size.columns <= 0:  # a new pty nobody sized yet
        return 24, 80
    return size.lines, size.columns


@contextlib.contextmanager
def raw_terminal(fd: int | None):
    """Put the terminal on *fd* in raw mode for the duration; no-op if it is not a TTY."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # keep what was typed ahead
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass  # the terminal hung up (a pty whose master was closed): nothing to restore


@contextlib.contextmanager
def caught_signals(signals, handler) -> Iterator[int]:
    """Meanwhile *handler(signum, frame)* handles *signals*, and a wake-up pipe
    (signal.set_wakeup_fd) gets a byte for each: yields its read end, for a wait to
    return when a signal comes. Restores the handlers and the wake-up fd after."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_handlers = {s: signal.signal(s, handler) for s in signals}
    try:
        yield wake_r
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)


class StdioPump:
    """Stream one process's stdio between local fds and the agent until it exits.

    Preconditions: the process *proc_id* has been started on *client*; the caller has
    not installed handlers for FORWARDED_SIGNALS (the pump installs and restores them).
    With a TTY and stdin, typing *detach_keys* (bytes) ends the pump with the process
    still running: :attr:`detached` is then true and :meth:`run` returns 0.
    """

    def __init__(
        self,
        client: FramedChannel,
        proc_id: int,
        *,
        stdin_fd: int | None,
        stdout_fd: int = 1,
        stderr_fd: int = 2,
        tty: bool = False,
        detach_keys: bytes = b"\x10\x11",
    ):
        self.client = client
        self.proc_id = proc_id
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.tty = tty
        self.exit_code: int | None = None
        self.exit_error = ""
        self._pending_signals: list[int] = []
        self._detach = DetachScanner(detach_keys) if tty and detach_keys else None

    @property
    def detached(self) -> bool:
        return self._detach is not None and self._detach.detached

    def run(self) -> int:
        """Pump until the agent reports the exit; return the exit code.

        Raises AgentError when the channel breaks (e.g. the VM died)."""
        with (
            caught_signals([*FORWARDED_SIGNALS, signal.SIGWINCH], self._on_signal) as wake_r,
            raw_terminal(self.stdin_fd if self.tty else None),
        ):
            return self._loop(wake_r)

    def _on_signal(self, signum, _frame):
        self._pending_signals.append(signum)

    def _loop(self, wake_r: int) -> int:
        stdin_open = self.stdin_fd is not None
        for msg in self.client.take_pending():
            self._handle(msg)
        while self.exit_code is None:
            if self.detached:
                return 0
            fds = [self.client.sock, wake_r] + ([self.stdin_fd] if stdin_open else [])
            ready = wait_readable(fds, None)
            if wake_r in ready:
                os.read(wake_r, 512)
            self._flush_signals()
            if stdin_open and self.stdin_fd in ready:
                stdin_open = self._forward_stdin()
            if self.client.sock in ready:
                for msg in self.client.read_available():
                    self._handle(msg)
                    if self.exit_code is not None:
                        break
        return self.exit_code

    def _forward_stdin(self) -> bool:
        if self.stdin_fd is None:  # only called while stdin is open
            return False
        try:
            data = os.read(self.stdin_fd, protocol.CHUNK)
        except OSError:
            data = b""
        if data and self._detach is not None:
            data = self._detach.feed(data)
            if not data:
                return True
        if data:
            self.client.send(protocol.STDIN, data, id=self.proc_id)
            return True
        self.client.send(protocol.STDIN_CLOSE, id=self.proc_id)
        return False

    def _flush_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            if signum == signal.SIGWINCH:
                if self.tty and self.stdin_fd is not None:
                    rows, cols = terminal_size(self.stdin_fd)
                    self.client.send(protocol.RESIZE, id=self.proc_id, rows=rows, cols=cols)
            else:
                self.client.send(protocol.SIGNAL, id=self.proc_id, signal=int(signum))

    def _handle(self, msg: protocol.Message) -> None:
        if msg.type in (protocol.STDOUT, protocol.STDERR):
            if msg.get("id", int) != self.proc_id:
                return
            fd = self.stdout_fd if msg.type == protocol.STDOUT else self.stderr_fd
            _write_all(fd, msg.payload)
        elif msg.type == protocol.EXIT and msg.get("id", int) == self.proc_id:
            self.exit_code = msg.get("code", int)
            self.exit_error = msg.get("error", str, "")  # the monitor's: why the run ended
        elif msg.type == protocol.ERROR and msg.get("id", int, self.proc_id) == self.proc_id:
            raise AgentError(protocol.printable(msg.get("message", str, "the agent reported an error")))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            wait_readable([], 0.01)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return
        except OSError as exc:
            if exc.errno == errno.EIO:  # a terminal that hung up: the output has no reader
                return
            raise
        view = view[written:]
