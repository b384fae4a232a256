"""The per-container monitor (vmshim's conmon / containerd-shim).

One small host process per running container. It creates the VM (or the host
placement), talks to the agent, appends the container's output to its log, serves the
CLI on ``<run dir>/monitor.sock`` (API: shim.containers.monitor_api), records state,
exit code and times in the store, applies ``--restart`` and ``--rm``, and tears down.

How it comes to life (:func:`spawn`): the CLI, with its modules already imported, forks;
the child starts a new session and forks again, so the monitor is nobody's child and no
second Python interpreter starts on the way to the container. It writes ``ready {pid,
start}`` on the socketpair it shares with its spawner, which records the pid (under the
container's lock) and sends the first request (``start``).

If the monitor dies (kill -9), the VM or host agent keeps running. The next CLI call that
needs the monitor finds it dead (:func:`shim.containers.store.monitor_alive`) and spawns
a new one with ``recover=True``: it connects to the agent's channel again (QEMU's
virtio-serial socket, or the host agent's socket, both accept a new connection) and the
agent greets it with a new ``hello``; output the agent held meanwhile arrives then. If
the VM is gone, the container is recorded as exited (code 255) and cleaned up.

The monitor's own life is a state machine of its own (shim.containers.monitor_life:
Idle, Booting, Running, Stopping, Removing, RestartWaiting, Exited, Checkpointed), each
state carrying what belongs to it, changed only by :meth:`Monitor._enter`. It is not the
container's lifecycle (shim.containers.state, what the record says across monitors); the
monitor records that one's changes as its own life moves.

The loop is single-threaded: one poll() over the agent channel, the listening socket
and the clients, with timers for stop timeouts and restarts. Output is read from the
agent only while every client keeps up (less than CLIENT_HIGH bytes queued for it), so a
slow reader slows the container down instead of filling memory; the agent's own flow
control does the rest.

The guest is untrusted. Every message from the agent is checked
(guest.protocol.check_from_guest) and handled on its own: one that breaks the protocol,
or whose handling fails, is dropped with a line in monitor.log (the first
BAD_MESSAGES_LOGGED only); after MAX_BAD_MESSAGES the container is killed and its run ends
with that reason. A frame that breaks the framing itself kills the container at once. A
well-formed message that answers nothing asked is ignored. Every request to the agent
has a deadline (START_TIMEOUT, REPLY_TIMEOUT); the log is capped by rotation
(shim.containers.logs.LogLimits).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable
from guest import protocol
from guest.protocol import Message, ProtocolError
from guest.spec import ProcessSpec
from shim import paths
from shim.containers import health
from shim.containers.forked import fork_detached, redirect_stdio
from shim.containers.isolation import Isolation, VmIsolation
from shim.containers import monitor_api as api
from shim.containers import monitor_life as life
from shim.containers.monitor_life import (
    Booting,
    Checkpointed,
    Exited,
    Idle,
    Life,
    Removing,
    RestartWaiting,
    Running,
    Stopping,
)
from shim.containers import state as lifecycle
from shim.containers.logs import LogWriter
from shim.containers.state import Status
from shim.containers.store import Container, ContainerStore, now_rfc3339, process_start_time, run_dir_of
from shim.errors import CheckpointError, ContainerNotFound, ContainerStateError, VmshimError

MAIN_ID = 1
START_TIMEOUT = 30.0
"""Seconds between ``start`` and ``started``: mounting and exec inside the guest."""
CLIENT_HIGH = 1 << 20
"""Stop reading the agent while a client has this many bytes queued."""
AGENT_HIGH = 4 << 20
"""Stop reading clients (their stdin) while this much waits to be sent to the agent."""
KILL_GRACE = 5.0
"""After the SIGKILL of a stop, how long the agent has to report the exit before the
VM (or host agent) is killed outright."""
REPLY_TIMEOUT = 30.0
"""Seconds the agent has to answer an exec, builtin, stats or update request."""
MAX_NETCONF_INTERFACES = 8
MEMBER_ID_RE = re.compile(r"[0-9a-f]{16,64}")
"""A pod member's container id (``exec`` with ``in_member``)."""
NETWATCH_SETTLE = 0.5
"""Seconds of quiet after link/address events in an engine's namespace before looking."""
DNS_TIMEOUT_CHECK = 6.0
"""When to drop relayed DNS queries that got no answer (engine_network.DNS_TIMEOUT is 5 s)."""
AGENT_LET_GO = 0.5
"""Seconds between closing the agent channel and saving the VM, for the guest agent to
see its host leave (it then greets the next one with a hello)."""
MAX_BAD_MESSAGES = 100
"""Messages breaking the protocol a guest may send before its container is killed: one
is dropped with a line in monitor.log, a stream of them is an attack (or a broken agent)."""
BAD_MESSAGES_LOGGED = 10
"""Only the first few dropped messages are logged one by one (monitor.log stays small)."""
MAX_AGENT_LINES = 100
"""Errors the agent reports on its own that monitor.log keeps (a guest cannot fill it)."""
POOL_REFILL_DELAY = 1.0
"""Seconds after a container that took a warm-pool VM started (or at its exit, if that
comes first) until the pool keeper is told to boot its replacement: under TCG that boot
takes a core for seconds, and would share the two here with the start it replaces."""
RESTART_DELAY_MAX = 60.0
RESTART_DELAY_FIRST = 0.1
RESTART_RESET_AFTER = 10.0
"""docker's back-off: 100 ms, doubled for each restart in a row, back to 100 ms once the
container ran this long."""


def restart_delay(previous: float | None, ran_seconds: float) -> float:
    """How long a restart policy waits after a run of *ran_seconds*, given the previous
    wait (None: none yet)."""
    if previous is None or ran_seconds >= RESTART_RESET_AFTER:
        return RESTART_DELAY_FIRST
    return min(RESTART_DELAY_MAX, previous * 2)


EXIT_CODE_LOST = 255
"""Recorded when the VM (or host agent) ended without reporting the exit."""


def _remove_anonymous_volumes(mounts: list) -> None:
    """``--rm``: the anonymous volumes (-v /path) of a removed container go with it."""
    from shim.containers.mounts import remove_anonymous

    remove_anonymous(mounts)


def make_placement(record: Container, store: ContainerStore) -> Isolation:
    """The isolation *record* asked for: its own VM, namespaces on the host, or (records
    the unit tests make, ``isolation="fake"``; the CLI never writes one) the in-tree fake
    (shim.containers.fake_isolation)."""
    if record.isolation == "fake":
        from shim.containers.fake_isolation import FakeIsolation

        return FakeIsolation(record, store)
    from shim.containers.options import boot_config_of

    boot = boot_config_of(record)
    run_dir = run_dir_of(record.id)
    if record.isolation == "vm":
        from shim.containers.vm_placement import VmPlacement

        rw = store.rw_disk(record.id) if record.writable == "disk" else None
        backend = None
        if record.hypervisor:  # migrated (issue 15)
            from shim.vm.libvirt_backend import LibvirtBackend

            backend = LibvirtBackend(record.hypervisor)
        placement = VmPlacement(
            boot,
            record.layer_disks,
            run_dir,
            name=record.name,
            memory_mib=record.vm_memory_mib,
            rw_disk=rw,
            backend=backend,
            vcpus=record.vm_vcpus,
            cpuset=record.resources.vm_cpuset(),
            mounts=record.mounts,
            network=record.network,
            rootfs_dir=record.rootfs,
            hypervisor=record.hypervisor,
            engine_netns=record.engine_netns,
        )
        if record.writable == "tmpfs" and record.state.status == Status.CREATED.value:
            from shim.containers import template

            try:
                placement.template = template.find(record)  # issue 15: snapshot start
            except (VmshimError, OSError, ValueError):
                placement.template = None  # no template then: a cold boot
        return placement
    from shim.containers.process_placement import ProcessPlacement

    rw_dir = store.dir(record.id) / "rw" if record.writable == "disk" else None
    return ProcessPlacement(
        boot, record.layer_disks, run_dir, name=record.name, rw_dir=rw_dir, mounts=record.mounts, network=record.network
    )


