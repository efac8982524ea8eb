"""Per-gateway caches on the request path: token lookups, the manifest public key, and the
current rollout's snapshot with its encoded ``GET /v1/manifest`` answers.

``fleet.runtime.Gateway`` holds one of each (``gw.auth_cache``, ``gw.model_key``,
``gw.manifests``). This module sits below ``fleet.auth`` and ``fleet.rollouts``, which both
read these caches, and imports neither: the auth cache is keyed by token hash and keeps
whatever principal its caller hands it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi import HTTPException
from pydantic import BaseModel
from sqlalchemy import select

from fleet.db import Database, ModelManifestRow, RolloutRow, RolloutStatus, Token
from fleet.rollout_policy import Stage
from fleet.rollout_shapes import camera_frame_size
from roadloop.errors import InvalidInputError
from roadloop.release.signing import load_public_key

P = TypeVar("P")


class AuthCache(Generic[P]):
    """Token scopes (they never change) and principals authenticated moments ago.

    Read-only routes (manifest polls, model downloads) reuse a principal for
    ``PRINCIPAL_TTL_S``; frames and heartbeats for ``principal_cache_s`` (a setting, ``ttl``
    of ``cached_principal``). A revocation, status change or expiry made elsewhere (another
    replica, the CLI) reaches a cached principal within that bound; one made through this
    gateway calls ``forget_device`` and takes effect at once. Only devices' principals are
    cached: an admin token is looked up on every request, so ``fleet admin-token revoke``
    (run in another process) takes effect at once. ``clock``: seconds, monotonic (injected
    by tests).
    """

    PRINCIPAL_TTL_S = 2.0

    def __init__(self, db: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.clock = clock
        self.lock = threading.Lock()
        self._scopes: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._principals: dict[tuple[str, Hashable], tuple[P, float]] = {}

    def cached_principal(self, token_hash: str, variant: Hashable, now: datetime,
                         ttl: float | None = None) -> P | None:
        """A principal authenticated (for ``variant``: what the route asked of the token)
        less than ``ttl`` (default ``PRINCIPAL_TTL_S``) seconds ago, else None; None as well
        once its token's ``expires_at`` is not after ``now`` (the caller then authenticates,
        which says why)."""
        with self.lock:
            hit = self._principals.get((token_hash, variant))
        limit = self.PRINCIPAL_TTL_S if ttl is None else ttl
        if hit is None or self.clock() - hit[1] > limit:
            return None
        expires_at = getattr(hit[0], "expires_at", None)
        if expires_at is not None and expires_at <= now:
            return None
        return hit[0]

    def remember_principal(self, token_hash: str, variant: Hashable, principal: P) -> None:
        now = self.clock()
        with self.lock:
            self._principals[(token_hash, variant)] = (principal, now)
            if len(self._principals) > 50_000:
                cutoff = now - 60.0  # longer than any TTL (principal_cache_s <= 60)
                for k in [k for k, v in self._principals.items() if v[1] < cutoff]:
                    del self._principals[k]

    def forget_device(self, device_id: str) -> None:
        """Drop every cached principal of ``device_id`` (revoked, status changed)."""
        with self.lock:
            for k in [k for k, v in self._principals.items()
                      if getattr(v[0], "device_id", None) == device_id]:
                del self._principals[k]

    def token_scopes(self, token_hash: str) -> frozenset[str] | None:
        """Scopes of a token, cached; None when unknown."""
        with self.lock:
            if token_hash in self._scopes:
                self._scopes.move_to_end(token_hash)
                return self._scopes[token_hash]
        with self.db.read() as session:
            scopes = session.scalar(select(Token.scopes).where(Token.token_hash == token_hash))
        if scopes is None:
            return None
        value = frozenset(scopes.split())
        with self.lock:
            self._scopes[token_hash] = value
            while len(self._scopes) > 20_000:
                self._scopes.popitem(last=False)
        return value


class ModelPublicKey:
    """The configured manifest public key (re-read when the file changes, so a key the
    platform creates after start-up is picked up)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pub: tuple[float, str] | None = None

    def get(self) -> str:
        """The base64 key; 503 when the file is missing or unusable."""
        path = self.path
        assert path is not None
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            raise HTTPException(
                503, f"the gateway has no model public key at {path}: copy the platform's "
                "model-signing.pub there or set ROADLOOP_GATEWAY_MODEL_PUBLIC_KEY_FILE"
            ) from None
        if self._pub is None or self._pub[0] != mtime:
            try:
                self._pub = (mtime, load_public_key(path))
            except InvalidInputError as exc:
                raise HTTPException(503, f"model public key unusable: {exc}") from exc
        return self._pub[1]

    def get_or_none(self) -> str | None:
        """The key to hand out at enrollment (None when not configured)."""
        try:
            return self.get()
        except HTTPException:
            return None


