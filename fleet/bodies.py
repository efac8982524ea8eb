"""Request bodies parsed within bounds: JSON nesting refused before the recursive parser runs,
malformed multipart refused with a message.

``json.loads`` recurses once per nested array/object, and so do ``json.dumps`` (the JSON
columns) and pydantic: a 1 MiB body of ``[[[[...`` either blows the recursion limit while
parsing or, a few hundred levels deep, later while storing. ``json_shape`` scans the raw
bytes first (vectorised, in fixed-size chunks, no recursion) and ``loads`` refuses anything
deeper than ``fleet.bounds.MAX_JSON_DEPTH`` or with more than ``MAX_JSON_VALUES`` values (a
1 MiB ``[[],[],...`` costs the parser ~0.3 s; the scan ~8 ms), every number the parser cannot
hold (a 5000-digit integer) and the non-JSON constants ``NaN``/``Infinity`` — each with a
message.

Every JSON request body goes through ``loads`` via ``BoundedJSONRoute`` (the ``route_class``
of the gateway's routers); JSON inside form fields (frame metadata, model manifests) calls
``loads`` directly. Routes that read multipart themselves use ``read_form``: the multipart
parser's own errors (a malformed part header, say) are not Starlette's and would be a 500.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import numpy as np
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from python_multipart.exceptions import FormParserError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fleet.bounds import MAX_JSON_DEPTH, MAX_JSON_VALUES, gateway_now, unstorable_string
from fleet.metrics import CLIENT_CLOSED

_CHUNK = 1 << 15
_QUOTE, _BACKSLASH, _COMMA = 0x22, 0x5C, 0x2C
_STEP = np.zeros(256, np.int32)  # +1 for [ and {, -1 for ] and }
_STEP[[0x5B, 0x7B]] = 1
_STEP[[0x5D, 0x7D]] = -1


class JsonRejected(ValueError):
    """A JSON text the gateway will not parse; the message says why (for a 422)."""


class JsonShape(NamedTuple):
    depth: int  # deepest array/object nesting
    values: int  # an upper bound on the number of values (1 + structural commas + containers)


def json_shape(raw: bytes, *, max_depth: int | None = None,
               max_values: int | None = None) -> JsonShape:
    """Nesting depth and size of the JSON text ``raw`` (UTF-8), without parsing it.

    Brackets and commas inside strings do not count: a quote opens or closes a string unless
    an odd run of backslashes precedes it. For every prefix of a valid JSON text the depth is
    exactly the parser's own, so a text the parser would recurse into deeply is caught here
    (what is invalid after that prefix, the parser refuses anyway). Stops early once the
    depth exceeds ``max_depth`` or the values ``max_values``.
    """
    depth = best = 0
    values = 1
    in_string = False
    backslashes = 0  # length of the backslash run that ended the previous chunk
    for start in range(0, len(raw), _CHUNK):
        piece = raw[start : start + _CHUNK]
        b = np.frombuffer(piece, np.uint8)
        quote = b == _QUOTE
        if backslashes or _BACKSLASH in piece:
            idx = np.arange(b.size, dtype=np.int32)
            last_other = np.maximum.accumulate(np.where(b == _BACKSLASH, np.int32(-1), idx))
            run = idx - last_other  # backslash run ending at i (0 where b[i] is not one)
            run[last_other < 0] += backslashes  # a run that began in the previous chunk
            quote[1:] &= run[:-1] % 2 == 0
            quote[0] &= backslashes % 2 == 0
            backslashes = int(run[-1])
        quotes_before = np.cumsum(quote, dtype=np.int32) - quote
        inside = (quotes_before % 2 == 1) ^ in_string
        step = _STEP[b]
        step[inside] = 0  # brackets inside strings
        levels = np.cumsum(step, dtype=np.int32) + depth
        best = max(best, int(levels.max()))
        depth = int(levels[-1])
        values += int(np.count_nonzero(step == 1)) + int(np.count_nonzero((b == _COMMA) & ~inside))
        in_string ^= bool(int(quote.sum()) % 2)
        if (max_depth is not None and best > max_depth) or (
                max_values is not None and values > max_values):
            break
    return JsonShape(best, values)


def nesting_depth(raw: bytes, stop_above: int | None = None) -> int:
    """``json_shape(raw).depth``, stopping once it exceeds ``stop_above``."""
    return json_shape(raw, max_depth=stop_above).depth


def _refuse_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not a JSON number: send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999: valid JSON, but beyond a 64-bit float
        raise JsonRejected(f"{text[:40]} is beyond a 64-bit float: send finite numbers only")
    return value


def loads(raw: bytes | str, what: str = "body", max_values: int = MAX_JSON_VALUES, *,
          check_strings: bool = True) -> Any:
    """Parse a JSON text within the bounds, or raise ``JsonRejected`` (a bad text raises
    ``json.JSONDecodeError`` as ``json.loads`` does). ``max_values``: a larger bound for a
    text that carries several bodies' worth (a frame batch's manifest), whose caller checks
    the strings of each body itself (``check_strings=False``; ``fleet.bounds.text_problem``)."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JsonRejected(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        data = raw
    else:
        text, data = raw, raw.encode("utf-8", "surrogatepass")
    shape = json_shape(data, max_depth=MAX_JSON_DEPTH, max_values=max_values)
    if shape.depth > MAX_JSON_DEPTH:
        raise JsonRejected(f"{what} is nested deeper than {MAX_JSON_DEPTH} arrays/objects")
    if shape.values > max_values:  # bounds what json.loads spends on one body
        raise JsonRejected(f"{what} has more than {max_values} values")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except JsonRejected as exc:
        raise JsonRejected(f"{what}: {exc}") from None
    except ValueError:  # an integer of more than 4300 digits (Python's conversion limit)
        raise JsonRejected(f"{what} has a number with more digits than the gateway reads "
                           "(integers must fit 64 bits)") from None
    except RecursionError:  # not reached: nesting is bounded above
        raise JsonRejected(f"{what} is nested too deeply") from None
    # NUL and lone surrogates reach a string only through a \u escape (a raw control
    # character is a JSON error, and UTF-8 cannot encode a surrogate) or, in text handed
    # over already decoded, as themselves: other bodies need no walk.
    if check_strings and ("\\u" in text or (data is not raw and not text.isascii())):
        problem = unstorable_string(value)
        if problem is not None:
            raise JsonRejected(f"{what}: {problem}")
    return value


