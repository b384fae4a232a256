"""guest.runtime.users: user strings resolved against the image's passwd/group files."""

from __future__ import annotations

import pytest

from guest.runtime.users import ExecUser, UserError, resolve_user

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment, then a malformed line
broken:x:notanumber:0::/:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:100::/home/bob:/bin/sh
nohome:x:1002:1002::
"""
GROUP = """\
root:x:0:
users:x:100:alice
alice:x:1000:
wheel:x:10:alice,bob
docker:x:999:bob
"""


@pytest.fixture
def root(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    return str(tmp_path)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("", ExecUser(uid=0, gid=0, groups=(), home="/root", name="root")),
        ("0", ExecUser(uid=0, gid=0, groups=(), home="/root", name="root")),
        ("alice", ExecUser(uid=1000, gid=1000, groups=(100, 10), home="/home/alice", name="alice")),
        ("1000", ExecUser(uid=1000, gid=1000, groups=(100, 10), home="/home/alice", name="alice")),
        ("bob", ExecUser(uid=1001, gid=100, groups=(10, 999), home="/home/bob", name="bob")),
        ("alice:wheel", ExecUser(uid=1000, gid=10, groups=(100,), home="/home/alice", name="alice")),
        ("alice:0", ExecUser(uid=1000, gid=0, groups=(100, 10), home="/home/alice", name="alice")),
        ("4242", ExecUser(uid=4242, gid=0, groups=(), home="/", name="")),
        ("4242:4343", ExecUser(uid=4242, gid=4343, groups=(), home="/", name="")),
        ("4242:docker", ExecUser(uid=4242, gid=999, groups=(), home="/", name="")),
        ("nohome", ExecUser(uid=1002, gid=1002, groups=(), home="/", name="nohome")),
    ],
)
def test_resolve(root, spec, expected):
    assert resolve_user(spec, root) == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mallory", "unable to find user mallory: no matching entries in passwd file"),
        ("alice:nogroup", "unable to find group nogroup: no matching entries in group file"),
        ("broken", "unable to find user broken"),
        ("alice:", "empty group"),
        ("99999999999", "out of range"),
    ],
)
def test_unknown_names_are_clear_errors(root, spec, message):
    with pytest.raises(UserError, match=message.replace("$", r"\$")):
        resolve_user(spec, root)


def test_never_reads_the_hosts_files(tmp_path):
    # A rootfs with no /etc at all: numbers work, names fail with a clear message,
    # even though the host surely has a "root" user.
    assert resolve_user("", str(tmp_path)) == ExecUser(uid=0, gid=0, home="/")
    assert resolve_user("12:34", str(tmp_path)) == ExecUser(uid=12, gid=34, home="/")
    with pytest.raises(UserError, match="no passwd file in the image"):
        resolve_user("root", str(tmp_path))
    with pytest.raises(UserError, match="no group file in the image"):
        resolve_user("0:root", str(tmp_path))
