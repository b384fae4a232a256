"""COPY and ADD: which files, what the cache key says about them, and the layer they make.

Planning (:func:`plan_context`, :func:`plan_image`, :func:`plan_url`) looks only at the
sources: it lists what will be copied, with a content digest per file, and gives the cache
key material. Writing (:func:`write_layer`) needs the image so far (a
:class:`~shim.build.tree.RootView`): the destination is resolved through the image's
symlinks (``COPY x /bin/`` on a merged-/usr system lands in /usr/bin), existing parent
directories keep their owner and mode, missing ones are made (owned like the copied files).

Docker's rules, as the classic builder applies them:

- a relative destination is relative to WORKDIR;
- a directory source copies its *contents*; a file source becomes ``DEST`` itself, or
  ``DEST/<name>`` when DEST ends in ``/`` or is a directory in the image;
- several sources (or a wildcard) need a destination ending in ``/``;
- everything is owned by 0:0 unless ``--chown`` (names looked up in the image's
  /etc/passwd and /etc/group); ``--chmod`` sets the mode;
- ``COPY --parents`` (BuildKit) keeps each source's parent directories, relative to the
  context, or to the part of the source before a ``/./`` (``COPY --parents a/./b/c d/``
  makes ``d/b/c``);
- ADD extracts a local tar (plain, gzip, bzip2, xz) into DEST, keeping the archive's owners
  unless ``--chown``; ADD of a URL downloads it (mode 0600, not extracted).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from shim.build.context import BuildContext, ContextError, file_digest, has_wildcard, match_component
from shim.build.tree import LayerWriter, RootView, norm
from shim.build.errors import BuildError
from shim.images.tarsafe import BoundedTarInfo

URL_TIMEOUT = float(os.environ.get("VMSHIM_BUILD_URL_TIMEOUT", "15"))
_ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class CopyError(BuildError):
    """A COPY or ADD cannot be done (bad destination, unknown --chown user …)."""


@dataclass
class Entry:
    """One thing to copy, *path* relative to its source's anchor ("" = the source itself)."""

    path: str
    kind: str  # d, f, l
    mode: int
    size: int = 0
    mtime: int = 0
    linkname: str = ""
    digest: str = ""
    uid: int = 0
    gid: int = 0
    opener: Callable[[], BinaryIO] | None = None


@dataclass
class SourcePlan:
    """One matched source. ``kind``: ``dir`` (contents go into DEST), ``file`` (DEST or
    DEST/name), ``archive`` (ADD: extracted into DEST)."""

    kind: str
    name: str
    entries: list[Entry] = field(default_factory=list)
    archive: Path | None = None
    archive_digest: str = ""
    keep_owner: bool = False  # archive and --from entries carry their own owners

    def key(self) -> list:
        if self.kind == "archive":
            return ["archive", self.archive_digest]
        return [
            self.kind,
            self.name,
            [[e.path, e.kind, e.mode, e.linkname, e.digest, e.uid, e.gid] for e in self.entries],
        ]


# ---- planning -----------------------------------------------------------------------------
def plan_context(
    ctx: BuildContext, patterns: list[str], what: str, *, extract: bool = False, parents: bool = False
) -> list[SourcePlan]:
    """Plans for sources in the build context; with *parents* (``COPY --parents``), one
    ``dir`` plan holding every source under its parent directories. Raises
    ContextError."""
    if parents:
        return [_with_parents(ctx, patterns, what)]
    plans = []
    for pattern in patterns:
        for src in ctx.sources(pattern, what):
            host = ctx.host_path(src.real)
            try:
                st = os.stat(host) if src.real != src.rel else os.lstat(host)
            except OSError as exc:
                raise ContextError(f"{what} failed: {pattern}: {exc.strerror}") from None
            name = posixpath.basename(src.rel) or posixpath.basename(str(ctx.root))
            if stat.S_ISDIR(st.st_mode):
                plans.append(SourcePlan("dir", name, _walk_context(ctx, src.real)))
            elif stat.S_ISREG(st.st_mode):
                if extract and _is_archive(host):
                    plans.append(
                        SourcePlan("archive", name, archive=host, archive_digest=file_digest(host), keep_owner=True)
                    )
                else:
                    plans.append(SourcePlan("file", name, [_file_entry("", host, st)]))
            elif stat.S_ISLNK(st.st_mode):  # a dangling link inside the context
                plans.append(
                    SourcePlan(
                        "file", name, [Entry("", "l", 0o777, mtime=int(st.st_mtime), linkname=os.readlink(host))]
                    )
                )
            else:
                raise ContextError(f"{what} failed: {pattern} is not a file, directory or symlink")
    return plans


