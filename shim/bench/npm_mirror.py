"""A small static npm registry: what ``npm install`` of one package.json needs, fetched once
while the network is reachable, then served from a directory with no network at all.

Used by the Express example's build test and its benchmark (the builds run in a network
namespace with no way out). Layout of the cache directory (``$VMSHIM_ROOT/cache/npm``)::

    index.json                    {"dependencies": <sha256 of the package.json deps>,
                                   "packages": {name: [versions]}}
    meta/<name>.json              the packument, only the versions kept
    tarballs/<name>/<file>.tgz    each kept version's tarball (integrity checked)

:func:`fetch` resolves the dependency tree like npm (the highest version that satisfies
each range; a small semver subset: exact, ``^``, ``~``, comparators, ``x`` ranges, hyphen
ranges, ``||``) and downloads what is missing. :func:`serve` answers ``GET /<name>``
with the packument, its tarball URLs rewritten to this server, and
``GET /<name>/-/<file>.tgz`` with the tarball.

    python -m shim.bench.npm_mirror fetch PACKAGE_JSON DIR
    python -m shim.bench.npm_mirror serve DIR HOST PORT
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from shim.errors import VmshimError

REGISTRY = "https://registry.npmjs.org"
MAX_PACKAGES = 2000
MAX_TARBALL = 64 << 20
TIMEOUT = 60
_NAME = re.compile(r"^(@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


class MirrorError(VmshimError):
    """The npm mirror cannot be filled or served."""


# ---- semver (the subset npm's dependency ranges use) ----------------------------------------
def parse_version(text: str) -> tuple | None:
    """(major, minor, patch, prerelease or "") or None when *text* is not a version."""
    m = _VERSION.match(text.strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) or ""


def _key(v: tuple | None) -> tuple:
    """Sort key of a parsed version (a release after its prereleases); None sorts first."""
    if v is None:
        return (-1, -1, -1, False, "")
    return v[0], v[1], v[2], v[3] == "", v[3]


def _partial(text: str) -> list[int | None]:
    parts = text.lstrip("v=").split("-")[0].split(".")
    out: list[int | None] = []
    for part in parts[:3]:
        out.append(None if part in ("x", "X", "*", "") else int(part))
    while len(out) < 3:
        out.append(None)
    return out


def _comparators(text: str) -> list[tuple[str, tuple]]:
    """One space-separated range → [(op, version)] all of which must hold."""
    text = text.strip()
    if text in ("", "*", "latest", "x"):
        return [(">=", (0, 0, 0, ""))]
    hyphen = re.match(r"^(\S+)\s+-\s+(\S+)$", text)
    if hyphen:
        first, last = _partial(hyphen.group(1)), _partial(hyphen.group(2))
        top = last[0] or 0
        out: list[tuple[str, tuple]] = [(">=", (first[0] or 0, first[1] or 0, first[2] or 0, ""))]
        if last[1] is None:
            out.append(("<", (top + 1, 0, 0, "")))
        elif last[2] is None:
            out.append(("<", (top, last[1] + 1, 0, "")))
        else:
            out.append(("<=", (top, last[1], last[2], "")))
        return out
    out = []
    for token in re.sub(r"([<>=~^]+)\s+", r"\1", text).split():
        found = re.match(r"^(\^|~>?|>=|<=|>|<|=)?", token)
        op = found.group(0) if found else ""
        rest = token[len(op) :]
        exact = parse_version(rest)
        major, minor, patch = _partial(rest)
        pre = exact[3] if exact else ""
        if op in ("", "="):
            if major is None:
                out.append((">=", (0, 0, 0, "")))
            elif minor is None:
                out += [(">=", (major, 0, 0, "")), ("<", (major + 1, 0, 0, ""))]
            elif patch is None:
                out += [(">=", (major, minor, 0, "")), ("<", (major, minor + 1, 0, ""))]
            else:
                out.append(("=", (major, minor, patch, pre)))
        elif op == "^":
            low: tuple = (major or 0, minor or 0, patch or 0, pre)
            high: tuple
            if major:
                high = (major + 1, 0, 0, "")
            elif minor:
                high = (0, minor + 1, 0, "")
            elif patch is not None and minor is not None:
                high = (0, 0, patch + 1, "")
            else:
                high = (0, (minor or 0) + 1, 0, "") if minor is not None else (1, 0, 0, "")
            out += [(">=", low), ("<", high)]
        elif op.startswith("~"):
            low = (major or 0, minor or 0, patch or 0, pre)
            high = ((major or 0) + 1, 0, 0, "") if minor is None else (major or 0, minor + 1, 0, "")
            out += [(">=", low), ("<", high)]
        else:
            out.append((op, (major or 0, minor or 0, patch or 0, pre)))
    return out


def satisfies(version: str, spec: str) -> bool:
    """Whether *version* is in the range *spec* (prereleases only when named exactly)."""
    v = parse_version(version)
    if v is None:
        return False
    for alternative in spec.split("||"):
        comps = _comparators(alternative)
        if v[3] and not any(c[1][3] and c[1][:3] == v[:3] for c in comps):
            continue
        ok = True
        for op, ref in comps:
            a, b = _key(v), _key(ref)
            ok = {"=": a == b, ">=": a >= b, ">": a > b, "<=": a <= b, "<": a < b}[op]
            if not ok:
                break
        if ok:
            return True
    return False


def best(versions, spec: str, latest: str | None = None) -> str | None:
    """npm's choice: ``latest`` when it satisfies *spec*, else the highest that does."""
    if latest is not None and satisfies(latest, spec):
        return latest
    fitting = [v for v in versions if satisfies(v, spec)]
    return max(fitting, key=lambda v: _key(parse_version(v)), default=None)


