"""The fleet gateway application: ``create_app(settings)`` builds a FastAPI app.

Run it with ``roadloop gateway serve`` / ``python -m fleet serve``; ``--workers N`` runs N
processes (each with its own group committer and 1/N of the per-device rate limit; the
database decides everything that must be unique: frame ids, token use, live devices).

What a request meets, outermost first: the HTTP server's header size and time bounds
(``fleet.server``), the limits on unattributed requests, the body size cap and
the body read deadline (``fleet.ratelimit``), then its route, which authenticates before
it reads the body (``fleet.auth_first``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text
from starlette.requests import ClientDisconnect

from fleet import (
    admin,
    auth,
    camera_config,
    docs_pages,
    drift,
    heartbeats,
    intake,
    intake_batch,
    privacy,
    rollouts,
    traffic,
    traffic_preview,
    traffic_queries,
)
from fleet.config import GatewaySettings
from fleet.metrics import CLIENT_CLOSED, MetricsMiddleware, RouteTemplates, metrics_response
from fleet.ratelimit import (
    BodyReadDeadline,
    BodySizeLimit,
    UnattributedLimit,
    body_limit_setting,
)
from fleet.runtime import Clock, Gateway, GatewayDep
from fleet.schemas import ErrorOut, Health

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """
Edge agents enroll, then upload sampled frames and heartbeats, follow staged model
rollouts (signed manifests) and their camera's configuration; operators manage devices,
rollouts and camera configurations.
Contract: `docs/fleet-api.md`. Every error body is `{"detail": "<message>"}`.

Each operation names the token it takes (Authorize holds one of each): **DeviceToken**, a
device's access token from `POST /v1/enroll`; **AdminToken**, an operator's token from
`roadloop fleet admin-token create`. Health, the landing page and enrollment take none.
"""
# /metrics: the scrape secret when one is configured; otherwise loopback clients, no token.
METRICS_TOKEN = HTTPBearer(
    scheme_name="MetricsToken", auto_error=False,
    description="ROADLOOP_GATEWAY_METRICS_TOKEN, when set; without it /metrics answers "
    "loopback clients only, with no token.",
)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
        kind = loc[0] if loc else "request"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"body is not valid JSON ({ctx.get('error', msg)})")
        else:
            parts.append(f"{kind} {where}: {msg}" if where else f"{kind}: {msg}")
    return "invalid request: " + "; ".join(parts)


# How long a successful database check answers /healthz: the kubelet's probes (and anyone,
# the route is public) then cost at most one ``SELECT 1`` a second per worker, not one each.
# A database that goes away is seen within this long; readiness probes run every 5-10 s.
HEALTH_DB_CHECK_S = 1.0


class DatabaseProbe:
    """``/healthz``'s database check, remembered for ``HEALTH_DB_CHECK_S`` once it passed."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._ok_at: float | None = None

    def check(self) -> None:
        now = time.monotonic()
        if self._ok_at is not None and now - self._ok_at < HEALTH_DB_CHECK_S:
            return
        with self.gw.db.read() as session:
            session.execute(text("SELECT 1"))
        self._ok_at = now

    def forget(self) -> None:
        self._ok_at = None


