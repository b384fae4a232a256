"""Parse a Dockerfile into stages of checked instructions (no variables expanded yet).

dockerfile-parse does the line work (continuations, comments, the ``escape`` directive);
this module turns its records into :class:`Instruction` objects, checks every one up front
(unknown instruction, missing or extra arguments, unknown flags, SHELL not in JSON form,
malformed ENV/LABEL pairs) so that a malformed Dockerfile fails before any step runs, and
groups them into :class:`Stage` objects. Each error names the Dockerfile line.

Variable substitution happens later, per step, when the environment is known
(:mod:`shim.build.words`).

BuildKit's heredocs (``RUN <<EOF``, ``RUN cmd <<EOF``, ``COPY <<EOF FILE``; ``<<-EOF``
strips leading tabs, ``<<"EOF"`` asks for no expansion) are cut out of the text before
dockerfile-parse sees it (their lines are blanked, so line numbers stay) and kept on the
instruction that opened them (:attr:`Instruction.heredocs`). Markers are read on the
instruction's first line only. ``# syntax=`` is accepted and ignored: the built-in
frontend is always used.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

from shim.build.words import WordError, parse_key_values, split_words
from shim.build.errors import BuildError

INSTRUCTIONS = (
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
)
FLAGS = {
    "FROM": {"platform"},
    "COPY": {"from", "chown", "chmod", "link", "parents"},
    "ADD": {"chown", "chmod", "link", "checksum"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
    "RUN": {"mount"},
}
REPEATABLE = {("RUN", "mount")}
"""Flags that may be given more than once; their values are joined with newlines."""
"""The ``--flags`` each instruction accepts (the classic builder's set, plus --chmod)."""
METADATA_ONLY = {
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}
"""Instructions that change the image config only (WORKDIR may add a directory)."""
_FLAG = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?(?:\s+|$)")
HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_.-]*)\2")
"""A heredoc marker: ``<<[-]["']WORD["']``."""
_HEREDOC_LINE = re.compile(r"\s*(RUN|COPY|ADD)\s", re.I)
MAX_HEREDOC = 1 << 20
"""Most bytes of one heredoc (a Dockerfile is read whole; this keeps a typo cheap)."""


@dataclass(frozen=True)
class Heredoc:
    """One heredoc: its marker word, its content (each line ending in a newline) and
    whether variables are expanded in it (the word was not quoted)."""

    word: str
    content: str
    expand: bool


