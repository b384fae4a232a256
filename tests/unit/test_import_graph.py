"""The floors of the code (docs/architecture.md): each package imports only from its own
floor or the floors below, and no two ``shim`` packages import each other, directly or
round a circle. Function-local imports count the same as module-level ones: a lazy import
saves start-up time, it does not change who depends on whom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FLOORS = {
    # 0: the ground every floor may use
    "shim": 0,
    "shim.errors": 0,
    "shim.units": 0,
    "shim.paths": 0,
    "shim.files": 0,
    "shim.proctitle": 0,
    "shim.records": 0,
    # 1: the guest agent (stdlib only; the host imports its protocol and spec)
    "guest": 1,
    # 2: machines, images, networks, volumes: nothing about containers
    "shim.vm": 2,
    "shim.images": 2,
    "shim.network": 2,
    "shim.volumes": 2,
    "shim.kernelbuild": 2,
    # 3: the guest image (a kernel + the agent)
    "shim.guestimage": 3,
    # 4: containers: record, lifecycle, store, monitor, and the glue to networks/volumes
    "shim.containers": 4,
    # 5: what is built from containers
    "shim.oci": 5,
    "shim.build": 5,
    "shim.compose": 5,
    "shim.bench": 5,
    "shim.remote": 5,
    # 6: the command line
    "shim.cli": 6,
}


def package_of(module: str) -> str | None:
    """The floor-table key of a dotted module name; None outside the project."""
    parts = module.split(".")
    if parts[0] == "guest":
        return "guest"
    if parts[0] != "shim":
        return None
    return "shim" if len(parts) == 1 else f"shim.{parts[1]}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from shim import paths`` imports shim.paths
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def edges(sources: list[Path]) -> list[tuple[str, str, str]]:
    """(from package, to package, where) for every import between two packages."""
    out = []
    for path in sources:
        src = package_of(module_name(path))
        for line, target in imported_modules(path):
            dst = package_of(target)
            if dst is not None and dst != src:
                if dst not in FLOORS and dst.startswith("shim."):
                    dst = "shim"  # a name imported from shim/__init__.py
                out.append((src, dst, f"{path.relative_to(ROOT)}:{line}"))
    return out


def project_sources() -> list[Path]:
    return sorted(p for d in ("shim", "guest") for p in (ROOT / d).rglob("*.py"))


def climbing(all_edges) -> list[str]:
    return [
        f"{where}: {src} (floor {FLOORS[src]}) imports {dst} (floor {FLOORS[dst]})"
        for src, dst, where in all_edges
        if FLOORS[dst] > FLOORS[src]
    ]


def circles(all_edges) -> list[list[str]]:
    """Every import circle between packages, each as the packages round it."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in all_edges:
        graph.setdefault(src, set()).add(dst)
    found, seen = [], set()

    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circle = path[path.index(nxt) :]
                key = frozenset(circle)
                if key not in seen:
                    seen.add(key)
                    found.append(circle + [nxt])
            else:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_every_package_has_a_floor():
    unknown = sorted({package_of(module_name(p)) for p in project_sources()} - set(FLOORS))
    assert not unknown, f"new packages need a floor in FLOORS (and docs/architecture.md): {unknown}"


def test_no_package_imports_a_higher_floor():
    problems = climbing(edges(project_sources()))
    assert not problems, "imports that climb:\n" + "\n".join(problems)


def test_no_import_circles_between_packages():
    found = circles(edges(project_sources()))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_guest_imports_nothing_but_the_standard_library_and_itself():
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for p in sorted((ROOT / "guest").rglob("*.py"))
        for line, mod in imported_modules(p)
        if mod.split(".")[0] == "shim"
    ]
    assert not bad, "the guest agent must not import the host's code:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "files,expect_climb,expect_circle",
    [
        (
            {
                "shim/vm/a.py": "from shim.containers import store\n",
                "shim/containers/store.py": "from shim.vm import a\n",
            },
            True,
            True,
        ),
        ({"shim/network/a.py": "def f():\n    from shim.cli import main\n"}, True, False),
        (
            {"shim/compose/a.py": "from shim.build import b\n", "shim/build/b.py": "import shim.compose.a\n"},
            False,
            True,
        ),
        ({"shim/containers/a.py": "from shim import paths\nfrom shim.vm import domain\n"}, False, False),
    ],
)
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, files, expect_climb, expect_circle):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    found = edges(sorted(tmp_path.rglob("*.py")))
    assert bool(climbing(found)) == expect_climb
    assert bool(circles(found)) == expect_circle


def module_edges(sources: list[Path]) -> list[tuple[str, str, str]]:
    """(from module, to module, where) for every import between two modules of the same
    ``shim`` package (``from shim.containers.store import X`` names the module
    shim.containers.store)."""
    modules = {module_name(p) for p in sources}
    out = []
    for path in sources:
        src = module_name(path)
        for line, target in imported_modules(path):
            parts = target.split(".")
            dst = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)
            if dst and dst != src and package_of(dst) == package_of(src) != "shim":
                out.append((src, dst, f"{path.relative_to(ROOT)}:{line}"))
    return out


def test_no_import_circles_between_the_modules_of_a_package():
    """Inside a package too (shim.containers above all: record, lifecycle, monitor,
    isolations and the glue), the modules import each other one way only."""
    found = circles(module_edges(project_sources()))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_module_check_catches_a_circle_through_a_local_import(tmp_path, monkeypatch):
    files = {
        "shim/containers/store.py": "def f():\n    from shim.containers.run import g\n",
        "shim/containers/run.py": "from shim.containers import store\n",
        "shim/containers/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert circles(module_edges(sorted(tmp_path.rglob("*.py"))))
