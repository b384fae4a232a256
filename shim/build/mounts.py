"""``RUN --mount=…`` (BuildKit) and ``vmshim build --secret``: what a RUN step sees beside
its image, and never keeps.

- ``type=cache,target=DIR[,id=ID][,ro]``: a persistent volume per id (default: the
  target), shared by every build on this host, one per isolation (a volume a VM wrote is
  never mounted by ``--isolation process``, see shim.volumes.store). Never in the image.
- ``type=secret,id=ID[,target=FILE][,required]``: the file given with ``--secret
  id=ID,src=PATH``, read-only at FILE (default ``/run/secrets/ID``) for that step only.
  A copy of it sits alone in a private directory of the build for the step (a VM shares
  that directory, never the source's own). Only the id is in the cache key and history.
- ``type=tmpfs,target=DIR[,size=BYTES]``: an empty tmpfs.
- ``type=bind,target=DIR[,source=PATH][,from=STAGE|IMAGE][,rw]`` (the default type):
  PATH (default: the whole) of the build context, or of an earlier stage or an image,
  read-only unless ``rw``. The builder copies it into a private directory of the build
  (:func:`materialize`), so the step never sees the user's own files and ``rw`` writes
  are thrown away; its content is part of the step's cache key, never of its layer.

Mount points the step made only to mount on (the target, its missing parents) are left
out of the layer (shim.build.diff).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from shim.build.errors import BuildError
from shim.volumes.specs import MountRequest

TYPES = ("bind", "cache", "secret", "tmpfs")
_KEYS = {
    "cache": {"type", "target", "dst", "destination", "id", "ro", "readonly", "rw", "sharing", "mode", "uid", "gid"},
    "secret": {"type", "target", "dst", "destination", "id", "required", "mode", "uid", "gid"},
    "tmpfs": {"type", "target", "dst", "destination", "size"},
    "bind": {"type", "target", "dst", "destination", "source", "src", "from", "rw", "readwrite", "ro", "readonly"},
}
MAX_SECRET = 500 * 1024
"""docker's cap on a build secret's size."""


class MountError(BuildError):
    """A ``--mount`` or ``--secret`` is malformed or cannot be provided."""


@dataclass
class StepMounts:
    """The mounts of one RUN step: requests for the placement, the paths (relative to
    the root) that are only mount points, and private files to remove afterwards."""

    requests: list[MountRequest] = field(default_factory=list)
    mount_points: set[str] = field(default_factory=set)
    scratch: list[Path] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)
        self.scratch.clear()


def parse_secret_flags(values: list[str]) -> dict[str, Path]:
    """``--secret id=ID,src=PATH`` (docker's form; ``source=``, ``type=file`` accepted)
    → {id: path}. Raises MountError naming the flag."""
    out: dict[str, Path] = {}
    for value in values:
        fields = _pairs(value, f"--secret {value!r}")
        if fields.get("type", "file") != "file":
            raise MountError(f"invalid --secret {value!r}: only type=file is supported")
        ident = fields.get("id")
        src = fields.get("src") or fields.get("source")
        if not ident or not src:
            raise MountError(f"invalid --secret {value!r}: expected id=ID,src=PATH")
        path = Path(src)
        try:
            size = path.stat().st_size
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise MountError(f"--secret {ident}: cannot read {src}: {exc.strerror}") from None
        if not path.is_file() or size > MAX_SECRET:
            raise MountError(f"--secret {ident}: {src} must be a regular file of at most {MAX_SECRET} bytes")
        out[ident] = path
    return out


def parse_mount(spec: str, where: str) -> dict:
    """Check one ``--mount`` value (no side effects); returns its fields with ``type``
    and ``target`` normalised. Raises MountError naming *where*."""
    # str values as written, plus "rw" (bool) below and the builder's "plans"/"open_many"
    fields: dict = _pairs(spec, f"{where}: RUN --mount={spec}")
    kind = fields.setdefault("type", "bind")
    if kind not in TYPES:
        raise MountError(f"{where}: RUN --mount type={kind} is not supported (supported: {', '.join(TYPES)})")
    unknown = sorted(set(fields) - _KEYS[kind])
    if unknown:
        raise MountError(f"{where}: RUN --mount type={kind} does not take {unknown[0]!r}")
    target: str = fields.get("target") or fields.get("dst") or fields.get("destination") or ""
    if kind == "secret":
        if not fields.get("id") and not target:
            raise MountError(f"{where}: RUN --mount type=secret needs id= or target=")
        ident = fields.get("id") or posixpath.basename(target)
        fields["id"] = ident
        target = target or f"/run/secrets/{ident}"
    if not target:
        raise MountError(f"{where}: RUN --mount type={kind} needs target=")
    target = posixpath.normpath(target)
    if target == "/":
        raise MountError(f"{where}: RUN --mount target=/ is not allowed")
    fields["target"] = target
    if kind == "bind":
        fields["source"] = fields.get("source") or fields.get("src") or "."
        fields["rw"] = _flag(fields, "rw") or _flag(fields, "readwrite")
    if kind == "tmpfs" and "size" in fields and not fields["size"].isdigit():
        raise MountError(f"{where}: RUN --mount type=tmpfs size= must be a number of bytes")
    return fields


def prepare(
    specs: list[dict], *, isolation: str, secrets: dict[str, Path], workdir: str, scratch_dir: Path
) -> StepMounts:
    """Turn checked ``--mount`` fields into requests for one step: cache volumes made if
    missing, secrets copied to a private directory under *scratch_dir*, bind sources
    written there (``fields["plans"]`` and ``fields["open_many"]`` set by the builder,
    see :func:`materialize`). Raises MountError (a required secret not given),
    VolumeError, CopyError."""
    from shim.volumes.store import VolumeStore

    out = StepMounts()
    try:
        for fields in specs:
            target = posixpath.normpath(posixpath.join(workdir, fields["target"]))
            if fields["type"] == "tmpfs":
                options = f"size={fields['size']}" if "size" in fields else ""
                out.requests.append(MountRequest(type="tmpfs", target=target, options=options))
            elif fields["type"] == "bind":
                private = Path(scratch_dir) / f"bind-{len(out.scratch)}"
                private.mkdir(mode=0o700, parents=True)
                out.scratch.append(private)
                source = materialize(fields["plans"], private / "root", fields.get("open_many"))
                out.requests.append(
                    MountRequest(type="bind", source=str(source), target=target, readonly=not fields["rw"])
                )
            elif fields["type"] == "cache":
                ident = fields.get("id") or target
                name = f"buildcache-{isolation}-{hashlib.sha256(ident.encode()).hexdigest()[:24]}"
                VolumeStore().ensure(name)
                readonly = "ro" in fields or fields.get("readonly", "false") != "false"
                out.requests.append(
                    MountRequest(type="volume", source=name, target=target, readonly=readonly, nocopy=True)
                )
            else:
                secret = secrets.get(fields["id"])
                if secret is None:
                    if fields.get("required", "false") not in ("false", ""):
                        raise MountError(
                            f"secret {fields['id']!r} is required by RUN "
                            f"--mount; give it with --secret id={fields['id']},"
                            "src=FILE"
                        )
                    continue
                private = Path(scratch_dir) / f"secret-{len(out.scratch)}"
                private.mkdir(mode=0o700, parents=True)
                out.scratch.append(private)
                copy = private / "secret"
                fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "wb") as f, open(secret, "rb") as src:
                    f.write(src.read(MAX_SECRET + 1)[:MAX_SECRET])
                out.requests.append(MountRequest(type="bind", source=str(copy), target=target, readonly=True))
            rel = target.lstrip("/")
            while rel:
                out.mount_points.add(rel)
                rel = posixpath.dirname(rel)
    except BaseException:
        out.cleanup()
        raise
    return out


MAX_BIND_ENTRIES = 200_000
"""Most files and directories one bind mount may copy."""


def materialize(plans: list, dest: Path, open_many=None) -> Path:
    """Write the COPY plans of a bind mount's source (shim.build.copy: one ``file`` plan
    or one ``dir`` plan) at *dest*: a file, or a directory with the plan's entries. Files
    of an image (entries without an opener) are read through *open_many* (a RootView's).
    Entry paths come from the context or the image's checked file list: no ``..``, no
    absolute paths; symlinks are made, never followed (every path is created under a
    parent made here). Returns *dest*. Raises MountError."""
    if len(plans) != 1 or plans[0].kind not in ("file", "dir"):
        raise MountError("RUN --mount type=bind: source must name one file or directory")
    plan = plans[0]
    if len(plan.entries) > MAX_BIND_ENTRIES:
        raise MountError(f"RUN --mount type=bind: source has more than {MAX_BIND_ENTRIES} entries")
    if plan.kind == "dir":
        dest.mkdir(mode=0o755)
    pending: dict[str, list] = {}
    made = {""}  # directories made here: the only parents an entry may have
    for entry in plan.entries:
        parts = entry.path.split("/") if entry.path else []
        if any(p in ("", ".", "..") for p in parts) or (plan.kind == "file" and parts):
            raise MountError(f"RUN --mount type=bind: unexpected path {entry.path!r}")
        if parts and "/".join(parts[:-1]) not in made:
            raise MountError(f"RUN --mount type=bind: {entry.path!r} is not below a directory of the source")
        path = dest.joinpath(*parts) if parts else dest
        if entry.kind == "d":
            if parts:
                os.mkdir(path, 0o700)
                made.add(entry.path)
        elif entry.kind == "l":
            os.symlink(entry.linkname, path)
        elif entry.opener is not None:
            with entry.opener() as src, _create(path) as out:
                shutil.copyfileobj(src, out)
        elif open_many is not None:
            pending.setdefault(entry.digest, []).append(path)
        else:
            raise MountError(f"RUN --mount type=bind: cannot read {entry.path!r}")
    if pending:
        for name, src in open_many(list(pending)):
            for path in pending.pop(name, []):
                with _create(path) as out:
                    shutil.copyfileobj(src, out)
    for entry in reversed(plan.entries):  # modes last: a 0555 directory is still filled
        if entry.kind == "l":
            continue
        parts = entry.path.split("/") if entry.path else []
        path = dest.joinpath(*parts) if parts else dest
        os.lchown(path, entry.uid, entry.gid)
        os.chmod(path, entry.mode & 0o7777)
    return dest


def _create(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


def _flag(fields: dict, name: str) -> bool:
    return name in fields and fields[name].lower() not in ("false", "0")


def _pairs(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not key:
            raise MountError(f"invalid {what}: empty field")
        out[key] = value if sep else "true"
    return out