def create_app(settings: GatewaySettings | None = None, *, clock: Clock | None = None,
               freeze_gc: bool = False) -> FastAPI:
    """Build the gateway. ``clock`` (aware UTC ``datetime`` factory) lets tests move time.
    ``freeze_gc``: freeze the start-up objects once started (``Gateway.start``); for a
    process that serves this one app (``fleet serve``), not for one that builds many."""
    settings = settings or GatewaySettings()
    gw = Gateway(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.worker_threads)
        await anyio.to_thread.run_sync(functools.partial(gw.start, freeze_gc=freeze_gc))
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(gw.stop)

    app = FastAPI(
        title="roadloop fleet gateway",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=docs_pages.TAGS,
        # Served by docs_pages from local assets: the default pages load them from a CDN.
        docs_url=None,
        redoc_url=None,
        # Every route: the body cap, the body deadline and the unattributed limits run before
        # it, and every answer that is not a success is an ErrorOut.
        responses={
            408: {"model": ErrorOut, "description": "The body stalled; connection closed."},
            413: {"model": ErrorOut, "description": "Body over the route's limit."},
            422: {"model": ErrorOut},
            429: {"model": ErrorOut, "description": "Rate limited (see Retry-After)."},
        },
    )
    app.state.gateway = gw

    def body_limit(path: str) -> int:
        return int(getattr(settings, body_limit_setting(path)))

    # Added innermost first: UnattributedLimit sees a request before the other two.
    app.add_middleware(BodyReadDeadline, idle_s=settings.body_idle_timeout_s,
                       base_s=settings.body_timeout_s,
                       min_rate=settings.body_min_rate_bytes_s, limit_for=body_limit)
    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.add_middleware(UnattributedLimit, per_address=gw.address_limiter,
                       overall=gw.unattributed_limiter, known=gw.known_tokens,
                       on_limited=lambda: gw.stats.count("unattributed_rate_limited"))
    if settings.metrics_enabled:  # outermost: it sees the limits' refusals too
        app.add_middleware(MetricsMiddleware, metrics=gw.metrics,
                           templates=lambda: RouteTemplates.of_app(app))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _format_validation(exc)})

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client closed the connection mid-body (an agent's timeout, a dropped link):
        # nothing was stored and nobody reads this answer; the metrics count it as 499.
        route = getattr(request.scope.get("route"), "path", request.url.path)
        logger.info("client disconnected before its body arrived: %s %s", request.method,
                    route)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            status_code=500,
            content={"detail": "internal gateway error (logged); retry later"},
        )

    app.state.database_probe = probe = DatabaseProbe(gw)

    @app.get("/healthz", response_model=Health, tags=["health"],
             responses={503: {"model": ErrorOut}}, openapi_extra=docs_pages.PUBLIC)
    def healthz(gw: GatewayDep) -> Health:
        """Liveness + database reachability."""
        try:
            probe.check()
        except Exception as exc:
            # Public route: the driver's message (it names the database server) is for the log.
            logger.warning("health check: the database is unreachable: %s", exc)
            raise HTTPException(503, "database unreachable") from exc
        if not gw.committer.running:
            raise HTTPException(503, "database writer is not running")
        return Health(status="ok")

    if settings.metrics_enabled:
        @app.get("/metrics", tags=["health"], response_class=Response,
                 responses={200: {"content": {"text/plain": {}},
                                  "description": "Prometheus text format."},
                            401: {"model": ErrorOut}, 403: {"model": ErrorOut}},
                 # MetricsToken, or none (loopback): {} is OpenAPI's "no credential".
                 openapi_extra={"security": [{}]})
        def metrics(
            request: Request, gw: GatewayDep,
            _token: Annotated[HTTPAuthorizationCredentials | None, Depends(METRICS_TOKEN)],
        ) -> Response:
            """Prometheus metrics (docs/monitoring.md): with a metrics token configured, send
            it as a bearer token; without one, loopback clients only."""
            return metrics_response(request, gw.metrics, gw.settings.metrics_token)

    docs_pages.install(app, metrics=settings.metrics_enabled)
    app.include_router(auth.router)
    app.include_router(intake.router)
    app.include_router(intake_batch.router)
    app.include_router(heartbeats.router)
    app.include_router(admin.router)
    app.include_router(rollouts.router)
    app.include_router(camera_config.router)
    app.include_router(drift.router)
    app.include_router(traffic.router)
    app.include_router(traffic_queries.router)
    app.include_router(traffic_preview.router)
    app.include_router(privacy.router)
    return app


def create_served_app() -> FastAPI:
    """``fleet serve``'s worker factory: the settings from the environment, and the start-up
    objects frozen when ``gc_freeze_on_start`` says so."""
    settings = GatewaySettings()
    return create_app(settings, freeze_gc=settings.gc_freeze_on_start)
