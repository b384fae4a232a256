"""What the dataclasses vmshim stores as JSON share."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Self


class JsonRecord:
    """A dataclass kept as a JSON object: :meth:`to_dict` and :meth:`from_dict`, which
    leaves out the keys that are not fields (written by another vmshim version)."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        return cls(**values)
