"""Model updates on the agent: signed manifests, resumable verified downloads, atomic swaps,
shadow runs and self-rollback (``docs/fleet-api.md``, "Model rollouts").

One poll (``ModelUpdater.poll_once``, on the updater thread — never on the frame loop):

1. ``GET /v1/manifest`` with ``If-None-Match`` → 304: nothing to do.
2. Verify the manifest *before* downloading anything: the ``key_id`` must be the pinned key's,
   the Ed25519 signature must verify over the canonical bytes (``canonical_manifest_bytes``,
   the same form ``roadloop/signing.py`` signs), the fields must be well-formed.
3. Download ``GET /v1/models/<sha256>`` into ``<state>/models/.partial-<sha256>``; a dropped
   connection keeps what arrived and the next poll resumes with ``Range``. Then size, then
   SHA-256, then the file becomes ``<state>/models/<sha256>.onnx`` (fsync + rename).
4. Load an ``OnnxDetector`` from it, check its input size and class names against the
   manifest, run one smoke inference.
5. ``mode: serve`` → ``ModelSlot.swap``: the frame loop picks the model once per frame, so
   the swap lands between two frames; the old model becomes *previous* (kept loaded and on
   disk, the baseline ``--model`` is copied into the store for that). ``mode: shadow`` →
   ``ShadowRunner`` beside the serving model. ``mode: none`` (or a rolled-back rollout)
   → back to the previous model if the serving one came from that rollout.

Heartbeat fields (``heartbeat_fields``): ``update_status`` is one of

* ``idle`` — no rollout work; ``downloading``; ``shadow``; ``serving`` (a rollout's model);
* ``rejected`` — the manifest or the file failed verification (signature, key, size,
  SHA-256): the artifact is not trusted, the model itself was never judged;
* ``rolled_back`` — a verified model could not serve (does not load, wrong input size or
  classes, smoke inference failed), or it served and broke the latency/error limits for
  ``bad_windows`` consecutive heartbeat windows, or a persisted model failed at start-up.

``update_reason`` says why, ``rollout_id`` which rollout it concerns. In every case the old
model keeps serving. A rejected or rolled-back SHA-256 is remembered in
``<state>/updater.json`` and not retried (a SHA-256 mismatch gets ``HASH_MISMATCH_ATTEMPTS``
tries first: it may be a corrupt transfer).

Self-rollback (``RollbackGuard``): after a swap, a heartbeat window is *bad* when the new
model's detect latency P95 exceeds ``latency_budget_ms`` (when unset: ``relative_latency`` ×
the previous model's recent P95, if it was measured) or its error rate (detector failures /
frames) exceeds ``max_error_rate``; ``bad_windows`` bad windows in a row swap back.

``<state>/updater.json`` (atomic writes): ``serving`` and ``previous`` (sha256, path,
model_version, rollout_id, since), ``shadow``, ``rejected`` {key: reason, count, permanent},
``status``/``reason``/``rollout_id``. The ETag is kept in memory only, so a restarted agent
re-reads the manifest once and re-applies it idempotently (nothing is downloaded twice).

Fault injection (tests, rollout drills): ``EDGE_AGENT_FAULT_MODEL_DELAY_MS="<sha256 prefix>=
<ms>[,…]"`` makes every detect of a model whose SHA-256 starts with the prefix take ``ms``
longer (in the pipeline and in shadow runs) — a "slow model" without building one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edge_agent.client import GatewayClient, GatewayError
from edge_agent.errors import EdgeAgentError, InvalidModelError
from edge_agent.fsutil import copy_file_atomic, file_sha256, fsync_dir, write_text_atomic
from edge_agent.inference import OnnxDetector
from edge_agent.manifest import ManifestError, ManifestVerifier, ModelManifest, manifest_digest
from edge_agent.shadow import ShadowRunner

logger = logging.getLogger(__name__)

STATE_FILE = "updater.json"
MODELS_DIR = "models"
FAULT_DELAY_ENV = "EDGE_AGENT_FAULT_MODEL_DELAY_MS"
UPDATE_STATUSES = ("idle", "downloading", "shadow", "serving", "rolled_back", "rejected")
HASH_MISMATCH_ATTEMPTS = 3
MAX_REJECTED = 200


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class UpdateRejected(EdgeAgentError):
    """A manifest or model was refused. ``status`` is ``rejected`` or ``rolled_back``;
    ``key`` is what the refusal is remembered under (a model SHA-256 or ``manifest:<digest>``);
    ``permanent=False`` allows another try on a later poll."""

    def __init__(
        self,
        reason: str,
        *,
        status: str = "rejected",
        key: str | None = None,
        permanent: bool = True,
        rollout_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.key = key
        self.permanent = permanent
        self.rollout_id = rollout_id


class DownloadIncomplete(EdgeAgentError):
    """The download stopped early (network, gateway busy); the next poll resumes it."""


# --------------------------------------------------------------------------- models and slot
_delay_cache: tuple[str, list[tuple[str, float]]] | None = None


def fault_delay_s(sha256: str) -> float:
    """Artificial per-detect delay for a model (``EDGE_AGENT_FAULT_MODEL_DELAY_MS``), seconds."""
    global _delay_cache
    spec = os.environ.get(FAULT_DELAY_ENV, "")
    if not spec:
        return 0.0
    if _delay_cache is None or _delay_cache[0] != spec:
        rules = []
        for part in spec.split(","):
            prefix, _, ms = part.strip().partition("=")
            try:
                rules.append((prefix.strip().lower(), float(ms) / 1e3))
            except ValueError:
                logger.warning(
                    "%s: ignoring %r (expected <sha256 prefix>=<ms>)", FAULT_DELAY_ENV, part
                )
        _delay_cache = (spec, rules)
    for prefix, delay in _delay_cache[1]:
        if prefix and sha256.startswith(prefix):
            return delay
    return 0.0


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A detector ready to serve, with where it came from."""

    detector: Any  # OnnxDetector (or anything with detect/last_timings/class_names)
    sha256: str
    path: Path
    model_version: str | None = None  # the manifest's label; None for the --model baseline
    rollout_id: str | None = None
    delay_s: float = 0.0  # fault injection (EDGE_AGENT_FAULT_MODEL_DELAY_MS)

    @classmethod
    def from_detector(
        cls,
        detector: Any,
        *,
        model_version: str | None = None,
        rollout_id: str | None = None,
        path: Path | None = None,
    ) -> LoadedModel:
        sha = str(detector.model_sha256)
        return cls(
            detector=detector,
            sha256=sha,
            path=Path(path or detector.model_path),
            model_version=model_version,
            rollout_id=rollout_id,
            delay_s=fault_delay_s(sha),
        )

    def record(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "path": str(self.path),
            "model_version": self.model_version,
            "rollout_id": self.rollout_id,
            "since": _now_iso(),
        }


