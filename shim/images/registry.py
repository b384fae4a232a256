"""A client for the OCI distribution API (``/v2/``), on ``requests``.

One :class:`RegistryClient` per registry endpoint. It handles:

- **transport**: HTTPS with certificate checks; plain HTTP (and HTTPS without checks) only
  for loopback hosts, hosts listed as insecure, or with ``insecure=True``
  (``shim.images.config``). For those it tries HTTPS first and falls back to HTTP.
- **auth**: the ``WWW-Authenticate`` challenge of a 401 decides: ``Bearer`` fetches a token
  from the realm for the scopes needed (``repository:NAME:pull[,push]``), with the stored
  credentials when there are any (anonymous otherwise); ``Basic`` sends the credentials.
  Tokens are cached per scope set for the client's life.
- **retries**: GET/HEAD are retried by urllib3 on connection errors and 429/5xx with
  exponential backoff; a blob download broken mid-stream is resumed with a ``Range``
  request; uploads are retried whole by the caller (:func:`with_retries`), which never
  retries again what urllib3 already retried. Before its first request a client pings
  ``/v2/`` with short timeouts (at most two tries), so a registry that does not answer
  fails within seconds with one line naming it.
- **verification**: manifests are hashed and checked against the digest asked for (or the
  ``Docker-Content-Digest`` the registry announces); blobs stream into an
  :class:`~shim.images.store.Ingest`, which verifies size and digest before the blob
  appears in the store.

Every failure is a RegistryError (the registry or network) or ImageError (the content) with
a one-line message naming the registry and what was asked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from shim.errors import ImageError, RegistryError
from shim.images import config as regconfig
from shim.images.store import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, Ingest, digest_hex

MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
MANIFEST_MAX = 8 << 20
CHUNK = 1 << 20
USER_AGENT = "vmshim/0.1 (+requests)"
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 0.5
DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read
PING_TIMEOUT = (3.0, 3.0)  # connect, read: a registry answers GET /v2/ at once
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_RETRY_STATUS = (429, 500, 502, 503, 504)
_URLLIB3_RETRIES = frozenset({"GET", "HEAD"})  # methods the session's Retry already retries

ProgressFn = Callable[[int], None]
T = TypeVar("T")


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def retry_policy() -> tuple[int, float]:
    """(attempts after the first, backoff factor in seconds): ``VMSHIM_REGISTRY_RETRIES``
    and ``VMSHIM_REGISTRY_BACKOFF`` override the defaults (4, 0.5 s: waits 0.5, 1, 2, 4)."""
    return (
        int(_env_number("VMSHIM_REGISTRY_RETRIES", DEFAULT_RETRIES)),
        _env_number("VMSHIM_REGISTRY_BACKOFF", DEFAULT_BACKOFF),
    )


def _retryable(message: str) -> RegistryError:
    err = RegistryError(message)
    err.retryable = True  # type: ignore[attr-defined]
    return err


def with_retries(fn: Callable[[], T], what: str) -> T:
    """Run ``fn``; when it raises a retryable RegistryError (a connection failure or a 5xx),
    wait (exponential backoff) and run it again, up to the configured attempts."""
    retries, backoff = retry_policy()
    for attempt in range(retries + 1):
        try:
            return fn()
        except RegistryError as e:
            if not getattr(e, "retryable", False) or attempt == retries:
                raise
            time.sleep(min(backoff * (2**attempt), 10.0))
    raise AssertionError("unreachable")  # pragma: no cover


class Cancelled(Exception):
    """A transfer stopped because another one of the same pull failed (internal)."""


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first Bearer or Basic challenge of a ``WWW-Authenticate`` header."""
    header = (header or "").strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return Challenge(scheme, params)


def registry_error_text(resp: requests.Response) -> str:
    """The registry's own words for a failed request (its ``errors`` JSON), shortened."""
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            parts = []
            for e in errors[:3]:
                code = str(e.get("code", "")).strip()
                msg = str(e.get("message", "")).strip()
                parts.append(": ".join(p for p in (code, msg) if p))
            return "; ".join(parts)[:300]
    except ValueError:
        pass
    text = (resp.text or "").strip().replace("\n", " ")
    return text[:200] or resp.reason or ""


