"""shim.oci.bundle: config.json → what a vmshim VM runs, and what it reports."""

from __future__ import annotations

import json

import pytest

from shim.oci.bundle import BundleError, check_id, load_bundle


def minimal(**overrides) -> dict:
    config = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }
    config.update(overrides)
    return config


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "rootfs").mkdir()

    def write(config) -> str:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "config.json").write_text(text)
        return str(tmp_path)

    return write


def test_minimal_config(bundle, tmp_path):
    b = load_bundle(bundle(minimal()))
    assert b.rootfs == (tmp_path / "rootfs").resolve()
    assert b.process.args == ["sh"]
    assert b.process.user == "0:0"
    assert b.process.capabilities is None
    assert b.notes == []
    assert b.resources.is_empty()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        (" " * (4 << 20) + "{}", "is larger than 4 MiB"),
        ("[1, 2]", "JSON object"),
        (json.dumps(minimal(ociVersion="0.9")), "ociVersion"),
        (json.dumps(minimal(process=None)), "process is required"),
        (json.dumps(minimal(process={"args": []})), "process.args"),
        (json.dumps(minimal(process={"args": ["sh"], "cwd": "relative"})), "process.cwd"),
        (json.dumps(minimal(root={"path": "nowhere"})), "root.path"),
        (json.dumps(minimal(root={"path": "rootfs", "readonly": "yes"})), "root.readonly"),
        (json.dumps(minimal(mounts=[{"destination": "data", "type": "bind"}])), "destination"),
        (json.dumps(minimal(mounts=[{"destination": "/d", "type": "bind", "source": "/no/such"}])), "does not exist"),
        (json.dumps(minimal(hooks={"prestart": [{"path": "relative"}]})), "hooks.prestart[0].path"),
        (json.dumps(minimal(hooks={"sometime": []})), "hooks.sometime"),
        (json.dumps(minimal(linux={"namespaces": [{"type": "nonsense"}]})), "namespaces[0].type"),
        (json.dumps(minimal(process={"args": ["sh"], "capabilities": {"bounding": ["CAP_FLY"]}})), "CAP_FLY"),
        (json.dumps(minimal(process={"args": ["sh"], "rlimits": [{"type": "RLIMIT_NOPE"}]})), "rlimits[0]"),
        (json.dumps(minimal(linux={"sysctl": {"a/b": "1"}})), "linux.sysctl"),
    ],
)
def test_bad_configs_name_the_problem(bundle, text, needle):
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle(text))
    assert needle in str(exc.value)
    assert "config.json" in str(exc.value)


def test_missing_bundle_and_config(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "absent")
    with pytest.raises(BundleError, match="no config.json"):
        load_bundle(tmp_path)


def test_process_fields(bundle):
    process = {
        "terminal": True,
        "args": ["top"],
        "cwd": "/srv",
        "env": ["A=1"],
        "user": {"uid": 1000, "gid": 100, "additionalGids": [100, 5], "umask": 0o27},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 2048, "soft": 1024}],
        "oomScoreAdj": 100,
        "noNewPrivileges": True,
        "consoleSize": {"height": 40, "width": 100},
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "ambient": []},
        "apparmorProfile": "docker-default",
    }
    b = load_bundle(bundle(minimal(process=process)))
    p = b.process
    assert (p.args, p.cwd, p.env, p.user, p.tty) == (["top"], "/srv", ["A=1"], "1000:100", True)
    assert p.rlimits == [["nofile", 1024, 2048]]
    assert p.oom_score_adj == 100
    assert p.no_new_privs is True
    assert p.additional_gids == [5]
    assert p.umask == 0o27
    assert p.capabilities["bounding"] == ["CAP_KILL"]
    assert b.console_size == (40, 100)
    assert any("apparmorProfile" in n for n in b.notes)
    # the spec survives the trip to the guest
    from guest.spec import ProcessSpec

    assert ProcessSpec.from_dict(p.to_dict()) == p


