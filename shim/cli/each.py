"""Verbs that take several names, docker style: do each one, report each failure on its
own line, go on with the rest, and exit 1 at the end if any failed; and the Go-template
subset ``--format`` renders their documents with (``ps`` uses it too)."""

from __future__ import annotations

import json
import re
import sys
from typing import Callable

import click

from shim.errors import UsageError, VmshimError


def each(refs, action: Callable[[str], object], show: Callable[[str, object], str] | None = None) -> None:
    """Apply *action* to every ref and print ``show(ref, result)`` (default: the ref, as
    docker prints each name done); ``Error: …`` for each failure; exit 1 if any failed."""
    failed = False
    for ref in refs:
        try:
            result = action(ref)
            click.echo(show(ref, result) if show else ref)
        except VmshimError as exc:
            click.echo(f"Error: {exc}", err=True)
            failed = True
    if failed:
        sys.exit(1)


def inspect_each(refs, document: Callable[[str], dict], fmt: str | None) -> None:
    """``inspect``: the documents of every ref that exists, as one JSON list, or each
    rendered with the Go-template-style *fmt*; ``Error: …`` for the others; exit 1 if
    any failed."""
    docs, failed = [], False
    for ref in refs:
        try:
            docs.append(document(ref))
        except VmshimError as exc:
            click.echo(f"Error: {exc}", err=True)
            failed = True
    if fmt:
        for doc in docs:
            click.echo(render_template(fmt, doc))
    else:
        click.echo(json.dumps(docs, indent=4))
    if failed:
        sys.exit(1)


TEMPLATE_FIELD = re.compile(r"\{\{\s*(json\s+)?\.([A-Za-z0-9_.]*)\s*\}\}")


def render_template(template: str, data: dict) -> str:
    """A small subset of Go templates: ``{{.A.B}}`` and ``{{json .A}}``."""

    def value(match):
        node = data
        for part in [p for p in match.group(2).split(".") if p]:
            if not isinstance(node, dict) or part not in node:
                raise UsageError(f"template: no field {match.group(2)!r}")
            node = node[part]
        if match.group(1) or isinstance(node, (dict, list)):
            return json.dumps(node)
        if isinstance(node, bool):
            return "true" if node else "false"
        return str(node)

    return TEMPLATE_FIELD.sub(value, template.replace("\\n", "\n").replace("\\t", "\t"))
