"""Image references, parsed the way docker does (distribution/reference grammar).

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ registry "/" ] repository
    registry   := host [ ":" port ]      (first component with a '.' or ':', or "localhost")
    repository := path-component ( "/" path-component )*     lowercase [a-z0-9] + separators
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex

Normalisation, as docker: ``busybox`` → ``docker.io/library/busybox:latest``,
``ns/x`` → ``docker.io/ns/x:latest``, ``index.docker.io/...`` → ``docker.io/...``.
A reference with a digest and no tag gets no default tag.

``str(ref)`` is the canonical form (stored in the image index); ``ref.familiar`` is the short
form for display (``busybox:latest``, ``ns/x:1``, ``localhost:5000/x:latest``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shim.errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_REGISTRIES = {"index.docker.io", "registry-1.docker.io"}

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_NAME_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference. ``tag`` is None only when ``digest`` is set."""

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        return parse_reference(text)

    @property
    def name(self) -> str:
        """``registry/repository``, e.g. ``docker.io/library/busybox``."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The repository as docker shows it: ``busybox``, ``ns/x``, ``localhost/x``."""
        if self.registry == DEFAULT_REGISTRY:
            repo = self.repository
            if repo.startswith("library/") and repo.count("/") == 1:
                return repo[len("library/") :]
            return repo
        return self.name

    @property
    def familiar(self) -> str:
        """Short display form: ``busybox:latest``, ``busybox@sha256:...``."""
        return self._with_suffix(self.familiar_name)

    def __str__(self) -> str:
        return self._with_suffix(self.name)

    def _with_suffix(self, name: str) -> str:
        out = name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``. Raises InvalidReference naming what is wrong."""
    if not isinstance(text, str):
        raise InvalidReference(f"invalid reference format: {text!r} is not a string")

    def bad(reason: str) -> InvalidReference:
        return InvalidReference(f"invalid reference format '{text}': {reason}")

    if not text:
        raise InvalidReference("invalid reference format: the image reference is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise bad("contains whitespace")

    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise bad(f"digest '{digest}' must be 'sha256:' followed by 64 lowercase hex digits")
    tag = None
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise bad(
                f"tag '{tag}' must be 1-128 characters of letters, digits, '_', '.' or '-'"
                " and not start with '.' or '-'"
            )
    if not rest:
        raise bad("the repository name is empty")

    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = first, remainder
        if not _REGISTRY.match(registry):
            raise bad(f"registry '{registry}' is not a valid host[:port]")
        if registry in _LEGACY_REGISTRIES:
            registry = DEFAULT_REGISTRY
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"

    if repository != repository.lower():
        raise bad("repository name must be lowercase")
    for component in repository.split("/"):
        if not _PATH_COMPONENT.match(component):
            shown = component or "(empty)"
            raise bad(
                f"repository component '{shown}' must be lowercase letters and digits,"
                " optionally separated by '.', '_', '__' or dashes"
            )
    if len(f"{registry}/{repository}") > _NAME_MAX:
        raise bad(f"the repository name is longer than {_NAME_MAX} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def as_reference(ref: "str | Reference") -> Reference:
    """Accept either form; parse strings."""
    return ref if isinstance(ref, Reference) else parse_reference(ref)
