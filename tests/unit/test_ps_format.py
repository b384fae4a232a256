"""``vmshim ps``: docker's PORTS column, Go-template --format fields and the ``table``
prefix, against records in a temporary state root (no monitor, no VM)."""

import pytest
from click.testing import CliRunner

from guest.spec import ProcessSpec
from shim.cli.main import cli
from shim.containers.store import Container, ContainerStore
from shim.network.ports import PortMapping


def record(cid: str, name: str, **kw) -> Container:
    return Container(
        id=cid,
        name=name,
        image="busybox",
        image_id="sha256:abc",
        isolation="vm",
        process=ProcessSpec(args=["sh", "-c", "true"]),
        hostname=cid[:12],
        token="t",
        layer_disks=["/l0.sqfs"],
        created="2026-12-04T16:01:37.5Z",
        **kw,
    )


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    store = ContainerStore()
    store.create(record("a" * 64, "web", labels={"tier": "front", "app": "shop"}))
    return store


def ps(*args) -> str:
    result = CliRunner().invoke(cli, ["ps", "-a", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_template_fields(root):
    out = ps("--format", "{{.ID}} {{.Image}} {{.Names}} {{.Status}} {{.CreatedAt}} {{.Labels}}")
    assert out == ("aaaaaaaaaaaa busybox web Created 2026-12-04 16:01:37 +0000 UTC app=shop,tier=front\n")
    assert ps("--format", "[{{.Ports}}]") == "[]\n"  # not running: nothing published


def test_table_prefix_adds_aligned_headers(root):
    lines = ps("--format", "table {{.ID}}\\t{{.Names}}\\t{{.Ports}}").splitlines()
    assert lines[0].split("   ") == ["CONTAINER ID", "NAMES", "PORTS"]
    assert lines[1].split() == ["aaaaaaaaaaaa", "web"]
    assert lines[1].index("web") == lines[0].index("NAMES")


def test_default_table_has_a_ports_column(root):
    header = ps().splitlines()[0]
    assert header.split()[-2:] == ["PORTS", "NAMES"]


def test_ports_of_a_running_container(root, monkeypatch):
    from shim.containers import listing as ps_module
    from shim.network import store as net_store

    def running(r):
        r.state.status = "running"

    root.update("a" * 64, running)
    endpoint = type(
        "Ep", (), {"ports": [PortMapping(80, "tcp", "0.0.0.0", 8080), PortMapping(53, "udp", "127.0.0.1", 5353)]}
    )
    monkeypatch.setattr(
        net_store.NetworkStore, "endpoints_of", lambda self, cid: [(None, endpoint)] if cid == "a" * 64 else []
    )
    assert ps_module.ports_text(root.load("a" * 64)) == "0.0.0.0:8080->80/tcp, 127.0.0.1:5353->53/udp"
