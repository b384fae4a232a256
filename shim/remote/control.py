"""The control process: holds one SSH connection to one target and runs each command the
CLI sends on its unix socket as a new channel on it (like OpenSSH's ControlMaster), so a
sequence of commands pays the SSH handshake once.

Started by the CLI (shim.remote.client.open_session) as ``python -m shim.remote.control
TARGET_JSON PERSIST``; it connects, checks the remote vmshim, listens on
``control_socket(target)`` (0600, in a 0700 directory, peers must be the same uid), writes
``ok`` (or ``error: MESSAGE``) on stdout for the CLI and closes it. It exits PERSIST
seconds after its last session ended, or when the connection drops. Its pid is in
``<socket>.pid``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time

from shim.errors import VmshimError
from shim.remote import mux, ssh
from shim.remote.target import SshTarget, control_socket

DEFAULT_PERSIST = 600.0


class Control:
    def __init__(self, target: SshTarget, client, persist: float):
        self.target, self.client, self.persist = target, client, persist
        self.transport = client.get_transport()
        self.lock = threading.Lock()
        self.active = 0
        self.idle_since = time.monotonic()

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(1.0)
        while True:
            with self.lock:
                idle = self.active == 0 and time.monotonic() - self.idle_since > self.persist
            if idle or not self.transport.is_active():
                return
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            with self.lock:
                self.active += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            self._run(conn)
        except Exception as exc:  # one broken session never takes the others down
            print(f"session failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            conn.close()
            with self.lock:
                self.active -= 1
                self.idle_since = time.monotonic()

    def _run(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            return
        frame = mux.recv(conn)
        if frame is None or frame[0] != mux.HELLO:
            return
        hello = json.loads(frame[1])
        try:
            channel = self.transport.open_session(timeout=ssh.CONNECT_TIMEOUT)
        except Exception as exc:
            mux.send(
                conn,
                mux.FAIL,
                f"the SSH connection to {self.target.display()} was lost ({exc}); run the command again".encode(),
            )
            self.transport.close()
            return
        pty = hello.get("pty")
        if pty:
            channel.get_pty(term=pty.get("term", "xterm"), width=int(pty["cols"]), height=int(pty["rows"]))
        channel.exec_command(ssh.remote_command(self.target, list(hello["args"]), dict(hello.get("env", {}))))
        send_lock = threading.Lock()

        def send(kind: bytes, payload: bytes = b"") -> None:
            with send_lock:
                mux.send(conn, kind, payload)

        send(mux.ACCEPT)
        remote_pid: list[int] = []
        early_signals: list[str] = []

        def pump(read, kind, marked):
            pending = b""
            while True:
                data = read(65536)
                if not data:
                    if pending:
                        send(kind, pending)
                    return
                if marked and not remote_pid:  # a line "vmshim-remote-pid N" comes first
                    pending += data
                    data, pid = _take_pid_line(pending)
                    if pid is None:
                        continue
                    pending = b""
                    remote_pid.append(pid)
                    for name in early_signals:  # sent before the pid was known
                        self._signal(remote_pid[0], name)
                    if not data:
                        continue
                send(kind, data)

        pumps = [
            threading.Thread(target=pump, args=(channel.recv, mux.STDOUT, bool(pty)), daemon=True),
            threading.Thread(target=pump, args=(channel.recv_stderr, mux.STDERR, not pty), daemon=True),
        ]
        for thread in pumps:
            thread.start()
        threading.Thread(target=self._from_cli, args=(conn, channel, remote_pid, early_signals), daemon=True).start()
        for thread in pumps:
            thread.join()
        status = channel.recv_exit_status()
        send(mux.EXIT, str(255 if status < 0 else status).encode())
        channel.close()

    def _signal(self, pid: int, name: str) -> None:
        if pid:
            threading.Thread(target=ssh.send_signal, args=(self.client, pid, name), daemon=True).start()

    def _from_cli(self, conn: socket.socket, channel, remote_pid: list[int], early_signals: list[str]) -> None:
        """CLI → channel: stdin, EOF, resizes, signals; the CLI hanging up closes the channel."""
        try:
            while True:
                frame = mux.recv(conn)
                if frame is None:
                    break
                kind, payload = frame
                if kind == mux.STDIN:
                    channel.sendall(payload)
                elif kind == mux.EOF:
                    channel.shutdown_write()
                elif kind == mux.RESIZE:
                    size = json.loads(payload)
                    channel.resize_pty(width=int(size["cols"]), height=int(size["rows"]))
                elif kind == mux.SIGNAL and not channel.exit_status_ready():
                    name = payload.decode("ascii", "replace")
                    if remote_pid:
                        self._signal(remote_pid[0], name)
                    elif len(early_signals) < 8:
                        early_signals.append(name)
        except (OSError, mux.FrameError, ValueError):
            pass
        if not channel.exit_status_ready():  # the client is gone: as a terminal closing
            if remote_pid and remote_pid[0]:
                try:
                    ssh.send_signal(self.client, remote_pid[0], "HUP")
                except Exception:
                    pass
            channel.close()


def _take_pid_line(buffer: bytes) -> tuple[bytes, int | None]:
    """(*buffer* without the remote pid line, the pid) once that line is complete; (b"",
    None) while it may still come; the buffer as it is and pid 0 when it did not (after
    4 KiB, e.g. a pty echoing early input first)."""
    at = buffer.find(ssh.PID_MARKER)
    if at >= 0:
        end = buffer.find(b"\n", at)
        if end >= 0:
            digits = buffer[at + len(ssh.PID_MARKER) : end].rstrip(b"\r")
            if digits.isdigit():
                return buffer[:at] + buffer[end + 1 :], int(digits)
            return buffer, 0
    if len(buffer) > 4096:
        return buffer, 0
    return b"", None


def _listen(path) -> socket.socket:
    """Bind *path* atomically (a temporary name renamed over it), mode 0600."""
    tmp = f"{path}.{os.getpid()}.tmp"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(tmp)
    finally:
        os.umask(old)
    os.chmod(tmp, 0o600)
    listener.listen(16)
    os.replace(tmp, path)
    return listener


def main() -> None:
    target = SshTarget(**json.loads(sys.argv[1]))
    persist = float(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_PERSIST
    os.chdir("/")
    status = sys.stdout
    try:
        client = ssh.connect(target)
        ssh.probe(client, target)
        path = control_socket(target)
        listener = _listen(path)
    except VmshimError as exc:
        status.write(f"error: {exc}\n")
        status.flush()
        sys.exit(1)
    except Exception as exc:
        status.write(f"error: cannot connect to {target.display()}: {type(exc).__name__}: {exc}\n")
        status.flush()
        sys.exit(1)
    pidfile = f"{path}.pid"
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    inode = os.stat(path).st_ino
    status.write("ok\n")
    status.flush()
    sys.stdout = open(os.devnull, "w")
    status.close()
    try:
        Control(target, client, persist).serve(listener)
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == inode:  # not a newer control's socket
                os.unlink(path)
                os.unlink(pidfile)
        except OSError:
            pass
        client.close()


if __name__ == "__main__":
    main()
