"""The json-lines container log: docker's format, bytes survive, tail/since/timestamps."""

import json
import os

import pytest

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
    path.write_bytes(
        logs.encode_entries("stdout", b"old\n", now=1000.0) + logs.encode_entries("stdout", b"new\n", now=2000.0)
    )
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


# ---- rotation and streaming reads (issue 12: a guest must not fill the host's disk) ------------


def _total(path):
    return sum(p.stat().st_size for p in logs.log_files(path))


def test_rotation_keeps_the_log_within_its_cap(tmp_path):
    path = tmp_path / "c.log"
    limits = logs.LogLimits(max_size=64 * 1024, max_files=3)
    writer = logs.LogWriter(path, limits)
    chunk = b"y\n" * 2000
    for _ in range(2000):  # ~ 8 MB of json lines
        writer.write("stdout", chunk)
    writer.close()
    files = logs.log_files(path)
    assert [p.name for p in files] == ["c.log.2", "c.log.1", "c.log"]
    assert not (tmp_path / "c.log.3").exists()
    assert _total(path) <= limits.max_size * limits.max_files + len(logs.encode_entries("stdout", chunk))
    # what is kept reads back whole, oldest first, newest last
    lines = list(logs.iter_lines(logs.iter_entries(path)))
    assert lines and all(ln[2] == b"y\n" for ln in lines)


def test_the_default_cap_applies_when_nothing_was_asked(tmp_path):
    assert logs.LogLimits.from_dict({}) == logs.LogLimits(10 << 20, 3)
    path = tmp_path / "c.log"
    writer = logs.LogWriter(path)
    line = b"z" * 1000 + b"\n"
    for _ in range(40 * 1024):  # 40 MiB of output
        writer.write("stdout", line * 1)
    writer.close()
    assert _total(path) <= 30 * (1 << 20) + 4096
    assert len(logs.log_files(path)) == 3


def test_max_file_one_truncates(tmp_path):
    path = tmp_path / "c.log"
    writer = logs.LogWriter(path, logs.LogLimits(max_size=8192, max_files=1))
    for i in range(100):
        writer.write("stdout", b"%d\n" % i * 100)
    writer.close()
    assert logs.log_files(path) == [path] and path.stat().st_size <= 8192 + 4096


@pytest.mark.parametrize(
    "opts, want",
    [
        ([], (10 << 20, 3)),
        (["max-size=1m"], (1 << 20, 3)),
        (["max-size=512k,max-file=2"], (512 << 10, 2)),
        (["max-file=5", "max-size=2g"], (2 << 30, 5)),
    ],
)
def test_log_opt_parsing(opts, want):
    limits = logs.LogLimits.parse(opts)
    assert (limits.max_size, limits.max_files) == want


@pytest.mark.parametrize(
    "bad", ["max-size=lots", "max-size=1", "max-file=0", "max-file=x", "mode=non-blocking", "max-size"]
)
def test_log_opt_refuses_bad_values(bad):
    from shim.errors import UsageError

    with pytest.raises(UsageError, match="invalid --log-opt"):
        logs.LogLimits.parse([bad])


def test_follower_reads_across_rotations(tmp_path):
    path = tmp_path / "c.log"
    writer = logs.LogWriter(path, logs.LogLimits(max_size=4096, max_files=2))
    writer.write("stdout", b"first\n")
    follower = logs.Follower(path, from_start=True)
    seen = [e[2] for e in follower.entries()]
    for i in range(30):  # several rotations; each poll catches up
        writer.write("stdout", b"line %d\n" % i + b"x" * 300 + b"\n")
        seen += [e[2] for e in follower.entries()]
    writer.close()
    follower.close()
    assert seen[0] == b"first\n"
    assert [s for s in seen if s.startswith(b"line")] == [b"line %d\n" % i for i in range(30)]


def test_reading_streams_without_loading_the_file(tmp_path):
    import tracemalloc

    path = tmp_path / "c.log"
    writer = logs.LogWriter(path, logs.LogLimits(max_size=64 << 20, max_files=1))
    for _ in range(300):
        writer.write("stdout", b"q" * 100_000 + b"\n")
    writer.close()
    assert path.stat().st_size > 25 << 20
    tracemalloc.start()
    last = list(logs.iter_lines(logs.iter_entries(path), tail=2))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(last) == 2 and peak < 4 << 20
