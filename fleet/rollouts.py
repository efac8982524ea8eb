"""Staged model rollouts: signed manifests, cohorts, health per stage, automatic rollback.

Contract: ``docs/fleet-api.md`` → "Model rollouts". In short:

* ``POST /v1/models`` stores a model file content-addressed after checking its size, its
  SHA-256 and the manifest's Ed25519 signature against the gateway's configured key.
* ``POST /v1/rollouts`` starts a rollout of a published manifest through stages
  (default ``shadow 5 % → canary 5 → 10 → 25 → 50 → 100``); one rollout is active at a
  time (a new one cancels the previous).
* A device is in a stage's cohort when ``h(device_id) < threshold`` (``fleet.rollout_policy``:
  the hash, the thresholds, the health rule; ``fleet.rollout_db`` applies them to the rows).
* ``POST /v1/rollouts/{id}/evaluate`` applies the rule: roll back on failing health (error
  rate, P95 latency, shadow agreement, a device reporting ``rolled_back``/``rejected``),
  advance when the hold elapsed and health passes, hold otherwise (too little data).
* Agents poll ``GET /v1/manifest`` (ETag / ``If-None-Match``) and download
  ``GET /v1/models/{sha256}`` (``Range`` supported).

Every change (publish, create, pause, resume, advance, rollback, cancel, complete) is a row
in the audit log. This module holds the routes; request/response bodies are
``fleet.rollout_schemas``, the per-gateway caches (manifest snapshot, model key, token
lookups) ``fleet.caches``.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from types import SimpleNamespace
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from fleet.auth import (
    AdminPrincipal,
    Principal,
    audit,
    authenticate,
    client_address,
    has_scope,
    hash_token,
)
from fleet.auth_first import (
    ADMIN_TOKEN,
    DEVICE_TOKEN,
    AuthFirstRoute,
    bearer_token,
    early_dependency,
    route_path,
)
from fleet.bodies import JsonRejected, loads, read_form
from fleet.bounds import RolloutId
from fleet.db import ModelManifestRow, RolloutRow, RolloutStatus
from fleet.models_store import ModelFileRejected, ModelFileResponse
from fleet.ratelimit import enforce_rate_limit
from fleet.rollout_db import (
    advance,
    compute_health,
    enter_stage,
    record_event,
    roll_back,
    rollout_out,
)
from fleet.rollout_policy import (
    LIVE,
    Stage,
    assignment_mode,
    decide,
    default_budgets,
    normalise_stages,
)
from fleet.rollout_schemas import (
    Assignment,
    EvaluateOut,
    ManifestOut,
    ModelPublished,
    RollbackRequest,
    RolloutCreate,
    RolloutOut,
)
from fleet.rollout_shapes import manifest_shapes, shape_for_camera
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut
from roadloop.release.signing import (
    SignatureError,
    check_manifest_fields,
    manifest_sha256,
    verify_manifest,
)

logger = logging.getLogger(__name__)
MAX_VARIANTS = 4  # other input shapes one manifest may carry


def require_device_or_admin(*, device_only: bool) -> Any:
    """Agents hold ``camera:write`` (and maybe ``camera:read``); either lets a device read its
    manifest and download models. Admin tokens may download (``device_only=False``).
    Resolved before the body (``early_dependency``), with the per-device rate limit."""

    def principal_for(request: Request, gw: Gateway) -> Principal:
        token = bearer_token(request)
        cache = gw.auth_cache
        token_hash = hash_token(token) if token else ""
        if token:
            cached = cache.cached_principal(token_hash, device_only, gw.now())
            if cached is not None:
                return cached
        scope = "camera:read"
        if token:
            scopes = cache.token_scopes(token_hash)
            if scopes and not has_scope(scopes, "camera:read") and "camera:write" in scopes:
                scope = "camera:write"
        principal = authenticate(gw, token, scope, device_only=device_only,
                                 client=client_address(request), path=route_path(request))
        # Devices only: an operator's download is rare, and a revoked admin token (the CLI
        # revokes from another process) must be refused at once, never from this cache.
        if token and principal.device_id is not None:
            cache.remember_principal(token_hash, device_only, principal)
        return principal

    def resolve(request: Request, gw: Gateway) -> Principal:
        principal = principal_for(request, gw)
        if principal.device_id is not None:
            enforce_rate_limit(gw, principal)
        return principal

    if device_only:
        return early_dependency(resolve, "require_device", (DEVICE_TOKEN,))
    return early_dependency(resolve, "require_reader", (DEVICE_TOKEN, ADMIN_TOKEN))


DeviceReader = Annotated[Principal, Depends(require_device_or_admin(device_only=True))]
ModelReader = Annotated[Principal, Depends(require_device_or_admin(device_only=False))]


def _get_rollout(session: Session, rollout_id: str) -> RolloutRow:
    ro = session.get(RolloutRow, rollout_id)
    if ro is None:
        raise HTTPException(404, f"no rollout {rollout_id} (GET /v1/rollouts lists them)")
    return ro


RolloutIdPath = Annotated[RolloutId, Path(description="GET /v1/rollouts lists them.")]
# Operators publish models and steer rollouts; devices poll their manifest and download.
OPERATOR_TAG = "rollouts (operator)"
DEVICE_TAG = "device updates"
router = APIRouter(route_class=AuthFirstRoute)
operator = SimpleNamespace(get=partial(router.get, tags=[OPERATOR_TAG]),
                           post=partial(router.post, tags=[OPERATOR_TAG]))
device = SimpleNamespace(get=partial(router.get, tags=[DEVICE_TAG]))
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
    409: {"model": ErrorOut}, 422: {"model": ErrorOut},
}
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["manifest"],
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "ONNX bytes (optional when this SHA-256 is stored)"},
            "manifest": {"type": "string", "description": "signed manifest JSON"},
        }}}}},
}


@operator.post("/v1/models", status_code=201, response_model=ModelPublished,
               responses={**_ERRORS, 413: {"model": ErrorOut}, 503: {"model": ErrorOut}},
               openapi_extra=_UPLOAD_DOC)
async def publish_model(
    request: Request, principal: AdminPrincipal, gw: GatewayDep, response: Response
) -> ModelPublished:
    """Publish a model: its file and signed manifest (size, SHA-256, signature checked)."""
    public_key = gw.model_key.get()
    form = await read_form(request, max_files=1 + MAX_VARIANTS, max_fields=2,
                           max_part_size=256 * 1024)
    try:
        raw_manifest = form.get("manifest")
        upload = form.get("file")
        variant_uploads = [u for u in form.getlist("variant") if isinstance(u, UploadFile)]
        if raw_manifest is None:
            raise HTTPException(422, "missing form field 'manifest' (signed manifest JSON)")
        text = (await raw_manifest.read()).decode("utf-8", "replace") \
            if isinstance(raw_manifest, UploadFile) else raw_manifest
        try:
            manifest = loads(text, "manifest")
        except json.JSONDecodeError as exc:
            raise HTTPException(422, f"manifest is not valid JSON ({exc})") from exc
        except JsonRejected as exc:
            raise HTTPException(422, str(exc)) from exc
        try:
            verify_manifest(manifest, public_key)
        except SignatureError as exc:
            raise HTTPException(422, f"manifest rejected: {exc}") from exc
        _check_fields(manifest)
        sha, size = str(manifest["sha256"]), manifest["size"]
        if not isinstance(size, int) or not 0 < size <= gw.settings.max_model_bytes:
            raise HTTPException(422, f"manifest size must be a positive integer of at most "
                                f"{gw.settings.max_model_bytes} bytes, got {size!r}")
        for name, longest in (("rollout_id", 100), ("model_version", 200), ("key_id", 16)):
            if len(str(manifest[name])) > longest:
                raise HTTPException(422, f"manifest {name} is longer than {longest} characters")
        try:
            path = gw.models.path_for(sha)
        except ValueError as exc:
            raise HTTPException(422, f"manifest sha256: {exc}") from exc
        # A clash is refused before any byte is stored (and again, under the write lock, when
        # the manifest is recorded: another publish may take the id in between).
        await run_in_threadpool(_check_rollout_id, gw, manifest)
        stored: list[str] = []  # files this request added: removed again if it is refused
        try:
            if isinstance(upload, UploadFile):
                try:
                    await _ingest(gw, upload, sha, size, stored)
                except ModelFileRejected as exc:
                    raise HTTPException(422, f"model file rejected: {exc}") from exc
            elif not path.is_file():
                raise HTTPException(422, f"missing form field 'file': no stored model {sha}")
            await _store_variants(gw, manifest, variant_uploads, stored)
            return await run_in_threadpool(_record_model, gw, principal, manifest, request,
                                           response)
        except BaseException:
            if stored:
                with anyio.CancelScope(shield=True):  # also when the client went away
                    await run_in_threadpool(_discard_unpublished, gw, stored)
            raise
    finally:
        await form.close()


def _check_fields(manifest: Any) -> None:
    """422 unless the fields an agent acts on are well formed and the manifest's own file is
    square (``check_manifest_fields``): at publish, and again at ``POST /v1/rollouts`` for a
    manifest stored before a rule was added (or written straight into the store)."""
    try:
        if not isinstance(manifest, dict):
            raise SignatureError(f"manifest is not a JSON object ({type(manifest).__name__})")
        if "key_id" not in manifest:
            raise SignatureError("manifest lacks field(s): key_id")
        check_manifest_fields(manifest)
    except SignatureError as exc:
        raise HTTPException(422, f"manifest rejected: {exc}") from exc


def _check_rollout_id(gw: Gateway, manifest: dict[str, Any]) -> None:
    """409 when another stored manifest has this manifest's ``rollout_id``."""
    msha = manifest_sha256(manifest)
    with gw.db.read() as session:
        clash = session.scalar(select(ModelManifestRow.manifest_sha256).where(
            ModelManifestRow.rollout_id == str(manifest["rollout_id"]),
            ModelManifestRow.manifest_sha256 != msha).limit(1))
    if clash is not None:
        raise HTTPException(409, f"rollout id {manifest['rollout_id']} already belongs to "
                            f"manifest {clash}: sign a new manifest")