def _figures(usage) -> dict | None:
    """The agent's ``stats`` usage, keeping only what can be a figure: at most 64 entries
    with short names and number (or null) values."""
    if not isinstance(usage, dict):
        return None
    return {
        k: v
        for k, v in list(usage.items())[:64]
        if isinstance(k, str)
        and len(k) <= 64
        and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
    }


def send_buffered(sock, buf: bytearray) -> bool:
    """Send what *buf* holds without blocking, removing what went out. Returns False when
    the peer is gone (the caller closes), True otherwise (sent all, or would block)."""
    while buf:
        try:
            sent = sock.send(buf[: 1 << 20])
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del buf[:sent]
    return True


def receive(sock: socket.socket) -> bytes | None:
    """What non-blocking *sock* holds (256 KiB at most): None when nothing yet, b"" when
    the peer is gone."""
    try:
        return sock.recv(256 * 1024)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class AgentChannel:
    """The loop's side of the agent's channel, held by a live state while it is there: the
    socket (non-blocking), its frame reader (None once the framing broke: what follows is
    discarded until it closes), what waits to be sent, and whether the agent said hello."""

    def __init__(self, sock: socket.socket, reader: protocol.FrameReader | None, *, greeted: bool):
        self.sock = sock
        sock.setblocking(False)
        self.reader = reader
        self.dropped_seen = reader.dropped_count if reader is not None else 0
        self.out = bytearray()
        self.greeted = greeted

    @classmethod
    def of(cls, client, *, greeted: bool) -> AgentChannel:
        """Take over an AgentClient's socket and reader (what it dropped meanwhile is the
        caller's to count: Monitor._note_rejected)."""
        return cls(client.sock, client._reader, greeted=greeted)

    def fileno(self) -> int:
        return self.sock.fileno()

    def flush(self) -> bool:
        """Send what is queued without blocking; False when the agent is gone."""
        return send_buffered(self.sock, self.out)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Conn:
    """One client connection (non-blocking; frames queued in ``out``)."""

    def __init__(self, sock: socket.socket, kind: str = "new"):
        self.sock = sock
        sock.setblocking(False)
        self.reader = protocol.FrameReader(api.TYPES)
        self.out = bytearray()
        self.kind = kind  # new | main (attached to the main process) | proc | waiter | done
        self.proc_id: int | None = None
        self.expect: str | None = None  # kind "request": the one answer type it takes
        self.stdin = False
        self.member = False  # kind "proc" running a pod member: it dies with its client
        self.closing = False  # close once out is flushed
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, type: str, payload: bytes = b"", **fields: Any) -> None:
        if self.closed:
            return
        self.out += api.encode(type, payload, **fields)
        self.flush()

    def flush(self) -> None:
        if not self.closed and not send_buffered(self.sock, self.out):
            self.close()
            return
        if self.closing and not self.out:
            self.close()

    def finish(self) -> None:
        """Close once everything queued was sent."""
        self.closing = True
        self.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.out.clear()
            try:
                self.sock.close()
            except OSError:
                pass


