"""Authenticate before the body is read: ``AuthFirstRoute`` and ``early_dependency``.

FastAPI reads and validates a route's body (JSON, form fields) *before* it runs the
route's dependencies, so a bearer-token dependency alone lets an unauthenticated client
make the gateway parse whatever it sends — and a malformed body gets a 422 where the
client deserved a 401. ``AuthFirstRoute`` (every router of the gateway uses it) first
resolves each dependency made by ``early_dependency`` — in the thread pool, since it
queries the database — and only then hands the request to FastAPI, which parses the body
and runs the dependencies; those return the result already resolved. Bodies stay declared
as parameters, so the OpenAPI document describes them as before.

A request a credential vouched for is marked ``AUTHENTICATED`` in its scope (see
``fleet.ratelimit.UnattributedLimit``): by an early dependency, or by a credential exchange
route (``@credential_exchange``: enroll, refresh) that answered with success.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from functools import cached_property
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from fleet.bodies import BoundedJSONRoute
from fleet.ratelimit import AUTHENTICATED
from fleet.runtime import Gateway, get_gateway

T = TypeVar("T")
Resolver = Callable[[Request, Gateway], Any]
_RESOLVED = "fleet.resolved"  # scope key: {dependency: its result} for this request

bearer = HTTPBearer(
    auto_error=False,
    description="Access token from POST /v1/enroll or /v1/token/refresh, or an admin token.",
)


def bearer_token(request: Request) -> str | None:
    """The bearer token of ``Authorization`` (None when absent or another scheme), read the
    way ``HTTPBearer`` reads it."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    if not credentials or scheme.lower() != "bearer":
        return None
    return credentials


def route_path(request: Request) -> str:
    """The matched route's template (``/v1/devices/{device_id}/status``), else the path:
    what the audit log and its aggregation key name, bounded whatever path a client sends."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.url.path


async def _resolve(dependency: Callable[..., Any], request: Request) -> Any:
    done: dict[Any, Any] = request.scope.setdefault(_RESOLVED, {})
    if dependency in done:
        return done[dependency]
    resolve: Resolver = dependency.resolve  # type: ignore[attr-defined]
    result = await run_in_threadpool(resolve, request, get_gateway(request))
    done[dependency] = result
    request.scope[AUTHENTICATED] = True
    return result


def early_dependency(resolve: Resolver, name: str) -> Callable[..., Awaitable[Any]]:
    """A dependency ``AuthFirstRoute`` resolves before the body: ``resolve(request, gw)``
    returns the caller or raises (401/403/429). Used by another route class, it still
    works — after the body, as FastAPI orders it."""

    async def dependency(
        request: Request,
        # Unused here (resolve reads the header itself); declares the bearer scheme in OpenAPI.
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Any:
        return await _resolve(dependency, request)

    dependency.resolve = resolve  # type: ignore[attr-defined]
    dependency.__name__ = dependency.__qualname__ = name
    return dependency


def credential_exchange(endpoint: Callable[..., T]) -> Callable[..., T]:
    """Mark a route that authenticates by a token in its body (enroll, refresh): a success
    answer marks the request ``AUTHENTICATED``."""
    endpoint.__fleet_credential_exchange__ = True  # type: ignore[attr-defined]
    return endpoint


def _early(dependant: Dependant) -> list[Callable[..., Any]]:
    found: list[Callable[..., Any]] = []
    for sub in dependant.dependencies:
        if sub.call is not None and hasattr(sub.call, "resolve"):
            found.append(sub.call)
        found.extend(_early(sub))
    return found


class AuthFirstRoute(BoundedJSONRoute):
    """The route class of every gateway router: it resolves the route's ``early_dependency``
    dependencies (authentication, the per-device rate limit) before FastAPI reads the body,
    which it then parses within bounds (``BoundedJSONRoute``)."""

    @cached_property
    def early_dependencies(self) -> tuple[Callable[..., Any], ...]:
        return tuple(dict.fromkeys(_early(self.dependant)))

    @property
    def exchanges_credential(self) -> bool:
        return bool(getattr(self.endpoint, "__fleet_credential_exchange__", False))

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        early = self.early_dependencies
        exchange = self.exchanges_credential
        if not early and not exchange:
            return handler

        async def authenticate_first(request: Request) -> Response:
            for dependency in early:
                await _resolve(dependency, request)
            response = await handler(request)
            if exchange and response.status_code < 400:
                request.scope[AUTHENTICATED] = True
            return response

        return authenticate_first