async def _ingest(gw: Gateway, upload: UploadFile, sha: str, size: int,
                  stored: list[str]) -> None:
    """Store one uploaded file; its SHA-256 goes to ``stored`` when it was not there before."""
    existed = gw.models.has(sha)
    await run_in_threadpool(gw.models.ingest, upload.file, sha, size)
    if not existed and sha not in stored:
        stored.append(sha)


def _discard_unpublished(gw: Gateway, shas: list[str]) -> None:
    """Remove the files a refused publish stored, unless a stored manifest names them (one
    published meanwhile): no manifest vouches for them, so no device may fetch them."""
    try:
        for sha in shas:
            if not gw.manifests.published(sha, fresh=True):
                gw.models.discard(sha)
    except Exception:  # the refusal itself is the answer; downloads check manifests anyway
        logger.exception("could not clean up the files of a refused publish: %s", shas)


async def _store_variants(gw: Gateway, manifest: dict[str, Any], uploads: list[UploadFile],
                          stored: list[str]) -> None:
    """Store the files of the manifest's ``variants`` (other input shapes): each upload in a
    ``variant`` part is matched by file name; a variant whose file is stored may be left out.
    Files stored here are added to ``stored``."""
    variants = manifest.get("variants") or []
    if not isinstance(variants, list) or len(variants) > MAX_VARIANTS:
        raise HTTPException(422, f"manifest variants must be a list of at most {MAX_VARIANTS}")
    by_name: dict[str, UploadFile] = {}
    for u in uploads:
        if not u.filename or u.filename in by_name:
            raise HTTPException(422, "each 'variant' part needs its own file name")
        by_name[u.filename] = u
    for i, v in enumerate(variants):
        sha, size = (v.get("sha256"), v.get("size")) if isinstance(v, dict) else (None, None)
        if not isinstance(size, int) or not 0 < size <= gw.settings.max_model_bytes:
            raise HTTPException(422, f"manifest variants[{i}].size must be a positive integer of "
                                f"at most {gw.settings.max_model_bytes} bytes, got {size!r}")
        try:
            path = gw.models.path_for(str(sha))
        except ValueError as exc:
            raise HTTPException(422, f"manifest variants[{i}].sha256: {exc}") from exc
        upload = by_name.pop(str(v.get("file") or ""), None)
        if upload is not None:
            try:
                await _ingest(gw, upload, str(sha), size, stored)
            except ModelFileRejected as exc:
                raise HTTPException(422, f"variant file {upload.filename} rejected: {exc}") from exc
        elif not path.is_file():
            raise HTTPException(422, f"manifest variants[{i}] ({v.get('file')}): no 'variant' "
                                f"part of that name and no stored model {sha}")
    if by_name:
        raise HTTPException(422, f"'variant' part(s) {sorted(by_name)} not in the manifest")


