"""The one table printer of the CLI (``ps``, ``images``, ``stats``, ``network ls``, …).

Not on a terminal, the output is docker's tabwriter look, which scripts and the tests
read: cells left-aligned in columns three spaces apart, no trailing blanks. On a terminal,
rich draws the same columns with the header in bold and cells wrapped to fit the width.
"""

from __future__ import annotations

import sys
from typing import Sequence

import click

GAP = 3
"""Spaces between two columns."""


def format_rows(rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of the plain table: *rows* (the first is the header; rows may be of
    different lengths) aligned in columns :data:`GAP` spaces apart, trailing blanks cut."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        return []
    ncols = max(len(row) for row in cells)
    widths = [max((len(row[i]) for row in cells if i < len(row)), default=0) for i in range(ncols)]
    return [(" " * GAP).join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]


def print_table(rows: Sequence[Sequence[object]]) -> None:
    """Print *rows*, the first being the header: plain (:func:`format_rows`) unless stdout
    is a terminal, then a rich table of the same columns."""
    if not rows:
        return
    if not sys.stdout.isatty():
        for line in format_rows(rows):
            click.echo(line)
        return
    _print_rich(rows)


def _print_rich(rows: Sequence[Sequence[object]]) -> None:
    # rich is imported here, not at the top: scripts reading the plain output (no
    # terminal) do not pay for loading it.
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    ncols = max(len(row) for row in rows)
    table = Table(box=None, pad_edge=False, padding=(0, GAP, 0, 0), show_edge=False, header_style="bold")
    header = [str(cell) for cell in rows[0]]
    for i in range(ncols):
        table.add_column(Text(header[i] if i < len(header) else ""))
    for row in rows[1:]:  # Text: a cell is shown as it is, never read as rich markup
        table.add_row(*(Text(str(cell)) for cell in row), *([Text("")] * (ncols - len(row))))
    Console(highlight=False).print(table)
