"""HTTP client of the fleet gateway (``docs/fleet-api.md``): enroll, refresh, upload, heartbeat,
the two model-rollout reads (``get_manifest`` with ``If-None-Match``, ``stream_model`` with
``Range``) the updater (``edge_agent.updater``) uses, and the camera's configuration
(``get_camera_config`` with ``If-None-Match``, for ``edge_agent.camera_config``).

The device identity (device id, access and refresh tokens, their expiry) is persisted in
``<state_dir>/identity.json`` with mode 0600, written atomically (temp file + ``os.replace``),
so a restarted agent keeps its identity and the one-time enrollment token is needed once.
The access token is refreshed shortly before it expires (``refresh_margin_s``, at most a tenth
of its lifetime) and again on a 401; refresh tokens
rotate, so the new pair is persisted before it is used.

Outcomes the caller acts on (``UploadOutcome.kind``):

* ``stored`` — 201; ``duplicate`` — 409 (already stored: also an acknowledgement);
* ``retry`` — network error, timeout, 5xx, 429 (``retry_after`` from the header), 401 that
  a refresh could not fix, 403 (device not active): keep the frame, try later;
* ``rejected`` — any other 4xx (bad metadata, too large…): retrying cannot help.

Batches (``upload_frames``, ``POST /v1/frames/batch``, the raw envelope of
``docs/fleet-api.md`` "Batched frame uploads"): one ``UploadOutcome`` per frame from the
response's per-frame status (201/409 acknowledge, 403/413/422 reject, 429/503/507 retry), or a
whole-request ``BatchOutcome.kind``: ``retry`` (network, 5xx, 429, 401 after a refresh, 403),
``unsupported`` (404/405/415: a gateway without the route) or ``refused`` (any other 4xx:
send the frames one by one instead).
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from edge_agent.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
BATCH_ROUTE = "/v1/frames/batch"
BATCH_CONTENT_TYPE = "application/vnd.roadloop.frame-batch"
# Per-frame statuses inside a batch response (the codes POST /v1/frames gives one frame).
_BATCH_ACK = {201: "stored", 409: "duplicate"}
_BATCH_REJECT = frozenset({403, 413, 422})
_BATCH_RETRY = frozenset({429, 503, 507})


class GatewayError(RuntimeError):
    """A gateway call failed in a way the caller must hear about (message says what to do)."""


class EnrollmentError(GatewayError):
    """Enrollment was refused (bad, used or expired token; wrong camera)."""


class AuthError(GatewayError):
    """The device cannot authenticate any more (refresh token revoked or expired)."""


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached or answered 5xx; try again later."""


@dataclass
class DeviceIdentity:
    """What enrollment returned, persisted in the state dir (0600)."""

    device_id: str
    camera_id: str
    gateway_url: str
    access_token: str
    refresh_token: str
    expires_at: float  # unix time the access token expires
    scopes: list[str] = field(default_factory=list)
    enrolled_at: float = field(default_factory=time.time)
    gateway_public_key: str | None = None
    ttl_s: float = 3600.0  # lifetime of the access token as issued
    # Ed25519 key that signs model manifests (base64 raw), pinned at enrollment.
    model_public_key: str | None = None

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        target = state_dir / IDENTITY_FILE
        write_text_atomic(target, json.dumps(asdict(self), indent=2), mode=0o600)
        return target

    @classmethod
    def load(cls, state_dir: Path) -> DeviceIdentity | None:
        path = state_dir / IDENTITY_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except (OSError, ValueError, TypeError) as exc:
            raise GatewayError(
                f"{path}: unreadable device identity ({exc}); move it away and enroll again"
            ) from exc


@dataclass(frozen=True)
class ManifestPoll:
    """One conditional GET (``/v1/manifest``, a camera's config): 200 with a body and an
    ETag, or 304 (unchanged)."""

    status_code: int
    etag: str | None = None
    body: dict[str, Any] | None = None

    @property
    def changed(self) -> bool:
        return self.status_code == 200


