"""HTTP client of the fleet gateway (``docs/fleet-api.md``): enroll, refresh, upload, heartbeat,
the two model-rollout reads (``get_manifest`` with ``If-None-Match``, ``stream_model`` with
``Range``) the updater (``edge_agent.updater``) uses, and the camera's configuration
(``get_camera_config`` with ``If-None-Match``, for ``edge_agent.camera_config``).

The device identity (``edge_agent.identity``) is persisted in the state dir, so a restarted
agent keeps it and the one-time enrollment token is needed once. The access token is refreshed
shortly before it expires (``refresh_margin_s``, at most a tenth of its lifetime) and again on a
401; refresh tokens rotate, so the new pair is saved (with a directory fsync) as soon as it
arrives; a save that fails (disk full) is logged and retried before each authorised request, the
pair kept in memory meanwhile (the gateway has already rotated the old one away). An early
refresh that fails transiently (the route busy: 429, 5xx) does not hold a request whose access
token is still valid. ``/v1/enroll`` and ``/v1/token/refresh`` answered 408/425/429 or 5xx (or,
for a refresh, anything but 200 and the other 4xx) raise ``GatewayUnavailable`` with the
answer's ``retry_after``: busy is not a refusal (``EnrollmentError``) nor a revoked device
(``AuthError``). No message quotes a credential answer's bytes (``edge_agent.gateway_answers``).

Outcomes the caller acts on (``UploadOutcome.kind``):

* ``stored`` — the route's success status (201; 202 for heartbeats) and nothing else;
  ``duplicate`` — 409 (already stored: also an acknowledgement);
* ``retry`` — network error, timeout, 5xx, 429 (``retry_after`` from the header, delta-seconds
  or an HTTP-date, at most ``MAX_RETRY_AFTER_S``), 401 that a refresh could not fix, 403
  (device not active), an answer that cannot be read (a token refresh answered with garbage,
  a body the JSON parser gives up on), and any status outside the contract (1xx, 3xx — a
  redirect is not followed —, another 2xx such as a proxy's 200 page): keep the frame, try
  later;
* ``rejected`` — any other 4xx (bad metadata, too large…): retrying cannot help.

Batches (``upload_frames``, ``POST /v1/frames/batch``, the raw envelope of
``docs/fleet-api.md`` "Batched frame uploads"): one ``UploadOutcome`` per frame from the
response's per-frame status (201/409 acknowledge, 403/410/413/422 and other 4xx reject,
429/503/507 and anything outside the contract — 0, negative, 1xx, 2xx other than 201, 3xx —
retry), or a whole-request ``BatchOutcome.kind``: ``retry`` (network, 5xx, 429, 401 after a
refresh, 403, an unreadable 200, a status other than 200 outside 4xx), ``unsupported``
(404/405/415: a gateway without the route) or ``refused`` (any other 4xx: send the frames
one by one instead).

Every answer is read streamed, capped in size and within the request's deadline
(``edge_agent.http_deadline``: ``MAX_RESPONSE_BYTES``, ``DEADLINE_TIMEOUTS``, the proxies the
environment names honoured): an answer over either is an unreadable answer
(``GatewayUnavailable``, so ``retry``). Model downloads (``stream_model``) are the exception:
their headers meet that deadline, their body is the caller's to read and bound.

No call here raises on what the gateway answers: ``upload_frame``, ``upload_frames``,
``post_heartbeat`` and ``post_traffic_interval`` turn every unreadable or unexpected answer
into ``retry``, so that no frame is dropped without the gateway's acknowledgement or refusal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from edge_agent.errors import (
    AuthError,
    EnrollmentError,
    GatewayError,
    GatewayUnavailable,
)
from edge_agent.gateway_answers import (
    _UNREADABLE,
    _detail,
    _enrollment_answer,
    _not_now,
    _retry_after,
    _retry_later,
    _token_pair,
    _unexpected,
)
from edge_agent.http_deadline import (
    DEADLINE_TIMEOUTS,
    MAX_RESPONSE_BYTES,
    AnswerTooLarge,
    AnswerTooSlow,
    _BoundedClient,
    read_capped,
    request_budget,
)
from edge_agent.identity import IDENTITY_FILE, DeviceIdentity

logger = logging.getLogger(__name__)

# URL patterns sent directly, never through the environment's proxies (``GatewayClient``).
LOOPBACK_MOUNTS = ("all://127.0.0.1", "all://localhost", "all://[::1]")
BATCH_ROUTE = "/v1/frames/batch"
BATCH_CONTENT_TYPE = "application/vnd.roadloop.frame-batch"
# Per-frame statuses inside a batch response (the codes POST /v1/frames gives one frame).
_BATCH_ACK = {201: "stored", 409: "duplicate"}
_BATCH_REJECT = frozenset({403, 410, 413, 422})
_BATCH_RETRY = frozenset({429, 503, 507})


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
    detail = str(entry.get("detail") or "")[:300]
    if not isinstance(code, int) or isinstance(code, bool):
        return UploadOutcome("retry", None, f"batch result without a status: {entry!r}"[:300])
    if code in _BATCH_ACK:
        return UploadOutcome(_BATCH_ACK[code], code, detail)
    if code in _BATCH_REJECT:
        return UploadOutcome("rejected", code, detail)
    if code in _BATCH_RETRY or _retry_later(code):
        return UploadOutcome("retry", code, detail, retry_after)
    if 400 <= code < 500:  # what POST /v1/frames would refuse the frame with alone
        return UploadOutcome("rejected", code, detail)
    # 0, negative, 1xx, 2xx other than 201, 3xx: not the contract's; keep the frame.
    return UploadOutcome("retry", code, f"status {code} outside the contract: {detail}"[:300],
                         retry_after)


def _response_or_retry(call: Callable[[], httpx.Response]) -> httpx.Response | UploadOutcome:
    """``call()``'s response, or the retry outcome of a request that never got one."""
    try:
        return call()
    except httpx.HTTPError as exc:
        return UploadOutcome("retry", None, f"{type(exc).__name__}: {exc}")
    except GatewayUnavailable as exc:  # e.g. a token refresh answered 429: its Retry-After
        return UploadOutcome("retry", None, str(exc), exc.retry_after)
    except AuthError as exc:
        return UploadOutcome("retry", 401, str(exc))
    except _UNREADABLE as exc:  # an answer the client could not read: never drop a frame on it
        return UploadOutcome("retry", None, f"unreadable answer: {type(exc).__name__}: {exc}"
                             [:300])


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
        self.timeout_s = timeout_s
        # ``transport`` None: httpx's default, through the environment's proxies if it names
        # any; either way bounded by each request's deadline (``_BoundedClient``). Loopback
        # never goes through a proxy (the proxy's 127.0.0.1 is the proxy itself): a gateway
        # on this host is reached directly, whatever NO_PROXY says.
        self._http = _BoundedClient(base_url=self.gateway_url, timeout=timeout_s,
                                    transport=transport, mounts=dict.fromkeys(LOOPBACK_MOUNTS))
        self._lock = threading.RLock()
        self.identity = DeviceIdentity.load(self.state_dir)
        # The in-memory identity differs from identity.json (a save after a token refresh
        # failed, e.g. the disk was full): saved again before each authorised request.
        self._identity_dirty = False
        self.identity_save_error: str | None = None  # the last failed save, None once saved

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
            resp = self._request("POST", "/v1/enroll", json=body)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"cannot reach {self.gateway_url} to enroll: {exc}") from exc
        except GatewayUnavailable as exc:  # an answer over the size cap or the deadline
            raise GatewayUnavailable(f"enrollment: {exc}; nothing was saved") from exc
        if _not_now(resp.status_code):  # busy (a 429 under a flood), not a refusal
            raise GatewayUnavailable(
                f"enrollment: gateway answered {resp.status_code}: {_detail(resp)}; nothing "
                f"was saved, trying again later", retry_after=_retry_after(resp))
        if resp.status_code != 201:
            raise EnrollmentError(
                f"enrollment refused by {self.gateway_url} ({resp.status_code}): {_detail(resp)}"
            )
        # Check the whole answer before building (and saving) the identity.
        identity = DeviceIdentity(camera_id=camera_id, gateway_url=self.gateway_url,
                                  **_enrollment_answer(resp))
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
        """Rotate the token pair (saved at once; a failed save is retried before each authorised
        request, see ``_save_identity_if_dirty``). Raises ``AuthError`` when refused."""
        with self._lock:
            ident = self._require_identity()
            try:
                resp = self._request(
                    "POST", "/v1/token/refresh", json={"refresh_token": ident.refresh_token}
                )
            except httpx.HTTPError as exc:
                raise GatewayUnavailable(
                    f"token refresh: cannot reach {self.gateway_url}: {exc}"
                ) from exc
            code = resp.status_code
            if code != 200 and not 400 <= code < 500 or _not_now(code):
                # Busy (a 429 under a flood, with Retry-After), a 5xx, or not the gateway's
                # answer (a redirect, a proxy's page): the pair is kept, nothing says it died.
                raise GatewayUnavailable(
                    f"token refresh: gateway answered {code}: "
                    f"{_unexpected(resp) if code < 400 else _detail(resp)}; the identity is "
                    f"kept, trying again later", retry_after=_retry_after(resp))
            if code != 200:
                raise AuthError(
                    f"token refresh refused ({resp.status_code}: {_detail(resp)}); the device was "
                    f"probably revoked — enroll again with a new token and a fresh state dir"
                )
            # Read and check the whole answer before touching the identity: a half-applied
            # pair (in memory, not saved) would leave identity.json with a rotated-away token.
            access, refresh_token, expires_in = _token_pair(resp)
            # The gateway has rotated the pair: the old refresh token is dead from here on, so
            # the new one is kept in memory even when it cannot be saved (disk full), and the
            # save is retried before each authorised request (``_save_identity_if_dirty``).
            ident.access_token = access
            ident.refresh_token = refresh_token
            ident.expires_at = time.time() + expires_in
            ident.ttl_s = expires_in
            self._identity_dirty = True
            logger.info("access token refreshed (expires in %ss)", expires_in)
            self._save_identity_if_dirty()

    def _save_identity_if_dirty(self) -> bool:
        """Save the identity if a save is owed; ``True`` when identity.json is current.

        A failed save is logged (an error the first time and whenever the error changes; kept
        in ``identity_save_error``) and not raised: the in-memory pair is the only one the
        gateway still accepts, so the agent keeps working with it and tries again."""
        with self._lock:
            if not self._identity_dirty or self.identity is None:
                return True
            try:
                self.identity.save(self.state_dir)
            except OSError as exc:
                msg = f"{type(exc).__name__}: {exc}"
                if msg != self.identity_save_error:
                    logger.error(
                        "cannot save the rotated token pair to %s (%s): a restart now would "
                        "present a rotated-away refresh token and the gateway would revoke "
                        "this device; retrying before each request — free disk space",
                        self.state_dir / IDENTITY_FILE, msg)
                self.identity_save_error = msg
                return False
            if self.identity_save_error is not None:
                logger.warning("rotated token pair saved to %s after an earlier failure (%s)",
                               self.state_dir / IDENTITY_FILE, self.identity_save_error)
            self._identity_dirty = False
            self.identity_save_error = None
            return True

    def _require_identity(self) -> DeviceIdentity:
        if self.identity is None:
            raise GatewayError("the device is not enrolled")
        return self.identity

    def _auth_headers(self) -> dict[str, str]:
        with self._lock:
            ident = self._require_identity()
            self._save_identity_if_dirty()
            margin = min(self.refresh_margin_s, 0.1 * ident.ttl_s)
            if ident.expires_at - time.time() < margin:
                try:
                    self.refresh()
                except GatewayUnavailable as exc:
                    # Refreshing early is a courtesy: while the token is still valid the
                    # request goes with it (a busy refresh route must not stop uploads that
                    # the gateway would take); the next request tries the refresh again.
                    if ident.expires_at - time.time() <= 0:
                        raise
                    logger.warning("early token refresh failed (%s); the access token is valid "
                                   "for %.0f s more, using it", str(exc)[:200],
                                   ident.expires_at - time.time())
            return {"Authorization": f"Bearer {ident.access_token}"}

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, its answer read streamed (``read_capped``: at most
        ``MAX_RESPONSE_BYTES``, within the deadline); a loaded response. Raises
        ``httpx.HTTPError`` (network, httpx's timeouts) or ``GatewayUnavailable`` (an answer over
        the cap or the deadline)."""
        start = time.monotonic()
        req = self._http.build_request(method, url, **kwargs)
        # Connecting, sending and the status line with the headers meet the deadline too
        # (``_DeadlineStream``), a slow upload moving it to ``timeout_s`` after its last write.
        with request_budget(start + DEADLINE_TIMEOUTS * self.timeout_s,
                            self.timeout_s) as budget:
            resp = self._http.send(req, stream=True)
            try:
                deadline = max(start + DEADLINE_TIMEOUTS * self.timeout_s,
                               time.monotonic() + self.timeout_s)
                budget.deadline = deadline
                body = read_capped(resp, MAX_RESPONSE_BYTES, deadline)
            finally:
                resp.close()
        # The body is decoded already: the loaded copy must not decode it again.
        headers = [(k, v) for k, v in resp.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx.Response(resp.status_code, headers=headers, content=body, request=req,
                              extensions=resp.extensions)

    def _send(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """An authorised request; on 401 refresh once and retry."""
        extra = headers or {}
        token_used = self._require_identity().access_token
        resp = self._request(method, url, headers={**self._auth_headers(), **extra}, **kwargs)
        if resp.status_code == 401:
            with self._lock:
                if self._require_identity().access_token == token_used:
                    self.refresh()  # nobody else refreshed meanwhile
            resp = self._request(
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
        if 400 <= code < 500:
            return BatchOutcome("refused", (), code, _detail(resp), None, len(body))
        if code != 200:  # 1xx, 3xx (a redirect is not followed), another 2xx: keep the frames
            return every(UploadOutcome("retry", code, _unexpected(resp), _retry_after(resp)))
        retry_after = _retry_after(resp)
        try:
            entries = resp.json()["results"]
            if not isinstance(entries, list) or len(entries) != n:
                raise ValueError(f"{n} frames sent, results: {str(entries)[:200]}")
            for entry, (_, meta) in zip(entries, items, strict=True):
                if not isinstance(entry, dict):
                    raise TypeError(f"a result is not an object: {str(entry)[:200]}")
                fid = entry.get("frame_id")
                if fid is not None and fid != meta.get("frame_id"):
                    raise ValueError(f"result for {str(fid)[:100]!r} where "
                                     f"{meta.get('frame_id')!r} was sent")
            outcomes = tuple(_frame_outcome(e, retry_after) for e in entries)
        except _UNREADABLE as exc:
            # Frames may be stored: a resend is answered 409, which acknowledges them.
            return every(UploadOutcome("retry", code, f"unreadable batch response: "
                                       f"{type(exc).__name__}: {exc}"[:300]))
        return BatchOutcome("results", outcomes, code, "", retry_after, len(body))

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
        resp = self._request("POST", url, content=body.encode("utf-8"), headers=headers)
        if resp.status_code == 401:
            with self._lock:
                if self._require_identity().access_token == token_used:
                    self.refresh()
            headers = {**self._auth_headers(), "Content-Type": "application/json"}
            resp = self._request("POST", url, content=body.encode("utf-8"), headers=headers)
        return resp

    def _outcome(self, call, *, expect: int) -> UploadOutcome:
        resp = _response_or_retry(call)
        if isinstance(resp, UploadOutcome):
            return resp
        code = resp.status_code
        if code == expect:  # the route's documented success status, nothing else
            return UploadOutcome("stored", code)
        if code == 409:
            return UploadOutcome("duplicate", code, _detail(resp))
        if _retry_later(code):
            return UploadOutcome("retry", code, _detail(resp), _retry_after(resp))
        if 400 <= code < 500:
            return UploadOutcome("rejected", code, _detail(resp))
        # 1xx, 3xx (a redirect is not followed), another 2xx (a proxy's or captive portal's
        # page): not the gateway's acknowledgement; keep the frame or record and try later.
        return UploadOutcome("retry", code, _unexpected(resp), _retry_after(resp))

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
        except (AnswerTooLarge, AnswerTooSlow) as exc:
            raise GatewayUnavailable(f"{what}: {exc}") from exc
        code = resp.status_code
        if code == 304:
            return ManifestPoll(304, etag)
        if _not_now(code):
            raise GatewayUnavailable(f"{what}: gateway answered {code}: {_detail(resp)}",
                                     retry_after=_retry_after(resp))
        if code == 403:
            raise GatewayError(f"{what} refused (403: {_detail(resp)}); {forbidden_hint}")
        if code != 200:
            raise GatewayError(f"{what}: gateway answered {code}: {_detail(resp)}")
        try:
            body = resp.json()
        except _UNREADABLE as exc:  # RecursionError too (``[[[[…``): not the caller's to catch
            raise GatewayError(f"{what}: the answer is not JSON ({type(exc).__name__}): "
                               f"{resp.content[:200]!r}") from exc
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
            # the status line and headers within the deadline of any request; the body is
            # the caller's to bound (``ModelStore``: a deadline from the size)
            with request_budget(time.monotonic() + DEADLINE_TIMEOUTS * self.timeout_s,
                                self.timeout_s):
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
            return self._request("GET", "/healthz").status_code == 200
        except (httpx.HTTPError, GatewayUnavailable):
            return False

    def close(self) -> None:
        self._http.close()
