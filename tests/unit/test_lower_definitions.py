"""The domain name and the host's resolv.conf are defined below the modules that once
owned them (shim.containers.store, shim.network.dns), so that the record and the
networking glue need not import the VM isolation or ``run``; vm_placement.py and run.py
use those definitions (vm_placement's adds only the pooled VM a container took)."""

from pathlib import Path

from shim.containers import run, store, vm_placement
from shim.network import dns


def test_one_domain_name():
    cid = "ab" * 32
    assert store.domain_name(cid) == vm_placement.domain_name(cid) == "vmshim-abababababab"


def test_one_host_resolv_conf(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    real = Path.read_text

    def read_text(self, *a, **kw):
        return real(conf if str(self) == "/etc/resolv.conf" else self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch lan\n")
    assert run.host_resolv_conf is dns.host_resolv_conf
    assert dns.host_resolv_conf() == "nameserver 10.0.0.2\nsearch lan\n"
    conf.unlink()
    assert dns.host_resolv_conf() == ""