def _with_parents(ctx: BuildContext, patterns: list[str], what: str) -> SourcePlan:
    """``COPY --parents``: every match of *patterns* at its path in the context (or below
    the pivot ``/./``), with its parent directories (modes from the context)."""
    entries: dict[str, Entry] = {}
    for pattern in patterns:
        pivot = ""
        if "/./" in pattern:
            before, after = pattern.split("/./", 1)
            pivot, pattern = norm(before), f"{before}/{after}"
        for src in ctx.sources(pattern, what):
            rel = norm(src.rel)
            if pivot and not rel.startswith(pivot + "/"):
                raise ContextError(
                    f"{what} failed: {pattern}: the part before /./ must be a directory the source is in"
                )
            keep = rel[len(pivot) + 1 :] if pivot else rel
            parts = keep.split("/") if keep else []
            for i in range(1, len(parts)):
                sub = "/".join(parts[:i])
                if sub not in entries:
                    host = ctx.host_path(ctx.resolve(f"{pivot}/{sub}" if pivot else sub))
                    st = os.stat(host)
                    entries[sub] = Entry(sub, "d", stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime))
            for plan in plan_context(ctx, [src.rel], what):
                if keep and plan.kind == "dir":
                    st = os.stat(ctx.host_path(src.real))
                    entries.setdefault(keep, Entry(keep, "d", stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime)))
                for e in plan.entries:
                    path = "/".join(p for p in (keep, e.path) if p)
                    if path:
                        e.path = path
                        entries[path] = e
    return SourcePlan("dir", "", sorted(entries.values(), key=lambda e: e.path.split("/")))


def plan_inline(name: str, data: bytes) -> SourcePlan:
    """The plan for a file given inline (``COPY <<NAME DEST``): mode 0644, owned by root."""
    return SourcePlan(
        "file",
        name,
        [
            Entry(
                "", "f", 0o644, size=len(data), digest=hashlib.sha256(data).hexdigest(), opener=lambda: io.BytesIO(data)
            )
        ],
    )


def _file_entry(path: str, host: Path, st: os.stat_result) -> Entry:
    return Entry(
        path,
        "f",
        stat.S_IMODE(st.st_mode),
        size=st.st_size,
        mtime=int(st.st_mtime),
        digest=file_digest(host),
        opener=lambda: open(host, "rb"),
    )


def _walk_context(ctx: BuildContext, real: str) -> list[Entry]:
    base = ctx.host_path(real)
    entries = []
    for rel, st in ctx.walk(real):
        host = base / rel
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(rel, "d", stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime)))
        elif stat.S_ISREG(st.st_mode):
            entries.append(_file_entry(rel, host, st))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(rel, "l", 0o777, mtime=int(st.st_mtime), linkname=os.readlink(host)))
        # sockets, fifos, devices in a context: not copied (docker skips them too)
    return entries


