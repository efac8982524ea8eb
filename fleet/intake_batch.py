"""``POST /v1/frames/batch``: several frames in one request, one result per frame.

The envelope (docs/fleet-api.md "Batched uploads") is a raw body, not multipart::

    4 bytes   big-endian uint32 L: length of the manifest
    L bytes   UTF-8 JSON {"frames": [{"metadata": {...FrameMetadata...}, "image_bytes": n}, ...]}
    then      the JPEGs, concatenated in manifest order; the body ends after the last one

An envelope that does not split into frames is a 422 for the whole request (nothing stored);
once it splits, every frame goes through the per-frame path of ``POST /v1/frames``
(``fleet.frame_checks.check_frames`` and ``fleet.intake.store_frames``) and gets the status and message that
route would give it alone. The stored frames of one batch are one group-commit item (a
SAVEPOINT per row), so a batch costs one commit wait, and with ``frame_sync=group`` one
durability barrier, however many frames it carries. Splitting a raw body is a few slices;
Starlette's multipart parser costs far more per frame (benchmarks/intake_parsing.py).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fleet.auth import DevicePrincipal, Principal
from fleet.auth_first import AuthFirstRoute
from fleet.bodies import JsonRejected, loads
from fleet.bounds import MAX_JSON_VALUES, unstorable_string
from fleet.config import GatewaySettings
from fleet.intake import (
    CheckedFrame,
    check_frames,
    metadata_too_large,
    store_frames,
    validate_metadata,
)
from fleet.ratelimit import BodyTooLarge, rate_limit_refusal
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut, FrameMetadata
from roadloop.data.frame_records import ID_RE

__all__ = ["BATCH_CONTENT_TYPE", "BatchResult", "FrameResult", "router", "split_batch",
           "store_batch"]

BATCH_CONTENT_TYPE = "application/vnd.roadloop.frame-batch"
_PREFIX = struct.Struct(">I")
RETRY_LATER = frozenset({429, 503, 507})
REFUSED = frozenset({403, 410, 413, 422})  # 410: an erased range (fleet.intake)


class FrameResult(BaseModel):
    """What happened to one frame: the status ``POST /v1/frames`` would answer for it."""

    frame_id: str | None
    status: int
    detail: str | None = None


class BatchResult(BaseModel):
    results: list[FrameResult]
    stored: int
    duplicates: int
    refused: int
    retry_later: int


def _bad(why: str) -> HTTPException:
    return HTTPException(422, f"frame batch envelope is invalid: {why}; nothing was stored "
                         "(see docs/fleet-api.md, batched uploads)")


def split_batch(body: bytes, settings: GatewaySettings) -> list[tuple[Any, bytes]]:
    """(metadata object as parsed, JPEG bytes) per manifest entry, or a 422 for the whole
    request when the envelope does not split into frames."""
    if len(body) < _PREFIX.size:
        raise _bad("the body is shorter than its 4-byte manifest length")
    (length,) = _PREFIX.unpack_from(body)
    max_frames = settings.max_batch_frames
    max_manifest = max_frames * settings.max_metadata_bytes + 1024
    if length > max_manifest:
        raise _bad(f"the manifest length {length} is over the {max_manifest}-byte limit")
    end = _PREFIX.size + length
    if end > len(body):
        raise _bad(f"the manifest length {length} runs past the end of the body")
    try:
        manifest = loads(body[_PREFIX.size:end], "manifest",
                         max_values=MAX_JSON_VALUES * max_frames, check_strings=False)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the manifest is not valid JSON ({exc})") from exc
    except JsonRejected as exc:
        raise _bad(str(exc)) from exc
    frames = manifest.get("frames") if isinstance(manifest, dict) else None
    if not isinstance(frames, list):
        raise _bad('the manifest must be a JSON object {"frames": [...]}')
    if not frames:
        raise _bad("the manifest lists no frames")
    if len(frames) > max_frames:
        raise _bad(f"{len(frames)} frames, more than max_batch_frames ({max_frames})")
    sizes = []
    for i, entry in enumerate(frames):
        size = entry.get("image_bytes") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or "metadata" not in entry or type(size) is not int \
                or size < 0:
            raise _bad(f"frames[{i}] must be an object with 'metadata' and a non-negative "
                       "integer 'image_bytes'")
        sizes.append(size)
    if sum(sizes) != len(body) - end:
        raise _bad(f"image_bytes add up to {sum(sizes)} but {len(body) - end} bytes follow "
                   "the manifest")
    out, pos = [], end
    for entry, size in zip(frames, sizes, strict=True):
        out.append((entry["metadata"], body[pos:pos + size]))
        pos += size
    return out


def charge_manifest(gw: Gateway, principal: Principal, body: bytes) -> None:
    """Charge the rate limit for the manifest's size before parsing it: one token per
    ``max_metadata_bytes`` started beyond the first (the route charged that one). One token
    buys at most one frame's metadata worth of parsing, as on ``POST /v1/frames``; without
    this, one 1-frame batch with a 3 MB manifest cost 0.12 s of CPU for a single token (a
    device could keep a node's cores busy within its rate limit). Agents' manifests (a few
    KB a frame) pay nothing extra. 429 for the whole request when the tokens run out."""
    if len(body) < _PREFIX.size:
        return  # split_batch says what is wrong
    (length,) = _PREFIX.unpack_from(body)
    extra = min(math.ceil(length / gw.settings.max_metadata_bytes),
                gw.settings.max_batch_frames) - 1
    for _ in range(max(extra, 0)):
        refusal = rate_limit_refusal(gw, principal)
        if refusal is not None:
            raise refusal


def _metadata(gw: Gateway, principal: Principal, raw: Any, image: bytes,
              first: bool) -> FrameMetadata:
    """One manifest entry through the checks ``POST /v1/frames`` makes before the camera and
    the JPEG, in that route's order: rate limit, body size, metadata size, metadata."""
    settings = gw.settings
    if not first:  # the route's early check charged the first frame
        refusal = rate_limit_refusal(gw, principal)
        if refusal is not None:
            raise refusal
    if len(image) > settings.max_request_bytes:
        raise HTTPException(413, BodyTooLarge(settings.max_request_bytes).detail)
    text = json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    try:
        size = len(text.encode("utf-8"))
        suspect = "\\u0000" in text  # json.dumps escapes NUL even with ensure_ascii=False
    except UnicodeEncodeError:  # a lone surrogate
        size, suspect = len(text.encode("utf-8", "surrogatepass")), True
    if suspect:  # this frame alone: the manifest was parsed without the string check
        problem = unstorable_string(raw)
        if problem is not None:
            raise HTTPException(422, f"metadata: {problem}")
    if size > settings.max_metadata_bytes:
        raise metadata_too_large(settings.max_metadata_bytes)
    with gw.stats.span("parse_metadata"):
        return validate_metadata(raw)


def _echoed_id(raw: Any) -> str | None:
    """The ``frame_id`` to echo for a manifest entry refused before its metadata validated:
    the one it gives when that is a valid frame id, else None (the entry's position says
    which frame it is, and its ``detail`` names the problem).

    Not a shortened or escaped rendering of an invalid id: the raw value is the client's
    bytes, unbounded (a 200 KB id came back whole) and possibly not encodable (a lone
    surrogate made the whole answer a 500 after the other frames were stored), and a
    rendering that differs from what was sent fails the agent's check that each result's
    ``frame_id`` is null or the one it sent (``edge_agent.client``), which would have it
    resend the whole batch."""
    fid = raw.get("frame_id") if isinstance(raw, dict) else None
    return fid if isinstance(fid, str) and ID_RE.fullmatch(fid) else None


def store_batch(gw: Gateway, principal: Principal,
                entries: list[tuple[Any, bytes]]) -> tuple[BatchResult, int | None]:
    """Check and store every frame; (the results, ``Retry-After`` seconds when every frame
    is to be retried later)."""
    errors: list[HTTPException | None] = [None] * len(entries)
    ids: list[str | None] = []
    parsed: list[tuple[int, FrameMetadata, bytes]] = []
    for i, (raw, image) in enumerate(entries):
        ids.append(_echoed_id(raw))
        try:
            meta = _metadata(gw, principal, raw, image, first=i == 0)
        except HTTPException as exc:
            errors[i] = exc
            continue
        ids[i] = meta.frame_id
        parsed.append((i, meta, image))
    checked = check_frames(gw, principal, [(m, img) for _, m, img in parsed])
    good: list[tuple[int, CheckedFrame]] = []
    for (i, _, _), c in zip(parsed, checked, strict=True):
        if isinstance(c, HTTPException):
            errors[i] = c
        else:
            good.append((i, c))
    if good:
        outcomes = store_frames(gw, principal, [f for _, f in good])
        for (i, _), outcome in zip(good, outcomes, strict=True):
            errors[i] = outcome
    results = [FrameResult(frame_id=ids[i], status=201) if exc is None else
               FrameResult(frame_id=ids[i], status=exc.status_code, detail=str(exc.detail))
               for i, exc in enumerate(errors)]
    statuses = [r.status for r in results]
    gw.stats.count("frame_batches")
    out = BatchResult(
        results=results, stored=statuses.count(201), duplicates=statuses.count(409),
        refused=sum(s in REFUSED for s in statuses),
        retry_later=sum(s in RETRY_LATER for s in statuses),
    )
    retry_after = None
    if out.retry_later == len(results):
        waits = [int((e.headers or {}).get("Retry-After", 1)) for e in errors if e is not None]
        retry_after = max([1, *waits])
    return out, retry_after


def _split_and_store(gw: Gateway, principal: Principal,
                     handed_over: list[bytes]) -> tuple[BatchResult, int | None]:
    """``split_batch`` then ``store_batch``, on one worker thread; ``handed_over`` holds the
    request body, which is taken out of it (no reference left once it is split)."""
    entries = split_batch(handed_over.pop(), gw.settings)
    return store_batch(gw, principal, entries)


# --------------------------------------------------------------------------- route
router = APIRouter(tags=["frames"], route_class=AuthFirstRoute)

_BATCH_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            BATCH_CONTENT_TYPE: {
                "schema": {
                    "type": "string", "format": "binary",
                    "description": "4-byte big-endian manifest length L, L bytes of JSON "
                    '{"frames": [{"metadata": FrameMetadata, "image_bytes": n}, ...]}, then '
                    "the JPEGs concatenated in manifest order.",
                },
            }
        },
    }
}