class ClientGone(ClientDisconnect, HTTPException):
    """The client disconnected while FastAPI read a JSON body. FastAPI answers any exception
    there 400 ("There was an error parsing the body") but re-raises an ``HTTPException``: as
    one, the disconnect reaches the app's ``ClientDisconnect`` handler (first in the MRO)
    like a disconnect on any other route."""

    def __init__(self) -> None:
        HTTPException.__init__(self, CLIENT_CLOSED, "the client disconnected mid-body")


class BoundedJSONRequest(Request):
    """A request whose ``json()`` is ``loads`` (refusals become a 422 with the message)."""

    async def body(self) -> bytes:
        try:
            return await super().body()
        except ClientDisconnect as exc:
            raise ClientGone() from exc

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except JsonRejected as exc:
                raise HTTPException(422, f"invalid request: {exc}") from exc
        return self._json


class BoundedJSONRoute(APIRoute):
    """Route class of the gateway's routers: FastAPI parses JSON bodies with ``loads``, and
    time bounds see the gateway's clock (``fleet.bounds.gateway_now``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            gw = getattr(request.app.state, "gateway", None)
            token = gateway_now.set(gw.now() if gw is not None else None)
            try:
                return await handler(BoundedJSONRequest(request.scope, request.receive))
            finally:
                gateway_now.reset(token)

        return bounded


async def read_form(request: Request, *,
                    part_too_large: Callable[[], HTTPException] | None = None,
                    **limits: Any) -> FormData:
    """``request.form(**limits)``, with a malformed multipart body answered 422 and a text
    part over ``max_part_size`` 413 (``part_too_large()`` when given: the route's message).

    Both the multipart parser's own errors and Starlette's 400s (no boundary, too many
    files or fields, a part over the size limit) are mapped: the API's documented answer to
    a body it cannot read is a 422, in the JSON error shape."""
    try:
        return await request.form(**limits)
    except FormParserError as exc:
        raise HTTPException(422, f"request body is not valid multipart/form-data ({exc}): send "
                            "the parts as multipart/form-data") from exc
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # e.g. the body limit's 413
            raise
        if "maximum size" in str(exc.detail):  # a text part over max_part_size
            if part_too_large is not None:
                raise part_too_large() from exc
            raise HTTPException(413, f"a text part of the form is over its "
                                f"{limits.get('max_part_size')}-byte limit") from exc
        raise HTTPException(422, f"malformed multipart body: {exc.detail}") from exc