class ModelSlot:
    """Holds the serving model. Readers take ``current`` once per frame (a plain reference
    read, atomic); ``swap`` replaces it under a lock, so a swap always lands between frames
    and a frame never mixes two models."""

    def __init__(self, model: LoadedModel | Any) -> None:
        self._current = (
            model if isinstance(model, LoadedModel) else LoadedModel.from_detector(model)
        )
        self._lock = threading.Lock()
        self.swaps = 0

    @property
    def current(self) -> LoadedModel:
        return self._current

    @property
    def detector(self) -> Any:
        return self._current.detector

    @property
    def sha256(self) -> str:
        return self._current.sha256

    def swap(self, new: LoadedModel) -> LoadedModel:
        """Serve ``new`` from the next frame on; returns the model it replaced."""
        with self._lock:
            old, self._current = self._current, new
            self.swaps += 1
        return old


# --------------------------------------------------------------------------- rollback guard
@dataclass
class GuardLimits:
    """When a freshly swapped-in model is taken back (see the module docstring)."""

    latency_budget_ms: float | None = None
    max_error_rate: float = 0.01
    bad_windows: int = 3
    relative_latency: float = 3.0  # used when latency_budget_ms is None
    min_frames: int = 1  # a window with fewer frames (+ errors) gives no verdict

    def __post_init__(self) -> None:
        if self.bad_windows < 1:
            raise ValueError(f"bad_windows (--rollback-after) must be >= 1, got {self.bad_windows}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")