class Monitor:
    """Serve one container until it ended for good (exited without a restart, or was
    removed). See the module doc. *spawner* is the socketpair end shared with the CLI
    that spawned us (it gets ``ready`` and sends the first request).

    ``state`` is the monitor's own life (shim.containers.monitor_life: Idle, Booting,
    Running, Stopping, Removing, RestartWaiting, Exited, Checkpointed), an inner machine
    distinct from the container's lifecycle in the record (shim.containers.state); it
    changes only through :meth:`_enter`. The placement comes from :func:`make_placement`,
    which picks the isolation the record names."""

    def __init__(
        self, store: ContainerStore, container_id: str, *, spawner: socket.socket | None = None, recover: bool = False
    ):
        self.store = store
        self.id = container_id
        self.spawner = spawner
        self.recover = recover
        self.state: Life = Idle()
        self._record: Container | None = store.load(container_id)
        self.run_dir = run_dir_of(container_id)
        self.placement: Isolation | None = None
        self.log = LogWriter(store.log_path(container_id), self.record.log)
        self.listener: socket.socket | None = None
        self.conns: list[Conn] = []
        self.procs: dict[int, Conn | None] = {}  # agent process id → its client
        self.pending: dict[int, Conn] = {}  # exec/builtin waiting for started
        self.waiters: list[Conn] = []
        self.timers: list[tuple[float, str, Callable[[], None]]] = []
        self.restart_wait: float | None = None  # the last back-off (restart_delay)
        self.last_agent_error = ""
        self.bad_messages = 0
        self.agent_lines = 0
        self.unexpected = 0
        self.netwatch: socket.socket | None = None
        """vmshim-runtime: wakes us when the engine changes the container's namespace."""
        self.internal_requests: set[int] = set()
        """Ids of requests the monitor itself sent the agent (netconf of followed links)."""

    @property
    def record(self) -> Container:
        """The container's record. Precondition: not removed yet (``_record`` is None once
        an auto-remove or ``rm`` deleted it)."""
        if self._record is None:
            raise ContainerNotFound(self.id)
        return self._record

    @record.setter
    def record(self, value: Container) -> None:
        self._record = value

    @property
    def record_if_kept(self) -> Container | None:
        """The record, or None once the container was removed."""
        return self._record

    @property
    def isolation(self) -> Isolation:
        """The container's isolation. Precondition: boot, restore or reattach made it."""
        if self.placement is None:
            raise ContainerStateError("use", "running", self._status().value, self.id)
        return self.placement

    def _vm(self, op: str) -> VmIsolation:
        """The isolation when it is a VM's; *op* (checkpoint, migrate…) is refused otherwise."""
        placement = self.isolation
        if not isinstance(placement, VmIsolation):
            raise ValueError(f"{op} needs --isolation vm")
        return placement

    # ---- the monitor's life (shim.containers.monitor_life) -------------------------------

    def _enter(self, new: Life) -> None:
        """The one place the monitor's life changes. Raises life.IllegalTransition for a
        change monitor_life.TRANSITIONS does not list (a bug)."""
        life.check_transition(self.state, new)
        self.state = new

    @property
    def main_running(self) -> bool:
        """Whether the container's main process runs (a live state)."""
        return life.is_live(self.state)

    @property
    def agent(self) -> AgentChannel | None:
        """The agent's channel: a live state's, while it is there."""
        return self.state.agent if isinstance(self.state, Running) else None

    def _set_agent(self, channel: AgentChannel | None) -> None:
        """The channel comes and goes within a live state (re-attach, checkpoint,
        migration): not a change of the monitor's life."""
        assert isinstance(self.state, Running), self.state
        self.state.agent = channel

    def _last_code(self) -> int | None:
        """The exit code of this monitor's last run (None: none ended, or one runs)."""
        state = self.state
        if isinstance(state, (RestartWaiting, Exited)):
            return state.code
        if isinstance(state, Booting):
            return state.last_code
        return None

    # ---- entry ---------------------------------------------------------------------------

    def serve(self) -> None:
        paths.private_dir(self.run_dir)
        self._listen()
        if self.spawner is not None:
            conn = Conn(self.spawner, kind="new")
            self.spawner = None
            conn.sock.setblocking(True)
            conn.sock.sendall(api.encode(api.READY, pid=os.getpid(), start=process_start_time(os.getpid()) or 0))
            conn.sock.setblocking(False)
            self.conns.append(conn)
        if self.recover:
            self._reattach()
        while not life.is_final(self.state):
            self._poll()
        self._finish()

    def _listen(self) -> None:
        path = self.run_dir / api.SOCKET_NAME
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self.listener = sock

    def _listen_again(self) -> None:
        """A new socket at the usual path (the old one's file is gone)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        old = self.listener
        self._listen()
        if old is not None:
            # Clients that connected while we tore down wait in the old socket's backlog:
            # take them over (closing it would drop their requests: a lost `stop`).
            self._accept_all(old)
            old.close()

    # ---- the loop ------------------------------------------------------------------------

    def _poll(self) -> None:
        poller = select.poll()
        handlers: dict[int, Callable[[int], None]] = {}
        clients_ok = all(len(c.out) < CLIENT_HIGH for c in self.conns if c.kind in ("main", "proc"))
        agent = self.agent
        if agent is not None:
            mask = (select.POLLIN if clients_ok else 0) | (select.POLLOUT if agent.out else 0)
            if mask:
                poller.register(agent.sock, mask)
                handlers[agent.fileno()] = self._on_agent
        if self.listener is not None:
            poller.register(self.listener, select.POLLIN)
            handlers[self.listener.fileno()] = self._on_listener
        read_clients = agent is None or len(agent.out) < AGENT_HIGH
        for conn in self.conns:
            mask = (select.POLLIN if read_clients else 0) | (select.POLLOUT if conn.out else 0)
            if mask:
                poller.register(conn.sock, mask)
                handlers[conn.fileno()] = functools.partial(self._on_client, conn)
        if self.netwatch is not None:
            poller.register(self.netwatch, select.POLLIN)
            handlers[self.netwatch.fileno()] = self._on_netwatch
        relay = self._dns_relay()
        for fd in relay.fds() if relay is not None else []:
            poller.register(fd, select.POLLIN)
            handlers[fd] = functools.partial(self._on_dns_ready, fd)
        timeout = None
        if self.timers:
            timeout = max(0, int((min(t[0] for t in self.timers) - time.monotonic()) * 1000) + 1)
        try:
            events = poller.poll(timeout)
        except InterruptedError:
            events = []
        for fd, event in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler(event)
        self._run_timers()
        self.conns = [c for c in self.conns if not c.closed]

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = [t for t in self.timers if t[0] <= now]
        self.timers = [t for t in self.timers if t[0] > now]
        for _, _name, func in due:
            func()

    def _timer(self, delay: float, name: str, func) -> None:
        self.timers.append((time.monotonic() + delay, name, func))

    def _cancel_timers(self, *names: str) -> bool:
        """Drop the pending timers called *names*; True when there was one."""
        kept = [t for t in self.timers if t[1] not in names]
        cancelled = len(kept) < len(self.timers)
        self.timers = kept
        return cancelled

    # ---- the agent -------------------------------------------------------------------------

    def _attach_agent(self, client) -> None:
        """Take over the socket of an AgentClient that did the handshake (a live state
        holds it); what it already received is handled now."""
        self._set_agent(AgentChannel.of(client, greeted=True))
        self._note_rejected(client)
        self._on_agent_messages(client.take_pending())

    def _to_agent(self, type: str, payload: bytes = b"", **fields) -> None:
        agent = self.agent
        if agent is None:
            return
        agent.out += protocol.encode(type, payload, **fields)
        self._flush_agent()

    def _flush_agent(self) -> None:
        agent = self.agent
        if agent is not None and not agent.flush():
            self._agent_gone()

    def _on_agent(self, event: int) -> None:
        if event & select.POLLOUT:
            self._flush_agent()
        agent = self.agent
        if agent is None or not event & (select.POLLIN | select.POLLHUP | select.POLLERR):
            return
        data = receive(agent.sock)
        if data is None:
            return
        if not data:
            self._agent_gone()
            return
        reader = agent.reader
        if reader is None:
            return
        try:
            messages = reader.feed(data)
        except ProtocolError as exc:
            # The framing itself is broken: nothing after this can be trusted.
            text = protocol.printable(str(exc), 200)
            self._say(f"the agent broke the protocol: {text}; killing the container")
            self.last_agent_error = f"the agent broke the protocol: {text}"
            agent.reader = None  # what follows is discarded until the channel closes
            self._kill_placement()
            return
        reasons = reader.take_dropped()
        dropped = reader.dropped_count - agent.dropped_seen
        agent.dropped_seen = reader.dropped_count
        for n in range(dropped):  # each frame counts, its reason when one was kept
            self._agent_misbehaved(reasons[n] if n < len(reasons) else "")
        self._on_agent_messages(messages)

    def _on_agent_messages(self, messages: list[Message]) -> None:
        """Handle each message on its own: one that breaks the protocol, or a bug in its
        handling, is logged and dropped, never the end of the monitor."""
        for msg in messages:
            try:
                protocol.check_from_guest(msg)
                self._on_agent_message(msg)
            except ProtocolError as exc:
                self._agent_misbehaved(str(exc))
            except Exception as exc:  # noqa: BLE001 - one message must not end the monitor
                if self.bad_messages < BAD_MESSAGES_LOGGED:
                    self._say(f"handling the agent's {msg.type!r} failed:\n" + traceback.format_exc())
                self._agent_misbehaved(f"handling {msg.type!r} failed: {exc}")

    def _note_rejected(self, client) -> None:
        """What an AgentClient dropped before the loop took its socket over."""
        for reason in client.rejected:
            self._agent_misbehaved(reason)
        for _ in range(client.rejected_count - len(client.rejected)):
            self._agent_misbehaved("")
        client.rejected.clear()
        client.rejected_count = 0

    def _agent_misbehaved(self, reason: str) -> None:
        """Count a dropped message; past MAX_BAD_MESSAGES the container is killed."""
        self.bad_messages += 1
        reason = protocol.printable(reason, 200)
        if reason and self.bad_messages <= BAD_MESSAGES_LOGGED:
            self._say(f"dropped a message from the agent: {reason}")
        if self.bad_messages == MAX_BAD_MESSAGES:
            self.last_agent_error = (
                f"the agent sent {MAX_BAD_MESSAGES} messages that break the protocol"
                + (f" (last: {reason})" if reason else "")
                + "; the container was killed"
            )
            self._say(self.last_agent_error)
            self._kill_placement()

    def _on_agent_message(self, msg: Message) -> None:
        """Precondition: *msg* passed protocol.check_from_guest."""
        proc_id = msg.fields.get("id")
        if msg.type == protocol.HELLO:
            version = msg.fields.get("protocol")
            if version != protocol.PROTOCOL_VERSION:
                self._say(f"the agent speaks protocol {version}; killing the container")
                self._kill_placement()
                return
            if self.agent is not None:
                self.agent.greeted = True
        elif msg.type in (protocol.STDOUT, protocol.STDERR):
            if proc_id == MAIN_ID:
                self.log.write(msg.type, msg.payload)
                for conn in self.conns:
                    if conn.kind == "main":
                        conn.send(msg.type, msg.payload, id=MAIN_ID)
            elif proc_id in self.procs:
                owner = self.procs[proc_id]
                if owner is not None:
                    owner.send(msg.type, msg.payload, id=proc_id)
            else:  # a previous monitor's exec, or made up
                self._unexpected(msg)
        elif msg.type == protocol.EXIT:
            code = msg.fields.get("code")
            code = code if isinstance(code, int) and not isinstance(code, bool) else EXIT_CODE_LOST
            if proc_id == MAIN_ID:
                self._main_exited(code, oom=msg.fields.get("oom_killed") is True)
            elif proc_id in self.procs:
                owner = self.procs.pop(proc_id)
                if owner is not None:
                    owner.send(protocol.EXIT, id=proc_id, code=code)
                    owner.finish()
            else:
                self._unexpected(msg)
        elif msg.type in (protocol.UPDATED, protocol.ERROR) and proc_id in self.internal_requests:
            self.internal_requests.discard(proc_id)
            if msg.type == protocol.ERROR:
                text = msg.fields.get("message")
                self._say(
                    "the agent could not bring up a followed interface: "
                    + (protocol.printable(text) if isinstance(text, str) else "?")
                )
        elif (
            msg.type == protocol.STARTED
            and proc_id in self.pending
            and self.pending[proc_id].kind in ("proc", "detached")
        ):
            owner = self.pending.pop(proc_id)
            if owner.closed:
                self.procs[proc_id] = None
                return
            owner.send(protocol.STARTED, id=proc_id, pid=msg.fields.get("pid", 0))
            if owner.kind == "detached":
                self.procs[proc_id] = None
                owner.finish()
            else:
                self.procs[proc_id] = owner
        elif (
            msg.type in (protocol.STATS, protocol.UPDATED)
            and proc_id in self.pending
            and self.pending[proc_id].kind == "request"
        ):
            # The answer to a stats/update/netconf request (shim.containers.limits,
            # shim.containers.networking): only the answer type that request takes.
            owner = self.pending.pop(proc_id)
            if owner.expect is not None and msg.type != owner.expect:
                self._say(f"the agent answered a request with {msg.type!r}; dropped")
                owner.send(
                    protocol.ERROR,
                    code=125,
                    message=f"the agent answered with {msg.type!r} instead of {owner.expect!r}",
                )
                owner.finish()
                return
            usage = _figures(msg.fields.get("usage"))
            owner.send(api.REPLY, b"", **({"usage": usage} if usage is not None else {}))
            owner.finish()
        elif msg.type == protocol.ERROR:
            text = msg.fields.get("message")
            text = protocol.printable(text) if isinstance(text, str) else "the agent reported an error"
            if proc_id in self.pending:
                owner = self.pending.pop(proc_id)
                code = msg.fields.get("code")
                owner.send(protocol.ERROR, message=text, code=code if isinstance(code, int) else 126)
                owner.finish()
            elif proc_id is None:
                self.last_agent_error = text
                self.agent_lines += 1
                if self.agent_lines <= MAX_AGENT_LINES:
                    self._say(f"agent: {text}")
                elif self.agent_lines == MAX_AGENT_LINES + 1:
                    self._say("agent: (further errors from the agent are not logged)")
            else:
                self._unexpected(msg)
        elif msg.type == protocol.DNS_QUERY:
            self._dns_query(msg)
        elif msg.type != protocol.LOG:
            self._unexpected(msg)

    # ---- the DNS relay into an engine's namespace (shim.containers.engine_network) ------------

    def _dns_relay(self):
        return getattr(self.placement, "dns_relay", None)

    def _dns_query(self, msg: Message) -> None:
        """Precondition: *msg* passed protocol.check_from_guest (id, server, payload size).
        A query the relay drops gets no answer (the guest's resolver times out)."""
        relay = self._dns_relay()
        if relay is None:
            self._unexpected(msg)
            return
        if relay.query(msg.fields["id"], msg.fields["server"], msg.payload):
            self._timer(DNS_TIMEOUT_CHECK, "dns", relay.expire)

    def _watch_engine(self) -> None:
        watch = getattr(self.placement, "engine_watch", None)
        if watch is None or self.netwatch is not None:
            return
        try:
            self.netwatch = watch()
        except OSError as exc:
            self._say(f"cannot watch the container's network namespace: {exc}")

    def _on_netwatch(self, event: int) -> None:
        """Link or address events: look again once they settle (NETWATCH_SETTLE s)."""
        if self.netwatch is None:
            return
        for _ in range(64):
            try:
                if not self.netwatch.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
        self._cancel_timers("netwatch")
        self._timer(NETWATCH_SETTLE, "netwatch", self._follow_engine)

    def _follow_engine(self) -> None:
        """Plug the engine's new interfaces into the VM and have the agent bring them up."""
        if not self.main_running or self.agent is None:
            return
        try:
            interfaces = self._vm("following the engine's links").follow_engine_links()
        except VmshimError as exc:
            self._say(f"cannot follow the container's network namespace: {exc}")
            return
        if interfaces:
            request_id = self._new_proc_id()
            self.internal_requests.add(request_id)
            self._to_agent(protocol.NETCONF, token=self.record.token, id=request_id, interfaces=interfaces)

    def _close_netwatch(self) -> None:
        if self.netwatch is not None:
            self.netwatch.close()
            self.netwatch = None
        self._cancel_timers("netwatch")

    def _on_dns_ready(self, fd: int, event: int) -> None:
        self._on_dns_answer(fd)

    def _on_dns_answer(self, fd: int) -> None:
        relay = self._dns_relay()
        answer = relay.answer(fd) if relay is not None else None
        if answer is not None:
            self._to_agent(protocol.DNS_ANSWER, answer[1], id=answer[0])

    def _unexpected(self, msg: Message) -> None:
        """A well-formed message that answers nothing we asked: logged (the first few)
        and dropped. Not counted as an attack: a late answer after a timeout, or output
        of an exec started by a previous monitor, look the same."""
        self.unexpected += 1
        if self.unexpected <= BAD_MESSAGES_LOGGED:
            self._say(f"ignored an unexpected {msg.type!r} from the agent (id {msg.fields.get('id')})")

    def _agent_gone(self) -> None:
        """The channel closed: the VM (or host agent) ended. Without an exit report,
        the container died with it."""
        if self.agent is not None:
            self.agent.close()
            self._set_agent(None)
        self._orphan_requests("the container stopped")
        if self.main_running:
            what = "microVM" if self.record.isolation == "vm" else "host agent"
            reason = f"the {what} stopped without reporting the container's exit"
            if self.last_agent_error:
                reason += f" ({self.last_agent_error})"
            self._say(reason)
            self._main_exited(EXIT_CODE_LOST, error=reason)

    def _kill_placement(self) -> None:
        if self.placement is not None:
            self.placement.kill()

    # ---- clients -------------------------------------------------------------------------

    def _on_listener(self, event: int) -> None:
        if self.listener is not None:
            self._accept_all(self.listener)

    def _accept_all(self, listener: socket.socket) -> None:
        """Take every connection waiting on *listener* (non-blocking) as a client."""
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._say(f"accept failed: {exc}")
                return
            self.conns.append(Conn(sock))

    def _on_client(self, conn: Conn, event: int) -> None:
        if event & select.POLLOUT:
            conn.flush()
        if conn.closed or not event & (select.POLLIN | select.POLLHUP | select.POLLERR):
            return
        data = receive(conn.sock)
        if data is None:
            return
        if not data:
            self._client_gone(conn)
            return
        try:
            messages = conn.reader.feed(data)
        except ProtocolError as exc:
            conn.send(protocol.ERROR, message=f"protocol error: {exc}")
            conn.finish()
            return
        for msg in messages:
            try:
                self._on_client_message(conn, msg)
            except ContainerStateError as exc:
                conn.send(
                    protocol.ERROR,
                    message=str(exc),
                    code=exc.exit_code,
                    state={
                        "operation": exc.operation,
                        "expected": exc.expected,
                        "actual": exc.actual,
                        "name": self.record.name,
                    },
                )
                conn.finish()
            except (VmshimError, ProtocolError, ValueError) as exc:
                conn.send(protocol.ERROR, message=str(exc), code=getattr(exc, "exit_code", 125))
                conn.finish()
            except Exception as exc:  # noqa: BLE001 - a bug must not end the monitor
                self._say("request failed:\n" + traceback.format_exc())
                conn.send(protocol.ERROR, message=f"internal monitor error: {exc}")
                conn.finish()
            if conn.closed or conn.closing:
                break

    def _client_gone(self, conn: Conn) -> None:
        conn.close()
        if conn.kind == "proc" and conn.proc_id is not None:
            # The exec's client went away: so does its stdin (the process may go on).
            if conn.proc_id in self.procs:
                self.procs[conn.proc_id] = None
                self._to_agent(protocol.STDIN_CLOSE, id=conn.proc_id)
                if conn.member:  # its stand-in is gone (SIGKILL): so is the member
                    self._to_agent(protocol.SIGNAL, id=conn.proc_id, signal=9)

    def _on_client_message(self, conn: Conn, msg: Message) -> None:
        if msg.type == api.REQUEST:
            if conn.kind != "new":
                raise ValueError("one request per connection")
            op = msg.get("op", str)
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise ValueError(f"unknown request {op!r}")
            handler(conn, msg)
            return
        # Stream messages for the process this connection is attached to.
        proc_id = msg.get("id", int)
        if conn.kind == "main":
            if proc_id != MAIN_ID:
                return
            if msg.type in (protocol.STDIN, protocol.STDIN_CLOSE) and not conn.stdin:
                return
        elif conn.kind == "proc":
            if proc_id != conn.proc_id:
                return
        else:
            return
        if msg.type == protocol.STDIN:
            self._to_agent(protocol.STDIN, msg.payload, id=proc_id)
        elif msg.type == protocol.STDIN_CLOSE:
            self._to_agent(protocol.STDIN_CLOSE, id=proc_id)
        elif msg.type == protocol.RESIZE:
            self._to_agent(protocol.RESIZE, id=proc_id, rows=msg.get("rows", int), cols=msg.get("cols", int))
        elif msg.type == protocol.SIGNAL:
            self._to_agent(protocol.SIGNAL, id=proc_id, signal=msg.get("signal", int))

    # ---- requests --------------------------------------------------------------------------

    def _status(self) -> Status:
        return self.record.status

    def _need(self, operation: str) -> None:
        lifecycle.check(operation, self._status(), self.record.name)
        if not self.main_running:
            raise ContainerStateError(operation, "running", "exited", self.record.name)

    def _op_start(self, conn: Conn, msg: Message) -> None:
        """Boot and start the main process (the spawner's request, to a fresh monitor)."""
        if not isinstance(self.state, Idle):
            actual = "restarting" if isinstance(self.state, RestartWaiting) else self._status().value
            raise ContainerStateError("start", "created or exited", actual, self.record.name)
        attach = msg.get("attach", bool, False)
        conn.stdin = msg.get("stdin", bool, False) and self.record.interactive
        rows = msg.get("rows", int, 24)
        cols = msg.get("cols", int, 80)
        self._boot_and_start(conn, attach=attach, rows=rows, cols=cols, cancel=conn if attach else None)

    def _op_attach(self, conn: Conn, msg: Message) -> None:
        self._need("attach")
        conn.kind = "main"
        conn.stdin = msg.get("stdin", bool, False) and self.record.interactive
        conn.send(protocol.STARTED, id=MAIN_ID, pid=self.record.state.pid, tty=self.record.tty)

    def _op_exec(self, conn: Conn, msg: Message) -> None:
        """Run a process in the container; with ``member`` (a BootConfig dict, the
        agent checks it) a pod member beside it (guest.runtime.member), which is killed
        when this connection (its stand-in's) goes; with ``in_member`` (a running
        member's container id) the process runs in that member (its namespaces and
        cgroup)."""
        self._need("exec")
        member = msg.get("member", dict, None)
        in_member = msg.get("in_member", str, "")
        if in_member and (member is not None or not MEMBER_ID_RE.fullmatch(in_member)):
            raise ValueError("in_member must be a pod member's container id (16-64 hex digits), without member")
        process = ProcessSpec.from_dict(msg.get("process", dict)) if member is None else None
        proc_id = self._new_proc_id()
        detach = msg.get("detach", bool, False) and member is None
        stdin = msg.get("stdin", bool, False) and not detach
        conn.kind = "detached" if detach else "proc"
        conn.proc_id = proc_id
        conn.stdin = stdin
        self._await_reply(proc_id, conn)
        if member is not None:
            conn.member = True
            self._to_agent(
                protocol.MEMBER,
                token=self.record.token,
                id=proc_id,
                config=member,
                stdin=stdin,
                tty=msg.get("tty", bool, False),
                rows=msg.get("rows", int, 24),
                cols=msg.get("cols", int, 80),
            )
            return
        assert process is not None
        self._to_agent(
            protocol.EXEC,
            token=self.record.token,
            id=proc_id,
            process=process.to_dict(),
            stdin=stdin,
            tty=process.tty,
            rows=msg.get("rows", int, 24),
            cols=msg.get("cols", int, 80),
            **({"member": in_member} if in_member else {}),
        )

    def _op_stats(self, conn: Conn, msg: Message) -> None:
        """The container cgroup's usage, asked of the agent (reply {usage})."""
        self._need("stats")
        self._agent_request(conn, protocol.STATS)

    def _op_update(self, conn: Conn, msg: Message) -> None:
        """Change the running container's cgroup limits (reply {}); the record is the
        caller's to update (shim.containers.limits)."""
        if not self.main_running:
            raise ContainerStateError("update", "running", self._status().value, self.record.name)
        self._agent_request(conn, protocol.UPDATE, limits=msg.get("limits", dict))

    def _op_netconf(self, conn: Conn, msg: Message) -> None:
        """Have the agent bring up NICs just plugged into the VM (reply {}); the host
        made the entries (shim.containers.networking), the agent checks them again."""
        self._need("network connect")
        if self.record.isolation == "process":
            raise ValueError("netconf is for VM containers (process containers get veths)")
        interfaces = msg.get("interfaces", list)
        if not interfaces or len(interfaces) > MAX_NETCONF_INTERFACES:
            raise ValueError(f"netconf takes 1 to {MAX_NETCONF_INTERFACES} interfaces")
        self._agent_request(conn, protocol.NETCONF, interfaces=interfaces)

    def _agent_request(self, conn: Conn, type: str, **fields) -> None:
        request_id = self._new_proc_id()
        conn.kind = "request"
        conn.expect = protocol.STATS if type == protocol.STATS else protocol.UPDATED
        self._await_reply(request_id, conn)
        self._to_agent(type, token=self.record.token, id=request_id, **fields)

    def _op_builtin(self, conn: Conn, msg: Message) -> None:
        self._need("exec")
        proc_id = self._new_proc_id()
        stdin = msg.get("stdin", bool, False)
        conn.kind = "proc"
        conn.proc_id = proc_id
        conn.stdin = stdin
        self._await_reply(proc_id, conn)
        self._to_agent(
            protocol.BUILTIN,
            token=self.record.token,
            id=proc_id,
            name=msg.get("name", str),
            args=msg.get("args", list, []),
            stdin=stdin,
        )

    def _await_reply(self, proc_id: int, conn: Conn) -> None:
        """*conn* waits for the agent's answer to request *proc_id*, REPLY_TIMEOUT at most."""
        self.pending[proc_id] = conn
        self._timer(REPLY_TIMEOUT, f"reply-{proc_id}", lambda: self._reply_overdue(proc_id))

    def _reply_overdue(self, proc_id: int) -> None:
        owner = self.pending.pop(proc_id, None)
        if owner is None:
            return
        self._say(f"the agent did not answer request {proc_id} within {REPLY_TIMEOUT:.0f} s")
        self.procs[proc_id] = None  # a late answer is dropped, its process's output too
        owner.send(
            protocol.ERROR,
            id=proc_id,
            code=125,
            message=f"the container's agent did not answer within {REPLY_TIMEOUT:.0f} s",
        )
        owner.finish()

    def _new_proc_id(self) -> int:
        while True:  # random: a previous monitor's processes may still hold small ids
            proc_id = 2 + secrets.randbelow(1 << 30)
            if proc_id not in self.procs and proc_id not in self.pending:
                return proc_id

    def _op_stop(self, conn: Conn, msg: Message) -> None:
        timeout = max(0.0, float(msg.get("timeout", (int, float), self.record.stop_timeout)))
        self._set_stopped_by_user()
        if not self.main_running:
            self._cancel_restart()
            conn.send(api.REPLY, exit_code=self.record.state.exit_code)
            conn.finish()
            return
        conn.kind = "waiter"
        self.waiters.append(conn)
        if isinstance(self.state, (Stopping, Removing)):
            return  # it is ending already: wait with the others
        self._enter(life.carry(self.state, Stopping, deadline=time.monotonic() + timeout))
        self._ensure_unpaused()
        if timeout == 0:
            self._to_agent(protocol.SIGNAL, id=MAIN_ID, signal=int(signal.SIGKILL))
        else:
            self._to_agent(protocol.SIGNAL, id=MAIN_ID, signal=self.record.stop_signal)
            self._timer(
                timeout, "stop-kill", lambda: self._to_agent(protocol.SIGNAL, id=MAIN_ID, signal=int(signal.SIGKILL))
            )
        self._timer(timeout + KILL_GRACE, "stop-destroy", self._kill_placement)

    def _op_kill(self, conn: Conn, msg: Message) -> None:
        signum = msg.get("signal", int, int(signal.SIGKILL))
        if not 0 < signum < signal.NSIG:
            raise VmshimError(f"invalid signal {signum}")
        self._need("kill")
        if signum in (signal.SIGKILL, signal.SIGTERM):
            self._set_stopped_by_user()
        self._ensure_unpaused()
        self._to_agent(protocol.SIGNAL, id=MAIN_ID, signal=signum)
        if signum == signal.SIGKILL:
            self._timer(KILL_GRACE, "kill-destroy", self._kill_placement)
        conn.send(api.REPLY)
        conn.finish()

    def _op_pause(self, conn: Conn, msg: Message) -> None:
        self._need("pause")
        new = lifecycle.transition("pause", self._status(), self.record.name)
        self.isolation.pause()
        self._update(lambda r: setattr(r.state, "status", new.value))
        conn.send(api.REPLY)
        conn.finish()

    def _op_unpause(self, conn: Conn, msg: Message) -> None:
        lifecycle.check("unpause", self._status(), self.record.name)
        new = lifecycle.transition("unpause", self._status(), self.record.name)
        self.isolation.resume()
        self._update(lambda r: setattr(r.state, "status", new.value))
        conn.send(api.REPLY)
        conn.finish()

    def _op_freeze_member(self, conn: Conn, msg: Message) -> None:
        """Freeze (``frozen``) or thaw the pod member ``in_member`` (its container id)
        in this VM (reply {}); the member's OCI state is the caller's to keep."""
        self._need("pause")
        member = msg.get("in_member", str)
        if not MEMBER_ID_RE.fullmatch(member):
            raise ValueError("in_member must be a pod member's container id (16-64 hex digits)")
        self._agent_request(conn, protocol.FREEZE, member=member, frozen=msg.get("frozen", bool))

    def _op_wait(self, conn: Conn, msg: Message) -> None:
        if not self.main_running and not isinstance(self.state, RestartWaiting):
            conn.send(api.REPLY, exit_code=self.record.state.exit_code)
            conn.finish()
            return
        conn.kind = "waiter"
        self.waiters.append(conn)

    def _op_remove(self, conn: Conn, msg: Message) -> None:
        force = msg.get("force", bool, False)
        if self.main_running and not force:
            raise ContainerStateError(
                "remove", "created or exited (stop it, or use -f)", self._status().value, self.record.name
            )
        conn.kind = "waiter"
        self._set_stopped_by_user()
        if isinstance(self.state, Removing):  # a second rm -f: it waits for the first
            self.waiters.append(conn)
            return
        if self.main_running:
            self._enter(life.carry(self.state, Removing, conn=conn))
            self._ensure_unpaused()
            self._kill_placement()
            self._timer(KILL_GRACE, "remove-force", self._force_gone)
        else:
            self._cancel_restart()
            self._enter(Exited(self._last_code(), removal=conn))

    def _op_checkpoint(self, conn: Conn, msg: Message) -> None:
        """Save the VM into the directory ``dir`` (shim.containers.checkpoint.save_vm:
        memory image + a copy of the writable disk) and end it (``checkpointed``); with
        ``leave_running``, restore it from that image at once. The caller synced the
        guest's file systems first. Our channel to the agent is closed (after what it
        sent was logged) a moment before the save, so the saved agent knows its host is
        gone and greets the next one. Reply {} once done."""
        from pathlib import Path

        from shim.containers import checkpoint_vm as checkpoint

        self._need("checkpoint")
        if type(self.state) is not Running:
            raise ContainerStateError("checkpoint", "running", "stopping", self.record.name)
        checkpoint.check_checkpointable(self.record)
        directory = Path(msg.get("dir", str))
        leave_running = msg.get("leave_running", bool, False)
        self._ensure_unpaused()
        self._drain_agent()
        self._detach_agent("the container was checkpointed")
        time.sleep(AGENT_LET_GO)  # the guest agent sees its host leave (virtio-serial)
        try:
            checkpoint.save_vm(self.placement, self.record, directory)
        except VmshimError as exc:
            self._say(f"checkpoint failed: {exc}")
            self._reconnect_agent()  # the VM runs on as it was
            raise
        if leave_running:
            try:
                client = self._vm("checkpoint --leave-running").restore(directory / checkpoint.MEMORY_FILE)
            except VmshimError as exc:
                self._say(f"restore after checkpoint failed: {exc}")
                self._checkpointed()  # the checkpoint itself is good: keep it
                raise CheckpointError(
                    f"the checkpoint of {self.record.name} was written, "
                    f"but the container did not come back: {exc}; "
                    f"`vmshim restore {self.record.name}`"
                ) from None
            self._attach_agent(client)
            self._say("checkpointed; running on")
        else:
            self._checkpointed()
        conn.send(api.REPLY)
        conn.finish()

    def _checkpointed(self) -> None:
        """The VM was saved and is gone: record ``checkpointed`` and leave (network
        leases and volumes let go of, run directory removed)."""
        self._enter(Checkpointed())
        self._cancel_timers("stop-kill", "stop-destroy", "kill-destroy", "remove-force")
        health.stop(self)

        def saved(r: Container) -> None:
            r.state.status = lifecycle.transition("checkpoint", r.status, r.name).value
            r.state.finished_at = now_rfc3339()

        self._update(saved)
        self.isolation.teardown(grace=0.0)
        self._say("checkpointed; the VM is saved and gone")

    def _drain_agent(self, timeout: float = 0.3, limit: float = 2.0) -> None:
        """Log what the agent already sent (until it has been quiet for *timeout* s, at
        most *limit* s: a chatty container is cut off there, its agent keeps the rest)."""
        deadline = time.monotonic() + limit
        while self.agent is not None and time.monotonic() < deadline:
            try:
                ready = select.select([self.agent.sock], [], [], timeout)[0]
            except InterruptedError:
                continue
            if not ready:
                return
            self._on_agent(select.POLLIN)

    def _detach_agent(self, reason: str) -> None:
        """Close the agent channel without taking it for the container's end: exec
        sessions and pending requests are told *reason*."""
        self._orphan_requests(reason)
        self._close_agent()

    def _orphan_requests(self, reason: str) -> None:
        """The channel went away: exec sessions and pending requests are told *reason*
        (code 137) and forgotten."""
        for proc_id, owner in list(self.pending.items()) + list(self.procs.items()):
            if owner is not None and not owner.closed:
                owner.send(protocol.ERROR, id=proc_id, message=reason, code=137)
                owner.finish()
        self.pending.clear()
        self.procs.clear()

    def _reconnect_agent(self) -> None:
        """After a failed save, or a migration: the VM runs (here or there); take its
        channel again (the agent says hello when it sees us)."""
        try:
            client = self.isolation.reattach()
        except VmshimError:
            client = None
        if client is None:
            self._agent_gone()
            return
        self._set_agent(AgentChannel.of(client, greeted=False))  # greeted by its hello

    def _op_migrate(self, conn: Conn, msg: Message) -> None:
        """Live-migrate the VM to the libvirt at ``uri`` (shared storage: the same files);
        this monitor stays, and talks to the agent through the destination QEMU's socket
        (same path). The record remembers the URI. Reply {} once done."""
        from shim.containers import checkpoint_vm as checkpoint

        self._need("migrate")
        if type(self.state) is not Running:
            raise ContainerStateError("migrate", "running", "stopping", self.record.name)
        checkpoint.check_checkpointable(self.record, "migrate")
        uri = msg.get("uri", str)
        self._ensure_unpaused()
        self._drain_agent()
        self._detach_agent("the container moved to another host")
        time.sleep(AGENT_LET_GO)
        try:
            self._vm("migrate").migrate(uri)
        except VmshimError as exc:
            self._say(f"migration failed: {exc}")
            self._reconnect_agent()
            raise
        self._update(lambda r: setattr(r, "hypervisor", uri))
        self._say(f"migrated to {uri}")
        self._reconnect_agent()
        conn.send(api.REPLY)
        conn.finish()

    def _op_restore(self, conn: Conn, msg: Message) -> None:
        """Bring a checkpointed container back from the memory image ``image`` (its
        writable disk was put back by shim.containers.checkpoint.restore). Reply {}."""
        from pathlib import Path

        if not isinstance(self.state, Idle):
            raise ContainerStateError("restore", "checkpointed", self._status().value, self.record.name)
        self.record = self.store.load(self.id)
        lifecycle.check("restore", self._status(), self.record.name)
        self.placement = make_placement(self.record, self.store)
        self._enter(Booting())
        try:
            client = self._vm("restore").restore(Path(msg.get("image", str)))
        except VmshimError as exc:
            self._say(f"restore failed: {exc}")
            self.placement.teardown(grace=0.0)
            self._enter(Exited())
            raise
        self._enter(Running(pid=self.record.state.pid, up_since=time.monotonic()))

        def restored(r: Container) -> None:
            r.state.status = lifecycle.transition("restore", r.status, r.name).value
            r.state.started_at = now_rfc3339()
            r.state.error = ""
            r.state.monitor_pid = os.getpid()
            r.state.monitor_start = process_start_time(os.getpid()) or 0

        self._update(restored)
        health.start(self)
        self._attach_agent(client)
        self._say("restored from a checkpoint")
        conn.send(api.REPLY)
        conn.finish()

    def _op_status(self, conn: Conn, msg: Message) -> None:
        conn.send(
            api.REPLY,
            status=self._status().value,
            running=self.main_running,
            agent=self.agent is not None and self.agent.greeted,
            pid=os.getpid(),
            restarting=isinstance(self.state, RestartWaiting),
        )
        conn.finish()

    def _force_gone(self) -> None:
        """The killed VM did not close its channel in time: give up on it."""
        if self.main_running:
            self._agent_gone()

    def _ensure_unpaused(self) -> None:
        if self._status() == Status.PAUSED and self.placement is not None:
            try:
                self.placement.resume()
            except VmshimError as exc:
                self._say(f"cannot resume: {exc}")
            self._update(lambda r: setattr(r.state, "status", Status.RUNNING.value))

    def _set_stopped_by_user(self) -> None:
        if not self.record.state.stopped_by_user:
            self._update(lambda r: setattr(r.state, "stopped_by_user", True))

    def _cancel_restart(self) -> None:
        """A stop or rm during a restart's back-off: no restart, the monitor leaves."""
        if isinstance(self.state, RestartWaiting):
            self._cancel_timers("restart")
            self._update(lambda r: setattr(r.state, "restarting", False))
            self._enter(Exited(self.state.code))

    # ---- starting ------------------------------------------------------------------------

    def _boot_and_start(
        self, conn: Conn | None, *, attach: bool = False, rows: int = 24, cols: int = 80, cancel: Conn | None = None
    ) -> bool:
        """Boot the placement and start the main process; True when it runs. Failures
        are recorded (state unchanged, like docker) and told to *conn*."""
        self.record = self.store.load(self.id)
        self.placement = make_placement(self.record, self.store)
        self._enter(Booting(last_code=self._last_code()))
        self.last_agent_error = ""
        alive = (lambda: self._cancelled(cancel)) if cancel is not None else None
        try:
            client = self.placement.boot(alive=alive)
        except VmshimError as exc:
            self._start_failed(conn, str(exc), getattr(exc, "exit_code", 125) or 125)
            return False
        except Exception as exc:  # noqa: BLE001
            self._say("boot failed:\n" + traceback.format_exc())
            self._start_failed(conn, f"cannot start the container: {exc}", 125)
            return False
        finally:
            self._note_template()
        try:
            client.send(
                protocol.START,
                token=self.record.token,
                id=MAIN_ID,
                stdin=self.record.interactive,
                tty=self.record.tty,
                rows=rows,
                cols=cols,
            )
            reply = client.recv(START_TIMEOUT, alive=alive)
        except VmshimError as exc:
            self.placement.kill()
            self._start_failed(conn, str(exc), 125)
            return False
        if reply.type != protocol.STARTED:
            message = reply.fields.get("message") if reply.type == protocol.ERROR else None
            message = protocol.printable(message) if isinstance(message, str) else None
            code = reply.fields.get("code") if reply.type == protocol.ERROR else None
            self.placement.kill()
            self._start_failed(
                conn,
                message if isinstance(message, str) else f"the agent answered {reply.type!r} to start",
                code if isinstance(code, int) else 125,
            )
            return False
        pid = reply.fields.get("pid", 0)
        self._enter(Running(pid=pid if isinstance(pid, int) else 0, up_since=time.monotonic()))

        def started(r: Container) -> None:
            r.state.status = lifecycle.transition("start", r.status, r.name).value
            r.state.started_at = now_rfc3339()
            r.state.pid = pid if isinstance(pid, int) else 0
            r.state.exit_code = 0
            r.state.error = ""
            r.state.oom_killed = False
            r.state.stopped_by_user = False
            r.state.monitor_pid = os.getpid()
            r.state.monitor_start = process_start_time(os.getpid()) or 0

        self._update(started)
        if self._took_pooled_vm():
            self._timer(POOL_REFILL_DELAY, "pool-refill", self._refill_pool)
        health.start(self)  # HEALTHCHECK / --health-cmd: probes on our timers
        if conn is not None:
            # Queued, not sent yet: output that came with the reply is logged (and queued
            # behind it for an attached client) first, so that a client that saw
            # "started" never misses it in the log, even if we die right after.
            conn.out += api.encode(protocol.STARTED, id=MAIN_ID, pid=pid, tty=self.record.tty)
            conn.kind = "main" if attach else "done"
        self._attach_agent(client)
        self._watch_engine()
        if conn is not None:
            if attach:
                conn.flush()
            else:
                conn.finish()
        return True

    def _took_pooled_vm(self) -> bool:
        return getattr(self.placement, "pooled", None) is not None

    def _refill_pool(self) -> None:
        """Tell the pool keeper that a VM was taken (shim.containers.pool.take leaves that
        to us, see POOL_REFILL_DELAY). Never raises."""
        from shim.containers import pool

        pool.poke()

    def _note_template(self) -> None:
        """monitor.log says whether the VM came from a snapshot template (issue 15)."""
        used = getattr(self.placement, "template", None)
        failed = getattr(self.placement, "template_error", "")
        if used:
            self._say(f"started from snapshot template {used['dir'].rsplit('/', 1)[-1]}")
        elif failed:
            self._say(f"snapshot template not used ({failed}); booted cold")

    def _cancelled(self, conn: Conn) -> str | None:
        """For a foreground start: the CLI hung up (Ctrl-C during boot)."""
        try:
            data = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        return "the start was cancelled" if data == b"" else None

    def _start_failed(self, conn: Conn | None, message: str, code: int) -> None:
        self._say(f"start failed: {message}")
        if self._took_pooled_vm():
            self._refill_pool()

        def failed(r: Container) -> None:
            r.state.exit_code = code
            r.state.error = message
            r.state.finished_at = now_rfc3339() if r.status == Status.EXITED else r.state.finished_at

        self._update(failed)
        anonymous = []
        if self._record is not None and self.record.auto_remove:
            anonymous = self.record.mounts
            self.store.delete(self.id)
            self._record = None
        if conn is not None:
            conn.send(protocol.ERROR, message=message, code=code)
            conn.finish()
            self._flush_clients(2.0)
        if self.placement is not None:
            self.placement.teardown(grace=0.0)
        if anonymous:
            _remove_anonymous_volumes(anonymous)
        self._enter(Exited(self._last_code()))

    # ---- recovery ----------------------------------------------------------------------------

    def _reattach(self) -> None:
        """Find the container a dead monitor left running and take it over."""
        status = self._status()
        if not lifecycle.is_active(status):
            self._enter(Exited())
            return
        self.placement = make_placement(self.record, self.store)
        try:
            client = self.placement.reattach()
        except VmshimError as exc:
            self._say(f"cannot look for the VM: {exc}")
            client = None
        # When it started is unknown (0.0: long ago, for the restart back-off).
        self._enter(Running(pid=self.record.state.pid, up_since=0.0))
        if client is None:
            self._say("re-attach: the container's VM (or host agent) is gone")
            self._main_exited(EXIT_CODE_LOST, error="the container ended while no monitor was watching it")
            return
        self._say(f"re-attached to the running container (pid {os.getpid()})")
        health.start(self)
        self._set_agent(AgentChannel.of(client, greeted=False))  # greeted by its hello
        self._note_rejected(client)

    # ---- the end of a run -------------------------------------------------------------------

    def _main_exited(self, code: int, *, oom: bool = False, error: str = "") -> None:
        if not isinstance(self.state, Running):
            return
        up_since, agent = self.state.up_since, self.state.agent
        removal = self.state.conn if isinstance(self.state, Removing) else None
        restart = self._should_restart(code)
        self._enter(RestartWaiting(code) if restart else Exited(code, removal=removal))
        self._cancel_timers("stop-kill", "stop-destroy", "kill-destroy", "remove-force")
        health.stop(self)
        finished_at = now_rfc3339()

        def exited(r: Container) -> None:
            if lifecycle.can("exit", r.status):
                r.state.status = lifecycle.transition("exit", r.status, r.name).value
            r.state.exit_code = code
            r.state.oom_killed = oom
            r.state.error = error
            r.state.finished_at = finished_at
            r.state.pid = 0

        self._update(exited)
        anonymous = []
        if self._record is not None and self.record.auto_remove and not restart and removal is None:
            anonymous = self.record.mounts
            self.store.delete(self.id)
            self._record = None
        for conn in self.conns:
            if conn.kind == "main":
                conn.send(protocol.EXIT, b"", id=MAIN_ID, code=code, **({"error": error} if error else {}))
                conn.finish()
        for conn in self.waiters:
            if conn is not removal:
                conn.send(api.REPLY, exit_code=code)
                conn.finish()
        self.waiters = []
        if agent is not None:  # the run's channel: the guest powers off
            agent.out += protocol.encode(protocol.SHUTDOWN)
            if not agent.flush():
                agent.close()
                self._orphan_requests("the container stopped")
                agent = None
        self._flush_clients(2.0)
        if self._cancel_timers("pool-refill"):
            self._refill_pool()  # the run is over: no need to wait
        if agent is not None:
            if not agent.flush():
                self._orphan_requests("the container stopped")
            agent.close()
        if self.placement is not None:
            self._close_netwatch()
            self.placement.teardown()
        if anonymous:
            _remove_anonymous_volumes(anonymous)
        if restart:
            self._listen_again()  # the teardown took the run directory, our socket with it
            delay = restart_delay(self.restart_wait, time.monotonic() - up_since)
            self.restart_wait = delay
            self._update(lambda r: setattr(r.state, "restarting", True))
            self._timer(delay, "restart", self._restart)

    def _close_agent(self) -> None:
        """Close a live state's channel after sending what is queued (if the agent is
        gone already, that is the container's end: _agent_gone)."""
        self._flush_agent()
        if self.agent is not None:
            self.agent.close()
            self._set_agent(None)

    def _should_restart(self, code: int) -> bool:
        """Whether the run that just ended is started again (the ``--restart`` policy);
        never after a stop or a removal."""
        record = self._record
        if record is None or isinstance(self.state, (Stopping, Removing)) or record.state.stopped_by_user:
            return False
        policy = record.restart_policy
        if policy in ("always", "unless-stopped"):
            return True
        if policy == "on-failure" and code != 0:
            return not record.restart_max or record.state.restart_count < record.restart_max
        return False

    def _restart(self) -> None:
        """The back-off passed: boot and start again (a failure ends the monitor)."""
        if not isinstance(self.state, RestartWaiting):
            return

        def counted(r: Container) -> None:
            r.state.restart_count += 1
            r.state.restarting = False

        try:
            self._update(counted)
        except ContainerNotFound:
            self._enter(Exited(self.state.code))
            return
        self._boot_and_start(None)

    def _finish(self) -> None:
        """Leave: no container process is left; reply to a removal, delete the record if
        asked, give the pid slot back. Precondition: a final state (nothing runs)."""
        removal = self.state.removal if isinstance(self.state, Exited) else None
        if removal is not None and self.placement is not None:
            self.placement.forget()  # rm returns when nothing of the VM is left
        if removal is not None or (self._record is not None and self.record.auto_remove):
            # --rm also removes the anonymous volumes (-v /path) the container made.
            anonymous = self.record.mounts if self._record is not None and self.record.auto_remove else []
            self.store.delete(self.id)
            self._record = None
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)
            if anonymous:
                _remove_anonymous_volumes(anonymous)
        elif self._record is not None:

            def forget(r: Container) -> None:
                r.state.restarting = False
                if r.state.monitor_pid == os.getpid():
                    r.state.monitor_pid = 0
                    r.state.monitor_start = 0

            try:
                self._update(forget)
            except ContainerNotFound:
                pass
        code = self._last_code()
        code = code if code is not None else 0
        for conn in self.waiters + ([removal] if removal is not None else []):
            conn.send(api.REPLY, exit_code=code)
            conn.finish()
        if self.listener is not None:
            self.listener.close()
            try:
                (self.run_dir / api.SOCKET_NAME).unlink()
            except FileNotFoundError:
                pass
        # Requests that arrived too late get a clear answer instead of a reset.
        for conn in self.conns:
            if conn.kind == "new" and not conn.closed:
                conn.send(protocol.ERROR, message="the container has ended", code=125, ended=True)
                conn.finish()
        self._flush_clients(2.0)
        self.log.close()

    # ---- helpers ---------------------------------------------------------------------------

    def _update(self, change) -> None:
        """Read-modify-write our record under its lock (no-op once it was deleted)."""
        if self._record is None:
            return
        try:
            self.record = self.store.update(self.id, change)
        except ContainerNotFound:
            self._record = None

    def _flush_clients(self, timeout: float) -> None:
        """Block (up to *timeout* s) until queued frames reached the clients."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [c for c in self.conns if c.out and not c.closed]
            if not pending:
                break
            try:
                select.select([], pending, [], max(0.0, deadline - time.monotonic()))
            except InterruptedError:
                pass
            for conn in pending:
                conn.flush()
        for conn in self.conns:
            if conn.closing:
                conn.close()

    def _say(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            sys.stderr.write(f"{stamp} monitor[{os.getpid()}] {self.id[:12]}: {text}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass


# ---- spawning ------------------------------------------------------------------------------


def spawn(store: ContainerStore, container_id: str, *, recover: bool = False):
    """Fork a monitor for *container_id* (see the module doc). Returns (MonitorClient on
    the socketpair, monitor pid, monitor start time). Raises VmshimError when it does not
    come up. The caller records the pid (it should hold the container's lock)."""
    from shim.containers.store import check_socket_paths

    check_socket_paths(container_id)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fork_detached(
        child,
        lambda: _monitor_main(store, container_id, child, recover),
        close_in_child=parent,
        what=f"monitor {container_id[:12]}",
    )
    client = api.MonitorClient(parent)
    try:
        ready = client.recv(timeout=30)
    except VmshimError as exc:
        client.close()
        raise VmshimError(
            f"the container's monitor did not start ({exc}); see {store.dir(container_id) / 'monitor.log'}"
        ) from None
    if ready.type != api.READY:
        client.close()
        raise VmshimError(f"the container's monitor said {ready.type!r} instead of ready")
    return client, ready.get("pid", int), ready.get("start", int)


def _monitor_main(
    store: ContainerStore, container_id: str, sock: socket.socket, recover: bool
) -> None:  # pragma: no cover - runs in the forked child
    os.chdir("/")
    os.umask(0o022)
    from shim.proctitle import set_process_title

    set_process_title(f"vmshim-monitor {container_id[:12]}")  # what ps and top show
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    log_fd = os.open(
        store.dir(container_id) / "monitor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
    )
    redirect_stdio(log_fd, keep=sock.fileno())
    Monitor(store, container_id, spawner=sock, recover=recover).serve()
