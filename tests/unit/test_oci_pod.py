"""Join detection for pods (shim.oci.pod): annotations, netns identity, hostile cases."""

import os

import pytest

from shim.containers.store import process_start_time
from shim.errors import ContainerNotFound
from shim.oci.pod import Join, PodError, annotated_sandbox, find_join, netns_path
from shim.oci.state import OciInfo


class FakeStore:
    def __init__(self, infos):
        self.infos = {i.id: i for i in infos}

    def ids(self):
        return sorted(self.infos)

    def load(self, oci_id):
        if oci_id not in self.infos:
            raise ContainerNotFound(oci_id)
        return None, self.infos[oci_id]


def info(oci_id, pid=0, start=0):
    return OciInfo(id=oci_id, bundle="/b", rootfs="/r", created="", standin_pid=pid,
                   standin_start=start)


def live(oci_id):
    pid = os.getpid()
    return info(oci_id, pid, process_start_time(pid))


def cfg(path):
    return {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": path}]}}


CRI = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"}


def test_netns_path():
    assert netns_path(cfg("/x")) == "/x"
    assert netns_path({"linux": {"namespaces": [{"type": "network"}]}}) is None
    assert netns_path({"linux": {"namespaces": "junk"}}) is None
    assert netns_path([]) is None


def test_cri_annotations_name_the_sandbox():
    assert annotated_sandbox(CRI, "c1") == "sb"
    assert annotated_sandbox({"io.kubernetes.cri.container-type": "sandbox"}, "sb") is None
    crio = {"io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.cri-o.SandboxID": "sb2"}
    assert annotated_sandbox(crio, "c") == "sb2"
    with pytest.raises(PodError):
        annotated_sandbox({"io.kubernetes.cri.container-type": "container"}, "c")


def test_annotation_join():
    assert find_join(FakeStore([live("sb")]), "c1", {}, CRI) == Join("sb", "annotation")


def test_annotation_naming_unknown_sandbox_is_refused():
    with pytest.raises(PodError, match="not a vmshim-runtime container"):
        find_join(FakeStore([]), "c1", {}, CRI)


def test_annotation_naming_dead_sandbox_is_refused():
    dead = info("sb", os.getpid(), (process_start_time(os.getpid()) or 0) + 1)
    with pytest.raises(PodError, match="has stopped"):
        find_join(FakeStore([dead]), "c1", {}, CRI)


def test_netns_held_by_a_live_standin_is_a_join():
    # the stand-in is this process: its namespace is /proc/self/ns/net
    store = FakeStore([live("infra")])
    assert find_join(store, "c1", cfg("/proc/self/ns/net"), {}) == Join("infra", "netns")


def test_netns_not_held_by_any_sandbox_is_no_join(tmp_path):
    other = tmp_path / "ns"
    other.write_text("")
    store = FakeStore([live("infra")])
    assert find_join(store, "c1", cfg(str(other)), {}) is None
    assert find_join(store, "c1", cfg(str(tmp_path / "missing")), {}) is None


def test_netns_of_a_dead_sandbox_is_no_join():
    dead = info("infra", os.getpid(), (process_start_time(os.getpid()) or 0) + 1)
    assert find_join(FakeStore([dead, info("never")]), "c1", cfg("/proc/self/ns/net"),
                     {}) is None


def test_container_never_joins_itself():
    assert find_join(FakeStore([live("c1")]), "c1", cfg("/proc/self/ns/net"), {}) is None


def test_refuse_member_of_a_live_vmshim_sandbox():
    from shim.oci.pod import refuse_member
    with pytest.raises(PodError, match="joins the namespaces of vmshim container infra"):
        refuse_member(FakeStore([live("infra")]), "c1", "/proc/self/ns/net", {})
    with pytest.raises(PodError, match="has stopped"):
        dead = info("sb", os.getpid(), (process_start_time(os.getpid()) or 0) + 1)
        refuse_member(FakeStore([dead]), "c1", None, CRI)


def test_refuse_member_lets_others_through(tmp_path):
    from shim.oci.pod import refuse_member
    refuse_member(FakeStore([]), "c1", None, CRI)  # sandbox of another runtime
    refuse_member(FakeStore([live("infra")]), "c1", None, {})  # a new namespace
    refuse_member(FakeStore([live("infra")]), "c1", str(tmp_path), {})  # engine's netns
