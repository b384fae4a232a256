"""Boots the real guest image with bare QEMU (no libvirt) and waits for the agent's hello.

This is the floor every vmshim boot is measured against (``boot_floor_command``), with a
config drive for a container with no layers (the agent waits for the drive before it says
hello). Builds the guest image first if needed (in ``$VMSHIM_ROOT``, default
/var/lib/vmshim). About 2 s per boot under TCG on an idle 2-core machine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from guest import protocol
from guest.spec import BootConfig, ProcessSpec
from shim import guestimage
from shim.vm.configdrive import build_config_drive

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86_64 not installed"),
]

BOOT_TIMEOUT = 90.0
"""Seconds to wait for hello; generous because TCG on a busy CI box is slow."""
SETTLE = 1.0
"""Seconds to keep listening after hello: an agent that failed to boot follows it with error."""


def _connect(path: str, proc: subprocess.Popen, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.fixture(scope="module")
def image() -> guestimage.GuestImage:
    return guestimage.ensure_guest_image()


def test_vm_guest_boots_and_agent_sends_hello(image, tmp_path):
    sock_path, serial = str(tmp_path / "agent.sock"), tmp_path / "serial.log"
    config = BootConfig(
        container_id="floor", token="t0ken", hostname="floor", process=ProcessSpec(args=["/bin/sh"]), layer_count=0
    )
    drive = build_config_drive(config, tmp_path / "config.iso")
    cmd = guestimage.boot_floor_command(image, sock_path, str(serial), config_drive=str(drive))
    started = time.monotonic()
    deadline = started + BOOT_TIMEOUT
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    messages: list[protocol.Message] = []
    try:
        sock = _connect(sock_path, proc, deadline)
        reader = protocol.FrameReader()
        with sock:
            elapsed = None
            while time.monotonic() < deadline:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    break
                if not data:
                    break
                messages += reader.feed(data)
                if messages and elapsed is None:
                    elapsed = time.monotonic() - started
                    deadline = time.monotonic() + SETTLE
    finally:
        if proc.poll() is None:
            proc.kill()
        qemu_out = proc.communicate(timeout=30)[0].decode(errors="replace")
    console = serial.read_text(errors="replace") if serial.exists() else ""
    context = f"\n--- qemu ---\n{qemu_out[-2000:]}\n--- guest console ---\n{console[-4000:]}"
    assert messages, f"no frame from the agent within {BOOT_TIMEOUT:.0f} s{context}"
    hello = messages[0]
    assert hello.type == protocol.HELLO, f"first frame was {hello!r}{context}"
    assert hello.get("protocol", int) == protocol.PROTOCOL_VERSION
    errors = [m for m in messages if m.type == protocol.ERROR]
    assert not errors, f"the agent reported {errors[0].fields}{context}"
    print(f"hello after {elapsed:.2f} s: {hello.fields}")
