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
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {
            "namespaces": list(SUPPORTED_NAMESPACES),
            "capabilities": list(CAPABILITIES),
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": sorted(ACTIONS), "operators": list(OPS),
                        "archs": ["SCMP_ARCH_X86_64"], "knownFlags": [],
                        "supportedFlags": []},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
        },
        "annotations": {
            "org.vmshim.isolation": "vm",
            "org.vmshim.rootfs": "virtiofs share of root.path",
            "org.vmshim.os": ("\"true\": process is the image's init (systemd), run as an "
                              "OS container: cgroup2 delegated, /run and /tmp tmpfs, "
                              "container=vmshim"),
            "org.vmshim.hooks": "all run on the host; createContainer/startContainer too",
            "org.vmshim.not-honoured": (
                "apparmor, selinux, seccomp notify, namespace paths (the VM has its own), device "
                "rules, hugepages; each is reported in --log when a config has it"),
        },
    }