def _record_model(gw: Gateway, principal: Principal, manifest: dict[str, Any],
                  request: Request, response: Response) -> ModelPublished:
    now = gw.now()
    msha = manifest_sha256(manifest)
    with gw.db.write() as session:
        row = session.get(ModelManifestRow, msha)
        created = row is None
        if row is None:
            clash = session.scalar(select(ModelManifestRow).where(
                ModelManifestRow.rollout_id == manifest["rollout_id"]))
            if clash is not None:
                raise HTTPException(409, f"rollout id {manifest['rollout_id']} already belongs to "
                                    f"manifest {clash.manifest_sha256}: sign a new manifest")
            row = ModelManifestRow(
                manifest_sha256=msha, file_sha256=manifest["sha256"], size=manifest["size"],
                model_version=str(manifest["model_version"]),
                rollout_id=str(manifest["rollout_id"]), key_id=str(manifest["key_id"]),
                manifest=manifest, path=f"{manifest['sha256']}.onnx", published_at=now,
                published_by=principal.actor)
            session.add(row)
            audit(session, now, "model_published", actor=principal.actor,
                  token_id=principal.token_id, client=client_address(request),
                  detail={"manifest_sha256": msha, "sha256": manifest["sha256"],
                          "model_version": row.model_version, "rollout_id": row.rollout_id,
                          "key_id": row.key_id})
            session.commit()
    if created:
        gw.manifests.invalidate()  # its files are downloadable at once
    else:
        response.status_code = 200
    return ModelPublished(manifest_sha256=msha, sha256=row.file_sha256, size=row.size,
                          model_version=row.model_version, rollout_id=row.rollout_id,
                          key_id=row.key_id, created=created)


