"""images/hostsuite/recipe.py: its cache is used only when it holds the recipe's packages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "images" / "hostsuite" / "recipe.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("hostsuite_recipe_under_test", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cache_is_used_only_for_the_same_package_list(tmp_path):
    recipe = _recipe()
    tar, meta = tmp_path / "rootfs.tar", tmp_path / "rootfs.json"
    tar.write_bytes(b"x")
    assert recipe._cached_meta(tar, meta) is None  # no note
    meta.write_text(json.dumps({"packages": list(recipe.PACKAGES), "created": "c"}))
    assert recipe._cached_meta(tar, meta)["created"] == "c"
    meta.write_text(json.dumps({"packages": ["python3"], "created": "c"}))
    assert recipe._cached_meta(tar, meta) is None  # another list: made again
    meta.write_text("{not json")
    assert recipe._cached_meta(tar, meta) is None
    meta.write_text(json.dumps({"packages": list(recipe.PACKAGES)}))
    tar.unlink()
    assert recipe._cached_meta(tar, meta) is None  # note without the tar


def test_the_recipe_installs_what_the_host_tests_need():
    assert {"python3", "python3-pytest", "busybox-static"} <= set(_recipe().PACKAGES)
