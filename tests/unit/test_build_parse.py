"""Dockerfile parsing and variable substitution (shim.build.dockerfile, shim.build.words)."""

import pytest

from shim.build.dockerfile import DockerfileError, parse, parse_duration
from shim.build.errors import BuildError
from shim.build.words import WordError, expand, parse_key_values, split_words


# ---- words --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, words",
    [
        ("a b  c", ["a", "b", "c"]),
        ('"a b" c', ['"a b"', "c"]),
        ("'a b' c", ["'a b'", "c"]),
        (r"a\ b c", [r"a\ b", "c"]),
        ("", []),
        ('  x="1 2"  y=3 ', ['x="1 2"', "y=3"]),
    ],
)
def test_split_words(text, words):
    assert split_words(text) == words


ENV = {"A": "alpha", "EMPTY": "", "PATH": "/bin"}


@pytest.mark.parametrize(
    "word, result",
    [
        ("$A", "alpha"),
        ("${A}x", "alphax"),
        ("$Ax", ""),  # the name is Ax: unset
        ("'$A'", "$A"),
        ('"$A b"', "alpha b"),
        (r"\$A", "$A"),
        (r'"\$A"', "$A"),
        (r'"a\b"', r"a\b"),  # in double quotes, \ escapes only " $ and itself
        ("${NOPE:-def}", "def"),
        ("${EMPTY:-def}", "def"),
        ("${EMPTY-def}", ""),
        ("${A:+set}", "set"),
        ("${NOPE:+set}", ""),
        ("${NOPE:-${A}}", "alpha"),
        ("$", "$"),
        ("a$", "a$"),
        ("$PATH:/usr/bin", "/bin:/usr/bin"),
        ("$1", ""),
    ],
)
def test_expand(word, result):
    assert expand(word, ENV) == result


def test_expand_with_backtick_escape():
    assert expand("a`$A", ENV, escape="`") == "a$A"


@pytest.mark.parametrize("word", ["'open", '"open', "${A", "${:-x}", "${A/x/y}"])
def test_expand_errors(word):
    with pytest.raises(WordError):
        expand(word, ENV)


def test_expand_required_variable():
    with pytest.raises(WordError, match="NOPE: must be set"):
        expand("${NOPE:?must be set}", ENV)
    assert expand("${A:?x}", ENV) == "alpha"


def test_key_values():
    assert parse_key_values('A=1 B="2 3" C=', "ENV") == [("A", "1"), ("B", '"2 3"'), ("C", "")]
    assert parse_key_values("A one two", "ENV") == [("A", "one two")]
    with pytest.raises(WordError, match="cannot find '='"):
        parse_key_values("A=1 B", "ENV")
    with pytest.raises(WordError, match="needs a value"):
        parse_key_values("A", "ENV")
    with pytest.raises(WordError, match="empty"):
        parse_key_values("=1", "LABEL")


# ---- Dockerfiles -----------------------------------------------------------------------------
LECTURE = b"""\
FROM node
RUN mkdir -p /usr/src/app
WORKDIR /usr/src/app
COPY package.json .
RUN npm install
COPY . .
EXPOSE 8080
CMD ["npm","start"]
"""


def test_the_lecture_example():
    df = parse(LECTURE)
    assert [s.base for s in df.stages] == ["node"]
    stage = df.stages[0]
    assert [i.keyword for i in stage.instructions] == ["RUN", "WORKDIR", "COPY", "RUN", "COPY", "EXPOSE", "CMD"]
    cmd = stage.instructions[-1]
    assert cmd.json == ["npm", "start"]
    assert stage.instructions[0].json is None and stage.instructions[0].rest == "mkdir -p /usr/src/app"
    assert stage.instructions[0].line == 2
    assert cmd.text == 'CMD ["npm","start"]'