@router.post(
    "/v1/frames/batch",
    response_model=BatchResult,
    responses={
        401: {"model": ErrorOut}, 403: {"model": ErrorOut},
        404: {"model": ErrorOut, "description": "Batches are switched off on this gateway."},
        413: {"model": ErrorOut, "description": "Body over max_batch_bytes (not read)."},
        415: {"model": ErrorOut}, 422: {"model": ErrorOut, "description": "Bad envelope."},
        429: {"model": ErrorOut},
    },
    openapi_extra=_BATCH_DOC,
)
async def post_frame_batch(
    request: Request,
    principal: DevicePrincipal,
    gw: GatewayDep,
) -> JSONResponse:
    """Upload up to ``max_batch_frames`` frames in one raw body; per-frame results in request
    order, each with the status ``POST /v1/frames`` gives that frame alone (201 stored and
    durable, 409 already stored, 403/413/422 refused, 410 captured in an erased range,
    429/503/507 retry later).

    Authentication and the rate limit's first frame are checked before the body is read;
    each further frame costs one token of the device's rate limit."""
    if not gw.settings.frame_batch_enabled:
        raise HTTPException(404, "frame batches are switched off on this gateway "
                            "(ROADLOOP_GATEWAY_FRAME_BATCH_ENABLED): use POST /v1/frames")
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != BATCH_CONTENT_TYPE:
        raise HTTPException(415, f"a frame batch is Content-Type {BATCH_CONTENT_TYPE}, "
                            f"not {ctype or 'none'} (multipart goes to POST /v1/frames)")
    with gw.stats.span("read_batch"):
        body = await request.body()
    charge_manifest(gw, principal, body)
    # Off the event loop: a manifest may hold up to max_batch_frames bodies' worth of JSON
    # values (~0.1 s of parsing at the limit), and the loop serves every other request.
    # One hand-off to the thread pool for the split and the storing; the body is handed over
    # in a list the thread empties, so it is freed once split (its frames are copies).
    handed_over = [body]
    del body
    result, retry_after = await run_in_threadpool(_split_and_store, gw, principal, handed_over)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(result.model_dump(mode="json"), headers=headers)