class RollbackGuard:
    """Counts consecutive bad heartbeat windows of the model it is armed for (thread-safe)."""

    def __init__(self, limits: GuardLimits | None = None) -> None:
        self.limits = limits or GuardLimits()
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=200)
        self._recent_sha: str | None = None
        self.armed_sha: str | None = None
        self.baseline_p95: float | None = None
        self.bad_streak = 0
        self.last_problem: str | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._lat: list[float] = []
        self._frames = 0
        self._errors = 0

    def record(self, sha256: str, latency_ms: float | None = None, *, error: bool = False) -> None:
        with self._lock:
            if latency_ms is not None:
                if sha256 != self._recent_sha:
                    self._recent.clear()
                    self._recent_sha = sha256
                self._recent.append(latency_ms)
            if self.armed_sha is None or sha256 != self.armed_sha:
                return
            if error:
                self._errors += 1
            else:
                self._frames += 1
                if latency_ms is not None:
                    self._lat.append(latency_ms)

    def recent_p95(self, sha256: str, min_frames: int = 10) -> float | None:
        """P95 of the last (up to 200) latencies of ``sha256``, if it served enough frames."""
        with self._lock:
            if self._recent_sha != sha256 or len(self._recent) < min_frames:
                return None
            return float(np.percentile(list(self._recent), 95))

    def budget_ms(self) -> float | None:
        if self.limits.latency_budget_ms is not None:
            return self.limits.latency_budget_ms
        if self.baseline_p95 is not None:
            return self.limits.relative_latency * self.baseline_p95
        return None

    def arm(self, sha256: str, baseline_p95: float | None = None) -> None:
        with self._lock:
            self.armed_sha = sha256
            self.baseline_p95 = baseline_p95
            self.bad_streak = 0
            self.last_problem = None
            self._reset_window()

    def disarm(self) -> None:
        with self._lock:
            self.armed_sha = None
            self.bad_streak = 0
            self._reset_window()

    def end_window(self) -> str | None:
        """Close the window; the reason to roll back when the bad streak reached the limit."""
        with self._lock:
            frames, errors, lat = self._frames, self._errors, self._lat
            self._reset_window()
            if self.armed_sha is None:
                return None
            n = frames + errors
            if n < self.limits.min_frames:
                return None  # no verdict: an idle window neither breaks nor resets the streak
            problems = []
            budget = self.budget_ms()
            p95 = float(np.percentile(lat, 95)) if lat else None
            if budget is not None and p95 is not None and p95 > budget:
                problems.append(f"latency P95 {p95:.1f} ms > budget {budget:.1f} ms")
            rate = errors / n
            if rate > self.limits.max_error_rate:
                problems.append(
                    f"error rate {rate:.1%} > {self.limits.max_error_rate:.1%} "
                    f"({errors} failed of {n} frames)"
                )
            if not problems:
                self.bad_streak = 0
                return None
            self.bad_streak += 1
            self.last_problem = "; ".join(problems)
            logger.warning(
                "model %s: bad heartbeat window %d/%d: %s",
                self.armed_sha[:12],
                self.bad_streak,
                self.limits.bad_windows,
                self.last_problem,
            )
            if self.bad_streak >= self.limits.bad_windows:
                return f"{self.last_problem} for {self.bad_streak} consecutive heartbeat windows"
            return None


# --------------------------------------------------------------------------- persisted state
@dataclass
class UpdaterState:
    serving: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "idle"
    reason: str | None = None
    rollout_id: str | None = None
    updated_at: str = field(default_factory=_now_iso)

    @classmethod
    def load(cls, path: Path) -> UpdaterState:
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            state = cls(**known)
            if not isinstance(state.rejected, dict):
                raise TypeError("'rejected' is not an object")
            return state
        except (OSError, ValueError, TypeError) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(path, aside)
            except OSError:
                aside = path
            logger.error(
                "%s: unreadable updater state (%s); kept as %s, starting fresh", path, exc, aside
            )
            return cls()

    def save(self, path: Path) -> None:
        self.updated_at = _now_iso()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- the updater
