"""Agent-side model updates, the audit's defects: what the updater reports while a refusal
may still be retried, a full disk, a model of a rollout the fleet left behind, a file refused
under one manifest and offered under a corrected one, and the rollback guard's latency
baseline across a restart.

The fake gateway, signing and models are ``tests/test_edge_updater.py``'s (its fixtures are
shared, hence F811 on their parameters). Gateway-side counterparts: ``tests/test_rollouts.py``
and ``tests/test_rollout_health_hostile.py``.
"""
# ruff: noqa: F811

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest

from edge_agent import model_store
from edge_agent.model_slot import LoadedModel, ModelSlot
from edge_agent.rollback_guard import GuardLimits
from tests.test_edge_updater import (  # noqa: F401 - fixtures
    MODEL_320,
    Rig,
    _detector,
    _publish,
    _state_json,
    _updater,
    baseline,
    gateway,
    image,
    manifest_for,
    models,
    public_b64,
    rig,
    signing_key,
)

FRAME = np.zeros((1, 1, 3), np.uint8)


def _window(rig: Rig, latency_ms: float, n: int = 20) -> dict[str, Any]:
    model = rig.slot.current
    for _ in range(n):
        rig.updater.observe_frame(model, latency_ms, [], FRAME)
    return rig.updater.heartbeat_fields()


# ------------------------------------------------------------------ 1. a refusal with tries left
def test_one_corrupt_transfer_is_reported_as_retrying_not_rejected(
    rig: Rig, models, signing_key
) -> None:
    m = _publish(rig, models["candidate"], signing_key, rollout="ro-A")
    good = rig.gw.models[m["sha256"]]
    bad = bytearray(good)
    bad[1000] ^= 0xFF
    rig.gw.models[m["sha256"]] = bytes(bad)  # one flipped byte on the first transfer
    assert rig.updater.poll_once() == "retrying"
    hb = rig.updater.heartbeat_fields()
    assert hb["update_status"] == "retrying" and hb["rollout_id"] == "ro-A"
    assert "sha256 mismatch" in hb["update_reason"] and "attempt 1 of 3" in hb["update_reason"]
    assert _state_json(rig)["status"] == "retrying"
    rig.gw.models[m["sha256"]] = good  # the next transfer is fine
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == m["sha256"]
    assert rig.updater.heartbeat_fields()["update_status"] == "serving"


# ------------------------------------------------------------------ 4. disk full
class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes were written."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


def test_disk_full_during_download_is_a_retry_with_a_reason(
    rig: Rig, models, signing_key, monkeypatch
) -> None:
    m = _publish(rig, models["candidate"], signing_key, rollout="ro-F")

    def full_open(path: Any, mode: str = "r") -> _FullDisk:
        return _FullDisk(open(path, mode), 200_000)  # closed by its __exit__

    monkeypatch.setattr(model_store, "open", full_open, raising=False)  # the store's writes
    for _ in range(2):  # caught every time: nothing escapes poll_once
        assert rig.updater.poll_once() == "retrying"
        hb = rig.updater.heartbeat_fields()
        assert hb["update_status"] == "retrying" and hb["rollout_id"] == "ro-F"
        assert "not writable / disk full" in hb["update_reason"]
        assert "No space left" in hb["update_reason"]
        assert not list((rig.state / "models").glob(".partial-*"))  # the partial is removed
        assert rig.slot.sha256 == rig.base_sha
    # a full disk is not the model's fault: not counted towards giving up on it
    assert m["sha256"] not in _state_json(rig)["rejected"]
    monkeypatch.undo()  # space freed
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == m["sha256"]


def test_short_free_space_is_found_before_downloading(
    rig: Rig, models, signing_key, monkeypatch
) -> None:
    _publish(rig, models["candidate"], signing_key, rollout="ro-F")
    real = model_store.shutil.disk_usage

    def tiny(path: Any) -> Any:
        return real(path)._replace(free=1000)

    monkeypatch.setattr(model_store.shutil, "disk_usage", tiny)
    assert rig.updater.poll_once() == "retrying"
    assert "disk full" in rig.updater.reason and "1000 bytes free" in rig.updater.reason
    assert rig.gw.model_requests() == []  # nothing fetched that could not be stored


