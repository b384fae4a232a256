"""The CLI's entry hook: finds the global options that choose a remote host before click
parses anything, so a remote command's arguments are parsed by the remote vmshim. Cheap
when no remote host is in use (no paramiko import, one stat of the contexts file)."""

from __future__ import annotations

import os
import sys

# Verbs that always run here: they manage this client, not a host.
LOCAL_VERBS = {"context", "remote-build-context"}
_GLOBAL_WITH_VALUE = {"--host", "-H", "--context", "-c", "--remote-vmshim"}


def _text(found: dict[str, str | bool], option: str) -> str | None:
    """The value of a global option that takes one (None when absent)."""
    value = found.get(option)
    return value if isinstance(value, str) else None


def split_globals(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """(global options, the rest from the verb on) of *argv* (without the program name)."""
    found: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        if name in _GLOBAL_WITH_VALUE:
            if not eq:
                if i + 1 >= len(argv):
                    break  # click reports the missing value
                value = argv[i + 1]
                i += 1
            found[{"-H": "--host", "-c": "--context"}.get(name, name)] = value
        elif token == "--debug":
            found["--debug"] = True
        else:
            break
        i += 1
    return found, argv[i:]


def maybe_run_remote(argv: list[str], commands) -> int | None:
    """Run *argv* on the remote host it names (or the current context's); the exit status,
    or None when the command runs here. *commands*: the CLI's click group (each verb's
    options say which arguments are local files or streams)."""
    found, rest = split_globals(argv)
    if not rest or rest[0].startswith("-") or rest[0] in LOCAL_VERBS:
        return None
    if not (
        found.get("--host")
        or found.get("--context")
        or os.environ.get("VMSHIM_HOST")
        or os.environ.get("VMSHIM_CONTEXT")
        or _contexts_file_exists()
    ):
        return None  # the common case: nothing more to import
    from shim.errors import VmshimError
    from shim.remote.target import resolve

    debug = bool(found.get("--debug")) or os.environ.get("VMSHIM_DEBUG", "") not in ("", "0")
    try:
        target = resolve(_text(found, "--host"), _text(found, "--remote-vmshim"), _text(found, "--context"))
        if target is None:
            return None
        from shim.remote.client import run_remote

        return run_remote(target, rest, commands, debug)
    except VmshimError as exc:
        if debug:
            raise
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _contexts_file_exists() -> bool:
    """Whether shim.remote.target's contexts file exists (same path, without its imports)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.exists(os.path.join(base, "vmshim", "contexts.json"))
