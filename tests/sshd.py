"""A real OpenSSH server for the remote-host tests, and a client home that trusts it.

``Sshd(tmp)`` makes a temporary host key, a user key, an authorized_keys file and an
sshd_config of its own (nothing under /etc/ssh is read or changed), starts
``/usr/sbin/sshd -D`` on 127.0.0.1 on a free port and stops it by PID. ``SetEnv`` passes
this process's VMSHIM_* variables to sessions, so the remote vmshim uses the same state root
and libvirtd as the local one. ``client_env()`` is the environment for the local CLI: HOME
is a temporary home whose ~/.ssh holds the user key and known_hosts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
REMOTE_VMSHIM = str(Path(sys.executable).parent / "vmshim")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class Sshd:
    def __init__(self, tmp: Path):
        self.dir = tmp / "sshd"
        self.dir.mkdir(mode=0o700)
        self.port = free_port()
        self.host_key = self.dir / "host_ed25519"
        keygen(self.host_key)
        self.home = tmp / "home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        self.user_key = self.home / ".ssh" / "id_ed25519"
        keygen(self.user_key)
        (self.dir / "authorized_keys").write_text(self.user_key.with_suffix(".pub").read_text())
        self.trust()
        setenv = " ".join(
            f"{k}={v}"
            for k, v in sorted(os.environ.items())
            if k.startswith("VMSHIM_")
            and " " not in v
            and '"' not in v
            and k not in ("VMSHIM_HOST", "VMSHIM_CONTEXT", "VMSHIM_REMOTE_VMSHIM")
        )
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxSessions 64",
            "MaxStartups 64",
        ]
        if setenv:
            lines.append(f"SetEnv {setenv}")
        self.config = self.dir / "sshd_config"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def trust(self, key: Path | None = None) -> None:
        """Write known_hosts with *key*'s public half (default: the real host key)."""
        public = (key or self.host_key).with_suffix(".pub").read_text().split()
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n")

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "sshd.log", "wb"),
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not listen in 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client_env(self, **extra) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "VMSHIM_HOST", "VMSHIM_CONTEXT")
        }
        env.update(HOME=str(self.home), VMSHIM_SSH_PERSIST="120", VMSHIM_REMOTE_VMSHIM=REMOTE_VMSHIM)
        env.update(extra)
        return env

    def stop_control_processes(self) -> None:
        """End the control processes the CLI started for this home (by their pid files)."""
        for pidfile in (self.home / ".cache" / "vmshim" / "ssh").glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