def test_mounts_map_to_vm_mounts(bundle, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        {"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "source": str(hosts), "options": ["bind"]},
        {
            "destination": "/scratch",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "size=65536k", "mode=1777"],
        },
        {"destination": "/weird", "type": "nfs", "source": "server:/x"},
    ]
    b = load_bundle(bundle(minimal(mounts=mounts)))
    got = [(m.type, m.target, m.source, m.readonly, m.options) for m in b.mounts]
    assert got == [
        ("bind", "/data", str(shared), True, ""),
        ("bind", "/etc/hosts", str(hosts), False, ""),
        ("tmpfs", "/scratch", "", False, "size=65536k,mode=1777"),
    ]
    assert any("/weird" in n and "nfs" in n for n in b.notes)


def test_resources_sysctl_paths_and_notes(bundle):
    linux = {
        "namespaces": [
            {"type": "network", "path": "/run/netns/x"},
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/1/ns/ipc"},
        ],
        "resources": {
            "memory": {"limit": 512 << 20},
            "cpu": {"quota": 50000, "period": 100000, "shares": 512},
            "pids": {"limit": 64},
            "blockIO": {"weight": 300},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 1}],
        },
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "maskedPaths": ["/proc/kcore", "/sys/firmware"],
        "readonlyPaths": ["/proc/sys"],
        "seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 3, "op": "SCMP_CMP_EQ"}]}
            ],
        },
    }
    b = load_bundle(bundle(minimal(linux=linux, hostname="web")))
    r = b.resources
    assert (r.memory, r.nano_cpus, r.cpu_shares, r.pids_limit, r.blkio_weight) == (512 << 20, 500_000_000, 512, 64, 300)
    assert b.sysctl == {"net.ipv4.ip_forward": "1"}
    assert b.masked_paths == ["/proc/kcore", "/sys/firmware"]
    assert b.readonly_paths == ["/proc/sys"]
    assert b.hostname == "web"
    text = " | ".join(b.notes)
    assert "/proc/1/ns/ipc" in text and "seccomp.flags" in text and "hugepageLimits" in text
    assert "/run/netns/x" not in text and b.network_ns == "/run/netns/x"
    assert b.process.seccomp == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 3, "op": "SCMP_CMP_EQ"}]}
        ],
    }


def test_seccomp_notify_and_bad_ops_are_refused(bundle):
    for seccomp, words in (
        ({"defaultAction": "SCMP_ACT_NOTIFY"}, "SCMP_ACT_NOTIFY"),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            },
            "index 0..5",
        ),
    ):
        with pytest.raises(BundleError, match=words):
            load_bundle(bundle(minimal(linux={"seccomp": seccomp})))


def test_hooks_are_kept_in_order(bundle):
    hooks = {
        "prestart": [{"path": "/bin/a", "args": ["a", "1"]}, {"path": "/bin/b"}],
        "poststop": [{"path": "/bin/c", "timeout": 5, "env": ["X=1"]}],
    }
    b = load_bundle(bundle(minimal(hooks=hooks)))
    assert [h.path for h in b.hooks["prestart"]] == ["/bin/a", "/bin/b"]
    assert b.hooks["poststop"][0].timeout == 5


@pytest.mark.parametrize("good", ["abc", "a.b-c_d+e", "0" * 64])
def test_good_ids(good):
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a b", "x" * 2000])
def test_bad_ids(bad):
    with pytest.raises(BundleError, match="invalid container id"):
        check_id(bad)


@pytest.mark.parametrize(
    "namespaces, expected",
    [
        ([{"type": "network"}, {"type": "pid"}], ""),
        ([{"type": "network", "path": "/var/run/netns/cni-1"}], "/var/run/netns/cni-1"),
        ([{"type": "pid"}], None),
    ],
)
def test_network_namespace_lives_on_the_host(bundle, namespaces, expected):
    """A new network namespace (""), one to join (its path), or none (only lo in the VM)."""
    b = load_bundle(bundle(minimal(linux={"namespaces": namespaces})))
    assert b.network_ns == expected


