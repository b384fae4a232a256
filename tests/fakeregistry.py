"""A small in-memory registry (OCI distribution API subset) on 127.0.0.1, for tests of what
a real registry will not do on demand: bearer/basic challenges, 5xx bursts, corrupted blobs,
slow blobs, dropped connections, ignored Range requests.

    with FakeRegistry(auth="bearer", users={"u": "p"}) as reg:
        reg.host  # "127.0.0.1:PORT"

Run as a script (``python -m tests.fakeregistry PORT [--slow BYTES_PER_SEC]``) it serves
the blobs and manifests found in a JSON seed file, for subprocess tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class State:
    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, ref) → body
        self.repo_blobs: dict[str, set[str]] = {}
        self.uploads: dict[str, bytearray] = {}
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, dict]] = []  # (method, path, headers)
        # knobs
        self.auth: str | None = None  # None, "basic", "bearer"
        self.users: dict[str, str] = {}
        self.tokens: dict[str, set[str]] = {}  # token → scopes granted
        self.corrupt: set[str] = set()  # blob digests served with a flipped byte
        self.fail_next: dict[str, int] = {}  # path regex → number of 503s still to send
        self.drop_after: dict[str, int] = {}  # blob digest → close after N bytes (once)
        self.slow: float = 0.0  # bytes per second for blob bodies (0: fast)
        self.ignore_range = False
        self.mounts = 0
        self.patches = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakeregistry/1"

    @property
    def st(self) -> State:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, *args):  # quiet
        pass

    # helpers ---------------------------------------------------------------------------
    def send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(code)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head and self.command != "HEAD":
            self.wfile.write(body)

    def error(self, code: int, err: str, msg: str, headers: dict | None = None) -> None:
        body = json.dumps({"errors": [{"code": err, "message": msg}]}).encode()
        self.send(code, body, {"Content-Type": "application/json", **(headers or {})})

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def authorized(self, scope: str | None) -> bool:
        st = self.st
        if st.auth is None:
            return True
        header = self.headers.get("Authorization", "")
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if st.auth == "basic":
            if header.startswith("Basic "):
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                if st.users.get(user) == pw:
                    return True
            self.error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": 'Basic realm="fake"'})
            return False
        if header.startswith("Bearer "):
            granted = st.tokens.get(header[7:])
            if granted is not None and (scope is None or scope in granted):
                return True
        challenge = f'Bearer realm="http://{host}/token",service="fake"'
        if scope:
            challenge += f',scope="{scope}"'
        self.error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})
        return False

    def maybe_fail(self) -> bool:
        st = self.st
        with st.lock:
            for pattern, left in st.fail_next.items():
                if left > 0 and re.search(pattern, self.path):
                    st.fail_next[pattern] = left - 1
                    self.body()  # consume the request so the connection stays in step
                    self.error(503, "UNAVAILABLE", "try again")
                    return True
        return False

    # routing ---------------------------------------------------------------------------
    def dispatch(self, method: str) -> None:
        st = self.st
        st.log.append((method, self.path, dict(self.headers)))
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if self.maybe_fail():
            return
        if path == "/token":
            return self.token(query)
        if path in ("/v2/", "/v2"):
            if self.authorized(None):
                self.send(200, b"{}", {"Content-Type": "application/json"})
            return
        m = re.match(r"/v2/(.+)/(manifests|blobs)/(uploads/?(.*)|[^/]+)$", path)
        if not m:
            return self.error(404, "NOT_FOUND", path)
        repo, kind, ref = m.group(1), m.group(2), m.group(3)
        write = method in ("POST", "PUT", "PATCH", "DELETE")
        if not self.authorized(f"repository:{repo}:{'pull,push' if write else 'pull'}"):
            return
        if kind == "manifests":
            return self.manifest(method, repo, ref)
        if ref.startswith("uploads"):
            return self.upload(method, repo, m.group(4) or "", query)
        return self.blob(method, repo, ref)

    def token(self, query) -> None:
        st = self.st
        header = self.headers.get("Authorization", "")
        if st.users:
            ok = False
            if header.startswith("Basic "):
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                ok = st.users.get(user) == pw
            if not ok:
                return self.error(401, "UNAUTHORIZED", "bad credentials")
        token = uuid.uuid4().hex
        scopes = set()
        for scope in query.get("scope", []):
            # "repository:a/b:pull,push" grants each action listed
            name, _, actions = scope.rpartition(":")
            scopes.add(scope)
            for action in actions.split(","):
                scopes.add(f"{name}:{action}")
            if "push" in actions:
                scopes.add(f"{name}:pull,push")
        st.tokens[token] = scopes
        self.send(200, json.dumps({"token": token, "expires_in": 300}).encode(), {"Content-Type": "application/json"})

    def manifest(self, method: str, repo: str, ref: str) -> None:
        st = self.st
        if method == "PUT":
            body = self.body()
            digest = sha(body)
            ctype = self.headers.get("Content-Type", "")
            st.manifests[(repo, ref)] = (body, ctype)
            st.manifests[(repo, digest)] = (body, ctype)
            return self.send(201, b"", {"Docker-Content-Digest": digest, "Location": f"/v2/{repo}/manifests/{digest}"})
        found = st.manifests.get((repo, ref))
        if found is None:
            return self.error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, ctype = found
        self.send(200, body, {"Content-Type": ctype, "Docker-Content-Digest": sha(body)}, head=method == "HEAD")

    def blob(self, method: str, repo: str, digest: str) -> None:
        st = self.st
        data = st.blobs.get(digest)
        if data is None or digest not in st.repo_blobs.get(repo, set()):
            return self.error(404, "BLOB_UNKNOWN", "blob unknown")
        if method == "HEAD":
            return self.send(200, b"", {"Content-Length": str(len(data)), "Docker-Content-Digest": digest}, head=True)
        if digest in st.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = self.headers.get("Range")
        code = 200
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        if rng and not st.ignore_range:
            m = re.match(r"bytes=(\d+)-$", rng)
            start = int(m.group(1)) if m else 0
            if start >= len(data):
                return self.send(416, b"")
            code = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(k, v)
        self.end_headers()
        drop = st.drop_after.pop(digest, None)
        sent = 0
        step = 16384
        while sent < len(payload):
            piece = payload[sent : sent + step]
            if drop is not None and sent + len(piece) > drop:
                self.wfile.write(payload[sent:drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(piece)
            sent += len(piece)
            if st.slow:
                self.wfile.flush()
                time.sleep(len(piece) / st.slow)

    def upload(self, method: str, repo: str, upload_id: str, query) -> None:
        st = self.st
        if method == "POST":
            mount, source = query.get("mount", [None])[0], query.get("from", [None])[0]
            self.body()
            if mount and source and mount in st.repo_blobs.get(source, set()):
                st.repo_blobs.setdefault(repo, set()).add(mount)
                st.mounts += 1
                return self.send(201, b"", {"Docker-Content-Digest": mount, "Location": f"/v2/{repo}/blobs/{mount}"})
            uid = uuid.uuid4().hex
            st.uploads[uid] = bytearray()
            return self.send(
                202,
                b"",
                {"Location": f"/v2/{repo}/blobs/uploads/{uid}?_state=x", "Range": "0-0", "Docker-Upload-UUID": uid},
            )
        buf = st.uploads.get(upload_id)
        if buf is None:
            return self.error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
        data = self.body()
        if method == "PATCH":
            st.patches += 1
            rng = self.headers.get("Content-Range")
            if rng and int(rng.split("-")[0]) != len(buf):
                return self.error(416, "BLOB_UPLOAD_INVALID", "bad range")
            buf += data
            return self.send(
                202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{upload_id}", "Range": f"0-{len(buf) - 1}"}
            )
        if method == "PUT":
            buf += data
            digest = query.get("digest", [""])[0]
            if sha(bytes(buf)) != digest:
                return self.error(400, "DIGEST_INVALID", "digest mismatch")
            st.blobs[digest] = bytes(buf)
            st.repo_blobs.setdefault(repo, set()).add(digest)
            del st.uploads[upload_id]
            return self.send(201, b"", {"Docker-Content-Digest": digest, "Location": f"/v2/{repo}/blobs/{digest}"})
        self.error(405, "UNSUPPORTED", method)

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")  # send() leaves out bodies, as HTTP requires

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")


class FakeRegistry:
    def __init__(self, auth: str | None = None, users: dict[str, str] | None = None, port: int = 0):
        self.state = State()
        self.state.auth = auth
        self.state.users = dict(users or {})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.state = self.state  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeRegistry":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # seeding ---------------------------------------------------------------------------
    def add_blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        self.state.blobs[digest] = data
        self.state.repo_blobs.setdefault(repo, set()).add(digest)
        return digest

    def add_manifest(
        self,
        repo: str,
        ref: str,
        manifest: dict | bytes,
        media_type: str = "application/vnd.oci.image.manifest.v1+json",
    ) -> str:
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        self.state.manifests[(repo, ref)] = (body, media_type)
        self.state.manifests[(repo, sha(body))] = (body, media_type)
        return sha(body)

    def add_image(
        self, repo: str, tag: str, layers: list[bytes], config: dict | None = None, arch: str = "amd64"
    ) -> dict:
        """Seed an image (layers given as tar bytes, stored uncompressed). Returns the
        digests: {"manifest", "config", "layers"}."""
        layer_digests = [self.add_blob(repo, data) for data in layers]
        cfg = dict(config or {})
        cfg.setdefault("architecture", arch)
        cfg.setdefault("os", "linux")
        cfg["rootfs"] = {"type": "layers", "diff_ids": layer_digests}
        cfg_bytes = json.dumps(cfg).encode()
        cfg_digest = self.add_blob(repo, cfg_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest,
                "size": len(cfg_bytes),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len(data)}
                for d, data in zip(layer_digests, layers, strict=True)
            ],
        }
        digest = (
            self.add_manifest(repo, tag, manifest) if tag else self.add_manifest(repo, "_untagged_" + arch, manifest)
        )
        return {
            "manifest": digest,
            "config": cfg_digest,
            "layers": layer_digests,
            "size": len(json.dumps(manifest).encode()),
        }


def main() -> None:
    """``python -m tests.fakeregistry SEED.json PORTFILE [SLOW_BPS]``: serve the images in
    SEED.json ([{"repo", "tag", "layers": [path...]}]) and write the port to PORTFILE."""
    import sys
    from pathlib import Path

    seed, portfile = sys.argv[1], sys.argv[2]
    reg = FakeRegistry()
    reg.state.slow = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    for image in json.loads(Path(seed).read_text()):
        reg.add_image(image["repo"], image["tag"], [Path(p).read_bytes() for p in image["layers"]])
    Path(portfile + ".tmp").write_text(str(reg.server.server_address[1]))
    Path(portfile + ".tmp").rename(portfile)
    reg.server.serve_forever()


if __name__ == "__main__":
    main()
