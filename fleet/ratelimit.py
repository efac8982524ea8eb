"""Request limits: token buckets (per device, ``enforce_rate_limit``; per client address and
overall for unattributed requests, ``UnattributedLimit``), a request-body size cap
(``BodySizeLimit``) and a body read deadline (``BodyReadDeadline``), the last three as ASGI
middleware that run before any route.

This module sits below ``fleet.runtime`` (whose ``Gateway`` holds the limiters) and
``fleet.auth`` (whose ``Principal`` is the caller): ``enforce_rate_limit`` names what it
needs of them as protocols instead of importing them. The header-size and header-time
bounds live in the HTTP server itself (``fleet.server``): no ASGI code runs before a
request's headers are complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import HTTPException

from fleet.config import GatewaySettings

# Set in a request's ASGI scope once a credential vouched for it (a bearer token accepted,
# or an enrollment / refresh token exchanged): such a request is free for ``UnattributedLimit``.
AUTHENTICATED = "fleet.authenticated"


class TokenBucketLimiter:
    """Token bucket per key: ``rate`` tokens/s refill up to ``burst``; one request costs one.

    In-process state: with ``workers`` processes each gets ``rate / workers`` (see
    ``fleet.runtime``), so a device stays within the configured rate in total; a device
    whose requests all reach one worker gets that worker's share (buckets in Redis would
    make it exact). ``max_keys`` bounds the table: the least recently seen key is dropped
    (it starts again with a full bucket — forgetting errs towards letting a client in).
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
        max_keys: int | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        # key -> [tokens, last refill]; tokens may go below zero after ``charge`` (a debt).
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, key: str, now: float) -> list[float]:
        """The key's bucket refilled to ``now`` (caller holds the lock)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
            if self.max_keys is not None and len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
            if self.max_keys is not None:
                self._buckets.move_to_end(key)
        return bucket

    def acquire(self, key: str) -> float:
        """Take one token; return 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            bucket = self._bucket(key, now)
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return 0.0
            return (1.0 - bucket[0]) / self.rate

    def wait_time(self, key: str) -> float:
        """0.0 when the key has a token, else the seconds until it has one (takes nothing)."""
        now = self._clock()
        with self._lock:
            tokens = self._bucket(key, now)[0]
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def charge(self, key: str) -> None:
        """Take one token after the fact, into debt if need be (at most ``burst`` deep), so
        requests that were in flight together all pay."""
        now = self._clock()
        with self._lock:
            bucket = self._bucket(key, now)
            bucket[0] = max(-self.burst, bucket[0] - 1.0)

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)


class _Counter(Protocol):
    def count(self, name: str, n: int = 1) -> None: ...


class LimitedGateway(Protocol):
    """What ``enforce_rate_limit`` uses of ``fleet.runtime.Gateway``."""

    @property
    def settings(self) -> GatewaySettings: ...

    @property
    def limiter(self) -> TokenBucketLimiter: ...

    @property
    def stats(self) -> _Counter: ...


class Caller(Protocol):
    """What ``enforce_rate_limit`` uses of ``fleet.auth.Principal``."""

    @property
    def device_id(self) -> str | None: ...

    @property
    def token_id(self) -> int: ...


