"""The build cache: what each step produced, keyed by what determines it.

A key is the sha256 of ``[parent image ID, instruction, inputs]`` where the parent image
ID is the config digest of the image before the step (so it covers every earlier step
and the base image), the instruction is its text after variable substitution, and the
inputs are whatever else decides the result: for RUN the build-arg values the command
sees, for COPY and ADD the list of source files with their modes, link targets and
content digests (and the ID of the ``--from`` image), for WORKDIR nothing more.

An entry stores the whole resulting image state (config and layer descriptors), in
``$VMSHIM_ROOT/build/cache/<key>.json``. It is used only while every layer blob it
names is still in the image store (``image prune`` may have collected the layers of
builds nothing is tagged with; then the step simply runs again).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from shim import paths
from shim.images.store import canonical_json

CACHE_VERSION = 1


def cache_key(parent_id: str, instruction: str, inputs=None) -> str:
    material = canonical_json({"v": CACHE_VERSION, "parent": parent_id, "instruction": instruction, "inputs": inputs})
    return hashlib.sha256(material).hexdigest()


class BuildCache:
    def __init__(self, root: Path | None = None):
        self.dir = Path(root) if root is not None else paths.root() / "build" / "cache"

    def get(self, key: str, store) -> tuple[dict, list[dict]] | None:
        """(config, layers) recorded for *key*, if all its layers are still stored."""
        try:
            data = json.loads((self.dir / f"{key}.json").read_bytes())
            config, layers = data["config"], data["layers"]
            if not isinstance(config, dict) or not isinstance(layers, list):
                return None
            if not all(store.has_blob(layer["digest"]) for layer in layers):
                (self.dir / f"{key}.json").unlink(missing_ok=True)  # its layers were pruned
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return config, layers

    def put(self, key: str, config: dict, layers: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{key}.json"
        # per thread too: independent stages may make the same step at once
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(canonical_json({"config": config, "layers": layers}))
        os.replace(tmp, path)