class ModelUpdater:
    """Polls the gateway for model assignments and applies them to a ``ModelSlot``.

    Thread model: ``poll_once`` (the updater thread) downloads, loads and swaps;
    ``observe_frame``/``observe_error`` (the frame loop) are cheap; ``heartbeat_fields``
    (the heartbeat thread) closes the guard's window and may roll back.
    """

    def __init__(
        self,
        client: GatewayClient,
        state_dir: Path | str,
        slot: ModelSlot,
        verifier: ManifestVerifier,
        *,
        limits: GuardLimits | None = None,
        shadow_sample_rate: float = 0.2,
        shadow_background: bool = True,
        detector_factory: Callable[[Path], Any] | None = None,
    ) -> None:
        if not 0.0 < shadow_sample_rate <= 1.0:
            raise ValueError(f"shadow sample rate must be in (0, 1], got {shadow_sample_rate}")
        self.client = client
        self.state_dir = Path(state_dir)
        self.models_dir = self.state_dir / MODELS_DIR
        self.state_path = self.state_dir / STATE_FILE
        self.slot = slot
        self.verifier = verifier
        self.guard = RollbackGuard(limits)
        self.shadow_sample_rate = shadow_sample_rate
        self.shadow_background = shadow_background
        self._factory = detector_factory or (lambda p: OnnxDetector(p))
        self._lock = threading.RLock()  # state + swaps
        self._poll_lock = threading.Lock()  # one poll at a time
        self.etag: str | None = None
        self.state = UpdaterState.load(self.state_path)
        self._previous: LoadedModel | None = None  # the previous model, kept loaded
        self._shadow: ShadowRunner | None = None
        self._shadow_model: LoadedModel | None = None
        self._shadow_rollout: str | None = None
        self._pending_sha: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ status
    @property
    def status(self) -> str:
        return self.state.status

    @property
    def reason(self) -> str | None:
        return self.state.reason

    def _set_status(self, status: str, reason: str | None, rollout_id: str | None) -> None:
        assert status in UPDATE_STATUSES, status
        with self._lock:
            self.state.status, self.state.reason, self.state.rollout_id = status, reason, rollout_id
            self._save()

    def _save(self) -> None:
        try:
            self.state.save(self.state_path)
        except OSError as exc:  # a full disk must not stop the camera
            logger.error("%s: cannot save the updater state: %s", self.state_path, exc)

    # ------------------------------------------------------------------ start-up
    def restore(self) -> None:
        """Serve the model the last run ended with (``updater.json``), if it is not the one
        the agent started with; a persisted model that no longer loads is rolled back."""
        with self._lock:
            st, base = self.state, self.slot.current
            self.models_dir.mkdir(parents=True, exist_ok=True)
            want = st.serving
            if not want or want.get("sha256") == base.sha256:
                if want and want.get("sha256") == base.sha256:
                    self.slot.swap(
                        dataclasses.replace(
                            base,
                            model_version=want.get("model_version"),
                            rollout_id=want.get("rollout_id"),
                        )
                    )
                    if want.get("rollout_id") is not None:
                        self.guard.arm(base.sha256)
                else:
                    st.serving = base.record()
                self._save()
                return
            try:
                model = self._load_recorded(want)
            except Exception as exc:  # noqa: BLE001 - any failure means: do not serve it
                reason = (
                    f"persisted model {str(want.get('sha256'))[:12]} does not load at start-up: "
                    f"{exc}"
                )
                self._remember(str(want.get("sha256")), reason, permanent=True)
                fallback = base
                prev = st.previous
                if prev and prev.get("sha256") != base.sha256:
                    try:
                        fallback = self._load_recorded(prev)
                        self.slot.swap(fallback)
                    except Exception as exc2:  # noqa: BLE001
                        logger.warning("previous model unusable too (%s); serving --model", exc2)
                        fallback = base
                st.serving, st.previous = fallback.record(), None
                logger.error("rolled back: %s; serving %s", reason, fallback.sha256[:12])
                self._set_status("rolled_back", reason, want.get("rollout_id"))
                return
            self.slot.swap(model)
            if model.rollout_id is not None:
                self.guard.arm(model.sha256)
            logger.info(
                "serving %s (model_version %s, rollout %s) from %s, as the last run did "
                "(previous: %s)",
                model.sha256[:12],
                model.model_version,
                model.rollout_id,
                self.state_path,
                (st.previous or {}).get("sha256", "none")[:12],
            )
            self._save()

    def _load_recorded(self, rec: Mapping[str, Any]) -> LoadedModel:
        sha = str(rec.get("sha256"))
        path = Path(str(rec.get("path") or self.models_dir / f"{sha}.onnx"))
        det = self._factory(path)
        if det.model_sha256 != sha:
            raise InvalidModelError(path, f"content changed: sha256 {det.model_sha256[:12]}")
        return LoadedModel.from_detector(
            det, model_version=rec.get("model_version"), rollout_id=rec.get("rollout_id")
        )

    # ------------------------------------------------------------------ the loop
    def start(self, interval_s: float) -> ModelUpdater:
        """Poll now and then every ``interval_s`` seconds on a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), name="model-updater", daemon=True
        )
        self._thread.start()
        return self

    def _loop(self, interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                logger.exception("model update poll failed")
            if self._stop.wait(interval_s):
                break

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            if self._shadow is not None:
                self._shadow.stop()

    # ------------------------------------------------------------------ frame loop hooks
    def observe_frame(
        self, model: LoadedModel, latency_ms: float, detections: list, image: np.ndarray
    ) -> None:
        """The frame loop served ``image`` with ``model``; feeds the guard and the shadow."""
        self.guard.record(model.sha256, latency_ms)
        shadow = self._shadow
        if shadow is not None and model.sha256 != shadow.model_version:
            shadow.offer(image, detections, latency_ms)

    def observe_error(self, model: LoadedModel | None) -> None:
        """``model`` failed on a frame."""
        if model is not None:
            self.guard.record(model.sha256, error=True)

    def heartbeat_fields(self) -> dict[str, Any]:
        """The optional rollout fields of the heartbeat for the window that ends now."""
        reason = self.guard.end_window()
        if reason is not None:
            self._self_rollback(reason)
        with self._lock:
            shadow = self._shadow.take_window() if self._shadow is not None else None
            cur = self.slot.current
            return {
                "update_status": self.state.status,
                "update_reason": self.state.reason,
                "rollout_id": self.state.rollout_id,
                "serving_model_version": cur.model_version,
                "shadow": shadow,
            }

    # ------------------------------------------------------------------ one poll
    def poll_once(self) -> str:
        """One manifest poll and whatever it asks for; returns the decision
        (``unchanged|unavailable|none|serving|shadow|rejected|rolled_back|skipped|downloading``)."""
        with self._poll_lock:
            try:
                poll = self.client.get_manifest(self.etag)
            except GatewayError as exc:
                logger.warning("manifest poll failed: %s", exc)
                return "unavailable"
            if not poll.changed:
                return "unchanged"
            body = poll.body or {}
            assignment = body.get("assignment") or {}
            if not isinstance(assignment, dict):
                assignment = {}
            manifest = body.get("manifest")
            mode = str(assignment.get("mode") or "none")
            rid = assignment.get("rollout_id")
            if rid is None and isinstance(manifest, dict):
                rid = manifest.get("rollout_id")
            rid = None if rid is None else str(rid)
            logger.info(
                "manifest seen: mode=%s rollout=%s stage=%s percent=%s model_version=%s sha256=%s",
                mode,
                rid,
                assignment.get("stage"),
                assignment.get("percent"),
                manifest.get("model_version") if isinstance(manifest, dict) else None,
                str(manifest.get("sha256"))[:12] if isinstance(manifest, dict) else None,
            )
            if str(assignment.get("status") or "") in ("rolled_back", "cancelled", "superseded"):
                mode = "none"
            try:
                decision = self._apply(mode, rid, manifest, body)
            except DownloadIncomplete as exc:
                logger.warning("model download incomplete: %s; the next poll resumes it", exc)
                return "downloading"
            except UpdateRejected as exc:
                permanent = self._reject(exc)
                if not permanent:
                    return exc.status  # the ETag stays unsettled: the next poll tries again
                decision = exc.status
            self.etag = poll.etag
            return decision

    def _apply(self, mode: str, rid: str | None, manifest: Any, body: Mapping) -> str:
        if mode not in ("serve", "shadow"):
            if mode != "none":
                logger.warning("unknown assignment mode %r: treated as 'none'", mode)
            return self._leave_rollout(
                rid, body.get("previous_model_version"), body.get("baseline")
            )
        if not isinstance(manifest, Mapping):
            raise UpdateRejected(
                f"assignment mode {mode!r} came without a manifest", rollout_id=rid
            )
        prior = self.state.rejected.get(f"manifest:{manifest_digest(manifest)}")
        if prior and prior.get("permanent"):
            logger.info("manifest rejected earlier (%s); ignoring it", prior.get("reason"))
            return "skipped"
        m = self._verify(manifest)
        rid = rid or m.rollout_id
        logger.info(
            "manifest verified: %s, %d bytes, input %d, signed by key_id %s, mode %s",
            m.short,
            m.size,
            m.input_size,
            m.key_id,
            mode,
        )
        prior = self.state.rejected.get(m.sha256)
        if prior and prior.get("permanent"):
            logger.info(
                "%s was %s earlier (%s); not retrying it",
                m.short,
                prior.get("status", "rejected"),
                prior.get("reason"),
            )
            return "skipped"
        cur = self.slot.current
        if mode == "serve" and cur.sha256 == m.sha256:
            with self._lock:
                if cur.model_version is None or cur.rollout_id != rid:
                    self.slot.swap(
                        dataclasses.replace(cur, model_version=m.model_version, rollout_id=rid)
                    )
                self._stop_shadow("already serving the rollout's model")
                if self.state.status not in ("serving",) or self.state.rollout_id != rid:
                    self._set_status("serving", None, rid)
            return "serving"
        if mode == "shadow" and self._shadow is not None and self._shadow.model_version == m.sha256:
            return "shadow"
        candidate = self._obtain(m, rid)
        if mode == "serve":
            self._promote(candidate, m, rid)
            return "serving"
        self._start_shadow(candidate, m, rid)
        return "shadow"

    def _verify(self, manifest: Any) -> ModelManifest:
        """``verifier.verify``; a refused manifest is remembered under ``manifest:<digest>``."""
        try:
            return self.verifier.verify(manifest)
        except ManifestError as exc:
            raise UpdateRejected(
                exc.reason,
                key=f"manifest:{exc.digest}" if exc.digest else None,
                rollout_id=exc.rollout_id,
            ) from exc

    # ------------------------------------------------------------------ obtain a model
    def _obtain(self, m: ModelManifest, rid: str | None) -> LoadedModel:
        """A loaded, validated model for ``m``: reused if already loaded, else downloaded."""
        for have in (self._shadow_model, self._previous):
            if have is not None and have.sha256 == m.sha256:
                return dataclasses.replace(have, model_version=m.model_version, rollout_id=rid)
        try:
            path = self._download(m, rid)
        except UpdateRejected as exc:
            exc.rollout_id = exc.rollout_id or rid
            raise
        return self._load_candidate(path, m, rid)

    def _download(self, m: ModelManifest, rid: str | None) -> Path:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        final = self.models_dir / f"{m.sha256}.onnx"
        if final.is_file():
            if final.stat().st_size == m.size and file_sha256(final) == m.sha256:
                logger.info("model %s is already on disk at %s", m.short, final)
                return final
            final.unlink()
        partial = self.models_dir / f".partial-{m.sha256}"
        self._pending_sha = m.sha256
        have = partial.stat().st_size if partial.exists() else 0
        if have > m.size:
            partial.unlink()
            have = 0
        if have < m.size:
            self._set_status("downloading", None, rid)
            logger.info(
                "downloading %s (%d bytes)%s",
                m.short,
                m.size,
                f", resuming at byte {have}" if have else "",
            )
            self._transfer(m, partial, have)
        got = partial.stat().st_size if partial.exists() else 0
        if got != m.size:  # the gateway ended the response cleanly: its file is shorter
            partial.unlink(missing_ok=True)
            self._pending_sha = None
            raise UpdateRejected(
                f"size mismatch: the gateway sent {got} bytes, the signed manifest says {m.size}",
                key=m.sha256,
                permanent=False,
                rollout_id=rid,
            )
        logger.info("download done: %s, %d bytes", m.short, got)
        digest = file_sha256(partial)
        if digest != m.sha256:
            partial.unlink(missing_ok=True)
            self._pending_sha = None
            raise UpdateRejected(
                f"sha256 mismatch: the downloaded file hashes to {digest[:16]}…, the signed "
                f"manifest says {m.sha256[:16]}…",
                key=m.sha256,
                permanent=False,
                rollout_id=rid,
            )
        os.replace(partial, final)  # _pending_sha stays set until the model is recorded
        fsync_dir(self.models_dir)
        logger.info("model verified: %s (size and sha256 match the signed manifest)", m.short)
        return final

    def _transfer(self, m: ModelManifest, partial: Path, have: int) -> None:
        try:
            with self.client.stream_model(m.sha256, offset=have) as resp:
                code = resp.status_code
                if code == 206:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != have:
                        partial.unlink(missing_ok=True)
                        raise DownloadIncomplete(
                            f"asked to resume at byte {have}, the gateway sent byte {start}; "
                            "restarting the download"
                        )
                    mode = "ab"
                elif code == 200:
                    mode, have = "wb", 0
                else:
                    resp.read()
                    try:
                        detail = str(resp.json().get("detail"))
                    except (ValueError, AttributeError):
                        detail = resp.text[:200]
                    if code == 416:  # the gateway's file is not longer than what we have
                        partial.unlink(missing_ok=True)
                        raise UpdateRejected(
                            f"size mismatch: the gateway cannot send bytes {have}- of "
                            f"{m.short} (416), the signed manifest says {m.size} bytes",
                            key=m.sha256,
                            permanent=False,
                        )
                    raise DownloadIncomplete(f"model download answered {code}: {detail}")
                written = have
                with open(partial, mode) as fh:
                    for chunk in resp.iter_bytes(1 << 16):
                        if written + len(chunk) > m.size:
                            break
                        fh.write(chunk)
                        written += len(chunk)
                    else:
                        fh.flush()
                        os.fsync(fh.fileno())
                        return
                partial.unlink(missing_ok=True)
                raise UpdateRejected(
                    f"the gateway sent more than the manifest's {m.size} bytes for {m.short}",
                    key=m.sha256,
                    permanent=False,
                )
        except httpx.HTTPError as exc:
            got = partial.stat().st_size if partial.exists() else 0
            raise DownloadIncomplete(
                f"connection lost after {got} of {m.size} bytes ({type(exc).__name__}: {exc})"
            ) from exc
        except GatewayError as exc:
            raise DownloadIncomplete(str(exc)) from exc

    def _load_candidate(self, path: Path, m: ModelManifest, rid: str | None) -> LoadedModel:
        """Load off the hot path and check the model against its manifest."""

        def bad(reason: str) -> UpdateRejected:
            return UpdateRejected(reason, status="rolled_back", key=m.sha256, rollout_id=rid)

        t0 = time.perf_counter()
        try:
            det = self._factory(path)
        except Exception as exc:
            raise bad(f"model {m.sha256[:12]} does not load: {exc}") from exc
        if det.model_sha256 != m.sha256:
            raise bad(f"model file {path} changed on disk (sha256 {det.model_sha256[:12]})")
        if det.input_size != m.input_size:
            raise bad(
                f"model {m.sha256[:12]} has input size {det.input_size}, the manifest says "
                f"{m.input_size}"
            )
        if m.class_names and list(det.class_names) != list(m.class_names):
            raise bad(
                f"model {m.sha256[:12]} has classes {list(det.class_names)}, the manifest says "
                f"{list(m.class_names)}"
            )
        try:
            det.detect(np.full((m.input_size, m.input_size, 3), 114, dtype=np.uint8))
        except Exception as exc:
            raise bad(f"model {m.sha256[:12]} fails a smoke inference: {exc}") from exc
        serving = self.slot.current.detector
        if list(getattr(serving, "class_names", [])) != list(det.class_names):
            logger.warning(
                "model %s has classes %s; the serving model has %s",
                m.sha256[:12],
                det.class_names,
                getattr(serving, "class_names", None),
            )
        logger.info(
            "loaded %s off the hot path in %.0f ms (input %d, classes %s, smoke inference ok)",
            m.short,
            (time.perf_counter() - t0) * 1e3,
            det.input_size,
            list(det.class_names),
        )
        return LoadedModel.from_detector(
            det, model_version=m.model_version, rollout_id=rid, path=path
        )

    # ------------------------------------------------------------------ state changes
    def _ensure_in_store(self, model: LoadedModel) -> LoadedModel:
        """Copy ``model``'s file into the store (``<sha256>.onnx``) so it survives as previous."""
        target = self.models_dir / f"{model.sha256}.onnx"
        try:
            if model.path.resolve() == target.resolve() or target.is_file():
                return dataclasses.replace(model, path=target)
            copy_file_atomic(model.path, target, sync_dir=True)
            logger.info("previous model %s kept on disk at %s", model.sha256[:12], target)
            return dataclasses.replace(model, path=target)
        except OSError as exc:
            logger.warning(
                "cannot copy %s into %s (%s); the previous model stays at its own path",
                model.path,
                self.models_dir,
                exc,
            )
            return model

    def _promote(self, candidate: LoadedModel, m: ModelManifest, rid: str | None) -> None:
        stored = self._ensure_in_store(self.slot.current)  # file I/O outside the lock
        with self._lock:
            old = self.slot.current
            if old.sha256 == stored.sha256:
                old = stored
            baseline = self.guard.recent_p95(old.sha256)
            self.slot.swap(candidate)
            self._previous = old
            self._pending_sha = None
            if self._shadow_model is not None and self._shadow_model.sha256 == candidate.sha256:
                self._stop_shadow("promoted to serving")
            else:
                self._stop_shadow("a rollout model is serving")
            self.guard.arm(candidate.sha256, baseline)
            self.state.serving, self.state.previous = candidate.record(), old.record()
            self.state.rejected.pop(candidate.sha256, None)
            budget = self.guard.budget_ms()
            logger.info(
                "swapped: now serving %s (rollout %s); previous %s kept on disk and loaded; "
                "rollback guard armed (latency budget %s, max error rate %.1f%%, %d windows)",
                m.short,
                rid,
                old.sha256[:12],
                "off: no baseline measured" if budget is None else f"{budget:.1f} ms",
                100 * self.guard.limits.max_error_rate,
                self.guard.limits.bad_windows,
            )
            self._set_status("serving", None, rid)
            self._prune()

    def _start_shadow(self, candidate: LoadedModel, m: ModelManifest, rid: str | None) -> None:
        with self._lock:
            self._stop_shadow("replaced by another candidate")
            self._shadow = ShadowRunner(
                candidate.detector,
                model_version=candidate.sha256,
                label=m.model_version,
                sample_rate=self.shadow_sample_rate,
                background=self.shadow_background,
                delay_s=candidate.delay_s,
            )
            self._shadow_model, self._shadow_rollout = candidate, rid
            self.state.shadow = candidate.record()
            self._pending_sha = None
            logger.info(
                "shadow started: %s beside %s on %.0f%% of frames (rollout %s); its outputs "
                "are compared, never used",
                m.short,
                self.slot.sha256[:12],
                100 * self.shadow_sample_rate,
                rid,
            )
            self._set_status("shadow", None, rid)
            self._prune()

    def _stop_shadow(self, why: str) -> None:
        with self._lock:
            shadow, self._shadow = self._shadow, None
            self._shadow_model = self._shadow_rollout = None
            self.state.shadow = None
        if shadow is not None:
            shadow.stop()
            logger.info("shadow stopped (%s) after %d frames", why, shadow.frames_total)

    def _swap_back(self, *, keep_old: bool) -> LoadedModel | None:
        """Serve the previous model again; None when there is none to go back to."""
        with self._lock:
            prev = self._previous
            if prev is None and self.state.previous:
                try:
                    prev = self._load_recorded(self.state.previous)
                except Exception as exc:  # noqa: BLE001
                    logger.error("the previous model cannot be loaded: %s", exc)
                    prev = None
            if prev is None:
                return None
            old = self.slot.swap(prev)
            self.guard.disarm()
            self.state.serving = prev.record()
            if keep_old:
                self._previous, self.state.previous = old, old.record()
            else:
                self._previous, self.state.previous = None, None
            return prev

    def _baseline_model(self, baseline: Any) -> LoadedModel | None:
        """The fleet's known-good model (the gateway's ``baseline`` manifest), verified,
        downloaded and loaded like any update — for a device with no previous model."""
        if not isinstance(baseline, Mapping):
            return None
        bm = self._verify(baseline)
        logger.info("no previous model on this device: falling back to the baseline %s", bm.short)
        return self._obtain(bm, bm.rollout_id)

    def _leave_rollout(self, rid: str | None, previous_version: Any, baseline: Any = None) -> str:
        with self._lock:
            shadow_rollout = self._shadow_rollout
            if self._pending_sha is not None:  # a download for the withdrawn rollout
                self._pending_sha = None
                self._prune()
            if self._shadow is not None:
                self._stop_shadow(f"assignment for rollout {rid}: mode none")
            cur = self.slot.current
            if rid is None or cur.rollout_id != rid:  # not serving that rollout's model
                if self.state.status in ("downloading", "shadow") or (
                    shadow_rollout is not None and shadow_rollout == rid
                ):
                    self._set_status("idle", None, rid)
                return "none"
            prev = self._swap_back(keep_old=True)
        if prev is None:  # no previous model here: the fleet's baseline, fetched off the lock
            fallback = self._baseline_model(baseline)  # may raise: retried / reported
            with self._lock:
                cur = self.slot.current
                if fallback is not None and fallback.sha256 != cur.sha256:
                    old = self.slot.swap(fallback)
                    self.guard.disarm()
                    self._previous = old
                    self.state.serving, self.state.previous = fallback.record(), old.record()
                    prev = fallback
        if prev is None:
            logger.error(
                "rollout %s withdrawn but no previous model is available; keeping %s",
                rid,
                cur.sha256[:12],
            )
            return "none"
        reason = (
            f"rollout {rid} withdrawn (mode none): back to previous model "
            f"{prev.sha256[:12]} (gateway's previous_model_version {previous_version})"
        )
        logger.info("swapped back: %s", reason)
        with self._lock:
            self._set_status("idle", reason, rid)
            self._prune()
        return "none"

    def _self_rollback(self, reason: str) -> None:
        with self._lock:
            bad = self.slot.current
            if bad.sha256 != self.guard.armed_sha:
                return
            prev = self._swap_back(keep_old=False)
            if prev is None:
                logger.error(
                    "model %s breaks its limits (%s) but no previous model is available",
                    bad.sha256[:12],
                    reason,
                )
                self.guard.disarm()
                return
            full = (
                f"model {bad.sha256[:12]} (model_version {bad.model_version}) rolled back to "
                f"{prev.sha256[:12]}: {reason}"
            )
            self._remember(bad.sha256, full, permanent=True, status="rolled_back")
            logger.error("rolled back: %s", full)
            self._set_status("rolled_back", full, bad.rollout_id)
            self._prune()

    def _remember(
        self, key: str, reason: str, *, permanent: bool, status: str = "rejected"
    ) -> dict[str, Any]:
        with self._lock:
            entry = self.state.rejected.get(key) or {"count": 0}
            entry.update(
                reason=reason,
                status=status,
                count=int(entry.get("count", 0)) + 1,
                at=_now_iso(),
            )
            entry["permanent"] = bool(
                permanent or entry["count"] >= HASH_MISMATCH_ATTEMPTS or entry.get("permanent")
            )
            self.state.rejected.pop(key, None)
            self.state.rejected[key] = entry  # newest last
            while len(self.state.rejected) > MAX_REJECTED:
                self.state.rejected.pop(next(iter(self.state.rejected)))
            return entry

    def _reject(self, exc: UpdateRejected) -> bool:
        """Record a refusal; True when it is final (no retry)."""
        entry = (
            self._remember(exc.key, exc.reason, permanent=exc.permanent, status=exc.status)
            if exc.key
            else {"permanent": True, "count": 1}
        )
        permanent = bool(entry["permanent"])
        logger.error(
            "%s: %s (the current model %s keeps serving%s)",
            "rejected" if exc.status == "rejected" else "rolled back",
            exc.reason,
            self.slot.sha256[:12],
            "" if permanent else f"; attempt {entry['count']} of {HASH_MISMATCH_ATTEMPTS}",
        )
        self._set_status(exc.status, exc.reason, exc.rollout_id)
        with self._lock:
            if permanent or exc.status != "rejected":
                self._pending_sha = None
            self._prune()
        return permanent

    def _prune(self) -> None:
        """Keep the serving, previous and shadow models (and the download in progress)."""
        keep = {
            str(rec["sha256"])
            for rec in (self.state.serving, self.state.previous, self.state.shadow)
            if rec and rec.get("sha256")
        }
        if self._pending_sha:
            keep.add(self._pending_sha)
        if not self.models_dir.is_dir():
            return
        for f in self.models_dir.iterdir():
            name = f.name
            if name.endswith(".onnx") and not name.startswith("."):
                sha = name[: -len(".onnx")]
            elif name.startswith(".partial-"):
                sha = name[len(".partial-") :]
            else:
                continue
            if sha not in keep:
                try:
                    f.unlink()
                    logger.info("pruned old model file %s", f)
                except OSError as exc:
                    logger.warning("cannot prune %s: %s", f, exc)


__all__ = [
    "FAULT_DELAY_ENV",
    "UPDATE_STATUSES",
    "DownloadIncomplete",
    "GuardLimits",
    "LoadedModel",
    "ModelSlot",
    "ModelUpdater",
    "RollbackGuard",
    "UpdateRejected",
    "UpdaterState",
    "fault_delay_s",
]