def rate_limit_refusal(gw: LimitedGateway, principal: Caller) -> HTTPException | None:
    """Take one token of the caller's bucket (its device, else its token): None, else the
    429 (with ``Retry-After``) to answer. A frame of a batch costs one token, like a request."""
    key = principal.device_id or f"token:{principal.token_id}"
    wait = gw.limiter.acquire(key)
    if wait <= 0:
        return None
    gw.stats.count("rate_limited")
    retry_after = max(1, int(wait + 0.999))
    return HTTPException(
        429, f"rate limit exceeded for {key}: at most {gw.settings.rate_limit_per_s:g} "
        f"requests/s (burst {gw.settings.rate_limit_burst}); retry after {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


def enforce_rate_limit(gw: LimitedGateway, principal: Caller) -> None:
    """Take one token of the caller's bucket or raise 429 with ``Retry-After``. Frames,
    heartbeats, manifest polls and device downloads share it."""
    refusal = rate_limit_refusal(gw, principal)
    if refusal is not None:
        raise refusal


def body_limit_setting(path: str) -> str:
    """The ``GatewaySettings`` field that caps a request body on ``path``."""
    if path == "/v1/frames":
        return "max_request_bytes"
    if path == "/v1/frames/batch":
        return "max_batch_bytes"
    if path == "/v1/models":
        return "max_model_bytes"
    if path in ("/v1/enroll", "/v1/token/refresh"):  # parsed before any credential
        return "max_credential_json_bytes"
    return "max_json_bytes"


_TOO_LARGE_ADVICE = {
    "max_request_bytes": "send a smaller image",
    "max_batch_bytes": "send fewer frames per batch",
    "max_model_bytes": "the model file is larger than this gateway accepts",
    "max_credential_json_bytes": "send only the documented fields",
    "max_json_bytes": "send a smaller JSON body",
}


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive`` when a streamed body passes the cap (FastAPI re-raises
    HTTPExceptions from body parsing, so the client gets a 413, not a 400/500). The message
    names the cap that applies (``setting``, a ``GatewaySettings`` field)."""

    def __init__(self, limit: int, setting: str = "max_request_bytes") -> None:
        advice = _TOO_LARGE_ADVICE.get(setting, "send a smaller body")
        super().__init__(
            status_code=413,
            detail=f"request body is larger than the {limit}-byte limit; {advice} (or raise "
            f"ROADLOOP_GATEWAY_{setting.upper()} on the gateway)",
        )


class BodySizeLimit:
    """Reject bodies over ``limit_for(path)`` bytes: by Content-Length before reading
    anything, and by counting when the body is streamed (chunked or lying about its length)."""

    def __init__(self, app: Any, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit, setting = self.limit_for(path), body_limit_setting(path)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "Content-Length is not an integer")
                    return
                if declared > limit:
                    await _send_json(send, 413, BodyTooLarge(limit, setting).detail,
                                     close=True)
                    return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        await self.app(scope, limited_receive, send)


class KnownTokens:
    """Digests of bearer tokens that authenticated recently (bounded LRU). Membership only
    exempts a request from the unattributed-request limits *before* authentication — it
    never replaces authentication; a token that fails is dropped."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._seen

    def add(self, digest: bytes) -> None:
        with self._lock:
            self._seen[digest] = None
            self._seen.move_to_end(digest)
            if len(self._seen) > self.max_size:
                self._seen.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        with self._lock:
            self._seen.pop(digest, None)


def _declares_body(scope: dict) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _bearer_digest(scope: dict) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return hashlib.sha256(token.strip()).digest()
            return None
    return None


# The Kubernetes probes (deploy/k8s/fleet-gateway.yaml): readiness and start-up GET /healthz,
# liveness GET /. Both are cheap: / answers a page built at start-up (about what its 429
# would cost), /healthz at most one ``SELECT 1`` a second per worker (~1.5 ms of CPU on
# SQLite, below a refused token's ~2 ms; fleet.app.DatabaseProbe). So they skip the gateway-wide unattributed
# bucket: a flood from many addresses that empties it must not make the kubelet see failed
# probes and restart every replica. Each address still has its own probe bucket.
PROBE_ROUTES: frozenset[tuple[str, str]] = frozenset({("GET", "/healthz"), ("GET", "/")})


class UnattributedLimit:
    """Token buckets over the requests no credential vouched for, checked before anything
    else (body, token, route): one per client address and one for the whole gateway.

    Charged when the answer is done and ``AUTHENTICATED`` is unset: refused tokens,
    unauthenticated routes, 404s. The probe routes (``PROBE_ROUTES``: ``GET /healthz``,
    ``GET /``) are neither checked against nor charged to those two buckets: they take a
    token of their own per-address bucket (``probes``; by default as large as the
    per-address one), so neither a flood from many addresses nor one sharing the kubelet's
    address (a node's SNAT) fails the kubelet's probes, while one address still cannot call
    them without limit. An empty bucket answers 429 with ``Retry-After`` and costs nothing
    more (a request with a body gets ``Connection: close`` rather than the gateway draining
    a body it will not read). A request bearing a
    token that authenticated recently (``KnownTokens``) skips the check, so devices keep
    posting while a flood drains the buckets — even one behind the flood's address. The
    per-address bucket keeps one address from taking the whole budget; the global one
    bounds what a flood from any number of addresses can cost. The address is the ASGI
    ``client`` — behind a reverse proxy that uvicorn trusts (``--forwarded-allow-ips``),
    the one the proxy reports.
    """

    def __init__(self, app: Any, per_address: TokenBucketLimiter, overall: TokenBucketLimiter,
                 known: KnownTokens, on_limited: Callable[[], None] | None = None,
                 probes: TokenBucketLimiter | None = None) -> None:
        self.app = app
        self.per_address = per_address
        self.overall = overall
        self.known = known
        self.on_limited = on_limited
        self.probes = probes if probes is not None else TokenBucketLimiter(
            per_address.rate, int(per_address.burst), clock=per_address._clock,
            max_keys=per_address.max_keys)

    @staticmethod
    def is_probe(scope: dict) -> bool:
        """A probe route (``PROBE_ROUTES``): exempt from the shared buckets."""
        return (scope.get("method", ""), scope.get("path", "")) in PROBE_ROUTES

    async def _probe(self, scope: dict, receive: Callable, send: Callable) -> None:
        """A probe takes a token of its address's probe bucket, or gets 429; the shared
        buckets are neither checked nor charged."""
        client = scope.get("client")
        key = str(client[0]) if client else "-"
        wait = self.probes.acquire(key)
        if wait > 0:
            await self._refuse(scope, send, wait, f"too many health checks from {key}: at "
                               f"most {self.probes.rate:g}/s per address")
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: dict, send: Callable, wait: float, why: str) -> None:
        """429 with ``Retry-After`` (a request with a body also gets ``Connection: close``)."""
        if self.on_limited is not None:
            self.on_limited()
        retry_after = max(1, int(wait + 0.999))
        await _send_json(send, 429, f"{why}; retry after {retry_after} s",
                         close=_declares_body(scope),
                         headers=[(b"retry-after", str(retry_after).encode())])

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.is_probe(scope):
            await self._probe(scope, receive, send)
            return
        client = scope.get("client")
        key = str(client[0]) if client else "-"
        digest = _bearer_digest(scope)
        if digest is None or digest not in self.known:
            wait = self.per_address.wait_time(key)
            what = f"from {key}: at most {self.per_address.rate:g}/s per address"
            if wait <= 0:
                wait = self.overall.wait_time("*")
                what = f"in total: at most {self.overall.rate:g}/s for the gateway"
            if wait > 0:
                await self._refuse(scope, send, wait,
                                   f"too many unauthenticated or refused requests {what}")
                return
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.get(AUTHENTICATED):
                if digest is not None:
                    self.known.add(digest)
            else:
                if digest is not None:
                    self.known.discard(digest)
                self.per_address.charge(key)
                self.overall.charge("*")