class DockerfileError(BuildError):
    """The Dockerfile is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Instruction:
    """One instruction. ``rest`` is the text after the flags; ``json`` is the argument
    list when the instruction is in exec (JSON) form, else None. ``line`` is 1-based."""

    keyword: str
    value: str
    line: int
    flags: dict = field(default_factory=dict)
    rest: str = ""
    json: list | None = None
    heredocs: tuple = ()

    def heredoc(self, marker: str) -> Heredoc | None:
        """The heredoc a ``<<WORD`` word of this instruction stands for, else None."""
        m = HEREDOC.fullmatch(marker)
        if m is None:
            return None
        return next((h for h in self.heredocs if h.word == m.group(3)), None)

    @property
    def text(self) -> str:
        """How the instruction is shown (``Step N/M : <text>``)."""
        return f"{self.keyword} {self.value}".rstrip()

    def flag(self, name: str, default: str | None = None) -> str | None:
        return self.flags.get(name, default)


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # the FROM image, variables not yet expanded
    from_: Instruction
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name if self.name is not None else str(self.index)


@dataclass
class Dockerfile:
    path: str
    escape: str
    global_args: list[Instruction]
    stages: list[Stage]

    def stage_index(self, target: str) -> int:
        """Index of the stage named (or numbered) *target*. Raises DockerfileError."""
        for stage in self.stages:
            if stage.name is not None and stage.name == target.lower():
                return stage.index
        raise DockerfileError(
            f"target stage {target!r} could not be found in {self.path}"
            + (f" (stages: {', '.join(s.label for s in self.stages)})" if self.stages else "")
        )


def parse(data: bytes | str, path: str = "Dockerfile") -> Dockerfile:
    """Parse and check a whole Dockerfile. Raises DockerfileError naming the line."""
    from dockerfile_parse import DockerfileParser

    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DockerfileError(f"{path} is not UTF-8 text") from None
    escape = _escape_directive(data, path)
    data, heredocs = _cut_heredocs(data, path)
    parser = DockerfileParser(fileobj=io.BytesIO(data.encode()), env_replace=False)
    try:
        records = parser.structure
    except Exception as exc:  # dockerfile-parse raises plain exceptions on odd input
        raise DockerfileError(f"cannot parse {path}: {exc}") from None
    instructions = []
    for rec in records:
        keyword = rec["instruction"].upper()
        if keyword == "COMMENT":
            continue
        line = rec["startline"] + 1
        instructions.append(
            parse_instruction(keyword, rec["value"], line, path, escape, heredocs=heredocs.get(line, ()))
        )
    if not instructions:
        raise DockerfileError(f"{path} is empty: a Dockerfile needs at least a FROM")
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    names: set[str] = set()
    for ins in instructions:
        if ins.keyword == "FROM":
            base, name = _from_parts(ins, path, escape)
            if name is not None:
                if name in names:
                    raise DockerfileError(f"{path}:{ins.line}: duplicate stage name {name!r}")
                names.add(name)
            stages.append(Stage(index=len(stages), name=name, base=base, from_=ins))
        elif not stages:
            if ins.keyword != "ARG":
                raise DockerfileError(
                    f"{path}:{ins.line}: {ins.keyword} before the first FROM: a Dockerfile "
                    "must start with FROM (only ARG may come before it)"
                )
            global_args.append(ins)
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError(f"{path} has no FROM instruction")
    return Dockerfile(path=path, escape=escape, global_args=global_args, stages=stages)


def _cut_heredocs(text: str, path: str) -> tuple[str, dict[int, tuple[Heredoc, ...]]]:
    """(the text with every heredoc body and terminator line blanked, {1-based line of
    the instruction → its heredocs}). Raises DockerfileError for an unterminated one."""
    lines = text.split("\n")
    found: dict[int, tuple[Heredoc, ...]] = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        start = index
        index += 1
        if not _HEREDOC_LINE.match(line):
            continue
        docs = []
        for m in HEREDOC.finditer(line):
            strip_tabs, quote, word = m.group(1) == "-", m.group(2), m.group(3)
            body = []
            size = 0
            while True:
                if index >= len(lines):
                    raise DockerfileError(
                        f"{path}:{start + 1}: the heredoc <<{word} is not closed (no line {word!r} after it)"
                    )
                current = lines[index]
                lines[index] = ""
                index += 1
                if strip_tabs:
                    current = current.lstrip("\t")
                if current == word:
                    break
                body.append(current + "\n")
                size += len(body[-1])
                if size > MAX_HEREDOC:
                    raise DockerfileError(
                        f"{path}:{start + 1}: the heredoc <<{word} is larger than {MAX_HEREDOC} bytes"
                    )
            docs.append(Heredoc(word=word, content="".join(body), expand=not quote))
        if docs:
            found[start + 1] = tuple(docs)
    return "\n".join(lines), found


def _escape_directive(text: str, path: str) -> str:
    """The ``# escape=`` parser directive (only at the very top), else backslash."""
    for line in text.splitlines():
        m = re.match(r"\s*#\s*([A-Za-z]+)\s*=\s*(.*?)\s*$", line)
        if not m:
            break
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise DockerfileError(f"{path}: invalid escape directive {m.group(2)!r}: use \\ or `")
            return m.group(2)
    return "\\"


def parse_instruction(
    keyword: str,
    value: str,
    line: int,
    path: str = "Dockerfile",
    escape: str = "\\",
    nested: bool = False,
    heredocs: tuple = (),
) -> Instruction:
    """Check one instruction and split off its flags. Raises DockerfileError."""
    where = f"{path}:{line}"
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(f"{where}: unknown instruction: {keyword}")
    value = value.strip()
    flags, rest = _split_flags(value, keyword, where)
    if keyword in ("RUN", "COPY", "ADD") and not heredocs and HEREDOC.search(rest):
        raise DockerfileError(f"{where}: a heredoc ({keyword} <<EOF) must start on the {keyword} line itself")
    form = _json_form(rest)
    ins = Instruction(
        keyword=keyword, value=value, line=line, flags=flags, rest=rest, json=form, heredocs=tuple(heredocs)
    )
    try:
        _check(ins, where, escape, nested)
    except WordError as exc:
        raise DockerfileError(f"{where}: {keyword}: {exc}") from None
    return ins


def _split_flags(value: str, keyword: str, where: str) -> tuple[dict, str]:
    flags: dict[str, str] = {}
    rest = value
    while rest.startswith("--"):
        m = _FLAG.match(rest)
        if not m:
            break
        name = m.group(1).lower()
        if name not in FLAGS.get(keyword, set()):
            allowed = sorted(FLAGS.get(keyword, set()))
            raise DockerfileError(
                f"{where}: {keyword} does not support the flag --{name}"
                + (f" (it supports {', '.join('--' + f for f in allowed)})" if allowed else "")
            )
        value = m.group(2) if m.group(2) is not None else "true"
        if name in flags and (keyword, name) in REPEATABLE:
            flags[name] += "\n" + value
        elif name in flags:
            raise DockerfileError(f"{where}: {keyword}: --{name} given twice")
        else:
            flags[name] = value
        rest = rest[m.end() :]
    return flags, rest.strip()


def _json_form(rest: str) -> list | None:
    if not rest.startswith("["):
        return None
    try:
        parsed = json.loads(rest)
    except ValueError:
        return None  # docker: not valid JSON means shell form
    if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
        return parsed
    return None