# ------------------------------------------------------------------ 3. a stale rollout's model
def _none_for(rig: Rig, rid: str, baseline: dict | None, status: str = "active") -> None:
    rig.gw.body = {
        "assignment": {"mode": "none", "rollout_id": rid, "stage": "shadow", "percent": 5,
                       "status": status},
        "manifest": None, "previous_model_version": None, "baseline": baseline,
    }


def test_cancelled_rollouts_model_goes_back_to_the_model_started_with(
    rig: Rig, models, signing_key
) -> None:
    m = _publish(rig, models["candidate"], signing_key, rollout="ro-A", version="8")
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == m["sha256"]
    # B cancelled A; this device is outside B's cohort; no rollout ever completed
    _none_for(rig, "ro-B", None)
    assert rig.updater.poll_once() == "none"
    assert rig.slot.sha256 == rig.base_sha and rig.slot.current.rollout_id is None
    hb = rig.updater.heartbeat_fields()
    assert hb["update_status"] == "idle" and hb["rollout_id"] == "ro-A"
    assert "neither this device's assignment" in hb["update_reason"]
    assert hb["serving_model_version"] is None
    assert _state_json(rig)["serving"]["sha256"] == rig.base_sha
    # and it stays there (no ping-pong with the previous model)
    _none_for(rig, "ro-B", None, status="rolled_back")
    assert rig.updater.poll_once() == "none" and rig.slot.sha256 == rig.base_sha


def test_cancelled_rollouts_model_goes_back_to_the_fleet_baseline(
    rig: Rig, models, signing_key
) -> None:
    data = MODEL_320.read_bytes()
    base_manifest = manifest_for(data, signing_key, version="6", rollout="ro-0")
    rig.gw.models[base_manifest["sha256"]] = data
    _publish(rig, models["candidate"], signing_key, rollout="ro-A", version="8")
    assert rig.updater.poll_once() == "serving"
    _none_for(rig, "ro-B", base_manifest)
    assert rig.updater.poll_once() == "none"
    cur = rig.slot.current
    assert cur.sha256 == rig.base_sha and (cur.rollout_id, cur.model_version) == ("ro-0", "6")
    # serving the baseline is what the fleet stands behind: nothing more happens
    rig.gw.body["previous_model_version"] = "6"  # a new ETag
    swaps = rig.slot.swaps
    assert rig.updater.poll_once() == "none" and rig.slot.swaps == swaps


def test_older_gateway_without_baseline_key_keeps_the_old_behaviour(
    rig: Rig, models, signing_key
) -> None:
    m = _publish(rig, models["candidate"], signing_key, rollout="ro-A")
    assert rig.updater.poll_once() == "serving"
    rig.gw.assign("none", None, "ro-B")  # no "baseline" key at all
    assert rig.updater.poll_once() == "none" and rig.slot.sha256 == m["sha256"]


