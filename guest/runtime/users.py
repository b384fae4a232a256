"""Resolve a container's ``user`` string against the image's own /etc/passwd and /etc/group.

Never the host's files: the caller passes the root directory of the container (``"/"``
once inside it). The rules follow docker/runc:

- ``""``            → uid 0, gid 0 (root)
- ``"1000"``        → uid 1000; gid and home from passwd if listed there, else gid 0, home /
- ``"1000:50"``     → uid 1000, gid 50
- ``"name"``        → must be in passwd (its uid, primary gid, home)
- ``"name:group"``  → name in passwd, group in /etc/group (numbers allowed on either side)

Supplementary groups are every group in /etc/group that lists the user's name as a member.
"""

from __future__ import annotations

import os
from collections import namedtuple

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _Entry = TypeVar("_Entry")


class UserError(Exception):
    """The user or group cannot be resolved in the container's files; text is for the user."""


ExecUser = namedtuple("ExecUser", "uid gid groups home name", defaults=((), "/", ""))
"""Who a process runs as: uid, gid, supplementary ``groups`` (a tuple of gids), ``home``
(from passwd, else "/") and ``name`` ("" when the uid is not in passwd)."""

_PasswdEntry = namedtuple("_PasswdEntry", "name uid gid home")
_GroupEntry = namedtuple("_GroupEntry", "name gid members")


def _read_entries(path: str, entry: Callable[[list[str]], _Entry | None]) -> list[_Entry] | None:
    """``entry(fields)`` of each meaningful line's colon-separated fields, skipping the
    lines it returns None for (malformed: skipped, as libc does); None if the file does
    not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    out: list[_Entry] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            parsed = entry(line.split(":"))
            if parsed is not None:
                out.append(parsed)
    return out


def _passwd_entry(row: list[str]) -> _PasswdEntry | None:
    if len(row) < 4 or not row[2].isdigit() or not row[3].isdigit():
        return None
    home = row[5] if len(row) > 5 and row[5] else "/"
    return _PasswdEntry(row[0], int(row[2]), int(row[3]), home)


def _group_entry(row: list[str]) -> _GroupEntry | None:
    if len(row) < 3 or not row[2].isdigit():
        return None
    members = [m for m in row[3].split(",") if m] if len(row) > 3 else []
    return _GroupEntry(row[0], int(row[2]), members)


def parse_passwd(path: str) -> list[_PasswdEntry] | None:
    return _read_entries(path, _passwd_entry)


def parse_group(path: str) -> list[_GroupEntry] | None:
    return _read_entries(path, _group_entry)


def _parse_id(text: str, what: str) -> int | None:
    """The number in *text*, or None if it is a name. Raises UserError when out of range."""
    if not text.isdigit():
        return None
    value = int(text)
    if value >= 2**32 - 1:
        raise UserError(f"{what} id {text} is out of range")
    return value


def resolve_user(spec: str, root: str = "/") -> ExecUser:
    """Resolve *spec* (see module doc) using ``<root>/etc/passwd`` and ``<root>/etc/group``.

    Raises UserError with a message such as
    ``unable to find user bob: no matching entries in passwd file``.
    """
    user_part, _, group_part = spec.partition(":")
    if ":" in spec and not group_part:
        raise UserError(f"invalid user {spec!r}: empty group")
    passwd = parse_passwd(os.path.join(root, "etc/passwd"))
    groups = parse_group(os.path.join(root, "etc/group"))

    # The user.
    uid = _parse_id(user_part, "user") if user_part else 0
    entry = None
    if uid is None:  # a name: it must be listed
        if passwd is None:
            raise UserError(f"unable to find user {user_part}: no passwd file in the image")
        entry = next((p for p in passwd if p.name == user_part), None)
        if entry is None:
            raise UserError(f"unable to find user {user_part}: no matching entries in passwd file")
        uid = entry.uid
    elif passwd is not None:
        entry = next((p for p in passwd if p.uid == uid), None)
    gid = entry.gid if entry else 0
    home = entry.home if entry else "/"
    name = entry.name if entry else ""

    # The primary group, if given.
    if group_part:
        gid_num = _parse_id(group_part, "group")
        if gid_num is None:
            if groups is None:
                raise UserError(f"unable to find group {group_part}: no group file in the image")
            group = next((g for g in groups if g.name == group_part), None)
            if group is None:
                raise UserError(f"unable to find group {group_part}: no matching entries in group file")
            gid_num = group.gid
        gid = gid_num

    # Supplementary groups: memberships by name.
    supplementary = []
    if name and groups:
        for group in groups:
            if name in group.members and group.gid != gid and group.gid not in supplementary:
                supplementary.append(group.gid)
    return ExecUser(uid=uid, gid=gid, groups=tuple(supplementary), home=home, name=name)
