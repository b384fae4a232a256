"""libvirt's QEMU save image, as far as snapshot templates need it: a copy with the
domain's name and UUID changed, so one saved VM can be restored many times at once.

libvirt refuses to restore a save image as a domain of another name or UUID ("Target
domain name … does not match source", checked by virDomainRestoreFlags even with new
XML), and two domains cannot share a UUID. The file is a fixed header (magic
``LibvirtQemudSave``, version, ``data_len``, was_running, compressed, cookie offset,
padding), then ``data_len`` bytes holding the domain XML and libvirt's cookie, then
QEMU's migration stream. :func:`clone` copies it with same-length substitutions in the
XML only (a container id for another, a UUID for another), so every offset stays valid,
and the migration stream copied as it is.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from shim.errors import HypervisorError

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("=16s5I14I")
"""magic, version, data_len, was_running, compressed, cookieOffset, unused[14]."""
MAX_DATA = 16 << 20


def clone(src: Path, dst: Path, replacements: dict[str, str]) -> None:
    """Write *dst*: *src* with every old → new text of *replacements* swapped in its
    domain XML (each pair the same length). Raises HypervisorError when *src* is not an
    uncompressed libvirt save image or an old text is missing."""
    for old, new in replacements.items():
        if len(old.encode()) != len(new.encode()):
            raise ValueError(f"replacement of {old!r} must keep its length")
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd_in, HEADER.size, 0)
        if len(head) != HEADER.size:
            raise HypervisorError(f"{src} is not a libvirt save image (too short)")
        fields = HEADER.unpack(head)
        magic, _version, data_len, _running, compressed = fields[:5]
        if magic != MAGIC or compressed != 0 or not 0 < data_len <= MAX_DATA:
            raise HypervisorError(f"{src} is not an uncompressed libvirt save image")
        data = os.pread(fd_in, data_len, HEADER.size)
        for old, new in replacements.items():
            if old.encode() not in data:
                raise HypervisorError(f"the save image {src} does not name {old}")
            data = data.replace(old.encode(), new.encode())
        size = os.fstat(fd_in).st_size
        start = HEADER.size + data_len
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd_out, head + data)
            offset_in, offset_out = start, start
            while offset_in < size:
                n = os.copy_file_range(fd_in, fd_out, size - offset_in, offset_in, offset_out)
                if n <= 0:
                    raise HypervisorError(f"short copy of the save image {src}")
                offset_in += n
                offset_out += n
        except BaseException:
            os.close(fd_out)
            Path(dst).unlink(missing_ok=True)
            raise
        os.close(fd_out)
    finally:
        os.close(fd_in)