def test_withdrawn_rollout_skips_a_previous_model_the_fleet_left_behind(
    rig: Rig, models, signing_key, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    third = onnx.load(str(models["candidate"]))
    entry = third.metadata_props.add()
    entry.key, entry.value = "roadloop_test_variant_2", "b"
    onnx.save(third, str(tmp_path / "b.onnx"))
    a = _publish(rig, models["candidate"], signing_key, rollout="ro-A")
    assert rig.updater.poll_once() == "serving"
    b = _publish(rig, tmp_path / "b.onnx", signing_key, rollout="ro-B")  # A cancelled by B
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == b["sha256"]
    assert _state_json(rig)["previous"]["sha256"] == a["sha256"]
    _none_for(rig, "ro-B", None, status="rolled_back")  # B rolled back
    assert rig.updater.poll_once() == "none"
    assert rig.slot.sha256 == rig.base_sha  # not A's model: A was cancelled


def test_self_rollback_onto_a_stale_model_is_corrected_on_the_next_poll(
    rig: Rig, models, signing_key, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    third = onnx.load(str(models["candidate"]))
    entry = third.metadata_props.add()
    entry.key, entry.value = "roadloop_test_variant_2", "b"
    onnx.save(third, str(tmp_path / "b.onnx"))
    _publish(rig, models["candidate"], signing_key, rollout="ro-A")
    assert rig.updater.poll_once() == "serving"
    b = _publish(rig, tmp_path / "b.onnx", signing_key, rollout="ro-B")
    rig.gw.body["baseline"] = None  # the gateway names no completed rollout
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == b["sha256"]
    rig.updater.guard.limits = GuardLimits(latency_budget_ms=100.0, bad_windows=1)
    hb = _window(rig, 500.0)  # B breaks its limits: back to the previous model, A's
    assert hb["update_status"] == "rolled_back" and hb["rollout_id"] == "ro-B"
    assert rig.slot.current.rollout_id == "ro-A"
    assert rig.updater.poll_once() == "skipped"  # same answer, read again in full
    assert rig.slot.sha256 == rig.base_sha
    hb = rig.updater.heartbeat_fields()  # B's refusal is what the heartbeat still reports
    assert hb["update_status"] == "rolled_back" and hb["rollout_id"] == "ro-B"


# ------------------------------------------------------------------ 6. manifest vs file
def test_file_refused_under_a_wrong_manifest_is_tried_under_a_corrected_one(
    rig: Rig, models, signing_key
) -> None:
    bad = _publish(rig, models["candidate"], signing_key, rollout="ro-1", classes=["a", "b"])
    assert rig.updater.poll_once() == "rolled_back"
    assert "classes" in rig.updater.reason
    fixed = _publish(rig, models["candidate"], signing_key, rollout="ro-2")
    assert fixed["sha256"] == bad["sha256"]
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == fixed["sha256"]
    hb = rig.updater.heartbeat_fields()
    assert hb["update_status"] == "serving" and hb["rollout_id"] == "ro-2"
    # the wrong manifest itself stays refused
    rig.gw.assign("serve", bad, "ro-1")
    assert rig.updater.poll_once() == "skipped"


def test_a_remembered_refusal_is_reported_against_the_rollout_offering_it(
    rig: Rig, models, signing_key
) -> None:
    junk = models["junk"].read_bytes()
    m1 = manifest_for(junk, signing_key, rollout="ro-1")
    rig.gw.models[m1["sha256"]] = junk
    rig.gw.assign("serve", m1, "ro-1")
    assert rig.updater.poll_once() == "rolled_back"
    m3 = manifest_for(junk, signing_key, rollout="ro-3", version="8")  # same file, new rollout
    rig.gw.assign("serve", m3, "ro-3")
    assert rig.updater.poll_once() == "skipped"
    hb = rig.updater.heartbeat_fields()
    assert hb["update_status"] == "rolled_back" and hb["rollout_id"] == "ro-3"
    assert "does not load" in hb["update_reason"]
    assert rig.gw.model_requests()[-1:] and len(rig.gw.model_requests()) == 1  # not refetched


# ------------------------------------------------------------------ 7. the guard's baseline
def test_restart_re_arms_the_guard_with_the_measured_baseline(
    rig: Rig, models, signing_key
) -> None:
    _window(rig, 20.0)  # the --model's latency is measured: P95 20 ms
    m = _publish(rig, models["candidate"], signing_key, rollout="ro-S")
    assert rig.updater.poll_once() == "serving"
    budget = rig.updater.guard.budget_ms()
    assert budget == pytest.approx(60.0)
    assert _state_json(rig)["serving"]["baseline_p95"] == pytest.approx(20.0)
    # the agent restarts (on --model), restores the new model and its guard
    again = _updater(
        rig.client, rig.state, ModelSlot(LoadedModel.from_detector(_detector(MODEL_320))),
        rig.updater.verifier,
    )
    again.restore()
    assert again.slot.sha256 == m["sha256"] and again.guard.budget_ms() == pytest.approx(60.0)
    again.guard.limits = GuardLimits(bad_windows=2)  # relative budget: 3 x the baseline
    restarted = Rig(rig.gw, rig.url, rig.state, rig.client, again.slot, again, rig.base_sha)
    assert _window(restarted, 500.0)["update_status"] == "serving"
    hb = _window(restarted, 500.0)
    assert hb["update_status"] == "rolled_back" and again.slot.sha256 == rig.base_sha
    assert "budget 60.0 ms" in hb["update_reason"]
    assert "baseline_p95" not in json.loads((rig.state / "updater.json").read_text())["serving"]
