"""Authenticate before the body is read: ``AuthFirstRoute`` and ``early_dependency``.

FastAPI reads and validates a route's body (JSON, form fields) *before* it runs the
route's dependencies, so a bearer-token dependency alone lets an unauthenticated client
make the gateway parse whatever it sends — and a malformed body gets a 422 where the
client deserved a 401. ``AuthFirstRoute`` (every router of the gateway uses it) first
resolves each dependency made by ``early_dependency`` — in the thread pool, since it
queries the database, unless a principal cached in memory answers it on the event loop
(frames and heartbeats) — and only then hands the request to FastAPI, which parses the body
and runs the dependencies; those return the result already resolved. Bodies stay declared
as parameters, so the OpenAPI document describes them as before.

A request a credential vouched for is marked ``AUTHENTICATED`` in its scope (see
``fleet.ratelimit.UnattributedLimit``): by an early dependency, or by a credential exchange
route (``@credential_exchange``: enroll, refresh) that answered with success.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Sequence
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

# The gateway's two kinds of bearer token, as OpenAPI security schemes: each operation
# lists the one(s) it accepts, and Swagger UI's Authorize button holds one of each.
DEVICE_TOKEN = HTTPBearer(
    scheme_name="DeviceToken", auto_error=False,
    description="A device's access token (scopes camera:write and/or camera:read): the "
    "access_token of POST /v1/enroll or POST /v1/token/refresh. Sent as "
    "'Authorization: Bearer <token>'.",
)
ADMIN_TOKEN = HTTPBearer(
    scheme_name="AdminToken", auto_error=False,
    description="An operator's admin token (scope camera:admin, which implies camera:read): "
    "`roadloop fleet admin-token create` on the gateway host. Sent as "
    "'Authorization: Bearer <token>'.",
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
    gw = get_gateway(request)
    from_memory: Resolver | None = getattr(dependency, "resolve_from_memory", None)
    result = from_memory(request, gw) if from_memory is not None else None
    if result is None:
        resolve: Resolver = dependency.resolve  # type: ignore[attr-defined]
        result = await run_in_threadpool(resolve, request, gw)
    done[dependency] = result
    request.scope[AUTHENTICATED] = True
    return result


def early_dependency(
    resolve: Resolver, name: str, schemes: Sequence[HTTPBearer] = (DEVICE_TOKEN, ADMIN_TOKEN),
    resolve_from_memory: Resolver | None = None,
) -> Callable[..., Awaitable[Any]]:
    """A dependency ``AuthFirstRoute`` resolves before the body: ``resolve(request, gw)``
    returns the caller or raises (401/403/429), in the thread pool since it may query the
    database. ``resolve_from_memory`` (optional) is tried first, on the event loop: it
    answers from memory only (a cached principal), or returns None to send the request to
    ``resolve``; it must raise what ``resolve`` would for the same request. Used by another
    route class, the dependency still works — after the body, as FastAPI orders it.

    ``schemes``: the tokens it accepts, declared in OpenAPI as alternatives (an operation's
    ``security`` lists one requirement per scheme); ``resolve`` reads the header itself."""
    if not schemes:
        raise ValueError("an early dependency accepts at least one security scheme")

    async def dependency(request: Request, **_credentials: Any) -> Any:
        return await _resolve(dependency, request)

    credential = HTTPAuthorizationCredentials | None
    dependency.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Request),
        *(inspect.Parameter(f"_scheme_{i}", inspect.Parameter.KEYWORD_ONLY,
                            annotation=Annotated[credential, Depends(scheme)])
          for i, scheme in enumerate(schemes)),
    ])
    dependency.resolve = resolve  # type: ignore[attr-defined]
    dependency.resolve_from_memory = resolve_from_memory  # type: ignore[attr-defined]
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
