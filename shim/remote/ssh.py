"""Connecting to a remote host with paramiko: ``~/.ssh/config`` (HostName, User, Port,
IdentityFile), the user's SSH agent and key files, and host keys checked against
``~/.ssh/known_hosts`` (and /etc/ssh/ssh_known_hosts). An unknown or changed host key is
refused with the command that trusts it; nothing is ever added silently."""

from __future__ import annotations

import os
import shlex
import socket

import paramiko

from shim.errors import VmshimError
from shim.remote.target import SshTarget

CONNECT_TIMEOUT = 15.0


class RemoteError(VmshimError):
    """The remote host cannot be reached, refused us, or cannot run vmshim."""


class HostKeyError(RemoteError):
    """The host's key is unknown or differs from known_hosts."""


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """Refuses an unknown host key, saying how to trust it."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def missing_host_key(self, client, hostname, key):
        port_opt = "" if self.port == 22 else f"-p {self.port} "
        raise HostKeyError(
            f"the host key of {_known_hosts_name(self.host, self.port)} is not in "
            f"~/.ssh/known_hosts ({_fingerprint(key)}); if that fingerprint is the host's, "
            f"trust it with `ssh-keyscan {port_opt}{self.host} >> ~/.ssh/known_hosts` "
            f"(or connect once with `ssh {port_opt}{self.host}`)"
        )


def connect(target: SshTarget) -> paramiko.SSHClient:
    """An authenticated SSHClient for *target*. Raises RemoteError/HostKeyError with one
    line saying what to do."""
    config = paramiko.SSHConfig()
    config_path = os.path.expanduser("~/.ssh/config")
    if os.path.exists(config_path):
        try:
            config = paramiko.SSHConfig.from_path(config_path)
        except Exception as exc:
            raise RemoteError(f"cannot read {config_path}: {exc}") from None
    options = config.lookup(target.host)
    hostname = options.get("hostname", target.host)
    port = target.port or int(options.get("port", 22))
    user = target.user or options.get("user") or _local_user()
    key_files = [
        os.path.expanduser(p) for p in options.get("identityfile", []) if os.path.exists(os.path.expanduser(p))
    ]

    client = paramiko.SSHClient()
    for path, load in (
        ("/etc/ssh/ssh_known_hosts", client.load_system_host_keys),
        (os.path.expanduser("~/.ssh/known_hosts"), client.load_host_keys),
    ):
        if os.path.exists(path):
            try:
                load(path)
            except Exception as exc:
                raise RemoteError(f"cannot read {path}: {exc}") from None
    client.set_missing_host_key_policy(_RefuseUnknown(hostname, port))
    where = f"{user}@{_known_hosts_name(hostname, port)}"
    try:
        client.connect(
            hostname,
            port=port,
            username=user,
            key_filename=key_files or None,  # type: ignore[arg-type]  # paramiko takes a list too
            allow_agent=options.get("identitiesonly", "no") != "yes",
            look_for_keys=options.get("identitiesonly", "no") != "yes",
            timeout=CONNECT_TIMEOUT,
            banner_timeout=CONNECT_TIMEOUT,
            auth_timeout=CONNECT_TIMEOUT,
        )
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"the host key of {_known_hosts_name(hostname, port)} has CHANGED: it offered "
            f"{_fingerprint(exc.key)}, known_hosts has {_fingerprint(exc.expected_key)}. "
            f"Someone may be intercepting the connection; if the host was really re-keyed, "
            f"remove the old key with `ssh-keygen -R {shlex.quote(_known_hosts_name(hostname, port))}` "
            f"and trust the new one"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise RemoteError(
            f"SSH authentication as {where} failed ({exc}): tried the SSH agent and "
            f"~/.ssh/id_* keys{' and ' + ', '.join(key_files) if key_files else ''}; add your "
            f"public key to the remote ~/.ssh/authorized_keys or load the key into ssh-agent"
        ) from None
    except paramiko.SSHException as exc:
        client.close()
        message = str(exc)
        if "No authentication methods available" in message:
            raise RemoteError(
                f"SSH authentication as {where} failed: no SSH key found (no agent, no "
                f"~/.ssh/id_* file, no IdentityFile in ~/.ssh/config); create one with "
                f"`ssh-keygen` and add it to the remote ~/.ssh/authorized_keys"
            ) from None
        raise RemoteError(f"SSH to {where} failed: {message}") from None
    except (OSError, socket.timeout) as exc:
        client.close()
        raise RemoteError(f"cannot connect to {where}: {getattr(exc, 'strerror', None) or exc}") from None
    transport = client.get_transport()
    assert transport is not None  # connected just above
    transport.set_keepalive(30)
    return client


def _local_user() -> str:
    import getpass

    return getpass.getuser()


PID_MARKER = b"vmshim-remote-pid "


def remote_command(target: SshTarget, args: list[str], env: dict[str, str]) -> str:
    """The shell command line that runs the remote vmshim with *args*. It first prints
    ``vmshim-remote-pid PID`` on a line of its own (to stderr, or the pty), which the
    control process strips and keeps for signal(), then ``exec``s vmshim in that pid."""
    assignments = [f"{k}={v}" for k, v in sorted(env.items())]
    return (
        "printf '%s%d\\n' "
        + shlex.quote(PID_MARKER.decode())
        + " $$ >&2; "
        + " ".join(
            ["exec", "env"]
            + [shlex.quote(a) for a in assignments]
            + [shlex.quote(target.remote_vmshim)]
            + [shlex.quote(a) for a in args]
        )
    )


def probe(client: paramiko.SSHClient, target: SshTarget) -> None:
    """Checks that the remote host can run vmshim; RemoteError naming what to install."""
    command = f"command -v {shlex.quote(target.remote_vmshim)}"
    _, stdout, stderr = client.exec_command(command, timeout=CONNECT_TIMEOUT)
    out = stdout.read()
    if stdout.channel.recv_exit_status() != 0 or not out.strip():
        raise RemoteError(
            f"{target.display()} has no {target.remote_vmshim!r} to run: install vmshim there "
            f"(git clone the project, then `scripts/setup`; it needs libvirt and QEMU) and put "
            f"`vmshim` on the SSH user's PATH, or name its path with "
            f"`--remote-vmshim /path/to/.venv/bin/vmshim`"
        )


SIGNALS = {"INT", "TERM", "HUP", "QUIT"}


def send_signal(client: paramiko.SSHClient, pid: int, name: str) -> None:
    """Send SIG*name* to the remote command's process group (*pid* leads it: sshd makes
    each session's command a session leader), as a terminal's Ctrl-C does locally.

    Not the RFC 4254 "signal" channel request: OpenSSH honours it only in privilege-
    separated sessions, so never for root logins (``session signalling requires privilege
    separation``). A ``kill`` on a new channel of the same connection works for every user."""
    if name not in SIGNALS or pid <= 1:
        return
    transport = client.get_transport()
    if transport is None:  # the connection is gone: nothing to signal through
        return
    channel = transport.open_session(timeout=CONNECT_TIMEOUT)
    try:
        channel.exec_command(f"kill -{name} -- -{int(pid)}")
        channel.recv_exit_status()
    finally:
        channel.close()