class _Body:
    """A file-like upload body with a known length that reports progress as it is read."""

    def __init__(self, f: BinaryIO, length: int, on_bytes: ProgressFn | None):
        self.f, self.length, self.on_bytes = f, length, on_bytes
        self.left = length

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        if self.on_bytes and data:
            self.on_bytes(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk


class RegistryClient:
    """The ``/v2/`` API of one registry. Thread-safe (one HTTP session per thread).

    ``registry`` is as in references (``docker.io``, ``127.0.0.1:5000``); the endpoint
    actually contacted may differ (see ``shim.images.config.endpoint_host``).
    ``credentials`` overrides what ``auth.json`` holds."""

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        credentials: tuple[str, str] | None = None,
        settings: regconfig.RegistrySettings | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    ):
        settings = settings or regconfig.load_settings()
        self.registry = registry
        self.host = regconfig.endpoint_host(registry, settings)
        self.allow_http = regconfig.plain_http_allowed(self.host, insecure, settings)
        self.credentials = credentials if credentials is not None else regconfig.get_credentials(self.host, registry)
        self.timeout = timeout
        self.retries, self.backoff = retry_policy()
        self._base: str | None = None
        self._answered = False
        self._tokens: dict[tuple[str, ...], str] = {}
        self._basic = False
        self._lock = threading.Lock()
        self._local = threading.local()
        if self.allow_http:  # certificate checks are off by request: do not warn each time
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    # -- transport --------------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            retry = Retry(
                total=self.retries,
                connect=self.retries,
                read=self.retries,
                status=self.retries,
                other=0,
                backoff_factor=self.backoff,
                backoff_max=10.0,
                status_forcelist=_RETRY_STATUS,
                allowed_methods=_URLLIB3_RETRIES,
                raise_on_status=False,
                respect_retry_after_header=True,
            )
            adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
            s.mount("https://", adapter)
            s.mount("http://", adapter)
            s.headers["User-Agent"] = USER_AGENT
            s.verify = not self.allow_http
            s.trust_env = False  # no proxies from the environment for registries
            self._local.session = s
        return s

    @property
    def base_url(self) -> str:
        """``https://host`` or, where allowed and HTTPS does not answer, ``http://host``."""
        if self._base is None:
            if not self.allow_http:
                self._base = f"https://{self.host}"
            else:
                self._base = self._probe()
        return self._base

    def _probe(self) -> str:
        """Where plain HTTP is allowed: ``https://host`` if it answers, else ``http://host``
        (which must answer: see :meth:`_ping`)."""
        https = f"https://{self.host}"
        failed = _ping_once(https)
        if failed is None:
            self._answered = True
            return https
        if isinstance(failed, requests.exceptions.SSLError):
            self._answered = True  # something answered, just not TLS
        return f"http://{self.host}"

    def _ping(self, what: str) -> None:
        """Make sure the registry answers ``GET /v2/`` at all (any HTTP status will do),
        trying at most twice with :data:`PING_TIMEOUT`; raise a RegistryError naming it
        otherwise. Where plain HTTP is allowed, the HTTPS probe is the first try."""
        if self._answered:
            return
        tries = 1 if self.allow_http else 2
        failed: requests.RequestException | None = None
        for _ in range(tries):
            failed = _ping_once(self.base_url)
            if failed is None or isinstance(failed, requests.exceptions.SSLError):
                failed = None  # answered (a TLS failure is reported by the request itself)
                break
        if failed is not None:
            raise RegistryError(
                f"{what}: registry {self.host} does not answer at "
                f"{self.base_url}/v2/ ({_reason(failed)}); is it running "
                "and is the address right?"
            )
        self._answered = True

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return self.base_url + path_or_url

    # -- auth -----------------------------------------------------------------------------
    def _auth_header(self, scopes: tuple[str, ...]) -> dict[str, str]:
        with self._lock:
            if self._basic and self.credentials:
                return {"Authorization": _basic_header(*self.credentials)}
            token = self._tokens.get(scopes)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _authenticate(self, challenge: Challenge | None, scopes: tuple[str, ...], what: str) -> None:
        if challenge is None:
            raise RegistryError(
                f"{what}: registry {self.host} answered 401 without a usable WWW-Authenticate challenge"
            )
        if challenge.scheme == "basic":
            if not self.credentials:
                raise RegistryError(
                    f"{what}: registry {self.host} requires authentication; run 'vmshim login {self.registry}'"
                )
            with self._lock:
                self._basic = True
            return
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"{what}: registry {self.host} sent a Bearer challenge without a realm")
        realm_url = urllib.parse.urlsplit(realm)
        if realm_url.scheme not in ("https", "http") or not realm_url.netloc:
            raise RegistryError(f"{what}: registry {self.host} sent an invalid token realm {realm!r}")
        if realm_url.scheme == "http" and not regconfig.plain_http_allowed(realm_url.netloc, self.allow_http):
            raise RegistryError(
                f"{what}: registry {self.host} wants tokens from {realm} "
                "over plain HTTP; refused (use --insecure if you trust it)"
            )
        wanted = list(scopes)
        if challenge.params.get("scope"):
            for scope in challenge.params["scope"].split(" "):
                if scope and scope not in wanted:
                    wanted.append(scope)
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params.extend(("scope", s) for s in wanted)
        if self.credentials:
            params.append(("account", self.credentials[0]))
        auth = self.credentials if self.credentials else None
        try:
            resp = self._session().get(
                realm, params=params, auth=auth, timeout=self.timeout, verify=not self.allow_http
            )
        except requests.RequestException as e:
            raise _retryable(f"{what}: cannot get a token from {realm}: {_reason(e)}") from None
        if resp.status_code in (401, 403):
            hint = (
                f"check the credentials ('vmshim login {self.registry}')"
                if self.credentials
                else f"run 'vmshim login {self.registry}'"
            )
            raise RegistryError(
                f"{what}: {realm} refused to issue a token ({resp.status_code} {registry_error_text(resp)}); {hint}"
            )
        if resp.status_code != 200:
            raise _retryable_if(resp, f"{what}: token request to {realm} failed")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{what}: {realm} answered without a token")
        with self._lock:
            self._tokens[scopes] = token

    # -- requests -------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        scopes: tuple[str, ...],
        what: str,
        headers: dict[str, str] | None = None,
        body: Callable[[], bytes | _Body] | None = None,
        stream: bool = False,
        params: dict | None = None,
        allow_redirects: bool = True,
    ) -> requests.Response:
        """Send a request, answering one 401 challenge. ``body`` is a callable returning
        a fresh body (so the request can be re-sent after authenticating). Connection
        failures raise a retryable RegistryError; HTTP errors are returned for the caller."""
        scopes = tuple(sorted(set(scopes)))
        self._ping(what)
        retried = method in _URLLIB3_RETRIES  # urllib3 retried it: no second round on top
        for attempt in (0, 1):
            h = {**(headers or {}), **self._auth_header(scopes)}
            try:
                resp = self._session().request(
                    method,
                    self._url(path_or_url),
                    headers=h,
                    params=params,
                    data=body() if body is not None else None,
                    stream=stream,
                    timeout=self.timeout,
                    allow_redirects=allow_redirects,
                )
            except requests.exceptions.SSLError as e:
                raise RegistryError(
                    f"{what}: TLS with {self.host} failed: {_reason(e)} (a "
                    "plain-HTTP registry needs --insecure or an "
                    "insecure_registries entry)"
                ) from None
            except requests.RequestException as e:
                message = f"{what}: cannot reach registry {self.host}: {_reason(e)}"
                raise (RegistryError(message) if retried else _retryable(message)) from None
            if resp.status_code != 401 or attempt == 1:
                return resp
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            self._authenticate(challenge, scopes, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fail(self, resp: requests.Response, what: str) -> RegistryError:
        text = registry_error_text(resp)
        if resp.status_code == 401:
            hint = "check the credentials" if self.credentials else f"run 'vmshim login {self.registry}'"
            return RegistryError(f"{what}: unauthorized ({text}); {hint}")
        if resp.status_code == 403:
            return RegistryError(f"{what}: access denied by {self.host} ({text})")
        return _retryable_if(resp, what)

    # -- API ------------------------------------------------------------------------------
    def login_check(self) -> None:
        """Verify the credentials: a registry with bearer auth only asks for them when a
        token is requested, so request one (no scope) even if /v2/ did not challenge."""
        what = f"logging in to {self.host}"
        resp = self.request("GET", "/v2/", scopes=(), what=what)
        if resp.status_code >= 400:
            raise self._fail(resp, what)

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index, by tag or digest. The digest
        is verified: against ``reference`` if it is one, else against the registry's
        ``Docker-Content-Digest`` when it sends one."""
        what = f"fetching manifest {self.registry}/{repository}:{reference}".replace(":sha256:", "@sha256:")
        resp = self.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(f"repository:{repository}:pull",),
            what=what,
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        try:
            if resp.status_code == 404:
                raise RegistryError(f"{what}: not found ({registry_error_text(resp)})")
            if resp.status_code != 200:
                raise self._fail(resp, what)
            body = _read_capped(resp, MANIFEST_MAX, what)
        finally:
            resp.close()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:"):
            if digest != reference:
                raise ImageError(f"digest mismatch: manifest {reference} from {self.host} has digest {digest}; refused")
        else:
            announced = resp.headers.get("Docker-Content-Digest", "")
            if announced.startswith("sha256:") and announced != digest:
                raise ImageError(
                    f"digest mismatch: {what} announced {announced} but the content has digest {digest}; refused"
                )
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            declared = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            raise ImageError(f"{what}: the manifest is not a JSON object") from None
        return body, declared or media_type, digest

    def blob_exists(self, repository: str, digest: str, scopes: tuple[str, ...] = ()) -> bool:
        what = f"checking blob {digest[:19]} in {self.host}/{repository}"
        resp = self.request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", scopes=scopes or (f"repository:{repository}:pull",), what=what
        )
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._fail(resp, what)

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        ingest: Ingest,
        on_bytes: ProgressFn | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        """Download a blob into ``ingest`` (resuming from its offset), then commit it
        (verified). Breaks mid-stream are resumed with ``Range`` up to the retry limit."""
        what = f"fetching blob {digest[:19]} from {self.host}/{repository}"
        scopes = (f"repository:{repository}:pull",)
        attempt = 0
        if on_bytes and ingest.offset:
            on_bytes(ingest.offset)
        while True:
            headers = {"Accept-Encoding": "identity"}
            start = ingest.offset
            if start:
                headers["Range"] = f"bytes={start}-"
            try:
                resp = self.request(
                    "GET", f"/v2/{repository}/blobs/{digest}", scopes=scopes, what=what, headers=headers, stream=True
                )
                try:
                    if resp.status_code == 416 and start:
                        ingest.reset()
                        if on_bytes:
                            on_bytes(-start)
                        continue
                    if resp.status_code == 404:
                        raise RegistryError(f"{what}: blob unknown to the registry ({registry_error_text(resp)})")
                    if resp.status_code not in (200, 206):
                        raise self._fail(resp, what)
                    if start and resp.status_code == 200:  # the server ignored Range
                        ingest.reset()
                        if on_bytes:
                            on_bytes(-start)
                    elif resp.status_code == 206 and not _range_starts_at(resp, start):
                        raise _retryable(f"{what}: the registry answered a range request with the wrong range")
                    for chunk in resp.raw.stream(CHUNK, decode_content=False):
                        if cancelled is not None and cancelled.is_set():
                            raise Cancelled(what)
                        ingest.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                finally:
                    resp.close()
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                err = _retryable(f"{what}: connection broke after {ingest.offset} bytes: {_reason(e)}")
            except RegistryError as e:
                err = e
            else:
                if ingest.size is None or ingest.offset >= ingest.size:
                    ingest.commit()
                    return
                err = _retryable(f"{what}: the connection closed after {ingest.offset} of {ingest.size} bytes")
            if not getattr(err, "retryable", False) or attempt >= self.retries:
                raise err
            time.sleep(min(self.backoff * (2**attempt), 10.0))
            attempt += 1

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> str | None:
        """Ask the registry to mount ``digest`` from another repository. Returns None when
        mounted, else the upload URL the registry opened instead."""
        what = f"mounting blob {digest[:19]} from {from_repository} into {repository}"
        resp = self.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scopes=(f"repository:{repository}:pull,push", f"repository:{from_repository}:pull"),
            what=what,
            params={"mount": digest, "from": from_repository},
            body=lambda: b"",
            headers={"Content-Length": "0"},
        )
        resp.close()
        if resp.status_code == 201:
            return None
        if resp.status_code == 202 and resp.headers.get("Location"):
            return urllib.parse.urljoin(self.base_url + "/", resp.headers["Location"])
        raise self._fail(resp, what)

    def start_upload(self, repository: str) -> str:
        what = f"starting an upload to {self.host}/{repository}"
        resp = self.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scopes=(f"repository:{repository}:pull,push",),
            what=what,
            body=lambda: b"",
            headers={"Content-Length": "0"},
        )
        resp.close()
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise self._fail(resp, what)
        return urllib.parse.urljoin(self.base_url + "/", resp.headers["Location"])

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        open_blob: Callable[[], BinaryIO],
        *,
        location: str | None = None,
        chunk_size: int = 0,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        """Upload a blob: monolithic (one PUT) when ``chunk_size`` is 0 or the blob fits in
        one chunk, else chunked (PATCH per chunk, then PUT). ``location`` is an upload
        already opened (by a refused mount). The registry's digest must match."""
        what = f"uploading blob {digest[:19]} to {self.host}/{repository}"
        scopes = (f"repository:{repository}:pull,push",)
        location = location or self.start_upload(repository)
        with open_blob() as f:
            if chunk_size and size > chunk_size:
                offset = 0
                while offset < size:
                    n = min(chunk_size, size - offset)
                    f.seek(offset)
                    start = offset
                    resp = self.request(
                        "PATCH",
                        location,
                        scopes=scopes,
                        what=what,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(n),
                            "Content-Range": f"{start}-{start + n - 1}",
                        },
                        body=functools.partial(_rewound, f, start, n, on_bytes),
                    )
                    resp.close()
                    if resp.status_code != 202 or not resp.headers.get("Location"):
                        raise self._fail(resp, what)
                    location = urllib.parse.urljoin(self.base_url + "/", resp.headers["Location"])
                    offset += n
                resp = self.request(
                    "PUT",
                    _with_query(location, digest=digest),
                    scopes=scopes,
                    what=what,
                    body=lambda: b"",
                    headers={"Content-Length": "0"},
                )
            else:
                resp = self.request(
                    "PUT",
                    _with_query(location, digest=digest),
                    scopes=scopes,
                    what=what,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    body=lambda: _rewound(f, 0, size, on_bytes),
                )
        resp.close()
        if resp.status_code not in (201, 204):
            raise self._fail(resp, what)
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced != digest:
            raise ImageError(f"{what}: the registry stored digest {announced}, expected {digest}")

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; returns its digest (checked against the
        registry's ``Docker-Content-Digest``)."""
        what = f"pushing manifest {self.registry}/{repository}:{reference}"
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        resp = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(f"repository:{repository}:pull,push",),
            what=what,
            headers={"Content-Type": media_type},
            body=lambda: body,
        )
        resp.close()
        if resp.status_code not in (200, 201, 202):
            raise self._fail(resp, what)
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced != digest:
            raise ImageError(f"{what}: the registry recorded digest {announced}, expected {digest}")
        return digest


