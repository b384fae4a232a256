"""guest.runtime.process.hold_container: a container process forked up to its execve and
held (a snapshot template saves one, issue 15), then given its process by Held.go, or
ended by Held.release. Real processes in real namespaces (root); tests/e2e/
test_snapshot_template.py runs it in a restored VM."""

from __future__ import annotations

import os

import pytest

from guest.runtime import process
from guest.runtime.process import Held, HeldGone, SpawnError, hold_container
from guest.spec import ProcessSpec
from tests.waiting import alive, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="new namespaces need root")

PLACEHOLDER = ProcessSpec(args=["/bin/sh", "-c", "exit 0"])


def _read_all(fd: int) -> bytes:
    return b"".join(iter(lambda: os.read(fd, 4096), b""))


@pytest.fixture
def held():
    made: list[Held] = []

    def make(**options) -> Held:
        one = hold_container(None, PLACEHOLDER, "template", None, namespaces=("uts", "pid", "ipc"), **options)
        made.append(one)
        return one

    yield make
    for one in made:
        one.release()


def test_a_held_process_becomes_the_process_it_is_given(held):
    one = held()
    assert alive(one.pid), "it waits, made up to its execve"
    spawned = one.go(
        ProcessSpec(args=["sh", "-c", 'hostname; echo "$$ $HOSTNAME"; cat; exit 3']),
        hostname="final",
        stdin=True,
    )
    assert spawned.pid == one.pid
    os.write(spawned.stdin, b"typed\n")
    os.close(spawned.stdin)
    spawned.stdin = None
    out = _read_all(spawned.stdout).decode().split("\n")
    assert out[:3] == ["final", "1 final", "typed"], "its own uts and pid namespaces, the name it was given at go"
    assert process.wait(spawned.pid) == 3
    spawned.close()


def test_a_held_process_runs_on_a_tty_when_the_process_asks(held):
    one = held()
    spawned = one.go(
        ProcessSpec(args=["sh", "-c", "stty size; test -t 0 && echo tty"], tty=True),
        hostname="final",
        stdin=True,
        rows=31,
        cols=91,
    )
    assert spawned.master is not None and spawned.stdout is None
    out = b""
    while True:
        try:
            chunk = os.read(spawned.master, 4096)
        except OSError:  # EIO once the slave side is gone
            break
        if not chunk:
            break
        out += chunk
    assert b"31 91" in out and b"tty" in out
    assert process.wait(spawned.pid) == 0
    spawned.close()


def test_a_failed_exec_after_go_is_reported_and_reaped(held):
    one = held()
    with pytest.raises(SpawnError) as info:
        one.go(ProcessSpec(args=["/no/such/program"]), hostname="x", stdin=False)
    assert info.value.exit_code == 127 and "/no/such/program" in str(info.value)
    assert not os.path.exists(f"/proc/{one.pid}")


def test_release_ends_the_held_process_and_reaps_it(held):
    one = held()
    pid = one.pid
    one.release()
    assert not os.path.exists(f"/proc/{pid}")
    one.release()  # idempotent
    with pytest.raises(HeldGone):
        one.go(ProcessSpec(args=["true"]), hostname="x", stdin=False)


def test_a_held_process_that_died_is_reported_as_gone_so_the_caller_spawns_anew(held):
    one = held()
    os.kill(one.pid, 9)
    wait_until(lambda: not alive(one.pid), 10, "the held process dead")
    with pytest.raises(HeldGone):
        one.go(ProcessSpec(args=["true"]), hostname="x", stdin=False)


def test_user_namespace_maps_cannot_be_held(held):
    maps = {"uid": [[0, 100000, 65536]], "gid": [[0, 100000, 65536]]}
    with pytest.raises(SpawnError, match="user namespace"):
        hold_container(None, ProcessSpec(args=["true"], id_mappings=maps), "t", None, namespaces=("uts",))
    one = held()
    with pytest.raises(HeldGone, match="user namespace"):
        one.go(ProcessSpec(args=["true"], id_mappings=maps), hostname="x", stdin=False)


