"""The per-container config drive: a small read-only ISO the agent reads at boot.

It carries ``config.json`` (a :class:`guest.spec.BootConfig`: process spec, hostname,
hosts, resolv.conf, agent token), so the workload can start without waiting for the host.
Built in-process with pycdlib (about a millisecond); Rock Ridge keeps the file names as
they are. Attach it as a read-only virtio disk whose ``<serial>`` is
``guest.spec.CONFIG_DRIVE_SERIAL``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pycdlib

from guest.spec import BootConfig

CONFIG_FILE = "config.json"
VOLUME_ID = "VMSHIM_CFG"


def build_config_drive(config: BootConfig, dest: Path) -> Path:
    """Write the ISO for *config* to *dest* atomically (temp file + rename); return *dest*.

    The ISO holds ``/config.json``. Precondition: dest's directory exists.
    """
    files = {CONFIG_FILE: json.dumps(config.to_dict(), indent=1).encode()}
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    try:
        for name, data in files.items():
            iso_name = "/" + name.upper().replace("-", "_").replace(".", "_")[:24] + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name)
        tmp = dest.with_name(dest.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, 0o600)  # the spec's environment and the agent token
            iso.write_fp(out)
        os.replace(tmp, dest)
    finally:
        iso.close()
    return dest


def read_config_drive(path: Path) -> BootConfig:
    """Read back the BootConfig of an ISO made by :func:`build_config_drive` (tests, inspect)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path="/" + CONFIG_FILE)
    finally:
        iso.close()
    return BootConfig.from_dict(json.loads(buf.getvalue()))
