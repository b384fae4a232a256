"""Registry settings and credentials.

Settings (all optional), the environment winning over the file:

    VMSHIM_DEFAULT_REGISTRY     host[:port] that serves names without a registry
                                (``busybox``, ``docker.io/...``); default registry-1.docker.io.
                                Names stay ``docker.io/...`` in the store, so ``vmshim run
                                busybox`` finds the image whichever endpoint it came from.
    VMSHIM_INSECURE_REGISTRIES  comma-separated host[:port] that may use plain HTTP (and
                                HTTPS without certificate checks)
    $VMSHIM_ROOT/registries.json  {"default_registry": "host:port",
                                   "insecure_registries": ["host:port", ...]}
                                (``VMSHIM_REGISTRIES_CONFIG`` names another file)

Loopback registries (``localhost``, ``127.0.0.0/8``, ``[::1]``) are always allowed plain
HTTP, as docker does; any other host only when listed or with ``--insecure``.

Credentials live in ``$VMSHIM_ROOT/auth.json`` (mode 0600) in docker's ``config.json``
form: ``{"auths": {"host:port": {"auth": base64("user:password")}}}``; Docker Hub's key is
``https://index.docker.io/v1/`` as docker writes it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from shim import paths
from shim.errors import RegistryError, UsageError
from shim.images.reference import DEFAULT_REGISTRY
from shim.images.store import atomic_write, flocked

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = (
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    DOCKER_HUB_AUTH_KEY,
    "https://index.docker.io/v1",
    "https://registry-1.docker.io",
)


@dataclass(frozen=True)
class RegistrySettings:
    default_registry: str | None = None
    insecure_registries: frozenset[str] = frozenset()


def config_file() -> Path:
    env = os.environ.get("VMSHIM_REGISTRIES_CONFIG")
    return Path(env) if env else paths.root() / "registries.json"


def load_settings() -> RegistrySettings:
    """Read the settings file and environment. Raises UsageError if the file is invalid."""
    data: dict = {}
    path = config_file()
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as e:
        raise UsageError(f"registry settings {path} are invalid: {e}") from None
    default = os.environ.get("VMSHIM_DEFAULT_REGISTRY") or data.get("default_registry") or None
    insecure = set(data.get("insecure_registries") or [])
    env = os.environ.get("VMSHIM_INSECURE_REGISTRIES", "")
    insecure.update(h.strip() for h in env.split(",") if h.strip())
    if default is not None:
        default = normalize_host(str(default))
    return RegistrySettings(
        default_registry=default, insecure_registries=frozenset(normalize_host(str(h)) for h in insecure)
    )


def normalize_host(text: str) -> str:
    """``https://Host:5000/v2/`` → ``host:5000``; Docker Hub's aliases → ``docker.io``."""
    host = text.strip()
    for prefix in ("https://", "http://"):
        if host.lower().startswith(prefix):
            host = host[len(prefix) :]
    host = host.split("/", 1)[0].lower()
    if not host:
        raise UsageError(f"invalid registry {text!r}: expected host[:port]")
    if host in ("index.docker.io", "registry-1.docker.io"):
        return DEFAULT_REGISTRY
    return host


def endpoint_host(registry: str, settings: RegistrySettings | None = None) -> str:
    """The host[:port] to contact for images whose reference names ``registry``."""
    settings = settings or load_settings()
    if registry == DEFAULT_REGISTRY:
        return settings.default_registry or DOCKER_HUB_ENDPOINT
    return registry


def split_host(host: str) -> str:
    """The hostname part of ``host[:port]`` (brackets of an IPv6 literal removed)."""
    if host.startswith("["):
        return host[1 : host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    name = split_host(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_allowed(host: str, insecure: bool = False, settings: RegistrySettings | None = None) -> bool:
    """Whether ``host`` may be reached over plain HTTP (and HTTPS without verification)."""
    if insecure or is_loopback(host):
        return True
    settings = settings or load_settings()
    return host in settings.insecure_registries or split_host(host) in settings.insecure_registries


# Credentials --------------------------------------------------------------------------------
def auth_file() -> Path:
    return paths.root() / "auth.json"


def _auth_key(registry: str) -> str:
    host = normalize_host(registry)
    return DOCKER_HUB_AUTH_KEY if host == DEFAULT_REGISTRY else host


def _read_auths(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"auths": {}}
    except (OSError, ValueError) as e:
        raise RegistryError(f"credentials file {path} is unreadable ({e}); fix or delete it and log in again") from None
    if not isinstance(data, dict):
        data = {}
    if not isinstance(data.get("auths"), dict):
        data["auths"] = {}
    return data


def get_credentials(*registries: str) -> tuple[str, str] | None:
    """(user, password) stored for the first of ``registries`` that has any."""
    auths = _read_auths(auth_file())["auths"]
    for registry in registries:
        host = normalize_host(registry)
        keys = _HUB_ALIASES if host == DEFAULT_REGISTRY else (host, f"https://{host}", f"http://{host}")
        for key in keys:
            entry = auths.get(key)
            if not isinstance(entry, dict):
                continue
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise RegistryError(
                        f"credentials for {registry} in {auth_file()} are malformed; log in again"
                    ) from None
                return user, password
            if entry.get("username") is not None:
                return str(entry["username"]), str(entry.get("password") or "")
    return None


def store_credentials(registry: str, user: str, password: str) -> None:
    """Record credentials for ``registry`` (file created 0600, replaced atomically)."""
    path = auth_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(path.parent / ".auth.lock"):
        data = _read_auths(path)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        data["auths"][_auth_key(registry)] = {"auth": token}
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n", mode=0o600)


def remove_credentials(registry: str) -> bool:
    """Forget the credentials of ``registry``; False if there were none."""
    path = auth_file()
    if not path.exists():
        return False
    with flocked(path.parent / ".auth.lock"):
        data = _read_auths(path)
        host = normalize_host(registry)
        keys = _HUB_ALIASES if host == DEFAULT_REGISTRY else (host, f"https://{host}", f"http://{host}")
        found = False
        for key in keys:
            if data["auths"].pop(key, None) is not None:
                found = True
        if found:
            atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n", mode=0o600)
    return found


def default_login_registry(settings: RegistrySettings | None = None) -> str:
    """What ``login``/``logout`` without an argument mean: the default registry."""
    settings = settings or load_settings()
    return settings.default_registry or DEFAULT_REGISTRY