def test_stages_global_args_and_flags():
    df = parse(b"""\
# a comment
ARG BASE=busybox
FROM $BASE AS Build
RUN echo a \\
    && echo b
COPY --from=build --chown=1:2 /a /b
FROM scratch
COPY --from=0 /b /c
""")
    assert [a.rest for a in df.global_args] == ["BASE=busybox"]
    assert [(s.name, s.base) for s in df.stages] == [("build", "$BASE"), (None, "scratch")]
    run, copy = df.stages[0].instructions
    assert "echo a" in run.rest and "echo b" in run.rest
    assert copy.flags == {"from": "build", "chown": "1:2"} and copy.rest == "/a /b"
    assert df.stage_index("BUILD") == 0
    with pytest.raises(DockerfileError, match="target stage 'nope'"):
        df.stage_index("nope")


def test_escape_directive():
    df = parse(b"# escape=`\nFROM busybox\nRUN echo a `\n  b\n")
    assert df.escape == "`"
    assert df.stages[0].instructions[0].rest.split() == ["echo", "a", "b"]


def test_exec_form_and_shell_form():
    df = parse(b'FROM busybox\nRUN ["echo", "x y"]\nRUN [not json\nENTRYPOINT []\n')
    a, b, c = df.stages[0].instructions
    assert a.json == ["echo", "x y"]
    assert b.json is None and b.rest == "[not json"
    assert c.json == []


@pytest.mark.parametrize(
    "text, message",
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (b"FOO bar\n", "Dockerfile:1: unknown instruction: FOO"),
        (b"FROM busybox\nFROBNICATE x\n", "Dockerfile:2: unknown instruction: FROBNICATE"),
        (b"RUN true\nFROM busybox\n", "before the first FROM"),
        (b"ARG X\n", "no FROM"),
        (b"FROM\n", "FROM needs an image"),
        (b"FROM a b\n", "FROM needs an image"),
        (b"FROM a AS 1bad\n", "invalid stage name"),
        (b"FROM a AS x\nFROM b AS x\n", "duplicate stage name"),
        (b"FROM a\nRUN\n", "RUN needs a command"),
        (b"FROM a\nRUN --mount=type=cache true\n", "needs target="),
        (b"FROM a\nCOPY --keep-git-dir a b\n", "does not support the flag --keep-git-dir"),
        (b"FROM a\nCOPY a\n", "needs at least one source and a destination"),
        (b"FROM a\nCOPY --chmod=rwx a b\n", "invalid --chmod 'rwx'"),
        (b"FROM a\nSHELL /bin/bash -c\n", "SHELL needs its arguments in JSON form"),
        (b"FROM a\nENV\n", "needs at least one argument"),
        (b"FROM a\nENV A=1 B\n", "cannot find '='"),
        (b'FROM a\nLABEL "unterminated\n', "unterminated"),
        (b"FROM a\nARG 9x\n", "invalid name"),
        (b"FROM a\nUSER a b\n", "exactly one argument"),
        (b"FROM a\nWORKDIR\n", "needs an argument"),
        (b"FROM a\nHEALTHCHECK\n", "NONE or CMD"),
        (b"FROM a\nHEALTHCHECK --interval=5x CMD true\n", "invalid duration"),
        (b"FROM a\nHEALTHCHECK NONE x\n", "no other arguments"),
        (b"FROM a\nONBUILD FROM b\n", "ONBUILD FROM is not allowed"),
        (b"FROM a\nONBUILD BOGUS x\n", "unknown instruction: BOGUS"),
        (b"FROM a\nRUN <<EOF\necho never closed\n", "heredoc <<EOF is not closed"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_dockerfiles(text, message):
    with pytest.raises(DockerfileError) as info:
        parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, BuildError) and info.value.exit_code == 1


def test_durations():
    assert parse_duration("30s", "x") == 30_000_000_000
    assert parse_duration("1m30s", "x") == 90_000_000_000
    assert parse_duration("250ms", "x") == 250_000_000
    for bad in ("", "5", "5x", "s"):
        with pytest.raises(DockerfileError):
            parse_duration(bad, "x")
