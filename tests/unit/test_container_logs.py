"""The json-lines container log: docker's format, bytes survive, tail/since/timestamps."""

import json
import os

from shim.containers import logs


def test_one_entry_per_line_in_dockers_format(tmp_path):
    writer = logs.LogWriter(tmp_path / "c.log")
    writer.write("stdout", b"hello\nworld\npartial")
    writer.write("stderr", b"oops\n")
    writer.close()
    lines = (tmp_path / "c.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["log"] for e in entries] == ["hello\n", "world\n", "partial", "oops\n"]
    assert [e["stream"] for e in entries] == ["stdout"] * 3 + ["stderr"]
    assert all(e["time"].endswith("Z") and "T" in e["time"] for e in entries)


def test_bytes_that_are_not_utf8_round_trip(tmp_path):
    data = bytes(range(256)) * 10 + "é€\n".encode()
    writer = logs.LogWriter(tmp_path / "c.log")
    writer.write("stdout", data)
    writer.close()
    entries, _ = logs.read_entries(tmp_path / "c.log")
    assert b"".join(e[2] for e in entries) == data


def test_floods_are_grouped_but_lines_stay_lines(tmp_path):
    data = b"".join(b"line %d\n" % i for i in range(5000))
    payload = logs.encode_entries("stdout", data)
    assert payload.count(b"\n") < 200  # far fewer entries than lines
    (tmp_path / "c.log").write_bytes(payload)
    entries, _ = logs.read_entries(tmp_path / "c.log")
    assert b"".join(e[2] for e in entries) == data
    assert [ln[2] for ln in logs.select_lines(entries, tail=2)] == [b"line 4998\n", b"line 4999\n"]
    assert logs.select_lines(entries, tail=0) == []


def test_long_lines_are_split(tmp_path):
    data = b"x" * (3 * logs.MAX_ENTRY + 5) + b"\n"
    entries = [json.loads(x) for x in logs.encode_entries("stdout", data).splitlines()]
    assert len(entries) == 4
    assert "".join(e["log"] for e in entries).encode() == data


def test_read_entries_leaves_a_line_being_written(tmp_path):
    path = tmp_path / "c.log"
    full = logs.encode_entries("stdout", b"one\n")
    path.write_bytes(full + full[:10])
    entries, offset = logs.read_entries(path)
    assert [e[2] for e in entries] == [b"one\n"] and offset == len(full)
    with open(path, "ab") as f:
        f.write(full[10:])
    entries, offset = logs.read_entries(path, offset)
    assert [e[2] for e in entries] == [b"one\n"] and offset == 2 * len(full)


def test_since_and_timestamps(tmp_path):
    path = tmp_path / "c.log"
    path.write_bytes(logs.encode_entries("stdout", b"old\n", now=1000.0)
                     + logs.encode_entries("stdout", b"new\n", now=2000.0))
    entries, _ = logs.read_entries(path)
    assert [ln[2] for ln in logs.select_lines(entries, since=1500.0)] == [b"new\n"]
    assert [ln[2] for ln in logs.select_lines(entries, until=1500.0)] == [b"old\n"]
    line = logs.select_lines(entries, since=1500.0)[0]
    assert logs.render(line, timestamps=True) == b"1970-01-01T00:33:20.000000Z new\n"


def test_parse_since():
    assert logs.parse_since("10m", now=1000.0) == 400.0
    assert logs.parse_since("1.5h", now=10000.0) == 10000.0 - 5400
    assert logs.parse_since("1700000000") == 1700000000.0
    assert logs.parse_since("1970-01-01T00:01:00Z") == 60.0
    import pytest

    from shim.errors import UsageError
    with pytest.raises(UsageError, match="invalid --since"):
        logs.parse_since("yesterday")


def test_missing_log_reads_as_empty(tmp_path):
    assert logs.read_entries(tmp_path / "nope") == ([], 0)
    assert not os.path.exists(tmp_path / "nope")
