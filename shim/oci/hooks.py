"""Running a config's hooks (runtime spec "POSIX-platform Hooks").

Each hook runs on the host with the container's ``state`` JSON on its stdin, ``args``
as its argv (``args[0]`` is argv[0]), exactly ``env`` as its environment, and is killed
after ``timeout`` seconds. When they run:

- ``prestart``, ``createRuntime``, ``createContainer``: in ``create``, in that order,
  once the stand-in exists (the VM boots in ``start``);
- ``startContainer``: in ``start``, before the process is started;
- ``poststart``: in ``start``, after the process runs;
- ``poststop``: in ``delete``.

``createContainer`` and ``startContainer`` are meant for the container's namespaces;
those are inside the VM, so they run on the host like the others (documented, and noted
in the log when a config has them).
"""

from __future__ import annotations

import json
import subprocess

from shim.errors import VmshimError

FATAL = ("prestart", "createRuntime", "createContainer", "startContainer")
"""A failure of these fails the operation; poststart and poststop only warn."""


class HookError(VmshimError):
    """A hook failed; the text names it."""


def run_hooks(kind: str, hooks: dict, state: dict, warn=None) -> None:
    """Run every hook of *kind* (dicts as stored in OciInfo.hooks) in order. Raises
    HookError for a failing FATAL hook; otherwise calls *warn(text)*."""
    payload = json.dumps(state).encode()
    for index, hook in enumerate(hooks.get(kind) or []):
        argv = list(hook.get("args") or []) or [hook["path"]]
        try:
            res = subprocess.run(
                argv,
                executable=hook["path"],
                input=payload,
                env={k: v for k, v in (e.split("=", 1) for e in hook.get("env") or [] if "=" in e)},
                capture_output=True,
                timeout=hook.get("timeout"),
            )
            problem = (
                f"exited with {res.returncode}: {res.stderr.decode(errors='replace').strip()[:500]}"
                if res.returncode
                else ""
            )
        except subprocess.TimeoutExpired:
            problem = f"did not finish within {hook.get('timeout')} s"
        except OSError as exc:
            problem = f"could not run: {exc.strerror}"
        if problem:
            text = f"{kind} hook #{index} ({hook['path']}) {problem}"
            if kind in FATAL:
                raise HookError(text)
            if warn is not None:
                warn(text)
