"""The CLI's one table printer (shim/cli/table.py): docker's tabwriter look when stdout is
not a terminal (what scripts and the e2e tests read), a rich table of the same columns on
a terminal."""

import io
import re

from shim.cli import table


def test_plain_columns_three_spaces_apart_without_trailing_blanks():
    lines = table.format_rows([("NAME", "SIZE", "PORTS"), ("web", "10MiB", ""), ("a-longer-name", "1B", "80/tcp")])
    assert lines == ["NAME            SIZE    PORTS", "web             10MiB", "a-longer-name   1B      80/tcp"]


def test_rows_of_different_lengths_and_non_strings():
    assert table.format_rows([["PID", "CMD"], [1, "init", "extra"], [22]]) == ["PID   CMD", "1     init   extra", "22"]
    assert table.format_rows([]) == []


def test_not_a_tty_prints_the_plain_table(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    table.print_table([("A", "B"), ("x", "[bold]y[/bold]")])
    assert capsys.readouterr().out == "A   B\nx   [bold]y[/bold]\n"


def test_a_tty_gets_the_same_columns_and_no_markup(monkeypatch):
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdout", out)
    table.print_table([("NAME", "STATUS"), ("web", "[bold]Up[/bold]"), ("db",)])
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # the header is bold
    lines = [line.rstrip() for line in plain.splitlines()]
    assert lines[0].split() == ["NAME", "STATUS"]
    assert lines[1].split() == ["web", "[bold]Up[/bold]"]
    assert lines[1].index("[bold]") == lines[0].index("STATUS")
    assert lines[2] == "db"
