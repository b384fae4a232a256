"""What a container may do: ``--privileged``, ``--cap-add/--cap-drop``, ``--security-opt``
and ``--device`` become the ProcessSpec's capabilities/seccomp/no_new_privs and the
record's ``privileged``/``devices`` (docker's defaults and rules; see README "Security
defaults").
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from guest.spec import CAPABILITIES, DEFAULT_CAPABILITIES
from shim.errors import UsageError
from shim.files import read_json

MAX_PROFILE_BYTES = 1 << 20


@dataclass
class SecurityOptions:
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)


def cap_name(text: str, flag: str) -> str:
    """``net_admin``, ``CAP_NET_ADMIN`` or ``ALL`` → the canonical name. Raises UsageError."""
    name = text.strip().upper()
    if name == "ALL":
        return name
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name not in CAPABILITIES:
        raise UsageError(f"invalid {flag} {text!r}: not a Linux capability (e.g. NET_ADMIN)")
    return name


def capability_set(options: SecurityOptions) -> list[str]:
    """Docker's rule: start from the default set (every capability with --privileged),
    drop ``--cap-drop`` (ALL: everything), then add ``--cap-add`` (ALL: everything)."""
    if options.privileged:
        return list(CAPABILITIES)
    drop = {cap_name(c, "--cap-drop") for c in options.cap_drop}
    add = {cap_name(c, "--cap-add") for c in options.cap_add}
    caps = [] if "ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c not in drop]
    if "ALL" in add:
        return list(CAPABILITIES)
    caps += [c for c in CAPABILITIES if c in add and c not in caps]
    return caps


def parse_security_opts(values: list[str], capabilities: list[str]) -> tuple[object, bool]:
    """``--security-opt`` values → (seccomp for the ProcessSpec: "default", None for
    unconfined or an OCI object from a profile file; no_new_privs). Raises UsageError."""
    from guest.runtime import seccomp

    profile: object = "default"
    no_new_privs = False
    for value in values:
        key, sep, arg = value.partition("=")
        if not sep:
            key, sep, arg = value.partition(":")  # docker's older spelling
        if key == "no-new-privileges":
            if arg not in ("", "true", "false"):
                raise UsageError(f"invalid --security-opt {value!r}: use no-new-privileges[=true|false]")
            no_new_privs = arg != "false"
        elif key == "seccomp" and arg:
            if arg == "unconfined":
                profile = None
                continue
            try:
                data = read_json(arg, MAX_PROFILE_BYTES)
            except OSError as exc:
                raise UsageError(f"cannot read seccomp profile {arg}: {exc.strerror}") from None
            except ValueError as exc:
                raise UsageError(f"seccomp profile {arg} {exc}") from None
            try:
                profile = seccomp.resolve_profile(data, capabilities)
            except ValueError as exc:
                raise UsageError(f"seccomp profile {arg} is not valid JSON: {exc}") from None
            except seccomp.SeccompError as exc:
                raise UsageError(f"seccomp profile {arg}: {exc}") from None
        elif key in ("apparmor", "label"):
            continue  # docker ignores these where the host has no such LSM; so do we
        else:
            raise UsageError(
                f"invalid --security-opt {value!r}: use no-new-privileges, seccomp=PROFILE.json or seccomp=unconfined"
            )
    return profile, no_new_privs


def parse_device(text: str, isolation: str) -> dict:
    """``--device HOST[:CONTAINER][:PERMS]`` → ``{"path", "type", "major", "minor",
    "permissions"}``. In a VM the guest kernel makes the node with the host's numbers,
    which means the same virtual device for character devices (tun, fuse); a host block
    device cannot be handed to a VM this way. Raises UsageError."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0].startswith("/"):
        raise UsageError(f"invalid --device {text!r}: use /dev/HOST[:/dev/CONTAINER][:rwm]")
    host = parts[0]
    perms = "rwm"
    target = host
    if len(parts) == 2:
        if set(parts[1]) <= set("rwm") and parts[1]:
            perms = parts[1]
        else:
            target = parts[1]
    elif len(parts) == 3:
        target, perms = parts[1], parts[2]
    if not target.startswith("/") or ".." in target.split("/") or not perms or not set(perms) <= set("rwm"):
        raise UsageError(
            f"invalid --device {text!r}: the container path must be absolute and the permissions some of r, w, m"
        )
    try:
        st = os.stat(host)
    except OSError as exc:
        raise UsageError(f"invalid --device {text!r}: {host}: {exc.strerror}") from None
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
        if isolation == "vm":
            raise UsageError(
                f"--device {host}: a host block device cannot be passed to a "
                "VM container; use a volume, or --isolation process"
            )
    else:
        raise UsageError(f"invalid --device {text!r}: {host} is not a device node")
    return {
        "path": target,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "permissions": perms,
    }
