"""Reading tar archives from hostile sources with bounded memory per header.

Python's ``tarfile`` reads a PAX extended header or a GNU long-name/long-link header whole,
whatever size its header block claims, before any caller sees the member, and it follows a
chain of such headers by recursion. A hostile layer, ``load`` archive or ``cp`` stream can
therefore make the host allocate gigabytes, or blow the stack, with a few bytes of input.
``BoundedTarInfo`` (pass it as ``tarinfo=``, or use ``open_tar``) refuses, before reading:

- one PAX (extended or global) header larger than ``MAX_EXTENDED_HEADER``;
- one GNU long name or long link larger than ``MAX_LONG_NAME``;
- more than ``MAX_HEADER_CHAIN`` extended headers in front of one member;
- global PAX headers adding up to more than ``MAX_EXTENDED_HEADER``;
- GNU sparse members (old GNU and PAX sparse 0.0/0.1/1.0): their maps are unbounded
  loops in ``tarfile``, and the tools that make images (docker, buildkit, podman,
  umoci) never write them.

Each refusal is a ``tarfile.HeaderError`` whose text names the cap; the readers turn it into
their own one-line error (LayerError, ImageError, VmshimError).
"""

from __future__ import annotations

import tarfile
from typing import Literal

MAX_EXTENDED_HEADER = 1 << 20  # xattrs (SCHILY.xattr.*) are the biggest legitimate users
MAX_LONG_NAME = 64 << 10  # PATH_MAX is 4096; leave room, never gigabytes
MAX_HEADER_CHAIN = 16
_CHAIN_ATTR = "_vmshim_header_chain"


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose header processing is bounded (see the module docstring)."""

    def _proc_member(self, tarfile_):
        _check_globals(tarfile_)
        return super()._proc_member(tarfile_)

    def _proc_gnulong(self, tarfile_):
        if self.size > MAX_LONG_NAME:
            raise tarfile.HeaderError(
                f"a GNU long-name header of {self.size} bytes is larger "
                f"than the {MAX_LONG_NAME} byte cap (header bomb?)"
            )
        with _chained(tarfile_):
            return super()._proc_gnulong(tarfile_)

    def _proc_pax(self, tarfile_):
        if self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(
                f"a PAX extended header of {self.size} bytes is larger "
                f"than the {MAX_EXTENDED_HEADER} byte cap "
                "(header bomb?)"
            )
        with _chained(tarfile_):
            return super()._proc_pax(tarfile_)

    def _proc_sparse(self, tarfile_):
        raise _sparse_refused(self)

    # PAX sparse formats 0.0, 0.1 and 1.0 (called by _proc_pax with the member that follows)
    def _proc_gnusparse_00(self, next_, *args):
        raise _sparse_refused(next_)

    def _proc_gnusparse_01(self, next_, *args):
        raise _sparse_refused(next_)

    def _proc_gnusparse_10(self, next_, *args):
        raise _sparse_refused(next_)


def _sparse_refused(member) -> tarfile.HeaderError:
    return tarfile.HeaderError(f"member {_shown(member.name)} is a GNU sparse file; sparse members are not supported")


class _chained:
    """Counts the extended headers in front of one member (tarfile recurses through them)."""

    def __init__(self, tar):
        self.tar = tar

    def __enter__(self):
        depth = getattr(self.tar, _CHAIN_ATTR, 0) + 1
        if depth > MAX_HEADER_CHAIN:
            raise tarfile.HeaderError(f"more than {MAX_HEADER_CHAIN} extended headers in a row (header bomb?)")
        setattr(self.tar, _CHAIN_ATTR, depth)

    def __exit__(self, *exc):
        setattr(self.tar, _CHAIN_ATTR, getattr(self.tar, _CHAIN_ATTR, 1) - 1)
        return False


def _check_globals(tar) -> None:
    total = sum(len(k) + len(v) for k, v in tar.pax_headers.items())
    if total > MAX_EXTENDED_HEADER:
        raise tarfile.HeaderError(f"global PAX headers add up to more than {MAX_EXTENDED_HEADER} bytes (header bomb?)")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:100] + "...")


def open_tar(fileobj, mode: Literal["r|", "r|*"] = "r|") -> tarfile.TarFile:
    """``tarfile.open(fileobj=…, mode=…)`` reading with BoundedTarInfo. Raises what
    ``tarfile.open`` raises (ReadError for a refused first header)."""
    return tarfile.open(fileobj=fileobj, mode=mode, tarinfo=BoundedTarInfo)
