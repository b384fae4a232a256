"""Errors of ``vmshim build``. Like docker's builder, a failed build exits with status 1."""

from __future__ import annotations

from shim.errors import VmshimError


class BuildError(VmshimError):
    """A build failed; the message says at which step and why."""

    exit_code = 1
