"""Join detection for pods (shim.oci.pod): annotations, netns identity, hostile cases."""

import os

import pytest

from shim.containers.store import process_start_time
from shim.errors import ContainerNotFound
from shim.oci.pod import (
    MAX_ENGINE_FILE,
    Join,
    PodError,
    annotated_sandbox,
    find_join,
    member_files,
    member_of,
    member_tag,
    netns_path,
)
from shim.oci.state import OciInfo
from shim.volumes.specs import MountRequest


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
    return OciInfo(id=oci_id, bundle="/b", rootfs="/r", created="", standin_pid=pid, standin_start=start)


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
    crio = {"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": "sb2"}
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
    assert find_join(FakeStore([dead, info("never")]), "c1", cfg("/proc/self/ns/net"), {}) is None


def test_container_never_joins_itself():
    assert find_join(FakeStore([live("c1")]), "c1", cfg("/proc/self/ns/net"), {}) is None


def test_member_of_a_live_vmshim_sandbox():
    assert member_of(FakeStore([live("infra")]), "c1", "/proc/self/ns/net", {}) == Join("infra", "netns")
    assert member_of(FakeStore([live("sb")]), "c1", None, CRI) == Join("sb", "annotation")
    with pytest.raises(PodError, match="has stopped"):
        dead = info("sb", os.getpid(), (process_start_time(os.getpid()) or 0) + 1)
        member_of(FakeStore([dead]), "c1", None, CRI)


def test_member_of_lets_others_through(tmp_path):
    assert member_of(FakeStore([]), "c1", None, CRI) is None  # another runtime's sandbox
    assert member_of(FakeStore([live("infra")]), "c1", None, {}) is None  # a new namespace
    assert member_of(FakeStore([live("infra")]), "c1", str(tmp_path), {}) is None


def test_annotations_naming_an_unknown_sandbox_leave_it_to_the_netns():
    # podman names its pod (not a container of ours) in the CRI-O annotations
    crio = {"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": "podid"}
    assert member_of(FakeStore([live("infra")]), "c1", "/proc/self/ns/net", crio) == Join("infra", "netns")


def test_a_member_is_never_the_sandbox_of_another():
    member = live("m1")
    member.sandbox = "infra"
    assert find_join(FakeStore([member]), "c2", cfg("/proc/self/ns/net"), {}) is None


def test_member_tag_is_what_the_guest_takes():
    from guest.runtime.member import TAG_RE

    tag = member_tag("c1")
    assert TAG_RE.match(tag) and len(tag) <= 36 and tag != member_tag("c2")


def _bind(target, source):
    return MountRequest(type="bind", target=target, source=str(source))


def test_member_files_take_the_engines_etc_files(tmp_path):
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "resolv").write_text("nameserver 10.0.0.1\n")
    (tmp_path / "hostname").write_text("mypod\n")
    notes = []
    files = member_files(
        "c1",
        [
            _bind("/etc/hosts", tmp_path / "hosts"),
            _bind("/etc/resolv.conf", tmp_path / "resolv"),
            _bind("/etc/hostname", tmp_path / "hostname"),
            _bind("/dev/shm", tmp_path),
            _bind("/run/.containerenv", tmp_path / "hosts"),
        ],
        notes,
    )
    assert files == {"hosts": "127.0.0.1 localhost\n", "resolv_conf": "nameserver 10.0.0.1\n", "hostname": "mypod"}
    assert len(notes) == 2 and "/dev/shm" in notes[0]


@pytest.mark.parametrize(
    "mount",
    [
        MountRequest(type="bind", target="/data", source="/tmp"),
        MountRequest(type="tmpfs", target="/scratch"),
        MountRequest(type="volume", target="/v", source="vol"),
    ],
)
def test_member_files_refuse_other_mounts(mount):
    with pytest.raises(PodError, match=f"mount on {mount.target}.*not supported in a pod member"):
        member_files("c1", [mount], [])


def test_member_files_never_follow_a_symlink_nor_read_a_fifo_or_a_huge_file(tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(PodError, match="cannot read"):
        member_files("c1", [_bind("/etc/hosts", tmp_path / "link")], [])
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PodError, match="not a regular file"):
        member_files("c1", [_bind("/etc/hosts", tmp_path / "fifo")], [])
    (tmp_path / "big").write_bytes(b"x" * (MAX_ENGINE_FILE + 1))
    with pytest.raises(PodError, match="larger than"):
        member_files("c1", [_bind("/etc/hosts", tmp_path / "big")], [])
    (tmp_path / "long").write_text("h" * 65)
    with pytest.raises(PodError, match="1-64 characters"):
        member_files("c1", [_bind("/etc/hostname", tmp_path / "long")], [])


def test_a_member_shares_only_the_sandboxs_uts_and_ipc(tmp_path):
    """Shared: a uts/ipc path that is the namespace the sandbox's stand-in is in (by
    device and inode). Not shared: another namespace, a missing path, a regular file,
    any other type."""
    from shim.oci.pod import shared_namespaces

    me = os.getpid()
    (tmp_path / "f").write_text("")
    assert shared_namespaces({"uts": f"/proc/{me}/ns/uts", "ipc": f"/proc/{me}/ns/ipc"}, me) == ["uts", "ipc"]
    assert shared_namespaces({"uts": f"/proc/{me}/ns/net", "ipc": str(tmp_path / "nope")}, me) == []
    assert shared_namespaces({"uts": str(tmp_path / "f"), "pid": f"/proc/{me}/ns/pid", "ipc": 5}, me) == []
    assert shared_namespaces({"uts": f"/proc/{me}/ns/uts"}, 0) == []