@operator.post("/v1/rollouts", status_code=201, response_model=RolloutOut, responses=_ERRORS)
def create_rollout(
    body: RolloutCreate, request: Request, principal: AdminPrincipal, gw: GatewayDep
) -> RolloutOut:
    """Start a rollout of a published manifest; cancels the rollout that is still live."""
    s = gw.settings
    try:
        stages = normalise_stages(body.stages)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    overrides = body.budgets.model_dump(exclude_none=True) if body.budgets else {}
    budgets = default_budgets(s).model_copy(update=overrides)
    now = gw.now()
    with gw.db.write() as session:
        if body.manifest_sha256:
            manifest = session.get(ModelManifestRow, body.manifest_sha256)
            what = f"manifest {body.manifest_sha256}"
        elif body.model_version:
            manifest = session.scalar(select(ModelManifestRow).where(
                ModelManifestRow.model_version == body.model_version)
                .order_by(ModelManifestRow.published_at.desc()).limit(1))
            what = f"model version {body.model_version}"
        else:
            raise HTTPException(422, "give manifest_sha256 or model_version")
        if manifest is None:
            raise HTTPException(404, f"no published {what}: POST /v1/models first")
        _check_fields(manifest.manifest)  # stored before a publish rule, or not published
        if session.get(RolloutRow, manifest.rollout_id) is not None:
            raise HTTPException(409, f"rollout {manifest.rollout_id} already exists: a manifest "
                                "is rolled out once; publish a new one (new rollout id)")
        for old in session.scalars(select(RolloutRow).where(RolloutRow.status.in_(LIVE))):
            old.status = RolloutStatus.cancelled.value
            old.finished_at = now
            old.reason = f"superseded by {manifest.rollout_id}"
            record_event(old, now, "cancelled", actor=principal.actor, by=manifest.rollout_id)
            audit(session, now, "rollout_cancelled", actor=principal.actor,
                  token_id=principal.token_id, client=client_address(request),
                  detail={"rollout_id": old.rollout_id, "superseded_by": manifest.rollout_id})
        previous = session.scalar(select(RolloutRow).where(
            RolloutRow.status == RolloutStatus.complete.value)
            .order_by(RolloutRow.finished_at.desc()).limit(1))
        ro = RolloutRow(
            rollout_id=manifest.rollout_id, manifest_sha256=manifest.manifest_sha256,
            model_version=manifest.model_version, status=RolloutStatus.active.value,
            stages=[st.model_dump() for st in stages], stage_index=0, stage_started_at=now,
            cohort_threshold=0.0,
            hold_seconds=body.hold_seconds if body.hold_seconds is not None
            else s.rollout_hold_seconds,
            budgets=budgets.model_dump(),
            previous_model_version=previous.model_version if previous else None,
            previous_manifest_sha256=previous.manifest_sha256 if previous else None,
            created_at=now, updated_at=now, created_by=principal.actor, history=[], health={})
        enter_stage(session, ro, 0, now)
        record_event(ro, now, "created", actor=principal.actor)
        session.add(ro)
        audit(session, now, "rollout_created", actor=principal.actor, token_id=principal.token_id,
              client=client_address(request),
              detail={"rollout_id": ro.rollout_id, "model_version": ro.model_version,
                      "manifest_sha256": ro.manifest_sha256, "hold_seconds": ro.hold_seconds,
                      "stages": [st.name for st in stages], "budgets": ro.budgets})
        session.commit()
        gw.manifests.invalidate()
        return rollout_out(session, ro, now)