class ManifestCache:
    """What ``GET /v1/manifest`` needs: the latest rollout that is not cancelled (reloaded on
    ``invalidate`` or after ``TTL_S``) and the JSON bodies + ETags built from it.

    ``baseline`` is the manifest of the newest *other* rollout that is complete now (not
    rolled back since): the model the fleet stands behind outside the current rollout. An
    agent serving a model of any other rollout (one a newer rollout cancelled, one rolled back
    after it completed) returns to it; ``null`` means no rollout completed, so the model each
    agent was started with is the known-good one."""

    TTL_S = 1.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self.lock = threading.Lock()
        self.generation = 0
        self._loaded: tuple[int, float] | None = None
        self.snapshot: dict[str, Any] = {}
        self._seq = 0
        self._bodies: dict[tuple[Any, ...], tuple[bytes, str]] = {}
        self._frame_sizes: dict[str, tuple[int, int] | None] = {}  # per camera, per snapshot
        self._published: frozenset[str] = frozenset()  # file SHA-256s stored manifests name
        self._published_at = -math.inf  # monotonic time of the last read of the manifests

    def invalidate(self) -> None:
        with self.lock:
            self.generation += 1
            self._published_at = -math.inf  # a manifest published here is found at once

    def current(self) -> dict[str, Any]:
        with self.lock:
            gen = self.generation
            fresh = self._loaded and time.monotonic() - self._loaded[1] < self.TTL_S
            if fresh and self._loaded[0] == gen:  # type: ignore[index]
                return self.snapshot
        snap = self._load()
        with self.lock:
            self._seq += 1
            snap["seq"] = self._seq
            self.snapshot = snap
            self._frame_sizes = {}
            self._loaded = (gen, time.monotonic())
        return snap

    def _load(self) -> dict[str, Any]:
        with self.db.read() as session:
            ro = session.scalar(
                select(RolloutRow).where(RolloutRow.status != RolloutStatus.cancelled.value)
                .order_by(RolloutRow.created_at.desc()).limit(1))
            if ro is None:
                return {"rollout": None}
            manifest = session.get(ModelManifestRow, ro.manifest_sha256)
            baseline = None
            done = session.scalar(
                select(RolloutRow).where(RolloutRow.status == RolloutStatus.complete.value,
                                         RolloutRow.rollout_id != ro.rollout_id)
                .order_by(RolloutRow.finished_at.desc()).limit(1))
            if done is not None:
                prev = session.get(ModelManifestRow, done.manifest_sha256)
                baseline = prev.manifest if prev else None
            stage = Stage(**ro.stages[ro.stage_index])
            return {
                "rollout": ro.rollout_id, "status": ro.status, "stage": stage,
                "threshold": 1.0 if ro.status == RolloutStatus.complete.value
                else ro.cohort_threshold,
                "manifest": manifest.manifest if manifest else None,
                "previous_model_version": ro.previous_model_version, "baseline": baseline,
            }

    def published(self, sha256: str, *, fresh: bool = False) -> bool:
        """Whether a stored manifest names the file ``sha256`` (its own file or a variant's):
        the only files ``GET /v1/models/{sha256}`` serves. Manifests are never deleted, so a
        hit is cached for good; a miss re-reads the manifests (a handful of rows), at most
        once per ``TTL_S`` (a device asking for made-up hashes costs no more), so a manifest
        another replica published is found within that. ``fresh``: always re-read on a miss
        (before a file is deleted)."""
        if sha256 in self._published:
            return True
        with self.lock:
            if not fresh and time.monotonic() - self._published_at < self.TTL_S:
                return False
            self._published_at = time.monotonic()
        with self.db.read() as session:
            rows = session.execute(
                select(ModelManifestRow.file_sha256, ModelManifestRow.manifest)).all()
        shas = {file_sha for file_sha, _ in rows}
        for _, manifest in rows:
            variants = manifest.get("variants") if isinstance(manifest, dict) else None
            for v in variants if isinstance(variants, list) else ():
                if isinstance(v, dict) and isinstance(v.get("sha256"), str):
                    shas.add(v["sha256"])
        with self.lock:
            self._published = frozenset(shas)
        return sha256 in shas

    def frame_size(self, camera_id: str) -> tuple[int, int] | None:
        """The camera's frame size (``fleet.rollout_shapes``), looked up once per snapshot."""
        with self.lock:
            if camera_id in self._frame_sizes:
                return self._frame_sizes[camera_id]
        with self.db.read() as session:
            size = camera_frame_size(session, camera_id)
        with self.lock:
            if len(self._frame_sizes) > 100_000:
                self._frame_sizes.clear()
            self._frame_sizes[camera_id] = size
        return size

    def encoded(
        self, snap: dict[str, Any], mode: str, out: BaseModel, shape: Any = None
    ) -> tuple[bytes, str]:
        """JSON body + ETag of an answer; cached per snapshot, mode and input shape (few
        distinct bodies)."""
        key = (snap.get("seq"), mode, tuple(shape) if shape else None)
        with self.lock:
            hit = self._bodies.get(key)
        if hit is not None:
            return hit
        body = json.dumps(out.model_dump(mode="json"), sort_keys=True,
                          separators=(",", ":")).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        with self.lock:
            if len(self._bodies) > 64:
                self._bodies.clear()
            self._bodies[key] = (body, etag)
        return body, etag