@pytest.mark.parametrize(
    "namespaces, error",
    [
        ([{"type": "network", "path": "netns/x"}], "must be an absolute path"),
        ([{"type": "network", "path": 7}], "must be an absolute path"),
        ([{"type": "network"}, {"type": "network", "path": "/run/netns/x"}], "named twice"),
    ],
)
def test_bad_network_namespace_is_refused(bundle, namespaces, error):
    with pytest.raises(BundleError, match=error):
        load_bundle(bundle(minimal(linux={"namespaces": namespaces})))


def test_linux_devices_become_guest_devices_with_their_access(bundle):
    linux = {
        "devices": [
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o20640, "uid": 0, "gid": 5},
            {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
            {"path": "/dev/u", "type": "u", "major": 1, "minor": 3},
            {"path": "/run/fifo", "type": "p"},
        ],
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"},
                {"allow": True, "type": "b", "major": 8, "access": "rwm"},
                {"allow": False, "type": "b", "major": 8, "minor": 0, "access": "w"},
                {"allow": True, "type": "c", "major": 13, "minor": 63, "access": "r"},
            ]
        },
    }
    b = load_bundle(bundle(minimal(linux=linux)))
    assert b.devices == [
        {
            "path": "/dev/fuse",
            "type": "c",
            "major": 10,
            "minor": 229,
            "permissions": "rw",
            "mode": 0o640,
            "uid": 0,
            "gid": 5,
        },
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "permissions": "rm"},
        {"path": "/dev/u", "type": "c", "major": 1, "minor": 3, "permissions": "m"},
    ]
    text = " | ".join(b.notes)
    assert "FIFOs" in text and "allow rules for devices not in linux.devices" in text


@pytest.mark.parametrize(
    "device",
    [
        {"path": "/dev/../etc/x", "type": "c", "major": 1, "minor": 3},
        {"path": "dev/x", "type": "c", "major": 1, "minor": 3},
        {"path": "/dev/x", "type": "c", "major": 1 << 21, "minor": 3},
        {"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "uid": -1},
        {"path": "/dev/x", "type": "s", "major": 1, "minor": 3},
        "x",
    ],
)
def test_bad_linux_devices_are_refused(bundle, device):
    with pytest.raises(BundleError, match=r"linux\.devices\[0\]"):
        load_bundle(bundle(minimal(linux={"devices": [device]})))


def test_a_user_namespace_takes_the_config_maps(bundle):
    linux = {
        "namespaces": [{"type": "user"}, {"type": "pid"}],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [
            {"containerID": 0, "hostID": 100000, "size": 65536},
            {"containerID": 70000, "hostID": 5, "size": 1},
        ],
    }
    b = load_bundle(bundle(minimal(linux=linux)))
    assert b.process.id_mappings == {"uid": [[0, 100000, 65536]], "gid": [[0, 100000, 65536], [70000, 5, 1]]}
    assert not any("Mappings" in n for n in b.notes)
    assert load_bundle(bundle(minimal())).process.id_mappings is None


@pytest.mark.parametrize(
    "linux, needle",
    [
        ({"namespaces": [{"type": "user"}]}, "uidMappings and gidMappings are needed"),
        (
            {
                "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
                "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
            },
            "need a new user namespace",
        ),
        (
            {
                "namespaces": [{"type": "user"}],
                "uidMappings": [{"containerID": 0, "hostID": 1, "size": 0}],
                "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
            },
            "uidMappings/gidMappings",
        ),
        (
            {
                "namespaces": [{"type": "user"}],
                "uidMappings": [{"containerID": 0, "hostID": 4294967295, "size": 2}],
                "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
            },
            "within 0..2",
        ),
        (
            {
                "namespaces": [{"type": "user"}],
                "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}] * 341,
                "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
            },
            "1 to 340",
        ),
    ],
)
def test_bad_id_mappings_are_refused(bundle, linux, needle):
    with pytest.raises(BundleError, match=needle):
        load_bundle(bundle(minimal(linux=linux)))
