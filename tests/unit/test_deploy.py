"""deploy/: the engine configs for vmshim-runtime parse and point at it."""

from __future__ import annotations

import tomllib
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_containerd_runtime_uses_the_runc_shim_with_our_binary():
    config = tomllib.loads((DEPLOY / "containerd" / "config.toml").read_text())
    assert config["version"] == 2
    runtime = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["vmshim"]
    assert runtime["runtime_type"] == "io.containerd.runc.v2"
    assert Path(runtime["options"]["BinaryName"]).name == "vmshim-runtime"


def test_podman_knows_the_runtime_by_name():
    config = tomllib.loads((DEPLOY / "podman" / "containers.conf").read_text())
    assert Path(config["engine"]["runtimes"]["vmshim"][0]).name == "vmshim-runtime"
    assert "vmshim" in config["engine"]["runtime_supports_json"]
    assert "runc" in config["engine"]["runtime_supports_json"]  # the defaults are kept


def test_runtime_class_names_the_containerd_handler():
    text = (DEPLOY / "kubernetes" / "runtimeclass.yaml").read_text()
    assert "kind: RuntimeClass" in text and "handler: vmshim" in text
    assert "runtimeClassName: vmshim" in text


def test_dockerd_knows_the_runtime_by_name():
    import json

    config = json.loads((DEPLOY / "docker" / "daemon.json").read_text())
    assert Path(config["runtimes"]["vmshim"]["path"]).name == "vmshim-runtime"
    assert "default-runtime" not in config  # opt-in per container unless the admin says so
