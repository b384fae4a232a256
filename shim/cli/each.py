"""Verbs that take several names, docker style: do each one, report each failure on its
own line, go on with the rest, and exit 1 at the end if any failed."""

from __future__ import annotations

import json
import sys
from typing import Callable

import click

from shim.errors import VmshimError


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
        from shim.cli.ps import render_template

        for doc in docs:
            click.echo(render_template(fmt, doc))
    else:
        click.echo(json.dumps(docs, indent=4))
    if failed:
        sys.exit(1)