class BodyReadTimeout(HTTPException):
    """Raised from inside ``receive`` when a body stalls or runs past its deadline (answered
    408 with ``Connection: close``, like ``BodyTooLarge``)."""

    def __init__(self, why: str) -> None:
        super().__init__(status_code=408, detail=f"request body {why}; send it again "
                         "promptly", headers={"Connection": "close"})


class BodyReadDeadline:
    """Bound the time a request body may take once the application reads it: at most
    ``idle_s`` between two chunks, and all of it within ``base_s + length / min_rate`` of
    the first read (``length``: Content-Length, else the route's body limit). uvicorn has
    no such bound; without it a client that sends half a body holds a worker task forever.

    A stall before the answer started is a 408 (connection closed); after it (a handler
    answering without the body), the application is told the client went away.
    """

    def __init__(self, app: Any, *, idle_s: float, base_s: float, min_rate: float,
                 limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.idle_s = idle_s
        self.base_s = base_s
        self.min_rate = min_rate
        self.limit_for = limit_for

    def _expects_body(self, scope: dict) -> int | None:
        """Bytes the body may take (None: no body is coming)."""
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return None  # BodySizeLimit answers 400
            elif name == b"transfer-encoding":
                return self.limit_for(scope.get("path", ""))
        return length or None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = self._expects_body(scope)
        if length is None:
            await self.app(scope, receive, send)
            return
        budget = self.base_s + length / self.min_rate
        deadline: float | None = None
        body_done = False
        answered = False

        async def bounded_receive() -> dict:
            nonlocal deadline, body_done
            if body_done:
                return await receive()
            now = asyncio.get_running_loop().time()
            if deadline is None:
                deadline = now + budget
            timeout = min(self.idle_s, deadline - now)
            try:
                message = await asyncio.wait_for(receive(), max(timeout, 0.0))
            except TimeoutError:
                body_done = True
                if answered:
                    return {"type": "http.disconnect"}
                why = (f"stalled for {self.idle_s:g} s" if timeout == self.idle_s
                       else f"not complete within {budget:.0f} s")
                raise BodyReadTimeout(why) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def watching_send(message: dict) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        await self.app(scope, bounded_receive, watching_send)


async def _send_json(send: Callable, status: int, detail: str, close: bool = False,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *(headers or [])]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