@operator.get("/v1/rollouts", response_model=list[RolloutOut], responses=_ERRORS)
def list_rollouts(
    _: AdminPrincipal, gw: GatewayDep, status: RolloutStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RolloutOut]:
    """Rollouts, newest first (filter by ``status``)."""
    q = select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(limit)
    if status is not None:
        q = q.where(RolloutRow.status == status.value)
    now = gw.now()
    with gw.db.read() as session:
        return [rollout_out(session, ro, now) for ro in session.scalars(q)]


@operator.get("/v1/rollouts/{rollout_id}", response_model=RolloutOut, responses=_ERRORS)
def get_rollout(rollout_id: RolloutIdPath, _: AdminPrincipal, gw: GatewayDep) -> RolloutOut:
    """One rollout: stage, percent, cohort size, status, history, health per stage."""
    with gw.db.read() as session:
        return rollout_out(session, _get_rollout(session, rollout_id), gw.now())


def _change(gw: Gateway, rollout_id: str, principal: Principal, request: Request,
            action: str) -> RolloutOut:
    now = gw.now()
    with gw.db.write() as session:
        ro = _get_rollout(session, rollout_id)
        audit_action = f"rollout_{action}"
        if action == "paused":
            if ro.status != RolloutStatus.active.value:
                raise HTTPException(409, f"rollout {rollout_id} is {ro.status}; only an active "
                                    "rollout can be paused")
            ro.status = RolloutStatus.paused.value
            record_event(ro, now, "paused", actor=principal.actor)
        elif action == "resumed":
            if ro.status != RolloutStatus.paused.value:
                raise HTTPException(409, f"rollout {rollout_id} is {ro.status}; only a paused "
                                    "rollout can be resumed")
            ro.status = RolloutStatus.active.value
            record_event(ro, now, "resumed", actor=principal.actor)
        elif action == "advanced":
            if ro.status != RolloutStatus.active.value:
                raise HTTPException(409, f"rollout {rollout_id} is {ro.status}; only an active "
                                    "rollout can advance (resume it first if paused)")
            audit_action = advance(session, ro, now, "manual", principal.actor)
        stage = ro.stages[ro.stage_index]
        audit(session, now, audit_action, actor=principal.actor, token_id=principal.token_id,
              client=client_address(request), detail={"rollout_id": rollout_id, "stage": stage["name"],
                                               "percent": stage["percent"], "status": ro.status})
        session.commit()
        gw.manifests.invalidate()
        return rollout_out(session, ro, now)


