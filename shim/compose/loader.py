"""Read compose files into one checked document: discovery, ``.env``, interpolation,
``-f`` overrides merged in order, validation, profiles.

The order is compose-spec's: each file is parsed (PyYAML, safe loader), interpolated
with the environment (the process's, over ``.env``), merged onto the previous ones, and
the result is validated once (:mod:`shim.compose.schema`). Nothing here touches the
state store: a file that is refused leaves nothing behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shim.compose.errors import ComposeError

DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
OVERRIDE_FILES = (
    "compose.override.yaml",
    "compose.override.yml",
    "docker-compose.override.yaml",
    "docker-compose.override.yml",
)
MAX_FILE_BYTES = 4 << 20
"""A compose file larger than this is refused (bounded work, no YAML bomb reaches us)."""
MAX_NODES = 200_000
"""Refuse documents with more nodes than this after parsing (alias expansion bombs)."""


# ---- discovery --------------------------------------------------------------------------


def find_files(files: list[str], cwd: Path) -> list[Path]:
    """The compose files to read: the ``-f`` ones in order, else the first default
    name found in *cwd* or a parent (with its override file next to it). Raises
    ComposeError when there is none."""
    if files:
        out = []
        for name in files:
            path = (cwd / name) if not os.path.isabs(name) else Path(name)
            if not path.is_file():
                raise ComposeError(f"{name}: no such compose file")
            out.append(path)
        return out
    for directory in [cwd, *cwd.parents]:
        for name in DEFAULT_FILES:
            if (directory / name).is_file():
                found = [directory / name]
                for override in OVERRIDE_FILES:
                    if (directory / override).is_file():
                        found.append(directory / override)
                        break
                return found
    raise ComposeError(
        f"no compose file found in {cwd} or its parents (looked for {', '.join(DEFAULT_FILES)}); use -f FILE"
    )


# ---- .env -------------------------------------------------------------------------------

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)$")


def read_env_file(path: Path, *, required: bool = True) -> dict[str, str]:
    """``K=V`` lines (``#`` comments, optional quotes, ``export`` prefix). A missing
    file is an error only when *required*."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ComposeError(f"env file {path} not found") from None
        return {}
    except OSError as exc:
        raise ComposeError(f"cannot read env file {path}: {exc.strerror}") from None
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            raise ComposeError(f"{path}: line {number}: expected KEY=VALUE")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if match.group(2).strip()[0] == '"':
                value = value.replace("\\n", "\n").replace('\\"', '"')
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


# ---- interpolation ------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


def interpolate_text(text: str, env: dict[str, str], where: str) -> str:
    """Substitute ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``; ``$$`` is a
    literal ``$``. Defaults may hold further ``${…}``. Raises ComposeError naming
    *where* for a bad expression or a required variable that is unset."""
    out, pos = [], 0
    while True:
        dollar = text.find("$", pos)
        if dollar < 0:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:dollar])
        nxt = text[dollar + 1 : dollar + 2]
        if nxt == "$":
            out.append("$")
            pos = dollar + 2
        elif nxt == "{":
            end, depth = dollar + 2, 1
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if depth:
                raise ComposeError(f"{where}: invalid interpolation format in {text!r}: an unclosed ${{")
            out.append(_braced(text[dollar + 2 : end - 1], env, where))
            pos = end
        else:
            match = _NAME.match(text, dollar + 1)
            if not match:
                raise ComposeError(
                    f"{where}: invalid interpolation format in {text!r}: "
                    "a '$' must be followed by a name, {NAME} or '$'"
                )
            out.append(env.get(match.group(0), ""))
            pos = match.end()


def _braced(braced: str, env: dict[str, str], where: str) -> str:
    parts = _BRACED.match(braced)
    if not parts:
        raise ComposeError(f"{where}: invalid interpolation format ${{{braced}}}")
    name, op, arg = parts.group("name"), parts.group("op"), parts.group("arg") or ""
    value = env.get(name)
    if op is None:
        return value or ""
    if op in (":-", "-"):
        unset = value is None or (op == ":-" and value == "")
        return interpolate_text(arg, env, where) if unset else value or ""
    if op in (":?", "?"):
        unset = value is None or (op == ":?" and value == "")
        if unset:
            reason = interpolate_text(arg, env, where) or "is not set"
            raise ComposeError(f"{where}: required variable {name} is missing a value: {reason}")
        return value or ""
    present = value is not None and (op == "+" or value != "")
    return interpolate_text(arg, env, where) if present else ""