def test_a_held_process_runs_as_the_user_go_names_not_the_placeholders(held):
    """The user the placeholder named is resolved while it waits; another one at go is
    resolved then."""
    one = held()
    spawned = one.go(ProcessSpec(args=["sh", "-c", "id -u; id -g"], user="65534:65533"), hostname="x", stdin=False)
    assert _read_all(spawned.stdout).decode().split() == ["65534", "65533"]
    assert process.wait(spawned.pid) == 0
    spawned.close()


# ---- guest.runtime.container.Container: hold, identity, start, destroy -------------------


@pytest.fixture
def container(tmp_path):
    """A Container on the host's own root (chroot "/": no mount namespace), so the held
    process's programs are the host's."""
    from guest.runtime.container import Container
    from guest.spec import BootConfig

    config = BootConfig(container_id="c" * 64, token="t" * 32, hostname="template", process=PLACEHOLDER, layer_count=0)
    made = Container(config, "/", files_dir=str(tmp_path / "files"), namespaces=("uts", "pid"))
    yield made
    made.destroy()
    if made.main is not None:
        process.reap(made.main.pid)
        made.main.close()


def _identity(container, **changes):
    container.set_identity(container.config.replace(hostname="fresh", **changes))


def test_a_held_container_starts_the_identitys_process_in_the_held_process(container, tmp_path):
    container.hold()
    held_pid = container.held.pid
    _identity(container)
    assert container.held is not None, "the same /etc files: it stays held"
    assert (tmp_path / "files" / "hostname").read_text() == "fresh\n"
    spawned = container.start(ProcessSpec(args=["sh", "-c", "hostname; echo $$"]), stdin=False)
    assert spawned.pid == held_pid and container.held is None and container.took_held
    assert _read_all(spawned.stdout).decode().split() == ["fresh", "1"]
    assert process.wait(spawned.pid) == 0


def test_the_identitys_files_are_rewritten_in_place_for_the_held_process(container, tmp_path):
    """The held process has /etc/hostname and /etc/hosts bind-mounted: a new inode would
    leave it the template's."""
    container.hold()
    before = {name: os.stat(tmp_path / "files" / name).st_ino for name in ("hostname", "hosts")}
    _identity(container)
    after = {name: os.stat(tmp_path / "files" / name).st_ino for name in ("hostname", "hosts")}
    assert before == after
    assert "fresh" in (tmp_path / "files" / "hosts").read_text()


def test_an_identity_with_other_etc_files_lets_the_held_process_go(container):
    """A resolv.conf the template did not mount: the held process is ended and the
    container's process is made the usual way."""
    container.hold()
    held_pid = container.held.pid
    _identity(container, resolv_conf="nameserver 127.0.0.53\n")
    assert container.held is None and not os.path.exists(f"/proc/{held_pid}")
    spawned = container.start(ProcessSpec(args=["hostname"]), stdin=False)
    assert spawned.pid != held_pid and not container.took_held
    assert _read_all(spawned.stdout) == b"fresh\n"
    assert process.wait(spawned.pid) == 0


def test_a_held_process_that_died_is_replaced_at_start(container):
    container.hold()
    os.kill(container.held.pid, 9)
    wait_until(lambda: not alive(container.held.pid), 10, "the held process dead")
    spawned = container.start(ProcessSpec(args=["true"]), stdin=False)
    assert process.wait(spawned.pid) == 0


def test_destroy_ends_a_held_process_never_started(container):
    container.hold()
    held_pid = container.held.pid
    with pytest.raises(SpawnError, match="already"):
        container.hold()
    container.destroy()
    assert container.held is None and not os.path.exists(f"/proc/{held_pid}")


def test_reading_the_program_ahead_reads_only_a_regular_file_and_never_blocks(tmp_path):
    """The image is hostile: its "program" may be a FIFO nobody writes, or missing."""
    program = tmp_path / "prog"
    program.write_bytes(b"\x7fELF" + b"x" * 5000)
    program.chmod(0o755)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o755)
    for args in ([str(program)], [str(fifo)], ["/no/such/program"], ["not-on-the-path"]):
        process._read_executable(ProcessSpec(args=args))  # returns; raises nothing
