"""``-v``, ``--mount``, ``--tmpfs`` and ``--volumes-from``: docker's syntax → a list of
:class:`MountRequest` (stored in the container's record). How a placement makes them is
shim.containers.mounts.

- ``-v /host/dir:/path[:opts]`` a bind mount (the host directory is made if missing, like
  docker); ``-v name:/path[:opts]`` the named volume (made if missing); ``-v /path`` a new
  anonymous volume. Options: ``ro``/``rw``, ``nocopy``; SELinux (``z``, ``Z``), consistency
  and propagation options are accepted and ignored.
- ``--mount type=bind|volume|tmpfs,source=…,target=…[,readonly][,volume-nocopy]
  [,volume-opt=size=…][,tmpfs-size=…][,tmpfs-mode=…]``.
- ``--tmpfs /path[:size=64m,mode=1777,…]``.
- ``--volumes-from CONTAINER[:ro|:rw]``: the bind mounts and volumes of another
  container, at the same places.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from shim.errors import UsageError
from shim.records import JsonRecord

TYPES = ("bind", "volume", "tmpfs")
IGNORED_OPTIONS = {
    "z",
    "Z",
    "cached",
    "delegated",
    "consistent",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "exec",
    "noexec",
}


@dataclass
class MountRequest(JsonRecord):
    """One mount as the user asked for it. ``source``: a host path (bind), a volume name
    (volume; "" until :func:`resolve_volumes` names an anonymous one) or "" (tmpfs)."""

    type: str
    target: str
    source: str = ""
    readonly: bool = False
    options: str = ""
    """tmpfs: kernel options (``size=67108864,mode=1777``)."""
    nocopy: bool = False
    """volume: do not copy the image's files into a new, empty volume."""
    anonymous: bool = False
    """volume: made for this container (``-v /path``); ``--rm`` removes it."""
    volume_size: int = 0
    """volume: the size to make it with (``volume-opt=size=…``), 0: the default."""

    def describe(self) -> str:
        source = self.source or ("(anonymous)" if self.type == "volume" else "tmpfs")
        return f"{self.type} {source} → {self.target}{' (ro)' if self.readonly else ''}"


def _target(path: str, flag: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"invalid {flag}: the mount destination {path!r} must be an absolute path")
    normal = os.path.normpath(path)
    if normal == "/":
        raise UsageError(f"invalid {flag}: cannot mount over the container's root (/)")
    return normal


def _bool(value: str, flag: str) -> bool:
    if value.lower() in ("", "1", "true"):
        return True
    if value.lower() in ("0", "false"):
        return False
    raise UsageError(f"invalid {flag}: expected true or false, got {value!r}")


def parse_volume(text: str) -> MountRequest:
    """One ``-v`` value. Raises UsageError."""
    parts = text.split(":")
    if len(parts) == 1:
        return MountRequest(type="volume", target=_target(parts[0], "-v"), anonymous=True)
    if len(parts) > 3 or not parts[0] or not parts[1]:
        raise UsageError(f"invalid -v {text!r}: expected SOURCE:DEST[:OPTIONS] or DEST")
    source, dest = parts[0], parts[1]
    readonly, nocopy = False, False
    for option in parts[2].split(",") if len(parts) == 3 else []:
        if option == "ro":
            readonly = True
        elif option == "rw":
            readonly = False
        elif option == "nocopy":
            nocopy = True
        elif option not in IGNORED_OPTIONS:
            raise UsageError(f"invalid -v {text!r}: unknown option {option!r}")
    target = _target(dest, "-v")
    if source.startswith("/"):
        return MountRequest(type="bind", source=os.path.normpath(source), target=target, readonly=readonly)
    if source.startswith("."):
        raise UsageError(f"invalid -v {text!r}: a bind mount source must be an absolute path")
    from shim.volumes.store import check_name

    check_name(source)
    return MountRequest(type="volume", source=source, target=target, readonly=readonly, nocopy=nocopy)


