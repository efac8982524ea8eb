"""Model updates on the agent: ``ModelUpdater``, the state machine that takes a rollout from the
gateway's manifest to a serving (or shadowed, or rolled-back) model (``docs/fleet-api.md``,
"Model rollouts").

Its parts live beside it: ``edge_agent.manifest`` (the signed manifest and its verification),
``edge_agent.model_store`` (verified, resumable downloads; ``updater.json``),
``edge_agent.model_slot`` (the serving model and the swap), ``edge_agent.rollback_guard``
(when a new model is taken back) and ``edge_agent.shadow`` (shadow runs).

One poll (``ModelUpdater.poll_once``, on the updater thread — never on the frame loop):

1. ``GET /v1/manifest`` with ``If-None-Match`` → 304: nothing to do.
2. Verify the manifest *before* downloading anything (``ManifestVerifier``): the ``key_id``
   must be the pinned key's, the Ed25519 signature must verify over the canonical bytes (the
   same form ``roadloop/release/signing.py`` signs: one implementation, ``edge_agent.manifest``), the
   fields must be well-formed.
3. Download the model into the store (``ModelStore.download``): resumable with ``Range``,
   size then SHA-256 checked against the signed manifest before the file is kept.
4. Load an ``OnnxDetector`` from it, check its input size and class names against the
   manifest, run one smoke inference.
5. ``mode: serve`` → ``ModelSlot.swap``: the swap lands between two frames; the old model
   becomes *previous* (kept loaded and on disk, the baseline ``--model`` is copied into the
   store for that) and the ``RollbackGuard`` is armed (with the old model's latency P95 as its
   baseline, kept in ``updater.json`` so a restarted agent re-arms it the same way).
   ``mode: shadow`` → ``ShadowRunner`` beside the serving model. ``mode: none`` (or a
   rolled-back rollout) → back to the previous model if the serving one came from that
   rollout (the fleet's known-good model instead when this device has no previous model, or
   when its previous model is itself from a rollout the fleet no longer stands behind).
6. After the assignment is applied: a serving model from a rollout that is neither the
   assignment's nor the fleet's baseline's (a rollout that was cancelled by a newer one, say)
   is replaced by the fleet's known-good model (``_leave_stale``): the gateway's ``baseline``
   manifest, or — ``baseline: null`` — the model the agent was started with. Only when the
   gateway's answer has a ``baseline`` key and names a rollout (older gateways: as before).

Heartbeat fields (``heartbeat_fields``): ``update_status`` is one of

* ``idle`` — no rollout work; ``downloading``; ``shadow``; ``serving`` (a rollout's model);
* ``retrying`` — a refusal that is not final yet: a size or SHA-256 mismatch with tries left
  (it may be a corrupt transfer), or the model directory is not writable / the disk is full;
  ``update_reason`` says which and that the next poll tries again. Not a failure: the
  gateway does not count it against the rollout;
* ``rejected`` — the manifest or the file failed verification (signature, key, size,
  SHA-256) for good: the artifact is not trusted, the model itself was never judged;
* ``rolled_back`` — a verified model could not serve (does not load, wrong input size or
  classes, smoke inference failed), or it served and broke the latency/error limits for
  ``bad_windows`` consecutive heartbeat windows, or a persisted model failed at start-up.

``update_reason`` says why, ``rollout_id`` which rollout it concerns. In every case the old
model keeps serving. A refusal is remembered in ``<state>/updater.json`` (``UpdaterState``)
and not retried (a SHA-256 mismatch gets ``HASH_MISMATCH_ATTEMPTS`` tries first: it may be a
corrupt transfer): a defect of the file (SHA-256, size, does not load, smoke inference) under
the file's SHA-256, a mismatch between the file and what its manifest says (input size or
shape, class names) under the manifest (``manifest:<digest>:<sha256>``), so the same file
under a corrected manifest is tried. A guard rollback refuses the file and its whole
manifest (``manifest:<digest>``, kept in the serving record): the rollout's other input shapes
are the same model, so none of them is served until the gateway offers another manifest. A
remembered refusal is reported again, against the rollout that offered it now, so the gateway
hears about every rollout the device refuses.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.client import GatewayClient
from edge_agent.errors import (
    DownloadIncomplete,
    GatewayError,
    InvalidModelError,
    UpdateRejected,
)
from edge_agent.inference import OnnxDetector
from edge_agent.manifest import ManifestError, ManifestVerifier, ModelManifest, manifest_digest
from edge_agent.model_slot import LoadedModel, ModelSlot
from edge_agent.model_store import (
    HASH_MISMATCH_ATTEMPTS,
    MODELS_DIR,
    STATE_FILE,
    ModelStore,
    UpdaterState,
)
from edge_agent.rollback_guard import GuardLimits, RollbackGuard
from edge_agent.shadow import ShadowRunner

logger = logging.getLogger(__name__)

UPDATE_STATUSES = (
    "idle", "downloading", "retrying", "shadow", "serving", "rolled_back", "rejected",
)
FAILED_STATUSES = ("rolled_back", "rejected")


# --------------------------------------------------------------------------- the updater

def _shape_hint(body: Mapping) -> Any:
    """``assignment.input_shape`` of a manifest poll: the gateway's pick for this camera."""
    assignment = body.get("assignment")
    return assignment.get("input_shape") if isinstance(assignment, Mapping) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _pair_key(m: ModelManifest) -> str:
    """What a refusal of a file *under this manifest* is remembered as (the file's input
    size or classes disagree with what the manifest says): the same file under a corrected
    manifest is another key."""
    return f"manifest:{manifest_digest(m.raw)}:{m.sha256}"


