"""Following symlinks inside a root that stands for ``/`` (a build context, an image's
file tree): one walk for both, so both confine ``..`` and absolute targets the same way
and both bound the number of links."""

from __future__ import annotations

from typing import Callable


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve_within(
    path: str, link_of: Callable[[list[str], str, bool], str | None], max_links: int, too_many: Callable[[], Exception]
) -> str:
    """*path* (relative to the root) with its symlinks followed, never above the root:
    ``..`` at the root stays there, an absolute target starts again at the root.
    ``link_of(resolved, name, last)`` is the target of the component *name* under the
    components *resolved* when it is a symlink to follow (*last*: nothing comes after
    it), else None; it may raise. Raises ``too_many()`` after *max_links* links."""
    pending = _parts(path)
    pending.reverse()
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        target = link_of(resolved, part, not pending)
        if target is None:
            resolved.append(part)
            continue
        links += 1
        if links > max_links:
            raise too_many()
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed(_parts(target)))
    return "/".join(resolved)
