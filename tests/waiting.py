"""Waiting in tests: on conditions, with deadlines, never with a bare sleep.

These are the only places where tests sleep (tests/unit/test_suite_rules.py checks that
every ``time.sleep`` in tests/ sits in a polling loop).
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie (a condition tests wait on)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition", interval: float = 0.2) -> T:
    """Poll *predicate* until it returns something true; return it. Fails the test with
    *what* when *timeout* seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(interval)


def holds_for(predicate: Callable[[], object], seconds: float, what: str = "condition", interval: float = 0.25) -> None:
    """Check that *predicate* stays true for *seconds* (polled every *interval*): how a
    test shows that something does NOT happen (a paused container does not log)."""
    deadline = time.monotonic() + seconds
    while True:
        assert predicate(), f"{what} stopped holding"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)
