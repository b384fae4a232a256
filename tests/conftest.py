"""Suite-wide rules.

**Skips must be honest.** A skip says a condition is really absent on this machine. When
``VMSHIM_STRICT_SKIPS=1`` (``scripts/test`` sets it, so CI runs with it) every skipped test
must match an entry of ``SKIP_ALLOWED`` below, each with the reason it cannot run on a
machine of this project's kind; any other skip turns into a failure, and the list of skips
is printed at the end. A skip that would hide a failure (a command that "should fail" but
succeeds) is not a skip: test the other behaviour instead.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

# A suite started in the background by a non-interactive shell (`scripts/test &`, nohup)
# inherits SIGINT ignored, and so would every CLI it runs: an ignored SIGINT is kept across
# exec, and Python then installs no KeyboardInterrupt handler. Tests that press Ctrl-C on
# `vmshim logs -f` or `attach` would wait forever. A handler (not SIG_IGN) is reset to the
# default on exec, so the children get Ctrl-C as a terminal would give it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SKIP_ALLOWED: dict[str, str] = {
    # pattern (searched in the skip reason) -> why it is genuinely impossible here
    r"no hard limit": "the host's nofile hard limit is unlimited: nothing to exceed",
    r"real KVM": "these machines have no usable KVM (a nested PVM /dev/kvm); TCG only",
}


def strict_skips() -> bool:
    return os.environ.get("VMSHIM_STRICT_SKIPS") == "1"


def _allowed(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in SKIP_ALLOWED)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    item.config._vmshim_skips.append((report.nodeid, reason))
    if strict_skips() and not _allowed(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped with a reason that is not on the allow-list in "
            f"tests/conftest.py (a skip must name a condition really absent "
            f"on this machine): {reason}"
        )


def pytest_configure(config):
    config._vmshim_skips = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = config._vmshim_skips
    if not skips:
        return
    terminalreporter.section("skipped tests")
    for nodeid, reason in skips:
        verdict = "allowed" if _allowed(reason) else "NOT ALLOWED"
        terminalreporter.write_line(f"{verdict}: {nodeid}: {reason}")