def _is_archive(path: Path) -> bool:
    """A tar, or a gzip/bzip2/xz-compressed tar (what ADD extracts)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return True
    if not head.startswith(_ARCHIVE_MAGIC):
        return False
    try:
        with tarfile.open(path, "r:*", tarinfo=BoundedTarInfo) as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


def plan_image(view: RootView, patterns: list[str], what: str, source_name: str) -> list[SourcePlan]:
    """Plans for ``COPY --from`` sources: paths in another stage's or image's filesystem."""
    plans = []
    for pattern in patterns:
        for path in _glob_view(view, norm(pattern)) if has_wildcard(pattern) else [norm(pattern)]:
            real = view.resolve(path)
            node = view.nodes.get(real)
            if node is None:
                raise ContextError(f"{what} failed: {pattern} not found in {source_name}")
            name = posixpath.basename(path) or "/"
            if node.kind == "d":
                entries = []
                for sub in view.walk(real):
                    n = view.nodes[sub]
                    rel = sub[len(real) + 1 :] if real else sub
                    entries.append(_view_entry(view, rel, sub, n))
                plans.append(SourcePlan("dir", name, entries))
            else:
                plans.append(SourcePlan("file", name, [_view_entry(view, "", real, node)]))
    return plans


def _glob_view(view: RootView, pattern: str) -> list[str]:
    current = [""]
    for part in pattern.split("/"):
        nxt = []
        for base in current:
            real = view.resolve(base)
            if not has_wildcard(part):
                nxt.append(f"{base}/{part}" if base else part)
                continue
            for name in view.children(real):
                if match_component(part, name):
                    nxt.append(f"{base}/{name}" if base else name)
        current = nxt
    found = [p for p in current if view.resolve(p) in view.nodes]
    if not found:
        raise ContextError(f"no source files were specified: {pattern} matches nothing")
    return found


def _view_entry(view: RootView, rel: str, path: str, node) -> Entry:
    kind = "f" if node.kind in ("f", "h") else node.kind
    if kind == "p":
        kind = "f"
    size = node.size
    if node.kind == "h":
        target = view.nodes.get(node.linkname)
        size = target.size if target else 0
    return Entry(
        rel,
        kind,
        node.mode,
        size=size,
        mtime=node.mtime,
        linkname=node.linkname if node.kind == "l" else "",
        digest=f"{path}",
        uid=node.uid,
        gid=node.gid,
        opener=None,
    )


def plan_url(url: str, workdir: Path, what: str) -> list[SourcePlan]:
    """Download *url* into *workdir*; a plan for the file. Raises ContextError with the
    reason when it cannot be fetched."""
    parsed = urllib.parse.urlparse(url)
    name = posixpath.basename(parsed.path.rstrip("/")) or "index.html"
    target = workdir / f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as resp, open(target, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
            modified = resp.headers.get("Last-Modified")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ContextError(f"{what} failed: cannot fetch {url}: {reason}") from None
    mtime = 0
    if modified:
        with contextlib.suppress(TypeError, ValueError):
            from email.utils import parsedate_to_datetime

            mtime = int(parsedate_to_datetime(modified).timestamp())
    st = os.stat(target)
    entry = Entry(
        "", "f", 0o600, size=st.st_size, mtime=mtime, digest=file_digest(target), opener=lambda: open(target, "rb")
    )
    return [SourcePlan("file", name, [entry])]


def check_checksum(plans: list[SourcePlan], expected: str, what: str) -> None:
    """``ADD --checksum=sha256:HEX``: the downloaded file must have that digest. Raises
    CopyError."""
    algo, _, hexd = expected.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise CopyError(f"{what} --checksum={expected}: expected sha256:<64 hex digits>")
    for plan in plans:
        for entry in plan.entries:
            if entry.digest != hexd:
                raise CopyError(f"{what}: the checksum of {plan.name} is sha256:{entry.digest}, not {expected}")


# ---- modes ---------------------------------------------------------------------------------
_SYMBOLIC = re.compile(r"[ugoa]*(?:[-+=][rwxXst]*)+")


def parse_chmod(spec: str) -> Callable[[int, bool], int]:
    """``--chmod`` as a function (mode, is_dir) → new mode: octal (``0755``) or chmod(1)'s
    symbolic form (``u+x``, ``go-w``, ``a=rX,u+w``). Raises CopyError."""
    if re.fullmatch(r"[0-7]{1,4}", spec):
        value = int(spec, 8)
        return lambda mode, is_dir: value
    clauses = spec.split(",")
    if not spec or not all(_SYMBOLIC.fullmatch(c) for c in clauses):
        raise CopyError(f"invalid --chmod {spec!r}: octal (0755) or symbolic (u+x, go-w, a=rX)")

    def apply(mode: int, is_dir: bool) -> int:
        for clause in clauses:
            who = clause[: len(clause) - len(clause.lstrip("ugoa"))] or "a"
            mask = 0
            for w in who:
                mask |= {"u": 0o4700, "g": 0o2070, "o": 0o1007, "a": 0o7777}[w]
            for op, perms in re.findall(r"([-+=])([rwxXst]*)", clause):
                bits = 0
                for p in perms:
                    if p == "X":
                        p = "x" if is_dir or mode & 0o111 else ""
                    bits |= {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000, "t": 0o1000, "": 0}[p]
                bits &= mask
                if op == "+":
                    mode |= bits
                elif op == "-":
                    mode &= ~bits
                else:
                    mode = (mode & ~mask) | bits
        return mode & 0o7777

    return apply


# ---- ownership -----------------------------------------------------------------------------
def parse_chown(spec: str, view: RootView) -> tuple[int, int]:
    """``user[:group]`` (names or numbers) → (uid, gid), names looked up in the image's
    /etc/passwd and /etc/group. Raises CopyError."""
    user, _, group = spec.partition(":")
    if not user:
        raise CopyError(f"invalid --chown {spec!r}: give user[:group]")
    passwd = group_file = None
    if user.isdigit():
        uid, primary = int(user), int(user)
    else:
        passwd = _table(view, "etc/passwd")
        row = passwd.get(user)
        if row is None or len(row) < 3 or not row[1].isdigit():
            raise CopyError(
                f"--chown {spec}: unable to find user {user}: no matching entries in the image's /etc/passwd"
            )
        uid, primary = int(row[1]), int(row[2]) if row[2].isdigit() else 0
    if not group:
        return uid, primary
    if group.isdigit():
        return uid, int(group)
    group_file = _table(view, "etc/group")
    row = group_file.get(group)
    if row is None or len(row) < 2 or not row[1].isdigit():
        raise CopyError(f"--chown {spec}: unable to find group {group}: no matching entries in the image's /etc/group")
    return uid, int(row[1])


def _table(view: RootView, path: str) -> dict[str, list[str]]:
    data = view.read(path) or b""
    out: dict[str, list[str]] = {}
    for line in data.decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0]:
            out.setdefault(fields[0], fields[1:])  # passwd: [x, uid, gid, …]; group: [x, gid, …]
    return out


# ---- writing -------------------------------------------------------------------------------
def destination(dest: str, workdir: str) -> tuple[str, bool]:
    """(absolute destination, ends-with-slash) for the DEST of a COPY/ADD."""
    is_dir = dest.endswith("/") or dest.endswith("/.") or dest in (".", "..")
    if not dest.startswith("/"):
        dest = posixpath.join(workdir or "/", dest)
    return "/" + norm(dest), is_dir


def write_layer(
    writer: LayerWriter,
    view: RootView,
    plans: list[SourcePlan],
    dest: str,
    workdir: str,
    *,
    chown: tuple[int, int] | None,
    chmod: int | Callable[[int, bool], int] | None,
    what: str,
    multiple: bool,
    open_view_files=None,
) -> int:
    """Write the layer of one COPY/ADD into *writer*. *chmod*: a mode, or a function
    (mode, is_dir) → mode (:func:`parse_chmod`). *open_view_files* (for COPY --from:
    the source view's ``open_many``) yields (path, file) for the files to read; an
    entry's ``digest`` is its path there. Returns the number of entries.
    Raises CopyError."""
    if isinstance(chmod, int):
        chmod = parse_chmod(f"{chmod:o}")
    target, dir_hint = destination(dest, workdir)
    if multiple and not dir_hint:
        raise CopyError(
            f"{what}: when copying more than one source, the destination must be a directory and end with a /: {dest}"
        )
    owner = chown if chown is not None else (0, 0)
    written: set[str] = set()
    now = int(time.time())

    def ensure_dir(path: str) -> None:
        """Emit *path* (resolved) and its ancestors as directories."""
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in written:
                continue
            node = view.nodes.get(sub)
            if node is not None and node.kind != "d":
                raise CopyError(f"{what}: cannot copy to /{sub}: it is not a directory in the image")
            if node is not None:
                writer.add_dir(sub, node.mode, node.uid, node.gid, node.mtime)
            else:
                writer.add_dir(sub, 0o755, owner[0], owner[1], now)
            written.add(sub)

    def resolved(path: str) -> str:
        """Resolve the parent through the image's symlinks; keep the last component."""
        parent, _, base = norm(path).rpartition("/")
        rparent = view.resolve(parent)
        return f"{rparent}/{base}" if rparent else base

    count = 0
    view_files = []
    for plan in plans:
        if plan.kind in ("dir", "archive"):
            root = view.resolve(norm(target))
            ensure_dir(root)
        elif dir_hint or view.is_dir(target):
            root = view.resolve(norm(target))
            ensure_dir(root)
            root = f"{root}/{plan.name}" if root else plan.name
        else:
            root = resolved(target)
            ensure_dir(root.rpartition("/")[0])
        if plan.kind == "archive":
            count += _extract(writer, plan, root, chown, chmod, ensure_dir, written, what)
            continue
        for e in plan.entries:
            path = f"{root}/{e.path}" if e.path else root
            if not path:
                continue  # the root itself
            uid, gid = (e.uid, e.gid) if (plan.keep_owner and chown is None) else owner
            mode = chmod(e.mode, e.kind == "d") if chmod is not None else e.mode
            parent = path.rpartition("/")[0]
            if parent not in written:
                ensure_dir(parent)
            if e.kind == "d":
                writer.add_dir(path, mode, uid, gid, e.mtime)
                written.add(path)
            elif e.kind == "l":
                writer.add_symlink(path, e.linkname, uid, gid, e.mtime)
            elif e.opener is not None:
                with e.opener() as f:
                    writer.add_file(path, f, e.size, mode, uid, gid, e.mtime)
            else:
                view_files.append((e, path, mode, uid, gid))
                continue
            count += 1
    if view_files:  # COPY --from: read each source file once, in layer order
        targets: dict[str, list] = {}
        for item in view_files:
            targets.setdefault(item[0].digest, []).append(item)
        for src, f in open_view_files(list(targets)):
            items = targets.get(src, [])
            data = f.read() if len(items) > 1 else None
            for e, path, mode, uid, gid in items:
                if data is not None:
                    writer.add_file(path, data, len(data), mode, uid, gid, e.mtime)
                else:
                    writer.add_file(path, f, e.size, mode, uid, gid, e.mtime)
                count += 1
    return count


def _extract(
    writer: LayerWriter, plan: SourcePlan, root: str, chown, chmod, ensure_dir, written: set[str], what: str
) -> int:
    """Write the members of a local archive under *root* (ADD)."""
    count = 0
    links = []
    try:
        with tarfile.open(plan.archive, "r:*", tarinfo=BoundedTarInfo) as tar:
            for ti in tar:
                raw = ti.name
                parts = [p for p in raw.split("/") if p not in ("", ".")]
                if ".." in parts:
                    raise CopyError(
                        f"{what}: archive {plan.name} has an entry that leads outside the destination: {raw!r}"
                    )
                rel = "/".join(parts)
                if not rel:
                    continue
                if any(p.startswith(".wh.") for p in parts):
                    continue  # would read as a whiteout in the layer
                path = f"{root}/{rel}" if root else rel
                uid, gid = chown if chown is not None else (ti.uid, ti.gid)
                mode = chmod(ti.mode & 0o7777, ti.isdir()) if chmod is not None else ti.mode & 0o7777
                parent = path.rpartition("/")[0]
                if parent not in written:
                    ensure_dir(parent)
                if ti.isdir():
                    writer.add_dir(path, mode, uid, gid, int(ti.mtime))
                    written.add(path)
                elif ti.isreg():
                    data = tar.extractfile(ti)
                    assert data is not None  # a regular file's member always has data
                    writer.add_file(path, data, ti.size, mode, uid, gid, int(ti.mtime))
                elif ti.issym():
                    writer.add_symlink(path, ti.linkname, uid, gid, int(ti.mtime))
                elif ti.islnk():
                    lparts = [p for p in ti.linkname.split("/") if p not in ("", ".")]
                    if ".." in lparts:
                        raise CopyError(
                            f"{what}: archive {plan.name} has a hard link that "
                            f"leads outside the destination: {ti.linkname!r}"
                        )
                    target = "/".join(lparts)
                    links.append((path, f"{root}/{target}" if root else target, uid, gid))
                    continue
                elif ti.isfifo():
                    writer.add_fifo(path, mode, uid, gid, int(ti.mtime))
                else:
                    continue  # device nodes: not allowed in layers
                count += 1
        for path, target, uid, gid in links:
            writer.add_hardlink(path, target, uid, gid)
            count += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CopyError(f"{what}: cannot extract {plan.name}: {exc}") from None
    return count


def make_workdir(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base, prefix="copy-"))
