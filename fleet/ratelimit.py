"""Request limits: a per-device token bucket (``enforce_rate_limit``) and a request-body size
cap (ASGI middleware).

This module sits below ``fleet.runtime`` (whose ``Gateway`` holds the limiter) and
``fleet.auth`` (whose ``Principal`` is the caller): ``enforce_rate_limit`` names what it
needs of them as protocols instead of importing them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import HTTPException

from fleet.config import GatewaySettings


class TokenBucketLimiter:
    """Token bucket per key: ``rate`` tokens/s refill up to ``burst``; one request costs one.

    In-process state: with ``workers`` processes each gets ``rate / workers`` (see
    ``fleet.runtime``), so a device stays within the configured rate in total; a device
    whose requests all reach one worker gets that worker's share (buckets in Redis would
    make it exact).
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token; return 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)


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


def enforce_rate_limit(gw: LimitedGateway, principal: Caller) -> None:
    """Take one token of the caller's bucket (its device, else its token) or raise 429 with
    ``Retry-After``. Frames, heartbeats, manifest polls and device downloads share it."""
    key = principal.device_id or f"token:{principal.token_id}"
    wait = gw.limiter.acquire(key)
    if wait > 0:
        gw.stats.count("rate_limited")
        retry_after = max(1, int(wait + 0.999))
        raise HTTPException(
            429, f"rate limit exceeded for {key}: at most {gw.settings.rate_limit_per_s:g} "
            f"requests/s (burst {gw.settings.rate_limit_burst}); retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive`` when a streamed body passes the cap (FastAPI re-raises
    HTTPExceptions from body parsing, so the client gets a 413, not a 400/500)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"request body is larger than the {limit}-byte limit; send a smaller image "
            "(or raise ROADLOOP_GATEWAY_MAX_REQUEST_BYTES on the gateway)",
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
        limit = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "Content-Length is not an integer")
                    return
                if declared > limit:
                    await _send_json(send, 413, BodyTooLarge(limit).detail, close=True)
                    return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Callable, status: int, detail: str, close: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
