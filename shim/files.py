"""Writing the stores' files safely: an flock held for a block (:func:`flocked`) and a
file replaced whole or not at all (:func:`replaced`). The bottom floor: stdlib only."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def flocked(path: Path, kind: int = fcntl.LOCK_EX, mode: int = 0o644) -> Iterator[None]:
    """Hold an flock of *kind* on the file *path* (made with *mode* when missing) for the
    ``with`` block: how the stores serialise their changes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, kind)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def replaced(path: Path, mode: int = 0o644, sync: bool = True) -> Iterator[BinaryIO]:
    """A file to write that replaces *path* when the ``with`` block ends without an
    exception, so readers see the old file or the whole new one (a temp file beside it,
    renamed; with *sync* flushed to disk first). On an exception the temp file goes.
    Raises OSError when the directory cannot take the temp file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_all(fd: int, data: bytes) -> None:
    """Write all of *data* to *fd*, waiting for room when it is non-blocking. Raises
    OSError (BrokenPipeError: the reader has gone)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            time.sleep(0.01)


def read_json(path: str | os.PathLike, limit: int):
    """The JSON value in the file *path*, of at most *limit* bytes. Raises OSError when it
    cannot be read; ValueError, saying it "is larger than N MiB" or "is not valid JSON: …",
    when it is too large or not JSON."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"is larger than {limit >> 20} MiB")
    try:
        return json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ValueError(f"is not valid JSON: {exc}") from None