@operator.post("/v1/rollouts/{rollout_id}/pause", response_model=RolloutOut, responses=_ERRORS)
def pause_rollout(rollout_id: RolloutIdPath, request: Request, principal: AdminPrincipal,
                  gw: GatewayDep) -> RolloutOut:
    """Stop advancing (devices keep their current assignment)."""
    return _change(gw, rollout_id, principal, request, "paused")


@operator.post("/v1/rollouts/{rollout_id}/resume", response_model=RolloutOut, responses=_ERRORS)
def resume_rollout(rollout_id: RolloutIdPath, request: Request, principal: AdminPrincipal,
                   gw: GatewayDep) -> RolloutOut:
    return _change(gw, rollout_id, principal, request, "resumed")


@operator.post("/v1/rollouts/{rollout_id}/advance", response_model=RolloutOut, responses=_ERRORS)
def advance_rollout(rollout_id: RolloutIdPath, request: Request, principal: AdminPrincipal,
                    gw: GatewayDep) -> RolloutOut:
    """Go to the next stage now (skips the hold and the health rule)."""
    return _change(gw, rollout_id, principal, request, "advanced")


@operator.post("/v1/rollouts/{rollout_id}/rollback", response_model=RolloutOut, responses=_ERRORS)
def rollback_rollout(rollout_id: RolloutIdPath, request: Request, principal: AdminPrincipal,
                     gw: GatewayDep, body: RollbackRequest | None = None) -> RolloutOut:
    """Roll the whole rollout back: every device returns to its previous model."""
    reason = (body or RollbackRequest()).reason
    now = gw.now()
    with gw.db.write() as session:
        ro = _get_rollout(session, rollout_id)
        if ro.status not in (*LIVE, RolloutStatus.complete.value):
            raise HTTPException(409, f"rollout {rollout_id} is {ro.status}: nothing to roll back")
        roll_back(ro, now, reason, "manual", principal.actor)
        stage = ro.stages[ro.stage_index]
        audit(session, now, "rollout_rolled_back", actor=principal.actor,
              token_id=principal.token_id, client=client_address(request),
              detail={"rollout_id": rollout_id, "stage": stage["name"], "reason": reason,
                      "how": "manual"})
        session.commit()
        gw.manifests.invalidate()
        return rollout_out(session, ro, now)


