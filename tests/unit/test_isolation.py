"""Every isolation implements the one interface the monitor drives (shim.containers.isolation)."""

from __future__ import annotations

import inspect

import pytest

from shim.containers.fake_isolation import FakeIsolation
from shim.containers.isolation import Isolation
from shim.containers.process_placement import ProcessPlacement
from shim.containers.vm_placement import VmPlacement

METHODS = [name for name, value in vars(Isolation).items() if callable(value) and not name.startswith("_")]


def parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_interface_is_what_the_monitor_uses():
    assert set(METHODS) == {
        "boot",
        "reattach",
        "running",
        "pause",
        "resume",
        "kill",
        "teardown",
        "forget",
        "info",
        "usage",
    }


@pytest.mark.parametrize("cls", [VmPlacement, ProcessPlacement, FakeIsolation])
def test_each_isolation_has_every_method_with_the_same_parameters(cls):
    assert isinstance(getattr(cls, "kind", None), str)
    for name in METHODS:
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__} lacks {name}"
        if name in ("pause", "resume") and cls is FakeIsolation:
            continue  # the fake refuses both with one method
        assert parameters(method) == parameters(getattr(Isolation, name)), (
            f"{cls.__name__}.{name}{inspect.signature(method)} differs from the interface's "
            f"{inspect.signature(getattr(Isolation, name))}"
        )


def test_a_class_missing_a_method_is_not_an_isolation():
    class Partial:
        kind = "partial"

        def boot(self, alive=None):
            return None

    assert not isinstance(Partial(), Isolation)