def parse_mount(text: str) -> MountRequest:
    """One ``--mount`` value (comma-separated key=value). Raises UsageError."""
    from shim.units import parse_bytes

    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not key:
            continue
        values[key] = value if sep else ""
    kind = values.pop("type", "volume")
    if kind not in TYPES:
        raise UsageError(f"invalid --mount {text!r}: type must be one of {', '.join(TYPES)}")
    source = values.pop("source", values.pop("src", ""))
    dest = values.pop("target", values.pop("destination", values.pop("dst", "")))
    if not dest:
        raise UsageError(f"invalid --mount {text!r}: target is required")
    readonly = False
    for key in ("readonly", "ro"):
        if key in values:
            readonly = _bool(values.pop(key), f"--mount {key}")
    request = MountRequest(type=kind, target=_target(dest, "--mount"), readonly=readonly)
    if kind == "bind":
        if not source.startswith("/"):
            raise UsageError(f"invalid --mount {text!r}: a bind mount needs an absolute source")
        if not os.path.exists(source):
            raise UsageError(f"invalid --mount {text!r}: bind source path does not exist: {source}")
        request.source = os.path.normpath(source)
        values.pop("bind-propagation", None)
        values.pop("consistency", None)
    elif kind == "volume":
        if source:
            from shim.volumes.store import check_name

            check_name(source)
            request.source = source
        else:
            request.anonymous = True
        if "volume-nocopy" in values:
            request.nocopy = _bool(values.pop("volume-nocopy"), "--mount volume-nocopy")
        option = values.pop("volume-opt", None)
        if option is not None:
            key, _, value = option.partition("=")
            if key != "size":
                raise UsageError(f"invalid --mount {text!r}: the only volume-opt is size=…")
            request.volume_size = parse_bytes(value, "--mount volume-opt=size")
        if values.get("volume-driver", "local") in ("", "local"):
            values.pop("volume-driver", None)
        values.pop("consistency", None)
    else:
        if source:
            raise UsageError(f"invalid --mount {text!r}: a tmpfs has no source")
        options = []
        if "tmpfs-size" in values:
            options.append(f"size={parse_bytes(values.pop('tmpfs-size'), '--mount tmpfs-size')}")
        if "tmpfs-mode" in values:
            mode = values.pop("tmpfs-mode")
            if not mode or any(c not in "01234567" for c in mode):
                raise UsageError(f"invalid --mount {text!r}: tmpfs-mode must be octal")
            options.append(f"mode={mode}")
        request.options = ",".join(options)
    if values:
        raise UsageError(f"invalid --mount {text!r}: unknown key {sorted(values)[0]!r}")
    return request


def parse_tmpfs(text: str) -> MountRequest:
    """One ``--tmpfs`` value: ``/path[:opt,opt=value…]``. Raises UsageError."""
    from guest.runtime.mounts import TMPFS_DATA, TMPFS_FLAGS
    from shim.units import parse_bytes

    dest, _, raw = text.partition(":")
    options = []
    readonly = False
    for word in (w.strip() for w in raw.split(",") if w.strip()):
        key, sep, value = word.partition("=")
        if word == "ro":
            readonly = True
        elif word in TMPFS_FLAGS:
            options.append(word)
        elif sep and key == "size":
            options.append(f"size={parse_bytes(value, '--tmpfs size')}")
        elif sep and key in TMPFS_DATA and value.isalnum():
            options.append(word)
        else:
            raise UsageError(f"invalid --tmpfs {text!r}: unknown option {word!r}")
    return MountRequest(type="tmpfs", target=_target(dest, "--tmpfs"), readonly=readonly, options=",".join(options))


def parse_all(volumes=(), mounts=(), tmpfs=()) -> list[MountRequest]:
    """Every mount flag in docker's order (``-v``, ``--mount``, ``--tmpfs``). Raises
    UsageError, also for two mounts on the same destination."""
    requests = [parse_volume(v) for v in volumes] + [parse_mount(m) for m in mounts] + [parse_tmpfs(t) for t in tmpfs]
    check_duplicates(requests)
    return requests


def check_duplicates(requests: list[MountRequest]) -> None:
    seen = set()
    for request in requests:
        if request.target in seen:
            raise UsageError(f"duplicate mount point: {request.target}")
        seen.add(request.target)


def volumes_from(records_mounts: list[list[MountRequest]], refs: list[str]) -> list[MountRequest]:
    """The mounts ``--volumes-from`` copies: for each ref (``NAME[:ro|:rw]``, with its
    container's stored mounts in *records_mounts*, same order), its bind mounts and
    volumes (anonymous ones too, by name: they stay the other container's). ``:ro``
    makes them all read-only; ``:rw`` (the default) keeps each one's own mode."""
    out = []
    for ref, stored in zip(refs, records_mounts):
        _, _, mode = ref.partition(":")
        if mode not in ("", "ro", "rw"):
            raise UsageError(f"invalid --volumes-from {ref!r}: the mode must be ro or rw")
        for theirs in stored:
            if theirs.type == "tmpfs":
                continue
            # the owner removes an anonymous one, not us
            out.append(replace(theirs, anonymous=False, volume_size=0, readonly=theirs.readonly or mode == "ro"))
    return out


def prepare_binds(requests: list[MountRequest], isolation: str) -> None:
    """Check bind sources on this host: make a missing ``-v`` directory (docker does),
    refuse a single file in a VM (virtiofs shares directories; share its directory).
    Raises UsageError."""
    for request in requests:
        if request.type != "bind":
            continue
        if not os.path.exists(request.source):
            os.makedirs(request.source, mode=0o755, exist_ok=True)
        if isolation == "vm" and not os.path.isdir(request.source):
            raise UsageError(
                f"cannot bind-mount {request.source}: in a VM only directories "
                "can be shared (mount its directory, or use --isolation process)"
            )