def _positive(value: Any) -> float | None:
    """``value`` as a positive finite float (a persisted latency baseline), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if v > 0 and v != float("inf") else None


def _is_baseline(rollout_id: str | None, sha256: str, baseline: Any) -> bool:
    """Whether a model (its rollout id and SHA-256) is the fleet's ``baseline`` manifest's."""
    if not isinstance(baseline, Mapping):
        return False
    if rollout_id is not None and rollout_id == baseline.get("rollout_id"):
        return True
    variants = baseline.get("variants")
    shas = {baseline.get("sha256")} | {
        v.get("sha256") for v in (variants if isinstance(variants, list) else [])
        if isinstance(v, Mapping)
    }
    return sha256 in shas


def _same_rollout(rec: Mapping[str, Any] | None, rid: str | None) -> bool:
    """Whether a model record comes from rollout ``rid``: another input shape of that
    rollout's model (``variants``) is no model to go back to when the rollout is left."""
    return bool(rec) and rid is not None and rec.get("rollout_id") == rid  # type: ignore[union-attr]


def _stale(rollout_id: str | None, sha256: str, rid: str | None, baseline: Any) -> bool:
    """A model from a rollout that is neither the assignment's (``rid``) nor the baseline's:
    the fleet no longer stands behind it (cancelled by a newer rollout, or left behind while
    the device was offline). A model from no rollout (``--model``) is never stale."""
    if rollout_id is None or rollout_id == rid:
        return False
    return not _is_baseline(rollout_id, sha256, baseline)


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
        self.store = ModelStore(self.state_dir / MODELS_DIR, client)
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
        # The model the agent was started with (--model): the fleet's known-good model while
        # no rollout has completed (the gateway's ``baseline: null``). A record, not the loaded
        # model: it is reloaded in the rare case it is needed.
        self._started_with: dict[str, Any] = slot.current.record()
        self._previous: LoadedModel | None = None  # the previous model, kept loaded
        self._shadow: ShadowRunner | None = None
        self._shadow_model: LoadedModel | None = None
        self._shadow_rollout: str | None = None
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
            self.store.dir.mkdir(parents=True, exist_ok=True)
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
                        self.guard.arm(base.sha256, _positive(want.get("baseline_p95")))
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
                if (prev and prev.get("sha256") != base.sha256
                        and not _same_rollout(prev, _text(want.get("rollout_id")))):
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
                # the latency baseline measured before the swap, not lost with the process
                self.guard.arm(model.sha256, _positive(want.get("baseline_p95")))
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
        path = Path(str(rec.get("path") or self.store.path_for(sha)))
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
        """One manifest poll and whatever it asks for; returns the decision (``unchanged|
        unavailable|none|serving|shadow|rejected|rolled_back|skipped|downloading|retrying``).
        The ETag is kept only once the answer is fully applied, so anything to try again
        (a download to resume, a refusal with tries left, a full disk) is tried next poll."""
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
                if not self._reject(exc):
                    return "retrying"  # the ETag stays unsettled: the next poll tries again
                decision = exc.status
            try:
                self._leave_stale(rid, body)
            except DownloadIncomplete as exc:
                logger.warning("baseline download incomplete: %s; the next poll resumes it", exc)
                return decision
            except UpdateRejected as exc:
                if not self._reject(exc):
                    return decision
            self.etag = poll.etag
            return decision

    def _apply(self, mode: str, rid: str | None, manifest: Any, body: Mapping) -> str:
        if mode not in ("serve", "shadow"):
            if mode != "none":
                logger.warning("unknown assignment mode %r: treated as 'none'", mode)
            return self._leave_rollout(
                rid, body.get("previous_model_version"), body.get("baseline"),
                _shape_hint(body), baseline_known="baseline" in body,
            )
        if not isinstance(manifest, Mapping):
            raise UpdateRejected(
                f"assignment mode {mode!r} came without a manifest", rollout_id=rid
            )
        prior = self.state.rejected.get(f"manifest:{manifest_digest(manifest)}")
        if prior and prior.get("permanent"):
            logger.info(
                "manifest of rollout %s %s earlier (%s); ignoring it",
                _text(manifest.get("rollout_id")),
                {"rolled_back": "rolled back"}.get(str(prior.get("status")), "rejected"),
                prior.get("reason"),
            )
            return self._skip(prior, rid or _text(manifest.get("rollout_id")))
        # The gateway names the input shape that fits this camera; only a shape the signed
        # manifest lists is taken (any other hint leaves the manifest's own file).
        m = self._verify(manifest).for_shape(_shape_hint(body))
        rid = rid or m.rollout_id
        logger.info(
            "manifest verified: %s, %d bytes, input %dx%d, signed by key_id %s, mode %s",
            m.short,
            m.size,
            *m.input_hw,
            m.key_id,
            mode,
        )
        for key in (m.sha256, _pair_key(m)):
            prior = self.state.rejected.get(key)
            if prior and prior.get("permanent"):
                logger.info(
                    "%s was %s earlier (%s); not retrying it",
                    m.short,
                    prior.get("status", "rejected"),
                    prior.get("reason"),
                )
                return self._skip(prior, rid)
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

    def _skip(self, prior: Mapping[str, Any], rid: str | None) -> str:
        """A refusal remembered from an earlier poll, offered again (by this rollout or a
        new one): report it against ``rid`` so that rollout's health hears of it rather
        than waiting for a device that stays silent."""
        status = str(prior.get("status") or "rejected")
        status = status if status in FAILED_STATUSES else "rejected"
        reason = str(prior.get("reason") or "refused earlier")
        st = self.state
        if (st.status, st.reason, st.rollout_id) != (status, reason, rid):
            self._set_status(status, reason, rid)
        return "skipped"

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

        def downloading() -> None:
            self._set_status("downloading", None, rid)

        try:
            path = self.store.download(m, on_transfer=downloading)
        except UpdateRejected as exc:
            exc.rollout_id = exc.rollout_id or rid
            raise
        return self._load_candidate(path, m, rid)

    def _load_candidate(self, path: Path, m: ModelManifest, rid: str | None) -> LoadedModel:
        """Load off the hot path and check the model against its manifest."""

        def bad(reason: str, *, manifest_says: bool = False) -> UpdateRejected:
            """A refusal keyed on the file (its own defect) or, ``manifest_says``, on the
            manifest and file together: the file may be fine under a corrected manifest."""
            key = _pair_key(m) if manifest_says else m.sha256
            return UpdateRejected(reason, status="rolled_back", key=key, rollout_id=rid)

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
                f"{m.input_size}",
                manifest_says=True,
            )
        # Always the HxW: a manifest without input_shape declares the square
        # input_size x input_size model (``ModelManifest.input_hw``), not "any shape".
        det_hw = tuple(getattr(det, "input_hw", (det.input_size, det.input_size)))
        if det_hw != tuple(m.input_hw):
            raise bad(
                f"model {m.sha256[:12]} has input {det_hw[0]}x{det_hw[1]}, the manifest says "
                f"{m.input_hw[0]}x{m.input_hw[1]}",
                manifest_says=True,
            )
        if m.class_names and list(det.class_names) != list(m.class_names):
            raise bad(
                f"model {m.sha256[:12]} has classes {list(det.class_names)}, the manifest says "
                f"{list(m.class_names)}",
                manifest_says=True,
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
    def _promote(self, candidate: LoadedModel, m: ModelManifest, rid: str | None) -> None:
        stored = self.store.adopt(self.slot.current)  # file I/O outside the lock
        with self._lock:
            old = self.slot.current
            if old.sha256 == stored.sha256:
                old = stored
            if rid is not None and old.rollout_id == rid:
                # Another input shape of the same rollout's model (the camera's frame size
                # changed): the model to go back to stays the one served before the rollout,
                # and the guard keeps judging against that model's latency.
                previous = self._previous
                previous_rec = previous.record() if previous is not None else self.state.previous
                if _same_rollout(previous_rec, rid):  # (an updater.json of an older agent)
                    previous, previous_rec = None, None
                baseline = _positive((self.state.serving or {}).get("baseline_p95"))
                if baseline is None and self.guard.armed_sha == old.sha256:
                    baseline = self.guard.baseline_p95
            else:
                previous, previous_rec = old, old.record()
                baseline = self.guard.recent_p95(old.sha256)
            self.slot.swap(candidate)
            self._previous = previous
            self.store.pending = None
            if self._shadow_model is not None and self._shadow_model.sha256 == candidate.sha256:
                self._stop_shadow("promoted to serving")
            else:
                self._stop_shadow("a rollout model is serving")
            self.guard.arm(candidate.sha256, baseline)
            # the guard's latency baseline travels with the serving record: a restarted
            # agent re-arms the guard with it (restore), and any later swap drops it
            # and so does the manifest's digest: a guard rollback refuses that manifest (every
            # file of the rollout's model), also after a restart (_self_rollback)
            self.state.serving = {
                **candidate.record(),
                "baseline_p95": baseline,
                "manifest": manifest_digest(m.raw),
            }
            self.state.previous = previous_rec
            self.state.rejected.pop(candidate.sha256, None)
            budget = self.guard.budget_ms()
            logger.info(
                "swapped: now serving %s (rollout %s) in place of %s; previous %s kept on disk; "
                "rollback guard armed (latency budget %s, max error rate %.1f%%, %d windows)",
                m.short,
                rid,
                old.sha256[:12],
                str((previous_rec or {}).get("sha256", "none"))[:12],
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
            self.store.pending = None
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

    def _swap_back(self, *, keep_old: bool, leaving: str | None = None) -> LoadedModel | None:
        """Serve the previous model again; None when there is none to go back to — or when
        it comes from ``leaving``, the rollout being left (another input shape of its model:
        going there would keep serving the model taken back)."""
        with self._lock:
            prev = self._previous
            rec = prev.record() if prev is not None else self.state.previous
            if _same_rollout(rec, leaving):
                logger.info(
                    "previous model %s is another file of rollout %s; not going back to it",
                    str((rec or {}).get("sha256"))[:12],
                    leaving,
                )
                return None
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

    def _baseline_model(self, baseline: Any, shape: Any = None) -> LoadedModel | None:
        """The fleet's known-good model (the gateway's ``baseline`` manifest), verified,
        downloaded and loaded like any update (reused when loaded or on disk already)."""
        if not isinstance(baseline, Mapping):
            return None
        bm = self._verify(baseline).for_shape(shape)
        logger.info("falling back to the fleet's baseline %s", bm.short)
        return self._obtain(bm, bm.rollout_id)

    def _known_good(
        self, baseline: Any, shape: Any, baseline_known: bool
    ) -> LoadedModel | None:
        """The model the fleet stands behind: the gateway's ``baseline`` manifest; with
        ``baseline: null`` (no rollout completed before the current one) the model this agent
        was started with; None when the gateway says nothing (an older gateway) or the model
        cannot be had. May raise like a download (``UpdateRejected``, ``DownloadIncomplete``)."""
        if isinstance(baseline, Mapping):
            return self._baseline_model(baseline, shape)
        if not baseline_known:
            return None
        rec = self._started_with
        for have in (self._previous, self.slot.current):
            if have is not None and have.sha256 == rec.get("sha256"):
                return dataclasses.replace(have, model_version=None, rollout_id=None)
        try:
            return self._load_recorded({**rec, "model_version": None, "rollout_id": None})
        except Exception as exc:  # noqa: BLE001 - logged; the serving model stays
            logger.error("the model this agent was started with cannot be loaded: %s", exc)
            return None

    def _serve_fallback(self, target: LoadedModel) -> LoadedModel:
        """Serve ``target`` (a known-good model) now, guard disarmed; the model it replaces
        becomes previous. Returns the replaced model."""
        with self._lock:
            cur = self.slot.current
            if target.sha256 == cur.sha256:  # the same file: only its label changes
                self.slot.swap(
                    dataclasses.replace(
                        cur, model_version=target.model_version, rollout_id=target.rollout_id
                    )
                )
                self.guard.disarm()
                self.state.serving = self.slot.current.record()
                return cur
            old = self.slot.swap(target)
            self.guard.disarm()
            self._previous = old
            self.state.serving, self.state.previous = target.record(), old.record()
            return old

    def _leave_stale(self, rid: str | None, body: Mapping) -> None:
        """Back to the fleet's known-good model when the serving one comes from a rollout
        that is neither the assignment's (``rid``) nor the baseline's — e.g. a canary of a
        rollout a newer one cancelled: the gateway no longer assigns it to anyone, and
        without this it would serve until some later rollout reached this device.

        Only with a gateway that names a rollout and says what the baseline is (the
        ``baseline`` key, ``null`` meaning: the model the agent was started with)."""
        if rid is None or "baseline" not in body:
            return
        baseline = body.get("baseline")
        cur = self.slot.current
        if not _stale(cur.rollout_id, cur.sha256, rid, baseline):
            return
        target = self._known_good(baseline, _shape_hint(body), True)
        if target is None:
            logger.error(
                "model %s of rollout %s is no longer assigned, but no known-good model is "
                "available; keeping it",
                cur.sha256[:12],
                cur.rollout_id,
            )
            return
        self._serve_fallback(target)
        reason = (
            f"model {cur.sha256[:12]} of rollout {cur.rollout_id} is neither this device's "
            f"assignment ({rid}) nor the fleet's baseline: back to {target.sha256[:12]} "
            f"({'model_version ' + str(target.model_version) if target.model_version else '--model'})"
        )
        logger.warning("swapped back: %s", reason)
        with self._lock:
            st = self.state
            # the status concerns the stale rollout (or nothing): say why the model changed;
            # a status about another rollout (shadow, a refusal) is that rollout's and stays
            if st.rollout_id == cur.rollout_id or st.status in ("idle", "serving"):
                self._set_status("idle", reason, cur.rollout_id)
            else:
                self._save()
            self._prune()

    def _leave_rollout(
        self,
        rid: str | None,
        previous_version: Any,
        baseline: Any = None,
        shape: Any = None,
        *,
        baseline_known: bool = False,
    ) -> str:
        with self._lock:
            shadow_rollout = self._shadow_rollout
            if self.store.pending is not None:  # a download for the withdrawn rollout
                self.store.pending = None
                self._prune()
            if self._shadow is not None:
                self._stop_shadow(f"assignment for rollout {rid}: mode none")
            cur = self.slot.current
            if rid is None or cur.rollout_id != rid:  # not serving that rollout's model
                if self.state.status in ("downloading", "retrying", "shadow") or (
                    shadow_rollout is not None and shadow_rollout == rid
                ):
                    self._set_status("idle", None, rid)
                return "none"  # (a model of another, stale rollout: _leave_stale)
            prev_rec = (
                self._previous.record() if self._previous is not None else self.state.previous
            )
            stale_prev = bool(baseline_known and prev_rec and _stale(
                prev_rec.get("rollout_id"), str(prev_rec.get("sha256")), rid, baseline
            ))
            if _same_rollout(prev_rec, rid):  # another shape of the withdrawn model
                prev = self._swap_back(keep_old=True, leaving=rid)  # None: says why
            elif stale_prev:  # the previous model is itself from a rollout the fleet left behind
                logger.info(
                    "previous model %s (rollout %s) is not the fleet's baseline; not going "
                    "back to it",
                    str(prev_rec.get("sha256"))[:12],
                    prev_rec.get("rollout_id"),
                )
                prev = None
            else:
                prev = self._swap_back(keep_old=True, leaving=rid)
        if prev is None:  # the fleet's known-good model instead, fetched off the lock
            fallback = self._known_good(baseline, shape, baseline_known)  # may raise: retried
            if fallback is not None and fallback.sha256 != cur.sha256:
                self._serve_fallback(fallback)
                prev = fallback
            elif fallback is None and stale_prev:  # better than the withdrawn model
                prev = self._swap_back(keep_old=True, leaving=rid)
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
            rec = self.state.serving or {}
            digest = _text(rec.get("manifest")) if rec.get("sha256") == bad.sha256 else None
            prev = self._swap_back(keep_old=False, leaving=bad.rollout_id)
            if prev is None and bad.rollout_id is not None:
                prev = self._back_to_started_with(bad)
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
            if digest:
                # The model, not only this file: the rollout's other input shapes are the same
                # model version (a frame-size change must not bring it back). Refused until
                # the gateway offers another manifest (a new version or a new rollout).
                full += (
                    f"; every file of rollout {bad.rollout_id} (model_version "
                    f"{bad.model_version}) is refused until the gateway offers another manifest"
                )
                self._remember(f"manifest:{digest}", full, permanent=True, status="rolled_back")
            self._remember(bad.sha256, full, permanent=True, status="rolled_back")
            logger.error("rolled back: %s", full)
            self._set_status("rolled_back", full, bad.rollout_id)
            self._prune()
            # The previous model may be one the fleet left behind meanwhile: the next poll
            # reads the whole answer again (no If-None-Match) and checks (_leave_stale).
            self.etag = None

    def _back_to_started_with(self, bad: LoadedModel) -> LoadedModel | None:
        """The guard took ``bad`` back and there is no previous model outside its rollout
        (another input shape of the same model is no way back): serve the model this agent
        was started with (on disk already: nothing is downloaded on the heartbeat thread;
        the next poll's answer then decides, ``_leave_stale``). None when it is ``bad``'s
        file or cannot be loaded."""
        target = self._known_good(None, None, True)
        if target is None or target.sha256 == bad.sha256:
            return None
        self.slot.swap(target)
        self.guard.disarm()
        self.state.serving = target.record()
        self._previous, self.state.previous = None, None
        return target

    def _remember(
        self, key: str, reason: str, *, permanent: bool, status: str = "rejected"
    ) -> dict[str, Any]:
        with self._lock:
            return self.state.remember(key, reason, permanent=permanent, status=status)

    def _reject(self, exc: UpdateRejected) -> bool:
        """Record a refusal; True when it is final (no retry).

        Only a final refusal is reported as ``rejected``/``rolled_back`` (the gateway counts
        those against the rollout); one with tries left (a corrupt transfer, a full disk) is
        ``retrying``, so a device that recovers on the next poll never failed the rollout."""
        if exc.key:
            entry = self._remember(
                exc.key, exc.reason, permanent=exc.permanent, status=exc.status
            )
        else:  # nothing to count tries under: final unless the cause is not the update's
            entry = {"permanent": exc.permanent, "count": 1}
        permanent = bool(entry["permanent"])
        if permanent:
            status, reason, tries = exc.status, exc.reason, ""
        elif exc.key:
            tries = f"attempt {entry['count']} of {HASH_MISMATCH_ATTEMPTS}"
            status, reason = "retrying", f"{exc.reason} ({tries}; retried on the next poll)"
        else:
            tries = "retried on the next poll"
            status, reason = "retrying", f"{exc.reason} ({tries})"
        logger.error(
            "%s: %s (the current model %s keeps serving%s)",
            {"rejected": "rejected", "rolled_back": "rolled back"}.get(status, status),
            exc.reason,
            self.slot.sha256[:12],
            f"; {tries}" if tries else "",
        )
        self._set_status(status, reason, exc.rollout_id)
        with self._lock:
            if permanent or exc.status != "rejected":
                self.store.pending = None
            self._prune()
        return permanent

    def _prune(self) -> None:
        """Keep the serving, previous and shadow models (and the download in progress)."""
        self.store.prune(
            str(rec["sha256"])
            for rec in (self.state.serving, self.state.previous, self.state.shadow)
            if rec and rec.get("sha256")
        )


__all__ = ["UPDATE_STATUSES", "ModelUpdater"]
