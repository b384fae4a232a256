"""The hostile guest agent of the malicious-guest suite (tests/e2e/test_hostile_guest.py).

:data:`PATCH` is appended to a copy of ``guest/agent.py``; the copy is built into a guest
image variant through ``VMSHIM_GUEST_SOURCE``. The patched agent is the real one, plus:

- the container's environment ``HOSTILE=<attack>``: the agent sends that attack's frames
  right after ``started`` and again after every later ``hello`` (a re-attached monitor);
- ``exec hostile <attack>``: the agent sends the attack's frames, then runs ``true``.

Attacks (:func:`attack_frames`): ``wrongtype`` (``stdout`` with ``id: [1]``, the exact
frame of issue 12), ``deepjson`` (a header nested 30,000 deep), ``types`` (every field of
every message with a wrong type), ``hugeid`` (ids out of range), ``flood`` (1,000 bad
messages and 20,000 frames of output for ids that do not exist), ``garbage`` (bytes that
break the framing itself).
"""

PATCH = r"""

# ---- hostile additions (tests/e2e/hostile_agent.py): this agent attacks its host ----------

import struct as _h_struct


def _h_frame(header, payload=b""):
    return _h_struct.pack(">II", len(header), len(payload)) + header + payload


def _h_attack_frames(name):
    f = _h_frame
    if name == "wrongtype":
        return f(b'{"t":"stdout","id":[1]}', b"INJECTED-WRONGTYPE\n")
    if name == "deepjson":
        return f(b'{"t":"stdout","id":' + b"[" * 30000 + b"]" * 30000 + b"}", b"INJECTED-DEEP\n")
    if name == "types":
        return b"".join(f(h, b"INJECTED-TYPES\n") for h in (
            b'{"t":"stdout","id":"1"}', b'{"t":"stdout","id":{"a":1}}', b'{"t":"stdout","id":null}',
            b'{"t":"stdout","id":1.5}', b'{"t":"stdout"}', b'{"t":"exit","id":1,"code":"0"}',
            b'{"t":"exit","id":[1],"code":0}', b'{"t":"started","id":{},"pid":1}',
            b'{"t":"error","id":[],"message":{}}', b'{"t":"stats","id":[2],"usage":7}',
            b'{"t":"hello","protocol":"1"}', b'{"t":"start","id":1}', b'{"t":7}', b'[]',
            b'"str"', b'{"t":"stdout","id":true}', b'\xff\xfe'))
    if name == "hugeid":
        return b"".join(f(h, b"INJECTED-HUGE\n") for h in (
            b'{"t":"stdout","id":' + b"9" * 4000 + b'}', b'{"t":"stdout","id":-1}',
            b'{"t":"stdout","id":1e308}', b'{"t":"exit","id":18446744073709551616,"code":0}',
            b'{"t":"started","id":4294967296,"pid":1}', b'{"t":"exit","id":1,"code":99999}'))
    if name == "flood":
        bad = f(b'{"t":"error","id":"x","message":"spam"}') * 1000
        return bad + f(b'{"t":"stdout","id":7777}', b"INJECTED-FLOOD\n" * 100) * 5000
    if name == "garbage":
        return b"\xff" * 64 + b"garbage that is no frame at all" * 100
    return b""


def _h_inject(self, name):
    data = _h_attack_frames(name)
    if data:
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._away:
            self._flush()


def _h_mode(self):
    try:
        for item in self.config.process.env:
            if item.startswith("HOSTILE="):
                return item[len("HOSTILE="):]
    except Exception:  # noqa: BLE001
        pass
    return ""


_h_orig_start = Agent._handle_start
_h_orig_hello = Agent._send_hello
_h_orig_exec = Agent._handle_exec


def _h_handle_start(self, message):
    _h_orig_start(self, message)
    _h_inject(self, _h_mode(self))


def _h_send_hello(self):
    _h_orig_hello(self)
    if self._main is not None:
        _h_inject(self, _h_mode(self))


def _h_handle_exec(self, message):
    process = message.fields.get("process")
    args = process.get("args") if isinstance(process, dict) else None
    if isinstance(args, list) and len(args) == 2 and args[0] == "hostile":
        _h_inject(self, args[1])
        message.fields["process"] = dict(process, args=["true"])
    _h_orig_exec(self, message)


Agent._handle_start = _h_handle_start
Agent._send_hello = _h_send_hello
Agent._handle_exec = _h_handle_exec
"""
