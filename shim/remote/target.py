"""Where commands go: ``ssh://user@host[:port]`` URLs and named contexts.

Contexts live in the user's config directory (``$XDG_CONFIG_HOME/vmshim``, default
``~/.config/vmshim``), not in the state root: they describe the client, not a host.
``contexts.json`` holds ``{"current": NAME|null, "contexts": {NAME: {...}}}``; writes are
atomic. The context named ``default`` is this machine and cannot be created or removed.
Imports nothing heavy: the CLI consults this module on every start.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shim.errors import UsageError, VmshimError

DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class SshTarget:
    """One remote host. *user*/*port* None: taken from ~/.ssh/config, else the local user
    and 22. *remote_vmshim*: the command run on the host (a name on its PATH or a path)."""

    host: str
    user: str | None = None
    port: int | None = None
    remote_vmshim: str = "vmshim"
    context: str | None = None
    url: str = field(default="", compare=False)

    def display(self) -> str:
        return self.url or format_url(self.user, self.host, self.port)


def format_url(user: str | None, host: str, port: int | None) -> str:
    who = f"{user}@" if user else ""
    where = f"[{host}]" if ":" in host else host
    return f"ssh://{who}{where}" + (f":{port}" if port else "")


def parse_host(url: str, remote_vmshim: str | None = None, context: str | None = None) -> SshTarget:
    """*url* as ``ssh://[user@]host[:port]``. Raises UsageError naming what is wrong."""
    if not url.startswith("ssh://"):
        raise UsageError(f"invalid host {url!r}: expected ssh://[user@]host[:port] (only SSH is supported)")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid host {url!r}: the port must be a number 1-65535") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"invalid host {url!r}: expected ssh://[user@]host[:port] (no path, query or fragment)")
    if parts.password is not None:
        raise UsageError(f"invalid host {url!r}: passwords in the URL are not supported; use an SSH key or agent")
    return SshTarget(
        host=parts.hostname,
        user=parts.username or None,
        port=port,
        remote_vmshim=remote_vmshim or "vmshim",
        context=context,
        url=url,
    )


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vmshim"


class ContextStore:
    """The user's contexts (see the module docstring)."""

    def __init__(self, directory: Path | None = None):
        self.path = (directory or config_dir()) / "contexts.json"

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"current": None, "contexts": {}}
        except (OSError, ValueError) as exc:
            raise VmshimError(f"cannot read {self.path}: {exc}; fix or remove it") from None
        if not isinstance(data, dict) or not isinstance(data.get("contexts"), dict):
            raise VmshimError(f"cannot read {self.path}: not a vmshim contexts file; fix or remove it")
        return data

    def _save(self, data: dict) -> None:
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".contexts.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def current(self) -> str:
        """The current context's name (``default`` when none was chosen)."""
        if not self.path.exists():
            return DEFAULT
        return self._load().get("current") or DEFAULT

    def list(self) -> dict[str, dict]:
        return dict(self._load()["contexts"])

    def get(self, name: str) -> dict:
        contexts = self._load()["contexts"]
        if name not in contexts:
            raise VmshimError(f"no such context: {name} (see `vmshim context ls`)")
        return contexts[name]

    def target(self, name: str) -> SshTarget | None:
        """The context's target; None for ``default`` (this machine)."""
        if name == DEFAULT:
            return None
        entry = self.get(name)
        return parse_host(entry["host"], entry.get("remote_vmshim"), context=name)

    def create(self, name: str, host: str, description: str = "", remote_vmshim: str | None = None) -> None:
        if name == DEFAULT or not _NAME.match(name):
            raise UsageError(f"invalid context name {name!r}: use letters, digits, '_', '.', '-' (and not {DEFAULT!r})")
        parse_host(host)  # validate
        data = self._load()
        if name in data["contexts"]:
            raise VmshimError(f"context {name} already exists (remove it first: `vmshim context rm {name}`)")
        entry = {"host": host, "description": description}
        if remote_vmshim:
            entry["remote_vmshim"] = remote_vmshim
        data["contexts"][name] = entry
        self._save(data)

    def use(self, name: str) -> None:
        data = self._load()
        if name != DEFAULT and name not in data["contexts"]:
            raise VmshimError(f"no such context: {name} (see `vmshim context ls`)")
        data["current"] = None if name == DEFAULT else name
        self._save(data)

    def remove(self, name: str, force: bool = False) -> None:
        data = self._load()
        if name == DEFAULT:
            raise UsageError("the default context (this machine) cannot be removed")
        if name not in data["contexts"]:
            raise VmshimError(f"no such context: {name} (see `vmshim context ls`)")
        if data.get("current") == name and not force:
            raise VmshimError(f"context {name} is in use: switch first (`vmshim context use default`) or pass --force")
        del data["contexts"][name]
        if data.get("current") == name:
            data["current"] = None
        self._save(data)


def resolve(host: str | None, remote_vmshim: str | None, context: str | None) -> SshTarget | None:
    """The target of this command: ``--host`` > $VMSHIM_HOST > ``--context`` >
    $VMSHIM_CONTEXT > the current context. None: run here."""
    remote_vmshim = remote_vmshim or os.environ.get("VMSHIM_REMOTE_VMSHIM") or None
    host = host or os.environ.get("VMSHIM_HOST") or None
    if host:
        return parse_host(host, remote_vmshim)
    store = ContextStore()
    name = context or os.environ.get("VMSHIM_CONTEXT") or store.current()
    target = store.target(name)
    if target is not None and remote_vmshim:
        target = SshTarget(**{**asdict(target), "remote_vmshim": remote_vmshim})
    return target


def control_dir() -> Path:
    """The private directory of this user's control sockets (made 0700, checked)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "vmshim" if runtime else Path(os.path.expanduser("~")) / ".cache" / "vmshim"
    directory = base / "ssh"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise VmshimError(
            f"{directory} must be owned by you with mode 0700 (it holds your SSH "
            f"control sockets): fix it with `chmod 700 {directory}`"
        )
    return directory


def control_socket(target: SshTarget) -> Path:
    """The control socket of *target*: one per (user, host, port, remote command)."""
    import hashlib

    key = json.dumps([target.user, target.host, target.port, target.remote_vmshim])
    return control_dir() / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".sock")