@operator.post("/v1/rollouts/{rollout_id}/evaluate", response_model=EvaluateOut, responses=_ERRORS)
def evaluate_rollout(rollout_id: RolloutIdPath, request: Request, principal: AdminPrincipal,
                     gw: GatewayDep) -> EvaluateOut:
    """Apply the automatic rule now: rollback on failing health, advance when the hold elapsed
    and health passes, hold otherwise. Terminal rollouts answer their status."""
    now = gw.now()
    with gw.db.write() as session:
        ro = _get_rollout(session, rollout_id)
        health = compute_health(session, ro, now) if ro.status in LIVE else None
        # Seconds compared as floats: no timedelta is built from a stored hold, so even a row
        # written before holds were bounded cannot overflow here.
        elapsed = (now - ro.stage_started_at).total_seconds() >= ro.hold_seconds
        decision = decide(ro.status, health, elapsed)
        stage = ro.stages[ro.stage_index]
        if health is not None:
            ro.health = {**ro.health, stage["name"]: health.model_dump(mode="json")}
        changed = decision in ("advance", "rollback")
        if decision == "rollback":
            assert health is not None
            reason = "; ".join(health.reasons)
            roll_back(ro, now, reason, "automatic", principal.actor)
            audit(session, now, "rollout_rolled_back", actor=principal.actor,
                  token_id=principal.token_id, client=client_address(request),
                  detail={"rollout_id": rollout_id, "stage": stage["name"], "reason": reason,
                          "how": "automatic", "health": health.model_dump(mode="json")})
        elif decision == "advance":
            action = advance(session, ro, now, "automatic", principal.actor, health)
            new = ro.stages[ro.stage_index]
            audit(session, now, action, actor=principal.actor, token_id=principal.token_id,
                  client=client_address(request),
                  detail={"rollout_id": rollout_id, "from": stage["name"], "stage": new["name"],
                          "percent": new["percent"], "how": "automatic",
                          "health": health.model_dump(mode="json") if health else None})
            if action == "rollout_completed":
                decision = "complete"
        session.commit()
        if changed:
            gw.manifests.invalidate()
        out = rollout_out(session, ro, now)
    return EvaluateOut(rollout_id=rollout_id, decision=decision, status=out.status,
                       stage=out.stage, percent=out.percent, health=health, rollout=out)


@device.get("/v1/manifest", response_model=ManifestOut,
            responses={**_ERRORS, 304: {"description": "unchanged (If-None-Match)"}})
def get_manifest(request: Request, principal: DeviceReader, gw: GatewayDep) -> Response:
    """This device's assignment: which model to serve or shadow (ETag / If-None-Match)."""
    snap = gw.manifests.current()
    assert principal.device_id is not None
    shape: list[int] | None = None
    if snap.get("rollout") is None:
        out = ManifestOut(assignment=Assignment(mode="none"))
    else:
        stage: Stage = snap["stage"]
        status = snap["status"]
        mode = assignment_mode(principal.device_id, stage, status, snap["threshold"])
        live = mode != "none"
        shapes = manifest_shapes(snap["manifest"] if live else snap["baseline"])
        if shapes and principal.camera_id:
            shape = shape_for_camera(gw.manifests.frame_size(principal.camera_id), shapes)
        out = ManifestOut(
            assignment=Assignment(mode=mode, rollout_id=snap["rollout"], stage=stage.name,
                                  percent=100.0 if status == RolloutStatus.complete.value
                                  else stage.percent, status=status, input_shape=shape),
            manifest=snap["manifest"] if live else None,
            previous_model_version=snap["previous_model_version"], baseline=snap["baseline"])
    body, etag = gw.manifests.encoded(snap, out.assignment.mode, out, shape)
    gw.stats.count("manifest_polls")
    match = request.headers.get("if-none-match")
    if match and etag in [t.strip() for t in match.split(",")]:
        gw.stats.count("manifest_not_modified")
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
    return Response(content=body, media_type="application/json",
                    headers={"ETag": etag, "Cache-Control": "no-cache"})


@device.get("/v1/models/{sha256}", responses={**_ERRORS, 206: {"description": "partial"},
                                              416: {"description": "range not satisfiable"}})
def download_model(sha256: str, principal: ModelReader, gw: GatewayDep) -> ModelFileResponse:
    """A published model file (``Range`` requests answered with 206): one a stored manifest
    names (its file or a variant's); any other file is a 404, even if it is on disk."""
    store = gw.models
    if not store.has(sha256) or not gw.manifests.published(sha256):
        raise HTTPException(404, f"no model {sha256} on this gateway")
    gw.stats.count("model_downloads")
    response = ModelFileResponse(store.path_for(sha256),
                                 media_type="application/octet-stream",
                                 headers={"ETag": f'"{sha256}"', "Cache-Control": "no-cache"})
    response.chunk_size = 1 << 20  # 1 MiB reads: fewer thread hops per download
    return response


__all__ = ["DeviceReader", "ModelReader", "require_device_or_admin", "router"]
