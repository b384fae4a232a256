"""What a verb reads or writes on the *local* machine when it runs on a remote host.

Most verbs need nothing: their arguments mean the same on the remote host (volume paths
are the host's, as with docker). These do:

- ``build CONTEXT``: the context (minus ``.dockerignore``, by the builder's own
  BuildContext) and the Dockerfile are sent as a tar on stdin to the hidden remote verb
  ``remote-build-context``, which unpacks them to a temporary directory and builds there.
- ``cp LOCAL CTR:PATH`` sends a tar of LOCAL to ``cp - CTR:PATH``; ``cp CTR:PATH LOCAL``
  takes the tar of ``cp CTR:PATH -`` and unpacks it here with the local cp's rules.
- ``save -o FILE`` writes the remote stdout to FILE (atomically, only on success);
  ``load -i FILE`` sends FILE as stdin.
- ``-i`` (run, exec, start), ``attach``, ``cp -``, ``load`` and ``login --password-stdin``
  forward stdin; ``-t`` with a terminal here asks the remote for a pty.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import click

from shim.errors import UsageError

CONTEXT_PLACEHOLDER = "@vmshim-remote-context@"
DOCKERFILE_PLACEHOLDER = "@vmshim-remote-dockerfile@"
CHUNK = 256 * 1024


@dataclass
class Plan:
    """How one command runs remotely. *stdin*: None (the remote sees EOF at once),
    ``"terminal"`` (forward this process's stdin), or a callable returning a file
    descriptor to stream from. *stdout*: None (this process's stdout) or a binary file.
    *finish(code)* runs after the remote exits and returns the final exit code."""

    args: list[str]
    stdin: object = None
    stdout: BinaryIO | None = None
    pty: bool = False
    finish: Callable[[int], int] = field(default=lambda code: code)


@dataclass
class Scanned:
    options: dict[str, list[tuple[object, int, str]]]  # name → (value, token index, prefix)
    positionals: list[tuple[str, int]]


def scan(command: click.Command, tokens: list[str]) -> Scanned:
    """Classify *tokens* by *command*'s own options (so the remote CLI parses them the same
    way): which are options (with their values and positions) and which are positionals."""
    takes: dict[str, tuple[str, bool]] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts + param.secondary_opts:
                takes[opt] = (param.name, not (param.is_flag or param.count))
    interspersed = command.context_settings.get("allow_interspersed_args", True)
    options: dict[str, list] = {}
    positionals: list[tuple[str, int]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            positionals += [(t, j) for j, t in enumerate(tokens[i + 1 :], i + 1)]
            break
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            pname, with_value = takes.get(name, (name, False))
            if with_value and not eq:
                if i + 1 < len(tokens):
                    options.setdefault(pname, []).append((tokens[i + 1], i + 1, ""))
                i += 2
                continue
            options.setdefault(pname, []).append((value if eq else True, i, name + "="))
        elif token.startswith("-") and token != "-":
            for j in range(1, len(token)):
                pname, with_value = takes.get("-" + token[j], ("-" + token[j], False))
                if with_value:
                    inline = token[j + 1 :]
                    if inline:
                        options.setdefault(pname, []).append((inline, i, token[: j + 1]))
                    elif i + 1 < len(tokens):
                        options.setdefault(pname, []).append((tokens[i + 1], i + 1, ""))
                        i += 1
                    break
                options.setdefault(pname, []).append((True, i, ""))
        else:
            if not interspersed:
                positionals += [(t, j) for j, t in enumerate(tokens[i:], i)]
                break
            positionals.append((token, i))
        i += 1
    return Scanned(options, positionals)


def _flag(scanned: Scanned, name: str) -> bool:
    return bool(scanned.options.get(name))


def _value(scanned: Scanned, name: str):
    values = scanned.options.get(name)
    return values[-1] if values else None


def _without(tokens: list[str], scanned: Scanned, name: str) -> list[str]:
    """*tokens* with every occurrence of option *name* (and its value) removed."""
    drop = set()
    for _, index, prefix in scanned.options.get(name, []):
        drop.add(index)
        if not prefix and index > 0 and tokens[index - 1].startswith("-"):
            drop.add(index - 1)  # the option token before a separate value
    return [t for k, t in enumerate(tokens) if k not in drop]


def plan(args: list[str], commands: click.Group) -> Plan:
    """The Plan for the vmshim arguments *args* (verb first, global options removed), read
    against *commands*, the CLI's click group (given by shim.cli.main, the floor above)."""
    if not args:
        return Plan(args)
    verb, rest, prefix = args[0], args[1:], [args[0]]
    if verb in ("image", "container") and rest and not rest[0].startswith("-"):
        verb, rest, prefix = rest[0], rest[1:], [args[0], rest[0]]
    command = _command(commands, prefix)
    if command is None or "-h" in rest or "--help" in rest:
        return Plan(args)
    scanned = scan(command, rest)
    handler = _HANDLERS.get(verb)
    if handler is not None:
        return handler(prefix, rest, scanned)
    return _interactive(prefix, rest, scanned, verb)


def _command(commands: click.Group, prefix: list[str]) -> click.Command | None:
    ctx = click.Context(commands)
    command = commands.get_command(ctx, prefix[0])
    if isinstance(command, click.Group) and len(prefix) > 1:
        command = command.get_command(ctx, prefix[1])
    return command if isinstance(command, click.Command) and not isinstance(command, click.Group) else None


def _interactive(prefix, rest, scanned, verb) -> Plan:
    interactive = _flag(scanned, "interactive") or (verb == "attach" and not _flag(scanned, "no_stdin"))
    if verb == "login" and _flag(scanned, "password_stdin"):
        interactive = True
    tty = _flag(scanned, "tty") and not _flag(scanned, "detach") and sys.stdin.isatty()
    if verb == "stats" and not _flag(scanned, "no_stream"):
        tty = sys.stdout.isatty() and sys.stdin.isatty()  # its live screen wants a terminal
    return Plan(prefix + rest, stdin="terminal" if interactive else None, pty=tty)


# ---- build ---------------------------------------------------------------------------------
def _build(prefix, rest, scanned) -> Plan:
    import tarfile  # here, not at the top: every remote command imports this module

    from shim.build.context import BuildContext

    if not scanned.positionals:
        return Plan(prefix + rest)  # the remote CLI says what is missing
    context, index = scanned.positionals[0]
    if not Path(context).is_dir():
        raise UsageError(f"build context {context!r} is not a directory")
    tokens = list(rest)
    tokens[index] = CONTEXT_PLACEHOLDER
    dockerfile = _value(scanned, "dockerfile")
    dockerfile_data = None
    if dockerfile is not None:
        value, at, opt_prefix = dockerfile
        if value == "-":
            dockerfile_data = sys.stdin.buffer.read()
        else:
            from shim.build.errors import BuildError

            try:  # the local builder's own messages
                dockerfile_data = Path(value).read_bytes()
            except FileNotFoundError:
                raise BuildError(f"cannot find the Dockerfile {value}") from None
            except OSError as exc:
                raise BuildError(f"cannot read the Dockerfile {value}: {exc.strerror}") from None
        tokens[at] = opt_prefix + DOCKERFILE_PLACEHOLDER
    build_context = BuildContext(Path(context))

    def write(out) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.add(str(build_context.root), arcname="context", recursive=False)
            for rel, _ in build_context.walk(""):
                tar.add(str(build_context.root / rel), arcname=f"context/{rel}", recursive=False)
            default = build_context.root / "Dockerfile"
            if dockerfile is None and build_context.ignore.excluded("Dockerfile") and default.is_file():
                tar.add(str(default), arcname="context/Dockerfile")  # sent even if ignored, as docker does
            if dockerfile_data is not None:
                info = tarfile.TarInfo("Dockerfile")
                info.size, info.mode = len(dockerfile_data), 0o644
                import io

                tar.addfile(info, io.BytesIO(dockerfile_data))

    return Plan(["remote-build-context", "--"] + prefix + tokens, stdin=_producer(write))


def _producer(write: Callable) -> Callable[[], int]:
    """A stdin source: a pipe whose other end a thread fills with *write(fileobj)*."""

    def start() -> int:
        read_fd, write_fd = os.pipe()
        errors: list[BaseException] = []

        def run():
            try:
                with os.fdopen(write_fd, "wb") as out:
                    write(out)
            except BrokenPipeError:
                pass
            except BaseException as exc:  # shown after the remote side ends
                errors.append(exc)
                print(f"Error: {exc}", file=sys.stderr)

        threading.Thread(target=run, daemon=True).start()
        return read_fd

    return start


# ---- cp ------------------------------------------------------------------------------------
def _cp(prefix, rest, scanned) -> Plan:
    from shim.containers.copy import split_ref

    if len(scanned.positionals) != 2:
        return Plan(prefix + rest)
    (src, src_at), (dest, dest_at) = scanned.positionals
    src_ctr, _ = split_ref(src)
    dest_ctr, _ = split_ref(dest)
    if (src_ctr is None) == (dest_ctr is None):
        return Plan(prefix + rest)  # the remote CLI refuses it with its own message
    tokens = list(rest)
    if dest_ctr is not None:
        if src == "-":
            return Plan(prefix + rest, stdin="terminal")
        path = Path(src)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"cannot copy {src}: no such file or directory")
        tokens[src_at] = "-"

        def write(out) -> None:
            from shim.containers.copy import write_source_tar

            write_source_tar(src, out, stream=True)

        return Plan(prefix + tokens, stdin=_producer(write))
    if dest == "-":
        return Plan(prefix + rest)
    tokens[dest_at] = "-"
    _, src_path = split_ref(src)
    spool = tempfile.TemporaryFile()

    def finish(code: int) -> int:
        from shim.containers.copy import extract
        from shim.errors import VmshimError

        with spool:
            if code != 0:
                return code
            spool.seek(0)
            name = "." if src_path.endswith("/.") else os.path.basename(os.path.normpath(src_path))
            try:
                extract(spool, Path(dest), name)
            except VmshimError as exc:
                print(f"Error: {exc}", file=sys.stderr)
                return exc.exit_code
        return 0

    return Plan(prefix + tokens, stdout=spool, finish=finish)


# ---- save / load ---------------------------------------------------------------------------
def _save(prefix, rest, scanned) -> Plan:
    output = _value(scanned, "output")
    if output is None:
        return Plan(prefix + rest)
    target = Path(output[0])
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
    spool = os.fdopen(fd, "wb")

    def finish(code: int) -> int:
        spool.close()
        if code == 0:
            os.replace(tmp, target)
        else:
            os.unlink(tmp)
        return code

    return Plan(prefix + _without(rest, scanned, "output"), stdout=spool, finish=finish)


def _load(prefix, rest, scanned) -> Plan:
    import tarfile  # here, not at the top: every remote command imports this module

    source = _value(scanned, "input_")
    if source is None:
        return Plan(prefix + rest, stdin="terminal")
    path = Path(source[0])
    if path.is_dir():

        def write(out) -> None:  # an OCI layout directory travels as an oci-archive
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for child in sorted(path.iterdir()):
                    tar.add(str(child), arcname=child.name)

        stdin = _producer(write)
    else:

        def stdin() -> int:
            try:
                return os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror}") from None

    return Plan(prefix + _without(rest, scanned, "input_"), stdin=stdin)


_HANDLERS = {"build": _build, "cp": _cp, "save": _save, "load": _load}
