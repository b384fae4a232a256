"""Running one vmshim command on a remote host through the control process: this
process's stdin/stdout/stderr stay apart, ``-t`` gets a remote pty of the local terminal's
size (SIGWINCH → resize), and signals sent to this process (Ctrl-C without a pty) reach the
remote vmshim's process group (the control process sends them with ``kill``), so it stops
the container as it would locally."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict

from shim.errors import VmshimError
from shim.remote import mux
from shim.remote.target import SshTarget, control_socket
from shim.remote.verbs import Plan, plan as make_plan

PERSIST_ENV = "VMSHIM_SSH_PERSIST"


class RemoteError(VmshimError):
    """The remote host cannot be reached or the connection broke."""


def run_remote(target: SshTarget, args: list[str], commands, debug: bool = False) -> int:
    """Run vmshim *args* (verb first) on *target*; the remote exit status. *commands*: the
    CLI's click group (see verbs.plan)."""
    plan = make_plan(args, commands)
    env = {"VMSHIM_REMOTE_CONTEXT": f"{target.context or '-'} {target.display()}"}
    if sys.stdout.isatty():
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    remote_args = (["--debug"] if debug else []) + plan.args
    for attempt in range(2):
        conn = open_session(target)
        pty = None
        if plan.pty:
            cols, rows = shutil.get_terminal_size()
            pty = {"term": os.environ.get("TERM", "xterm"), "cols": cols, "rows": rows}
        mux.send(conn, mux.HELLO, json.dumps({"args": remote_args, "env": env, "pty": pty}).encode())
        try:
            reply = mux.recv(conn)
        except (OSError, mux.FrameError):
            reply = None
        if reply is None and attempt == 0:  # the control process was just exiting: start anew
            conn.close()
            continue
        if reply is None:
            raise RemoteError(f"the SSH control process for {target.display()} hung up")
        if reply[0] == mux.FAIL:
            conn.close()
            if attempt == 0:
                continue
            raise RemoteError(reply[1].decode(errors="replace"))
        break
    try:
        code = _Session(conn, plan).run()
    finally:
        conn.close()
    return plan.finish(code)


def open_session(target: SshTarget) -> socket.socket:
    """A connection to *target*'s control process, starting one when none runs."""
    path = control_socket(target)
    conn = _try_connect(path)
    if conn is not None:
        return conn
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _try_connect(path)
        if conn is not None:
            return conn
        _spawn(target, path)
    conn = _try_connect(path)
    if conn is None:
        raise RemoteError(f"the SSH control process for {target.display()} did not listen on {path}")
    return conn


def _try_connect(path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _spawn(target: SshTarget, path) -> None:
    persist = os.environ.get(PERSIST_ENV, "600")
    log = os.open(f"{path}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shim.remote.control", json.dumps(asdict(target)), persist],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log)
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline().decode(errors="replace").strip()
    proc.stdout.close()
    if line == "ok":
        return
    proc.wait()
    if line.startswith("error: "):
        raise RemoteError(line[len("error: ") :])
    raise RemoteError(f"the SSH control process for {target.display()} failed to start (see {path}.log)")


class _Session:
    def __init__(self, conn: socket.socket, plan: Plan):
        self.conn, self.plan = conn, plan
        self.send_lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self.send_lock:
            try:
                mux.send(self.conn, kind, payload)
            except OSError:
                pass

    def run(self) -> int:
        from shim.containers.attach import raw_terminal

        plan = self.plan
        stdin_fd = None
        if plan.stdin == "terminal":
            stdin_fd = sys.stdin.fileno()
        elif callable(plan.stdin):
            stdin_fd = plan.stdin()
        if stdin_fd is None:
            self.send(mux.EOF)
        else:
            threading.Thread(target=self._forward_stdin, args=(stdin_fd,), daemon=True).start()
        handlers = self._install_signals()
        try:
            with raw_terminal(sys.stdin.fileno() if plan.pty and plan.stdin == "terminal" else None):
                return self._receive()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _forward_stdin(self, fd: int) -> None:
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                self.send(mux.STDIN, data)
        except OSError:
            pass
        self.send(mux.EOF)

    def _install_signals(self) -> dict:
        handlers = {}

        def forward(signum, _frame):
            self.send(mux.SIGNAL, signal.Signals(signum).name[3:].encode())

        def resize(_signum, _frame):
            cols, rows = shutil.get_terminal_size()
            self.send(mux.RESIZE, json.dumps({"cols": cols, "rows": rows}).encode())

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            handlers[sig] = signal.signal(sig, forward)
        if self.plan.pty:
            handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
        return handlers

    def _receive(self) -> int:
        out = self.plan.stdout
        while True:
            try:
                frame = mux.recv(self.conn)
            except InterruptedError:
                continue
            except (OSError, mux.FrameError) as exc:
                raise RemoteError(f"the connection to the remote host broke: {exc}") from None
            if frame is None:
                raise RemoteError("the connection to the remote host ended before the command did")
            kind, payload = frame
            if kind == mux.STDOUT:
                if out is None:
                    _write_all(1, payload)
                else:
                    out.write(payload)
            elif kind == mux.STDERR:
                _write_all(2, payload)
            elif kind == mux.EXIT:
                return int(payload)
            elif kind == mux.FAIL:
                raise RemoteError(payload.decode(errors="replace"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        with contextlib.suppress(InterruptedError):
            view = view[os.write(fd, view) :]
