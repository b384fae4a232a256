"""What a container is, as both placements of the runtime see it. Stdlib only.

Plain classes, not dataclasses: importing ``dataclasses`` costs ~100 ms of the guest's
boot under TCG, on the path to the agent's hello.

The host fills a :class:`BootConfig` and writes it as ``config.json`` on the config drive
(VM isolation) or hands it to the runtime directly (process isolation). The agent reads it
at boot, before the host has said anything, so it can mount the rootfs straight away.
"""

from __future__ import annotations


CONFIG_DRIVE_SERIAL = "vmshim-config"
"""``<serial>`` of the config-drive disk; the agent finds it in /sys/block/*/serial."""
WRITABLE_SERIAL = "vmshim-rw"
"""``<serial>`` of the writable-layer disk (ext4), when the container has one."""
LAYER_SERIAL_PREFIX = "vmshim-l"
"""Layer disks are ``vmshim-l0`` (lowest) … ``vmshim-lN`` (topmost)."""
AGENT_PORT_NAME = "org.vmshim.agent"
"""virtio-serial port name the agent opens (/sys/class/virtio-ports/*/name)."""


class _Record:
    """Keyword construction, equality and repr from ``_fields`` (name → default)."""

    _fields: dict = {}

    def __init__(self, **values):
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        for name, default in self._fields.items():
            if name in values:
                value = values[name]
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name!r}")
            else:
                value = default() if callable(default) else default
            setattr(self, name, value)

    def replace(self, **changes):
        """A copy with *changes* applied (like dataclasses.replace)."""
        values = {n: getattr(self, n) for n in self._fields}
        values.update(changes)
        return type(self)(**values)

    def __eq__(self, other):
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self._fields)

    def __repr__(self):
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({inner})"


_REQUIRED = object()


class ProcessSpec(_Record):
    """One process to run in the container.

    ``user`` is ``uid[:gid]`` or a name from the image's /etc/passwd (resolved inside the
    rootfs, never on the host). ``env`` is a list of ``K=V`` strings, OCI style.
    """

    _fields = {"args": _REQUIRED, "env": list, "cwd": "/", "user": "", "tty": False}

    @classmethod
    def from_dict(cls, data: dict) -> "ProcessSpec":
        """Build from untrusted JSON; raises ValueError naming the bad field."""
        args = data.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise ValueError("process.args must be a non-empty list of strings")
        env = data.get("env", [])
        if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
            raise ValueError("process.env must be a list of K=V strings")
        cwd = data.get("cwd", "/")
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise ValueError("process.cwd must be an absolute path")
        user = data.get("user", "")
        if not isinstance(user, str):
            raise ValueError("process.user must be a string")
        tty = data.get("tty", False)
        if not isinstance(tty, bool):
            raise ValueError("process.tty must be a boolean")
        return cls(args=list(args), env=list(env), cwd=cwd, user=user, tty=tty)

    def to_dict(self) -> dict:
        return {"args": list(self.args), "env": list(self.env), "cwd": self.cwd,
                "user": self.user, "tty": self.tty}


class BootConfig(_Record):
    """Everything the agent needs at boot; serialised to the config drive.

    ``writable`` is ``"tmpfs"`` (a throw-away upper layer in guest RAM) or ``"disk"``
    (the disk with WRITABLE_SERIAL); ``memory_limit`` is bytes for the container's cgroup
    memory.max (0: no limit); ``pids_limit`` likewise for pids.max.
    """

    _fields = {"container_id": _REQUIRED, "token": _REQUIRED, "hostname": _REQUIRED,
               "process": _REQUIRED, "layer_count": _REQUIRED, "writable": "tmpfs",
               "hosts": "", "resolv_conf": "", "memory_limit": 0, "pids_limit": 0}

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self._fields}
        data["process"] = self.process.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BootConfig":
        """Build from the config drive's JSON; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("boot config must be a JSON object")
        out = {}
        for name, kind in (("container_id", str), ("token", str), ("hostname", str),
                           ("layer_count", int), ("writable", str), ("hosts", str),
                           ("resolv_conf", str), ("memory_limit", int), ("pids_limit", int)):
            if name in data:
                if not isinstance(data[name], kind) or isinstance(data[name], bool):
                    raise ValueError(f"boot config field {name!r} has the wrong type")
                out[name] = data[name]
        for name in ("container_id", "token", "hostname", "layer_count"):
            if name not in out:
                raise ValueError(f"boot config lacks {name!r}")
        if out.get("writable", "tmpfs") not in ("tmpfs", "disk"):
            raise ValueError("boot config field 'writable' must be 'tmpfs' or 'disk'")
        out["process"] = ProcessSpec.from_dict(data.get("process") or {})
        return cls(**out)
