"""What the gateway's answers mean to the client (``edge_agent.client``): which statuses say
"not now" (``_not_now``, ``_retry_later``), an error answer's short detail, ``Retry-After``
(``parse_retry_after``), and the checked fields of a credential answer — enrollment's 201, a
token refresh's 200 — whose bytes no message quotes (``_body_shape``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from edge_agent.errors import GatewayUnavailable
from edge_agent.outbox import MAX_RETRY_AFTER_S, bounded_retry_after

# What a body that cannot be parsed raises: json gives up on deep nesting (``[[[[…``) with
# RecursionError, which is not a ValueError.
_UNREADABLE = (ValueError, KeyError, TypeError, RecursionError)


def _retry_later(code: int) -> bool:
    """A whole request's status that means "not now, try again" (not "never")."""
    return code in (401, 403) or _not_now(code)


def _not_now(code: int) -> bool:
    """A status that says nothing about the request or the credential it carried: the server
    is busy (429 with ``Retry-After``, 5xx) or timed the request out (408, 425). On
    ``/v1/enroll`` and ``/v1/token/refresh`` (whose 429 is the gateway's unattributed-request
    limit under a flood) it is "try again later", never a refusal of the token."""
    return code in (408, 425, 429) or code >= 500


def _unexpected(resp: httpx.Response) -> str:
    """The detail of an answer outside the contract (a redirect names where it points)."""
    code = resp.status_code
    if 300 <= code < 400:
        where = resp.headers.get("Location", "?")[:200]
        return (f"redirect {code} to {where!r} is not followed: check --gateway-url "
                f"(scheme, host, path prefix)")
    return f"unexpected status {code}: {_detail(resp)}"[:300]


def _detail(resp: httpx.Response) -> str:
    """A short message for an error answer: its JSON ``detail`` if any, else its text."""
    try:
        body = resp.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:300]
    except _UNREADABLE:
        pass
    try:
        return resp.text[:300]
    except (ValueError, LookupError):  # an unknown charset in Content-Type
        return repr(resp.content[:300])


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` value (RFC 9110 §10.2.3: delta-seconds or an HTTP-date) as seconds
    from ``now``, within ``[0, MAX_RETRY_AFTER_S]``; None when absent or unreadable. A delay
    too large to represent (``1e400`` → inf) or past the bound is taken as the bound."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if math.isnan(seconds):
            return None
        return bounded_retry_after(seconds)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000": a UTC time
        when = when.replace(tzinfo=UTC)
    try:
        target = when.timestamp()
    except (OverflowError, ValueError, OSError):
        return MAX_RETRY_AFTER_S
    return bounded_retry_after(target - (time.time() if now is None else now))


def _retry_after(resp: httpx.Response) -> float | None:
    return parse_retry_after(resp.headers.get("Retry-After"))


# The longest access-token lifetime a gateway issues (the platform's ``MAX_TOKEN_TTL_S``,
# 366 days; the agent imports nothing of the platform): a longer ``expires_in`` is not the
# gateway's answer (and one past a float, ``1e400`` or a 400-digit integer, cannot be used).
MAX_TOKEN_TTL_S = 366 * 86400


def _field(data: Mapping[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"no {name} field")
    return data[name]


def _token_fields(data: Any) -> tuple[str, str, float]:
    """``(access_token, refresh_token, expires_in)`` of a decoded token answer (enrollment's
    201, a refresh's 200); ``_UNREADABLE`` naming the first field that is not right."""
    if not isinstance(data, dict):
        raise TypeError(f"a JSON {type(data).__name__}, not an object")
    access, refresh = _field(data, "access_token"), _field(data, "refresh_token")
    for name, token in (("access_token", access), ("refresh_token", refresh)):
        if not isinstance(token, str) or not token:
            raise TypeError(f"{name} is not a non-empty string")
        if not token.isascii() or not token.isprintable():  # it travels in a header
            raise ValueError(f"{name} is not printable ASCII")
    expires_in = data.get("expires_in", 3600)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        raise TypeError(f"expires_in is not a number: {expires_in!r}"[:100])
    try:
        seconds = float(expires_in)
    except OverflowError:  # an integer past any float
        seconds = math.inf
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TOKEN_TTL_S:
        raise ValueError(f"expires_in out of range (0, {MAX_TOKEN_TTL_S}]: "
                         f"{str(expires_in)[:40]}")
    return access, refresh, seconds


def _body_shape(resp: httpx.Response) -> str:
    """What an answer that carries credentials looked like, none of its values: its size, its
    Content-Type and, for a JSON object, its keys. A token pair the agent cannot use (an
    ``expires_in`` out of range…) is still live on the gateway: its bytes must not reach a log
    or an outcome's detail."""
    shape = f"{len(resp.content)} bytes of {resp.headers.get('Content-Type', 'no type')[:60]!r}"
    try:
        data = json.loads(resp.content)
    except _UNREADABLE:
        return shape
    if isinstance(data, dict):
        keys = ", ".join(repr(str(k)[:40]) for k in list(data)[:12])
        return f"{shape}: a JSON object with keys [{keys}]"
    return f"{shape}: a JSON {type(data).__name__}"


def _unreadable_answer(what: str, resp: httpx.Response, exc: BaseException,
                       then: str) -> GatewayUnavailable:
    """``exc`` names the field that is wrong, never its value (``_token_fields``)."""
    return GatewayUnavailable(
        f"{what}: unreadable answer {resp.status_code} ({type(exc).__name__}: {exc}; "
        f"{_body_shape(resp)}); {then}")


def _token_pair(resp: httpx.Response) -> tuple[str, str, float]:
    """``(access_token, refresh_token, expires_in)`` of a 200 from ``/v1/token/refresh``;
    ``GatewayUnavailable`` (try again later, the identity unchanged) when it is not that."""
    try:
        return _token_fields(resp.json())
    except _UNREADABLE as exc:
        raise _unreadable_answer("token refresh", resp, exc,
                                 "the identity is kept, trying again later") from exc


def _enrollment_answer(resp: httpx.Response) -> dict[str, Any]:
    """The checked fields of a 201 from ``/v1/enroll`` (``DeviceIdentity``'s keyword
    arguments from the gateway: tokens as a refresh's, ``device_id`` a non-empty string,
    ``scopes`` a list of strings, the two keys strings or absent); ``GatewayUnavailable`` when
    it is not that. A broken answer is the gateway's (or a proxy's) fault, not a refusal of
    this device: the agent tries again later (the token may be spent by then, and the gateway
    then refuses it plainly — ``EnrollmentError``)."""
    try:
        data = resp.json()
        access, refresh, expires_in = _token_fields(data)
        device_id = _field(data, "device_id")
        if not isinstance(device_id, str) or not device_id:
            raise TypeError("device_id is not a non-empty string")
        scopes = data.get("scopes") or []
        if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
            raise TypeError("scopes is not a list of strings")
        keys = {k: data.get(k) for k in ("gateway_public_key", "model_public_key")}
        for name, key in keys.items():
            if key is not None and not isinstance(key, str):
                raise TypeError(f"{name} is not a string")
        for text in (device_id, *keys.values()):
            if text is not None:
                text.encode("utf-8")  # a lone surrogate cannot be saved (UnicodeEncodeError)
    except _UNREADABLE as exc:
        raise _unreadable_answer(
            "enrollment", resp, exc,
            "nothing was saved; trying again later (if the gateway then says the enrollment "
            "token is used, create a new one)") from exc
    return {"device_id": device_id, "access_token": access, "refresh_token": refresh,
            "expires_at": time.time() + expires_in, "ttl_s": expires_in, "scopes": list(scopes),
            **keys}