@dataclass(frozen=True)
class UploadOutcome:
    kind: str  # stored | duplicate | retry | rejected
    status_code: int | None = None
    detail: str = ""
    retry_after: float | None = None

    @property
    def acknowledged(self) -> bool:
        return self.kind in ("stored", "duplicate")


@dataclass(frozen=True)
class BatchOutcome:
    """What one ``POST /v1/frames/batch`` came to.

    ``kind``: ``results`` (the envelope was taken: ``results`` holds one outcome per frame, in
    request order), ``retry`` (the whole request failed transiently: ``results`` holds the same
    retry outcome for every frame), ``unsupported`` (404/405/415: the gateway has no batch
    route) or ``refused`` (another whole-request 4xx, e.g. 413 over the gateway's batch size:
    nothing was stored; send these frames one by one). ``results`` is empty for the last two.
    """

    kind: str
    results: tuple[UploadOutcome, ...] = ()
    status_code: int | None = None
    detail: str = ""
    retry_after: float | None = None
    body_bytes: int = 0  # size of the request body sent


def encode_frame_batch(items: Sequence[tuple[bytes, Mapping[str, Any]]]) -> bytes:
    """The batch envelope: a 4-byte big-endian manifest length, the JSON manifest
    ``{"frames": [{"metadata": ..., "image_bytes": n}, ...]}``, then the JPEGs in order."""
    manifest = json.dumps(
        {"frames": [{"metadata": dict(meta), "image_bytes": len(jpeg)} for jpeg, meta in items]},
        separators=(",", ":"),
    ).encode("utf-8")
    return b"".join([struct.pack(">I", len(manifest)), manifest, *(jpeg for jpeg, _ in items)])


def _frame_outcome(entry: Any, retry_after: float | None) -> UploadOutcome:
    """One entry of a batch response's ``results`` as the single route's outcome."""
    code = entry.get("status")
    detail = str(entry.get("detail") or "")
    if not isinstance(code, int) or isinstance(code, bool):
        return UploadOutcome("retry", None, f"batch result without a status: {entry!r}"[:300])
    if code in _BATCH_ACK:
        return UploadOutcome(_BATCH_ACK[code], code, detail)
    if code in _BATCH_REJECT:
        return UploadOutcome("rejected", code, detail)
    if code in _BATCH_RETRY or code in (401, 408, 425) or code >= 500:
        return UploadOutcome("retry", code, detail, retry_after)
    if 200 <= code < 300:
        return UploadOutcome("stored", code, detail)
    return UploadOutcome("rejected", code, detail)


def _retry_later(code: int) -> bool:
    """A whole request's status that means "not now, try again" (not "never")."""
    return code in (401, 403, 408, 425, 429) or code >= 500


