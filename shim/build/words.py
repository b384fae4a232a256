"""Dockerfile words: splitting on whitespace with quotes, and variable substitution.

The rules are docker's (``moby/buildkit/frontend/dockerfile/shell``), which the instructions
that take environment replacement use (FROM, COPY, ADD, ENV, LABEL, ARG, EXPOSE, USER,
VOLUME, WORKDIR, STOPSIGNAL; RUN, CMD and ENTRYPOINT are left to the shell):

- ``'...'`` is literal; ``"..."`` allows ``$`` substitution, and the escape character
  there only escapes ``"``, ``$`` and itself; outside quotes it escapes any character.
- ``$NAME``, ``${NAME}``, ``${NAME:-word}`` / ``${NAME-word}`` (default when unset or
  empty / unset), ``${NAME:+word}`` / ``${NAME+word}`` (alternative), ``${NAME:?msg}`` /
  ``${NAME?msg}`` (error). Unset names expand to nothing. A ``$`` not followed by a name or
  ``{`` is kept.

The escape character is ``\\`` unless the Dockerfile says ``# escape=`` (then a backtick).
"""

from __future__ import annotations

from typing import Callable, Mapping

from shim.build.errors import BuildError


class WordError(BuildError):
    """A word cannot be parsed (unterminated quote, bad ``${...}``); caller adds the line."""


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Split *text* on whitespace outside quotes and not escaped. Quotes and escapes are
    kept in the words (expand them with :func:`expand`)."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    quote = None
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote is None and ch.isspace():
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
            continue
        in_word = True
        if ch == escape and quote != "'":
            cur.append(text[i : i + 2])
            i += 2
            continue
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        cur.append(ch)
        i += 1
    if in_word:
        words.append("".join(cur))
    return words


def expand(word: str, env: Mapping[str, str] | Callable[[str], str | None], escape: str = "\\") -> str:
    """Substitute variables in *word* and remove its quotes and escapes.

    *env* maps names to values (or is a lookup function returning None when unset).
    Raises WordError for an unterminated quote or ``${``, or a ``${NAME?msg}`` whose NAME
    is unset."""
    lookup = env if callable(env) else env.get
    return _Expander(word, lookup, escape).run()


def expand_all(words: list[str], env, escape: str = "\\") -> list[str]:
    return [expand(w, env, escape) for w in words]


class _Expander:
    def __init__(self, text: str, lookup, escape: str):
        self.text, self.lookup, self.escape = text, lookup, escape
        self.i = 0

    def run(self, stop: str | None = None) -> str:
        """Process until the end (or an unquoted *stop* character, which is consumed)."""
        out: list[str] = []
        text, n = self.text, len(self.text)
        while self.i < n:
            ch = text[self.i]
            if stop is not None and ch == stop:
                self.i += 1
                return "".join(out)
            if ch == "'":
                end = text.find("'", self.i + 1)
                if end < 0:
                    raise WordError(f"unterminated single quote in {self.text!r}")
                out.append(text[self.i + 1 : end])
                self.i = end + 1
            elif ch == '"':
                self.i += 1
                out.append(self._double_quoted())
            elif ch == self.escape:
                if self.i + 1 < n:
                    out.append(text[self.i + 1])
                self.i += 2
            else:
                out.append(self._expansion_or(ch))
        if stop is not None:
            raise WordError(f"missing '{stop}' in {self.text!r}")
        return "".join(out)

    def _double_quoted(self) -> str:
        out: list[str] = []
        text, n = self.text, len(self.text)
        while self.i < n:
            ch = text[self.i]
            if ch == '"':
                self.i += 1
                return "".join(out)
            if ch == self.escape and self.i + 1 < n and text[self.i + 1] in ('"', "$", self.escape):
                out.append(text[self.i + 1])
                self.i += 2
            else:
                out.append(self._expansion_or(ch))
        raise WordError(f"unterminated double quote in {self.text!r}")

    def _expansion_or(self, ch: str) -> str:
        """At ``$``: the expansion there; else the character *ch* itself."""
        if ch == "$":
            return self._dollar()
        self.i += 1
        return ch

    def _name(self) -> str:
        start = self.i
        while self.i < len(self.text) and (self.text[self.i].isalnum() or self.text[self.i] == "_"):
            self.i += 1
        return self.text[start : self.i]

    def _dollar(self) -> str:
        text = self.text
        self.i += 1  # the $
        if self.i >= len(text):
            return "$"
        if text[self.i] != "{":
            name = self._name()
            if not name:
                return "$"
            return self.lookup(name) or ""
        self.i += 1  # the {
        name = self._name()
        if not name:
            raise WordError(f"bad substitution in {self.text!r}: '${{' needs a name")
        if self.i >= len(text):
            raise WordError(f"missing '}}' in {self.text!r}")
        value = self.lookup(name)
        ch = text[self.i]
        if ch == "}":
            self.i += 1
            return value or ""
        colon = ch == ":"
        if colon:
            self.i += 1
            ch = text[self.i] if self.i < len(text) else ""
        if ch not in ("-", "+", "?"):
            raise WordError(
                f"unsupported modifier in {self.text!r}: "
                f"use ${{{name}:-word}}, ${{{name}:+word}} or ${{{name}:?message}}"
            )
        self.i += 1
        word = self.run(stop="}")
        is_set = value is not None and (value != "" or not colon)
        if ch == "-":
            return value if is_set else word
        if ch == "+":
            return word if is_set else ""
        if not is_set:
            raise WordError(f"{name}: {word or 'is not set'}")
        return value


def parse_key_values(text: str, what: str, escape: str = "\\", legacy: bool = True) -> list[tuple[str, str]]:
    """``K=V K2="v 2"`` → [(K, V), (K2, "v 2")] with the raw (unexpanded) values; or, for
    ENV and LABEL, the legacy ``K the rest of the line``. Raises WordError."""
    words = split_words(text, escape)
    if not words:
        raise WordError(f"{what} needs at least one argument")
    if "=" not in words[0] and legacy:
        key = words[0]
        rest = text.strip()[len(words[0]) :].strip()
        if not rest:
            raise WordError(f"{what} {key} needs a value: use {what} {key}=VALUE")
        return [(key, rest)]
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise WordError(f"{what}: cannot find '=' in {word!r}: must be of the form name=value")
        if not key:
            raise WordError(f"{what}: names cannot be empty ({word!r})")
        pairs.append((key, value))
    return pairs
