"""``vmshim-runtime features``: what the runtime supports, in the runtime spec's
features.md format, plus ``org.vmshim.*`` annotations naming what a VM cannot honour
(shim.oci.bundle's module doc is the full list)."""

from __future__ import annotations

from guest.runtime.seccomp import ACTIONS, OPS
from guest.spec import CAPABILITIES
from shim.oci.bundle import HOOK_KINDS, SUPPORTED_NAMESPACES
from shim.oci.state import OCI_VERSION


def features() -> dict:
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": list(HOOK_KINDS),
        "mountOptions": ["bind", "rbind", "ro", "rw", "private", "rprivate"],
        "linux": {
            "namespaces": list(SUPPORTED_NAMESPACES),
            "capabilities": list(CAPABILITIES),
            # the host cgroup of cgroupsPath (shim.oci.hostcgroup); the guest's is v2
            "cgroup": {"v1": True, "v2": True, "systemd": True, "systemdUser": False},
            "seccomp": {
                "enabled": True,
                "actions": sorted(ACTIONS),
                "operators": list(OPS),
                "archs": ["SCMP_ARCH_X86_64"],
                "knownFlags": [],
                "supportedFlags": [],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
        },
        "annotations": {
            "org.vmshim.isolation": "vm",
            "org.vmshim.rootfs": "virtiofs share of root.path",
            "org.vmshim.os": (
                '"true": process is the image\'s init (systemd), run as an '
                "OS container: cgroup2 delegated, /run and /tmp tmpfs, "
                "container=vmshim"
            ),
            "org.vmshim.hooks": "all run on the host; createContainer/startContainer too",
            "org.vmshim.not-honoured": (
                "apparmor, selinux, seccomp notify, namespace paths (the VM has its own), "
                "mount propagation other than private, hugepages; each is "
                "reported in --log when a config has it"
            ),
            "org.vmshim.host-cgroup": (
                "cgroupsPath holds the stand-in, QEMU and its helpers; "
                "the memory limit covers the VM (see "
                "docs/oci-runtime.md)"
            ),
        },
    }
