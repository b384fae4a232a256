"""Rules the suite keeps about itself (issue: a suite that holds on any Debian 12 host)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _ends_on_a_condition(loop: ast.While | ast.For) -> bool:
    """A polling loop: ``while <condition>``, or a loop its body can leave (break, return,
    raise, assert) once what it waits for is there."""
    if isinstance(loop, ast.While) and not (isinstance(loop.test, ast.Constant) and loop.test.value):
        return True
    return any(
        isinstance(n, (ast.Break, ast.Return, ast.Raise, ast.Assert)) for stmt in loop.body for n in ast.walk(stmt)
    )


def _bare_sleeps(path: Path) -> list[int]:
    """Lines of ``time.sleep(...)`` calls in *path* that are not in a loop of their
    function that ends on a condition: a sleep used as synchronisation rather than
    between polls of a condition (with a deadline: the loop can end)."""
    text = path.read_text()
    tree = ast.parse(text, str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bare = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "time"
        ):
            continue
        up = node
        while up in parents:
            up = parents[up]
            if isinstance(up, (ast.While, ast.For)):
                if not _ends_on_a_condition(up):
                    bare.append(node.lineno)
                break
            if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                bare.append(node.lineno)
                break
    return bare


def test_tests_sleep_only_while_polling_a_condition():
    offenders = [
        f"{p.relative_to(TESTS.parent)}:{line}" for p in sorted(TESTS.rglob("*.py")) for line in _bare_sleeps(p)
    ]
    assert not offenders, (
        f"time.sleep outside a polling loop (use tests/waiting.py's wait_until / holds_for): {offenders}"
    )


def test_the_rule_itself_catches_a_bare_sleep(tmp_path):
    sample = tmp_path / "t.py"
    sample.write_text(
        "import time\n\ndef f():\n    time.sleep(1)\n"  # 4: bare
        "\ndef g():\n    while not ready():\n        time.sleep(1)\n"
        "\ndef h():\n    for _ in range(3):\n        time.sleep(1)\n"  # 12
        "\ndef i():\n    while True:\n        if ready():\n            break\n"
        "        time.sleep(1)\n"
        "\ndef j():\n    while True:\n        time.sleep(1)\n"
    )  # 22: no way out
    assert _bare_sleeps(sample) == [4, 12, 22]