# ---- fetching -------------------------------------------------------------------------------
def deps_digest(package_json: Path) -> str:
    deps = json.loads(Path(package_json).read_text()).get("dependencies") or {}
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()


def ready(package_json: Path, root: Path) -> bool:
    """Whether *root* already holds what *package_json* needs."""
    try:
        index = json.loads((Path(root) / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("dependencies") == deps_digest(package_json)


def fetch(package_json: Path, root: Path, registry: str = REGISTRY, log=print) -> dict:
    """Fill *root* with every package the dependencies of *package_json* need (resolved
    like npm), downloading what is missing. Returns the index. Raises MirrorError."""
    root = Path(root)
    if ready(package_json, root):
        return json.loads((root / "index.json").read_text())
    deps = json.loads(Path(package_json).read_text()).get("dependencies") or {}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "tarballs").mkdir(parents=True, exist_ok=True)
    packuments: dict[str, dict] = {}
    chosen: dict[str, set[str]] = {}
    queue = list(deps.items())
    while queue:
        name, spec = queue.pop()
        if not _NAME.match(name):
            raise MirrorError(f"npm mirror: invalid package name {name!r}")
        if name not in packuments:
            if len(packuments) >= MAX_PACKAGES:
                raise MirrorError(f"npm mirror: more than {MAX_PACKAGES} packages")
            packuments[name] = _get_json(f"{registry}/{urllib.parse.quote(name, safe='@')}")
        doc = packuments[name]
        latest = (doc.get("dist-tags") or {}).get("latest")
        version = best(doc.get("versions", {}), spec, latest)
        if version is None:
            raise MirrorError(f"npm mirror: no version of {name} satisfies {spec!r}")
        if version in chosen.setdefault(name, set()):
            continue
        chosen[name].add(version)
        manifest = doc["versions"][version]
        queue += list((manifest.get("dependencies") or {}).items())
    for name, versions in sorted(chosen.items()):
        doc = packuments[name]
        kept = {v: doc["versions"][v] for v in sorted(versions, key=lambda v: _key(parse_version(v)))}
        for version, manifest in kept.items():
            dist = manifest.get("dist") or {}
            target = _tarball_path(root, name, dist.get("tarball", ""))
            if not target.exists():
                log(f"npm mirror: {name}@{version}")
                data = _get(dist["tarball"], MAX_TARBALL)
                _check_integrity(data, dist, f"{name}@{version}")
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        latest = max(kept, key=lambda v: _key(parse_version(v)))
        slim = {"_id": name, "name": name, "dist-tags": {"latest": latest}, "versions": kept}
        (root / "meta" / f"{_file_name(name)}.json").write_text(json.dumps(slim))
    index = {"dependencies": deps_digest(package_json), "packages": {n: sorted(v) for n, v in sorted(chosen.items())}}
    (root / "index.json").write_text(json.dumps(index))
    return index


def _file_name(name: str) -> str:
    return name.replace("/", "%2f")


def _tarball_path(root: Path, name: str, url: str) -> Path:
    base = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
    if not base.endswith(".tgz") or "/" in base or base.startswith("."):
        raise MirrorError(f"npm mirror: unexpected tarball URL {url!r} for {name}")
    return root / "tarballs" / _file_name(name) / base


def _check_integrity(data: bytes, dist: dict, what: str) -> None:
    integrity = dist.get("integrity", "")
    if integrity.startswith("sha512-"):
        want = base64.b64decode(integrity[7:])
        if hashlib.sha512(data).digest() != want:
            raise MirrorError(f"npm mirror: {what}: the tarball does not match its integrity")
    elif dist.get("shasum"):
        if hashlib.sha1(data).hexdigest() != dist["shasum"]:
            raise MirrorError(f"npm mirror: {what}: the tarball does not match its shasum")
    else:
        raise MirrorError(f"npm mirror: {what}: the registry gave no checksum")


def _get(url: str, limit: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "vmshim-npm-mirror"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            data = resp.read(limit + 1)
    except OSError as exc:
        raise MirrorError(f"npm mirror: cannot fetch {url}: {exc}") from None
    if len(data) > limit:
        raise MirrorError(f"npm mirror: {url} is larger than {limit} bytes")
    return data


def _get_json(url: str) -> dict:
    try:
        return json.loads(_get(url, 256 << 20))
    except ValueError:
        raise MirrorError(f"npm mirror: {url} is not JSON") from None


# ---- serving --------------------------------------------------------------------------------
class _FreeBindServer(ThreadingHTTPServer):
    """Binds with IP_FREEBIND: the address may belong to a bridge that comes up later
    (a network's gateway before its first container starts)."""

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        super().server_bind()


IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def make_server(root: Path, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering npm from *root* on *host*:*port* (not started). *host* may
    be an address not (yet) on this host, see _FreeBindServer."""
    root = Path(root)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
            if "/-/" in path:
                name, _, base = path.partition("/-/")
                if _NAME.match(name) and re.match(r"^[A-Za-z0-9._-]+\.tgz$", base):
                    file = root / "tarballs" / _file_name(name) / base
                    if file.is_file():
                        return self._send(file.read_bytes(), "application/octet-stream")
            elif _NAME.match(path):
                file = root / "meta" / f"{_file_name(path)}.json"
                if file.is_file():
                    doc = json.loads(file.read_text())
                    base = f"http://{self.headers.get('Host') or f'{host}:{port}'}"
                    for version in doc.get("versions", {}).values():
                        dist = version.get("dist") or {}
                        name = urllib.parse.urlparse(dist.get("tarball", "")).path
                        dist["tarball"] = base + "/" + path + "/-/" + name.rsplit("/", 1)[-1]
                    return self._send(json.dumps(doc).encode(), "application/json")
            self._send(b'{"error":"Not found"}', "application/json", 404)

        def _send(self, body: bytes, kind: str, code: int = 200):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return _FreeBindServer((host, port), Handler)


def serve_in_thread(root: Path, host: str, port: int) -> ThreadingHTTPServer:
    server = make_server(root, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "fetch":
        index = fetch(Path(argv[1]), Path(argv[2]), log=lambda t: print(t, file=sys.stderr))
        print(f"npm mirror: {len(index['packages'])} packages in {argv[2]}")
        return 0
    if len(argv) == 4 and argv[0] == "serve":
        make_server(Path(argv[1]), argv[2], int(argv[3])).serve_forever()
        return 0
    print(__doc__.rsplit("\n\n", 1)[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except MirrorError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
