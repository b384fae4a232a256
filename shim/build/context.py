"""The build context: the directory COPY and ADD read from, minus ``.dockerignore``.

Sources are always relative to the context root (a leading ``/`` is dropped, as docker
does); one that leads outside it (``../x``) is refused. Wildcards (``*``, ``?``, ``[...]``)
match per path component, dot files included. A source that is a symlink is followed
*inside* the context (its target is resolved with the context as ``/``); symlinks found
inside a copied directory are copied as symlinks.

``.dockerignore`` follows docker's rules: one pattern per line, ``#`` comments, ``!`` to
re-include, ``**`` for any number of directories, the last matching pattern wins, and a
path is excluded when it or one of its parent directories is.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shim.build.errors import BuildError
from shim.build.symlinks import resolve_within

_WILDCARD = re.compile(r"[*?\[]")


class ContextError(BuildError):
    """A COPY/ADD source is missing, excluded, or outside the build context."""


class ExcludedPath(ContextError):
    """A path goes through a symlink that ``.dockerignore`` excludes."""


class DockerIgnore:
    """Compiled ``.dockerignore`` patterns."""

    def __init__(self, patterns: list[str]):
        self.rules: list[tuple[re.Pattern, bool]] = []
        for raw in patterns:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclude = True
            if line.startswith("!"):
                exclude, line = False, line[1:].strip()
            line = posixpath.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            self.rules.append((re.compile(_pattern_regex(line)), exclude))
        self.has_exceptions = any(not exclude for _, exclude in self.rules)

    @classmethod
    def load(cls, root: Path) -> "DockerIgnore":
        try:
            text = (root / ".dockerignore").read_text(errors="replace")
        except FileNotFoundError:
            return cls([])
        except OSError as exc:
            raise ContextError(f"cannot read {root / '.dockerignore'}: {exc.strerror}") from None
        return cls(text.splitlines())

    def excluded(self, rel: str) -> bool:
        """Whether the context path *rel* (``a/b``) is excluded."""
        if not self.rules:
            return False
        parents = []
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parents.append("/".join(parts[:i]))
        result = False
        for regex, exclude in self.rules:
            if regex.fullmatch(rel) or any(regex.fullmatch(p) for p in parents):
                result = exclude
        return result


def _pattern_regex(pattern: str) -> str:
    """Go filepath.Match syntax plus ``**`` → a regular expression for whole paths."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end]
                if body.startswith(("!", "^")):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def has_wildcard(path: str) -> bool:
    return bool(_WILDCARD.search(path))


def match_component(pattern: str, name: str) -> bool:
    return re.fullmatch(_pattern_regex(pattern), name) is not None


@dataclass(frozen=True)
class Source:
    """One matched source: *rel* is its path in the context as written/matched (used for
    the destination name), *real* the path after following symlinks (what is read)."""

    rel: str
    real: str


class BuildContext:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ContextError(f"build context {root} is not a directory")
        self.ignore = DockerIgnore.load(self.root)

    # ---- paths ------------------------------------------------------------------------------
    def _host(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def resolve(self, rel: str) -> str:
        """*rel* with symlinks followed, confined to the context (as if it were ``/``).
        A symlink excluded by ``.dockerignore`` is not part of the context (docker never
        sends it), so it is not followed: ContextError."""

        def link_of(resolved: list[str], part: str, _last: bool) -> str | None:
            candidate = self.root.joinpath(*resolved, part)
            if not candidate.is_symlink():
                return None
            if self.ignore.excluded("/".join([*resolved, part])):
                raise ExcludedPath(f"{rel} goes through {'/'.join([*resolved, part])}, which .dockerignore excludes")
            return os.readlink(candidate)

        return resolve_within(rel, link_of, 40, lambda: ContextError(f"too many levels of symbolic links in {rel}"))

    def sources(self, pattern: str, what: str) -> list[Source]:
        """The context paths *pattern* names (wildcards expanded), excluded ones left out.
        Raises ContextError when it leads outside the context or matches nothing."""
        cleaned = posixpath.normpath("/" + pattern).lstrip("/") if pattern else ""
        lexical = posixpath.normpath(pattern.lstrip("/")) if pattern.lstrip("/") else "."
        if lexical == ".." or lexical.startswith("../"):
            raise ContextError(f"{what} failed: forbidden path outside the build context: {pattern}")
        if has_wildcard(cleaned):
            found = []
            for rel in self._glob(cleaned):
                try:
                    real = self.resolve(rel)
                except ExcludedPath:
                    continue  # through an excluded symlink: not in the context
                if not (real and self.ignore.excluded(real)):
                    found.append(Source(rel, real))
            if not found:
                raise ContextError(
                    f"{what} failed: no source files were specified: {pattern} matches nothing in the build context"
                )
            return found
        missing = ContextError(
            f"{what} failed: file not found in build context or excluded by .dockerignore: {pattern}"
        )
        try:
            real = self.resolve(cleaned)
        except ExcludedPath:
            raise missing from None
        # the name as written and where its symlinks lead must both be in the context: a
        # symlink to an ignored file must not bring it in
        if (
            (cleaned and self.ignore.excluded(cleaned))
            or (real and self.ignore.excluded(real))
            or not os.path.lexists(self._host(real))
        ):
            raise ContextError(
                f"{what} failed: file not found in build context or excluded by .dockerignore: {pattern}"
            )
        return [Source(cleaned, real)]

    def _glob(self, pattern: str) -> list[str]:
        parts = pattern.split("/")
        current = [""]
        for i, part in enumerate(parts):
            nxt = []
            for base in current:
                try:
                    host = self._host(self.resolve(base))
                except ExcludedPath:
                    continue
                if not has_wildcard(part):
                    cand = f"{base}/{part}" if base else part
                    try:
                        if os.path.lexists(self._host(self.resolve(cand))):
                            nxt.append(cand)
                    except ExcludedPath:
                        pass
                    continue
                try:
                    names = sorted(os.listdir(host))
                except OSError:
                    continue
                for name in names:
                    if match_component(part, name):
                        nxt.append(f"{base}/{name}" if base else name)
            current = nxt
        return [p for p in current if not self.ignore.excluded(p)]

    # ---- walking and hashing ----------------------------------------------------------------
    def walk(self, real: str) -> Iterator[tuple[str, os.stat_result]]:
        """(path relative to *real*, lstat) of everything below the directory *real*,
        parents first, sorted, excluded paths left out (their contents too, unless an
        exception pattern could re-include something)."""
        base = self._host(real)

        def rec(rel_dir: str) -> Iterator[tuple[str, os.stat_result]]:
            try:
                names = sorted(os.listdir(base / rel_dir if rel_dir else base))
            except OSError as exc:
                raise ContextError(f"cannot read {base / rel_dir}: {exc.strerror}") from None
            for name in names:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                ctx_rel = f"{real}/{rel}" if real else rel
                st = os.lstat(base / rel)
                excluded = self.ignore.excluded(ctx_rel)
                if not excluded:
                    yield rel, st
                if stat.S_ISDIR(st.st_mode) and (not excluded or self.ignore.has_exceptions):
                    yield from rec(rel)

        yield from rec("")

    def host_path(self, real: str) -> Path:
        return self._host(real)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