def interpolate(node, env: dict[str, str], path: str = ""):
    """Interpolate every string value (not keys) of a parsed document."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, join(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        return interpolate_text(node, env, path or "(root)")
    return node


def join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


# ---- parsing -------------------------------------------------------------------------------


def parse_yaml(path: Path) -> dict:
    """One compose file as a dict. Raises ComposeError (size, syntax, not a mapping)."""
    import yaml

    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ComposeError(f"{path}: the file is larger than {MAX_FILE_BYTES >> 20} MiB")
        text = path.read_text()
    except OSError as exc:
        raise ComposeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ComposeError(f"{path}: invalid YAML at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        raise ComposeError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ComposeError(f"{path}: (root): must be a mapping, not {type_name(data)}")
    if _count_nodes(data) > MAX_NODES:
        raise ComposeError(f"{path}: the document has more than {MAX_NODES} nodes")
    bad = [k for k in _all_keys(data) if not isinstance(k, str)]
    if bad:
        raise ComposeError(f"{path}: key {bad[0]!r} must be a string")
    return data


def _count_nodes(node, limit: int = MAX_NODES + 1) -> int:
    count, stack = 0, [node]
    while stack and count < limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _all_keys(node):
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield from item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def type_name(value) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# ---- merging -------------------------------------------------------------------------------

REPLACED = {"command", "entrypoint", "healthcheck.test", "image", "build.context"}
"""Keys whose value an override replaces wholesale (compose-spec merge rules)."""


def _as_mapping(value) -> dict | None:
    """environment/labels/build.args in list form (``K=V``) as a mapping."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        out = {}
        for entry in value:
            key, sep, val = entry.partition("=")
            out[key] = val if sep else None
        return out
    return None


def _volume_target(entry) -> str | None:
    if isinstance(entry, dict):
        return entry.get("target")
    if isinstance(entry, str):
        parts = entry.split(":")
        return parts[1] if len(parts) > 1 else parts[0]
    return None


def merge(base, override, path: str = ""):
    """Merge *override* onto *base*: mappings key by key; environment/labels as
    mappings; volumes by target; command/entrypoint/healthcheck.test replaced; other
    lists appended without duplicates; scalars replaced."""
    key = path.split(".", 2)[-1] if path.startswith("services.") else path
    if key in REPLACED:
        return override
    if (
        path.startswith("services.")
        and path.count(".") == 2
        and path.rsplit(".", 1)[1] in ("environment", "labels", "extra_hosts", "sysctls")
    ):
        left, right = _as_mapping(base), _as_mapping(override)
        if left is not None and right is not None:
            return {**left, **right}
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(out[k], v, join(path, k)) if k in out else v
        return out
    if isinstance(base, list) and isinstance(override, list):
        if path.endswith(".volumes") and path.startswith("services."):
            targets = {_volume_target(v) for v in override}
            return [v for v in base if _volume_target(v) not in targets] + list(override)
        return list(base) + [v for v in override if v not in base]
    return override


# ---- the whole load ----------------------------------------------------------------------


def load_document(files: list[Path], env: dict[str, str]) -> dict:
    """Parse, interpolate and merge *files* in order. Raises ComposeError."""
    merged: dict = {}
    for path in files:
        data = parse_yaml(path)
        try:
            data = interpolate(data, env)
        except ComposeError as exc:
            raise ComposeError(f"{path.name}: {exc}") from None
        merged = merge(merged, data) if merged else data
    return merged


def environment(project_dir: Path, env_files: list[str]) -> dict[str, str]:
    """The variables for interpolation: ``.env`` in the project directory (or the
    ``--env-file`` ones), under the process's environment (which wins)."""
    values: dict[str, str] = {}
    if env_files:
        for name in env_files:
            values.update(read_env_file(Path(name)))
    else:
        values.update(read_env_file(project_dir / ".env", required=False))
    values.update(os.environ)
    return values