def _rewound(f: BinaryIO, offset: int, length: int, on_bytes: ProgressFn | None) -> _Body:
    f.seek(offset)
    return _Body(f, length, on_bytes)


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k not in params] + list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _range_starts_at(resp: requests.Response, start: int) -> bool:
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return m is not None and int(m.group(1)) == start


def _read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    try:
        for chunk in resp.iter_content(65536):
            data += chunk
            if len(data) > limit:
                raise ImageError(f"{what}: the manifest is larger than {limit} bytes; refused")
    except requests.RequestException as e:
        raise _retryable(f"{what}: connection broke: {_reason(e)}") from None
    return bytes(data)


def _basic_header(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _ping_once(base: str) -> requests.RequestException | None:
    """GET ``base/v2/`` once with :data:`PING_TIMEOUT`: None when anything answered (an
    HTTP status), else the failure (an SSLError when something answered without TLS)."""
    try:
        with requests.Session() as s:
            s.trust_env = False
            s.get(base + "/v2/", timeout=PING_TIMEOUT, verify=False, allow_redirects=False).close()
    except requests.RequestException as e:
        return e
    return None


def _retryable_if(resp: requests.Response, what: str) -> RegistryError:
    message = f"{what}: {resp.status_code} {registry_error_text(resp)}".rstrip()
    if resp.status_code in _RETRY_STATUS and resp.request.method not in _URLLIB3_RETRIES:
        return _retryable(message)
    return RegistryError(message)


def _reason(exc: BaseException) -> str:
    """A short reason for a requests/urllib3 exception (their text nests several levels)."""
    seen = exc
    while True:
        inner = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        inner = inner or getattr(seen, "reason", None)
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    text = str(seen) or type(seen).__name__
    text = re.sub(r"<urllib3\.[^>]*>:\s*", "", text)
    text = re.sub(r"HTTPS?Connection(Pool)?\([^)]*\):\s*", "", text)
    return text[:200]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


__all__ = [
    "RegistryClient",
    "Challenge",
    "parse_challenge",
    "with_retries",
    "digest_of",
    "MANIFEST_ACCEPT",
    "digest_hex",
]