def _check(ins: Instruction, where: str, escape: str, nested: bool) -> None:
    k, rest = ins.keyword, ins.rest
    if nested and k in ("FROM", "ONBUILD", "MAINTAINER"):
        raise DockerfileError(f"{where}: ONBUILD {k} is not allowed")
    if k == "FROM":
        _from_parts(ins, where.rsplit(":", 1)[0], escape)
    elif k in ("RUN", "CMD", "ENTRYPOINT"):
        if ins.json is None and not rest:
            raise DockerfileError(f"{where}: {k} needs a command")
        if k == "RUN" and ins.json == []:
            raise DockerfileError(f"{where}: RUN needs a command")
        if k == "RUN" and "mount" in ins.flags:
            from shim.build.mounts import MountError, parse_mount

            for spec in ins.flags["mount"].split("\n"):
                try:
                    parse_mount(spec, where)
                except MountError as exc:
                    raise DockerfileError(str(exc)) from None
    elif k == "SHELL":
        if not ins.json:
            raise DockerfileError(f'{where}: SHELL needs its arguments in JSON form, e.g. SHELL ["/bin/sh", "-c"]')
    elif k in ("ENV", "LABEL"):
        parse_key_values(rest, k, escape)
    elif k == "ARG":
        words = split_words(rest, escape)
        if not words:
            raise DockerfileError(f"{where}: ARG needs a name")
        for word in words:
            name = word.partition("=")[0]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise DockerfileError(f"{where}: ARG: invalid name {name!r}")
    elif k in ("COPY", "ADD"):
        args = ins.json if ins.json is not None else split_words(rest, escape)
        if len(args) < 2:
            raise DockerfileError(f"{where}: {k} needs at least one source and a destination")
        if "chmod" in ins.flags and "$" not in ins.flags["chmod"]:
            from shim.build.copy import CopyError, parse_chmod

            try:
                parse_chmod(ins.flags["chmod"])
            except CopyError as exc:
                raise DockerfileError(f"{where}: {k} {exc}") from None
        if "checksum" in ins.flags and not all(w.startswith(("http://", "https://")) for w in args[:-1]):
            raise DockerfileError(f"{where}: ADD --checksum is only for URL sources")
    elif k in ("WORKDIR", "USER", "STOPSIGNAL", "MAINTAINER"):
        if not rest:
            raise DockerfileError(f"{where}: {k} needs an argument")
        if k in ("USER", "STOPSIGNAL") and len(split_words(rest, escape)) != 1:
            raise DockerfileError(f"{where}: {k} takes exactly one argument")
    elif k in ("EXPOSE", "VOLUME"):
        if ins.json is None and not split_words(rest, escape):
            raise DockerfileError(f"{where}: {k} needs at least one argument")
    elif k == "HEALTHCHECK":
        words = rest.split(None, 1)
        if not words:
            raise DockerfileError(f"{where}: HEALTHCHECK needs NONE or CMD <command>")
        if words[0].upper() == "NONE":
            if len(words) > 1 or ins.flags:
                raise DockerfileError(f"{where}: HEALTHCHECK NONE takes no other arguments")
        elif words[0].upper() == "CMD":
            if len(words) < 2:
                raise DockerfileError(f"{where}: HEALTHCHECK CMD needs a command")
            for name in ("interval", "timeout", "start-period", "start-interval"):
                if name in ins.flags:
                    parse_duration(ins.flags[name], f"{where}: HEALTHCHECK --{name}")
            if "retries" in ins.flags and not ins.flags["retries"].isdigit():
                raise DockerfileError(f"{where}: HEALTHCHECK --retries must be a number")
        else:
            raise DockerfileError(f"{where}: HEALTHCHECK needs NONE or CMD <command>, not {words[0]!r}")
    elif k == "ONBUILD":
        words = rest.split(None, 1)
        if not words:
            raise DockerfileError(f"{where}: ONBUILD needs an instruction")
        parse_instruction(
            words[0].upper(), words[1] if len(words) > 1 else "", ins.line, where.rsplit(":", 1)[0], escape, nested=True
        )


def _from_parts(ins: Instruction, path: str, escape: str) -> tuple[str, str | None]:
    words = split_words(ins.rest, escape)
    if len(words) == 1:
        return words[0], None
    if len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
            raise DockerfileError(
                f"{path}:{ins.line}: invalid stage name {words[2]!r}: use "
                "a letter then letters, digits, '.', '_' or '-'"
            )
        return words[0], name
    raise DockerfileError(f"{path}:{ins.line}: FROM needs an image, optionally followed by AS <name>")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_duration(text: str, what: str) -> int:
    """A Go duration (``30s``, ``1m30s``) in nanoseconds, as docker stores them."""
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNITS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise DockerfileError(f"{what}: invalid duration {text!r} (e.g. 30s, 1m30s)")
    return total
