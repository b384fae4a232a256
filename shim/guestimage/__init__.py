"""The guest image: the kernel and the initramfs every microVM boots. Built once, cached.

What goes in (see images/guest/README.md):

- the kernel (see :func:`kernel_choice`): the minimal microVM kernel when it has been built
  (:mod:`shim.kernelbuild`, everything built in, no modules); else the Debian cloud kernel
  (``linux-image-cloud-amd64`` → its concrete package), fetched with ``apt-get download``
  into ``paths.cache_dir()/kernel`` and unpacked there, never installed on the host; or a
  kernel named by ``VMSHIM_KERNEL`` (+ ``VMSHIM_KERNEL_MODULES``, its
  ``/lib/modules/<release>`` directory);
- an initramfs (newc cpio written here, so device nodes need no root and the bytes are
  reproducible) holding ``/init``, the host's Debian python with the libraries it links and
  a trimmed, precompiled stdlib, ``guest/`` under ``/usr/lib/vmshim``, busybox-static and
  the kernel modules the agent loads (listed in load order in
  ``/lib/modules/vmshim-modules.txt``).

Builds live in ``paths.guest_dir()/<inputs-hash>/`` with ``vmlinuz``, ``initramfs.img`` and
``manifest.json``. The hash covers everything that goes in (builder version, kernel package
and version, python and busybox package versions, every file of ``guest/``), so a build is
reused until one of those changes. Older builds are removed by a later build once they
have been superseded for ten minutes (a VM may be starting from one).

The package, bottom up: ``tools`` (asking the host), ``cpio`` (the newc writer),
``modules`` (module closure), ``kernel`` (choice and fetch), ``python`` (python and stdlib
selection), ``inputs`` (what goes in, and its hash), ``initramfs`` (one build), ``image``
(:class:`GuestImage`, the bare QEMU command), ``cache`` (builds on disk, under a lock).

Public API, re-exported here: :class:`GuestImage`, :func:`ensure_guest_image`,
:func:`current_guest_image`, :func:`boot_floor_command`, the kernel choice
(:func:`kernel_choice`, :func:`save_kernel_choice`, :data:`KERNEL_CHOICES`,
:data:`KERNEL_ENV`) and :func:`collect_inputs`/:func:`inputs_hash`. Every failure raises
:class:`shim.errors.GuestImageError`.
"""

from shim.guestimage.cache import current_guest_image, ensure_guest_image
from shim.guestimage.cpio import CpioEntry, CpioWriter, read_cpio
from shim.guestimage.image import GuestImage, boot_floor_command
from shim.guestimage.inputs import (
    BUILDER_VERSION,
    BUSYBOX,
    CMDLINE,
    COMPRESSION,
    collect_inputs,
    guest_source_dir,
    hash_tree,
    inputs_hash,
)
from shim.guestimage.kernel import KERNEL_CHOICES, KERNEL_ENV, bzimage_release, kernel_choice, save_kernel_choice
from shim.guestimage.modules import GUEST_MODULES, ModuleTree, module_load_order, module_name, read_modinfo
from shim.guestimage.python import PYTHON

__all__ = [
    "BUILDER_VERSION",
    "BUSYBOX",
    "CMDLINE",
    "COMPRESSION",
    "GUEST_MODULES",
    "KERNEL_CHOICES",
    "KERNEL_ENV",
    "PYTHON",
    "CpioEntry",
    "CpioWriter",
    "GuestImage",
    "ModuleTree",
    "boot_floor_command",
    "bzimage_release",
    "collect_inputs",
    "current_guest_image",
    "ensure_guest_image",
    "guest_source_dir",
    "hash_tree",
    "inputs_hash",
    "kernel_choice",
    "module_load_order",
    "module_name",
    "read_cpio",
    "read_modinfo",
    "save_kernel_choice",
]
