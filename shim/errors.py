"""One error hierarchy for the host side. The message of every VmshimError is what the user
reads: one line naming what is wrong and, where there is one, what to do about it."""

from __future__ import annotations


class VmshimError(Exception):
    """Base of every error the CLI shows as ``Error: <message>`` (exit status ``exit_code``)."""

    exit_code = 125
    """Like docker: 125 when vmshim itself fails, 126/127 when the command cannot run."""


class UsageError(VmshimError):
    """A flag or argument is malformed (``-e`` without ``=``, a bad ``--isolation``)."""


class ImageNotFound(VmshimError):
    """The image reference names nothing in the local store."""


class InvalidReference(VmshimError):
    """An image reference that cannot be parsed."""


class ImageError(VmshimError):
    """The image store or an image's content is broken or hostile."""


class LayerError(ImageError):
    """A layer tar is corrupt or hostile and was refused; nothing was written."""


class RegistryError(VmshimError):
    """A registry could not be reached, refused a request, or needs credentials we lack."""


class GuestImageError(VmshimError):
    """The guest kernel/initramfs cannot be built or is missing."""


class HypervisorError(VmshimError):
    """libvirt or QEMU refused or failed (libvirtd not reachable, domain failed to start)."""


class AgentError(VmshimError):
    """The guest agent did not answer, broke the protocol, or reported a failure."""


class ContainerNotFound(VmshimError):
    """No container with that name or id."""


class ContainerStateError(VmshimError):
    """An operation is not allowed in the container's current state."""

    def __init__(self, operation: str, expected: str, actual: str, name: str = ""):
        who = f"container {name}" if name else "container"
        super().__init__(f"cannot {operation} {who}: it is {actual}, must be {expected}")
        self.operation, self.expected, self.actual = operation, expected, actual


class CommandNotFound(VmshimError):
    """The container's command does not exist in the image (exit 127, like docker)."""

    exit_code = 127


class CommandNotExecutable(VmshimError):
    """The container's command exists but cannot be executed (exit 126, like docker)."""

    exit_code = 126


class NetworkError(VmshimError):
    """A network cannot be created, set up or removed (bridge, NAT, ports, DNS), or a
    network flag (``-p``, ``--network``, ``--ip``, ``--add-host`` …) asks for the impossible."""


class NetworkNotFound(NetworkError):
    """No network with that name or id."""


class VolumeError(VmshimError):
    """A volume or mount cannot be created, used or removed."""


class VolumeNotFound(VolumeError):
    """No volume has that name."""


class VolumeInUse(VolumeError):
    """The volume is used by a container (running, or kept for a restart)."""


class CheckpointError(VmshimError):
    """A container cannot be checkpointed, or a checkpoint cannot be restored (a missing,
    corrupt or foreign checkpoint, a share QEMU cannot save)."""
