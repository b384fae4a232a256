"""Volumes: named volumes (ext4 disk images that outlive containers), the ``-v`` /
``--mount`` / ``--tmpfs`` / ``--volumes-from`` flags, and how each placement attaches them
(VM: virtio disks and virtiofs shares; process isolation: loop and bind mounts)."""