def _response_or_retry(call: Callable[[], httpx.Response]) -> httpx.Response | UploadOutcome:
    """``call()``'s response, or the retry outcome of a request that never got one."""
    try:
        return call()
    except httpx.HTTPError as exc:
        return UploadOutcome("retry", None, f"{type(exc).__name__}: {exc}")
    except GatewayUnavailable as exc:
        return UploadOutcome("retry", None, str(exc))
    except AuthError as exc:
        return UploadOutcome("retry", 401, str(exc))


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    return resp.text[:300]


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class GatewayClient:
    """One device's session with the gateway. Thread-safe (token refresh is serialised)."""

    def __init__(
        self,
        gateway_url: str,
        state_dir: Path | str,
        *,
        timeout_s: float = 10.0,
        refresh_margin_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.state_dir = Path(state_dir)
        self.refresh_margin_s = refresh_margin_s
        self._http = httpx.Client(base_url=self.gateway_url, timeout=timeout_s, transport=transport)
        self._lock = threading.RLock()
        self.identity = DeviceIdentity.load(self.state_dir)

    # ------------------------------------------------------------------ enrollment
    @property
    def enrolled(self) -> bool:
        return self.identity is not None

    def enroll(
        self,
        enrollment_token: str,
        camera_id: str,
        agent_version: str,
        hardware: dict[str, Any] | None = None,
    ) -> DeviceIdentity:
        """Trade the one-time token for a device identity and persist it."""
        body = {
            "enrollment_token": enrollment_token,
            "camera_id": camera_id,
            "agent_version": agent_version,
            "hardware": hardware or {},
        }
        try:
            resp = self._http.post("/v1/enroll", json=body)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"cannot reach {self.gateway_url} to enroll: {exc}") from exc
        if resp.status_code >= 500:
            raise GatewayUnavailable(
                f"enrollment: gateway answered {resp.status_code}: {_detail(resp)}"
            )
        if resp.status_code != 201:
            raise EnrollmentError(
                f"enrollment refused by {self.gateway_url} ({resp.status_code}): {_detail(resp)}"
            )
        data = resp.json()
        identity = DeviceIdentity(
            device_id=str(data["device_id"]),
            camera_id=camera_id,
            gateway_url=self.gateway_url,
            access_token=data["access_token"],
            refresh_token=data["refresh_token"],
            expires_at=time.time() + float(data.get("expires_in", 3600)),
            scopes=list(data.get("scopes") or []),
            gateway_public_key=data.get("gateway_public_key"),
            ttl_s=float(data.get("expires_in", 3600)),
            model_public_key=data.get("model_public_key"),
        )
        with self._lock:
            identity.save(self.state_dir)
            self.identity = identity
        logger.info("enrolled camera %s as device %s", camera_id, identity.device_id)
        return identity

    def ensure_enrolled(
        self,
        camera_id: str,
        enrollment_token: str | None,
        agent_version: str,
        hardware: dict[str, Any] | None = None,
    ) -> DeviceIdentity:
        """The saved identity if it matches this camera and gateway, else enroll."""
        ident = self.identity
        if ident is not None:
            if ident.camera_id != camera_id or ident.gateway_url.rstrip("/") != self.gateway_url:
                raise GatewayError(
                    f"{self.state_dir / IDENTITY_FILE}: this state dir is enrolled as camera "
                    f"{ident.camera_id!r} at {ident.gateway_url}; use another --state-dir for "
                    f"camera {camera_id!r} at {self.gateway_url}"
                )
            return ident
        if not enrollment_token:
            raise EnrollmentError(
                f"no device identity in {self.state_dir}; pass --enroll-token (from "
                "`roadloop fleet token create`) to enroll this camera"
            )
        return self.enroll(enrollment_token, camera_id, agent_version, hardware)

    # ------------------------------------------------------------------ tokens
    def refresh(self) -> None:
        """Rotate the token pair (persisted before use). Raises ``AuthError`` when refused."""
        with self._lock:
            ident = self._require_identity()
            try:
                resp = self._http.post(
                    "/v1/token/refresh", json={"refresh_token": ident.refresh_token}
                )
            except httpx.HTTPError as exc:
                raise GatewayUnavailable(
                    f"token refresh: cannot reach {self.gateway_url}: {exc}"
                ) from exc
            if resp.status_code >= 500:
                raise GatewayUnavailable(f"token refresh: gateway answered {resp.status_code}")
            if resp.status_code != 200:
                raise AuthError(
                    f"token refresh refused ({resp.status_code}: {_detail(resp)}); the device was "
                    f"probably revoked — enroll again with a new token and a fresh state dir"
                )
            data = resp.json()
            ident.access_token = data["access_token"]
            ident.refresh_token = data["refresh_token"]
            ident.expires_at = time.time() + float(data.get("expires_in", 3600))
            ident.ttl_s = float(data.get("expires_in", 3600))
            ident.save(self.state_dir)
            logger.info("access token refreshed (expires in %ss)", data.get("expires_in"))

    def _require_identity(self) -> DeviceIdentity:
        if self.identity is None:
            raise GatewayError("the device is not enrolled")
        return self.identity

    def _auth_headers(self) -> dict[str, str]:
        with self._lock:
            ident = self._require_identity()
            margin = min(self.refresh_margin_s, 0.1 * ident.ttl_s)
            if ident.expires_at - time.time() < margin:
                self.refresh()
            return {"Authorization": f"Bearer {ident.access_token}"}

    def _send(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """An authorised request; on 401 refresh once and retry."""
        extra = headers or {}
        token_used = self._require_identity().access_token
        resp = self._http.request(method, url, headers={**self._auth_headers(), **extra}, **kwargs)
        if resp.status_code == 401:
            with self._lock:
                if self._require_identity().access_token == token_used:
                    self.refresh()  # nobody else refreshed meanwhile
            resp = self._http.request(
                method, url, headers={**self._auth_headers(), **extra}, **kwargs
            )
        return resp

    # ------------------------------------------------------------------ calls
    def upload_frame(self, jpeg: bytes, metadata: dict[str, Any]) -> UploadOutcome:
        """``POST /v1/frames`` (multipart ``image`` + ``metadata``); never raises on HTTP errors."""
        files = {
            "image": (f"{metadata.get('frame_id', 'frame')}.jpg", jpeg, "image/jpeg"),
            "metadata": (None, json.dumps(metadata), "application/json"),
        }
        return self._outcome(lambda: self._send("POST", "/v1/frames", files=files), expect=201)

    def upload_frames(
        self, items: Sequence[tuple[bytes, Mapping[str, Any]]]
    ) -> BatchOutcome:
        """``POST /v1/frames/batch`` with ``(jpeg, metadata)`` pairs; never raises on HTTP
        errors (see ``BatchOutcome``). A 401 refreshes the token once, as ``upload_frame``."""
        body = encode_frame_batch(items)
        n = len(items)

        def every(outcome: UploadOutcome) -> BatchOutcome:
            return BatchOutcome("retry", (outcome,) * n, outcome.status_code, outcome.detail,
                                outcome.retry_after, len(body))

        headers = {"Content-Type": BATCH_CONTENT_TYPE}
        resp = _response_or_retry(
            lambda: self._send("POST", BATCH_ROUTE, content=body, headers=headers))
        if isinstance(resp, UploadOutcome):
            return every(resp)
        code = resp.status_code
        if code in (404, 405, 415):
            return BatchOutcome("unsupported", (), code, _detail(resp), None, len(body))
        if _retry_later(code):
            return every(UploadOutcome("retry", code, _detail(resp), _retry_after(resp)))
        if code != 200:
            return BatchOutcome("refused", (), code, _detail(resp), None, len(body))
        try:
            entries = resp.json()["results"]
            if not isinstance(entries, list) or len(entries) != n:
                raise ValueError(f"{n} frames sent, results: {str(entries)[:200]}")
            for entry, (_, meta) in zip(entries, items, strict=True):
                if not isinstance(entry, dict):
                    raise TypeError(f"a result is not an object: {entry!r}")
                fid = entry.get("frame_id")
                if fid is not None and fid != meta.get("frame_id"):
                    raise ValueError(f"result for {fid!r} where {meta.get('frame_id')!r} was sent")
        except (ValueError, KeyError, TypeError) as exc:
            # Frames may be stored: a resend is answered 409, which acknowledges them.
            return every(UploadOutcome("retry", code, f"unreadable batch response: {exc}"[:300]))
        retry_after = _retry_after(resp)
        return BatchOutcome("results", tuple(_frame_outcome(e, retry_after) for e in entries),
                            code, "", retry_after, len(body))

    def post_heartbeat(self, heartbeat_json: str) -> UploadOutcome:
        """``POST /v1/heartbeats`` with a ``Heartbeat.to_json()`` body."""
        return self._outcome(lambda: self._send_json("/v1/heartbeats", heartbeat_json), expect=202)

    def post_traffic_interval(self, record_json: str) -> UploadOutcome:
        """``POST /v1/traffic/intervals`` with one interval record (``edge_agent.traffic``):
        201 stored, 409 already stored (the same ``record_id``) — both acknowledge it."""
        return self._outcome(
            lambda: self._send_json("/v1/traffic/intervals", record_json), expect=201)

    def _send_json(self, url: str, body: str) -> httpx.Response:
        token_used = self._require_identity().access_token
        headers = {**self._auth_headers(), "Content-Type": "application/json"}
        resp = self._http.post(url, content=body.encode("utf-8"), headers=headers)
        if resp.status_code == 401:
            with self._lock:
                if self._require_identity().access_token == token_used:
                    self.refresh()
            headers = {**self._auth_headers(), "Content-Type": "application/json"}
            resp = self._http.post(url, content=body.encode("utf-8"), headers=headers)
        return resp

    def _outcome(self, call, *, expect: int) -> UploadOutcome:
        resp = _response_or_retry(call)
        if isinstance(resp, UploadOutcome):
            return resp
        code = resp.status_code
        if code in (expect, 200, 201, 202):
            return UploadOutcome("stored", code)
        if code == 409:
            return UploadOutcome("duplicate", code, _detail(resp))
        if _retry_later(code):
            return UploadOutcome("retry", code, _detail(resp), _retry_after(resp))
        return UploadOutcome("rejected", code, _detail(resp))

    # ------------------------------------------------------------------ model rollouts
    def get_manifest(self, etag: str | None = None) -> ManifestPoll:
        """``GET /v1/manifest`` (``If-None-Match: etag``). Raises ``GatewayUnavailable`` when the
        gateway cannot answer now, ``GatewayError`` for any other refusal (message says why)."""
        return self._conditional_get(
            "/v1/manifest", etag, "manifest",
            "the device needs scope camera:read and status active to receive model updates")

    def get_camera_config(self, etag: str | None = None) -> ManifestPoll:
        """``GET /v1/cameras/{camera_id}/config`` of this device's camera (``If-None-Match:
        etag``); errors as ``get_manifest``."""
        camera = quote(self._require_identity().camera_id, safe="")
        return self._conditional_get(
            f"/v1/cameras/{camera}/config", etag, "camera config",
            "a device reads its own camera's configuration only")

    def _conditional_get(self, url: str, etag: str | None, what: str,
                         forbidden_hint: str) -> ManifestPoll:
        headers = {"If-None-Match": etag} if etag else {}
        try:
            resp = self._send("GET", url, headers=headers)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"{what}: cannot reach {self.gateway_url}: {exc}") from exc
        code = resp.status_code
        if code == 304:
            return ManifestPoll(304, etag)
        if code >= 500 or code == 429:
            raise GatewayUnavailable(f"{what}: gateway answered {code}: {_detail(resp)}")
        if code == 403:
            raise GatewayError(f"{what} refused (403: {_detail(resp)}); {forbidden_hint}")
        if code != 200:
            raise GatewayError(f"{what}: gateway answered {code}: {_detail(resp)}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise GatewayError(f"{what}: the answer is not JSON: {resp.text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise GatewayError(f"{what}: expected a JSON object, got {type(body).__name__}")
        return ManifestPoll(200, resp.headers.get("ETag"), body)

    @contextlib.contextmanager
    def stream_model(self, sha256: str, offset: int = 0) -> Iterator[httpx.Response]:
        """``GET /v1/models/{sha256}`` as a streamed response, from byte ``offset`` (``Range``).

        The caller checks the status (206 resumed, 200 whole file) and reads ``iter_bytes()``;
        network errors surface as ``httpx.HTTPError`` (while reading) or ``GatewayUnavailable``.
        """

        def open_() -> httpx.Response:
            headers = self._auth_headers()
            if offset > 0:
                headers["Range"] = f"bytes={offset}-"
            req = self._http.build_request("GET", f"/v1/models/{sha256}", headers=headers)
            return self._http.send(req, stream=True)

        token_used = self._require_identity().access_token
        try:
            resp = open_()
            if resp.status_code == 401:
                resp.close()
                with self._lock:
                    if self._require_identity().access_token == token_used:
                        self.refresh()
                resp = open_()
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(
                f"model download: cannot reach {self.gateway_url}: {exc}"
            ) from exc
        try:
            yield resp
        finally:
            resp.close()

    def healthz(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()
