"""The compose error: one line a user can act on, naming the file and the key's path."""

from __future__ import annotations

from shim.errors import UsageError


class ComposeError(UsageError):
    """A compose file (or a compose command line) that cannot be used: ``path: reason``."""

    exit_code = 1  # docker compose exits 1 on an invalid file


class DependencyFailed(ComposeError):
    """A service's depends_on condition can never hold (unhealthy, exited non-zero)."""
