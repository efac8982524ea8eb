"""Two rollout defects left by the last review.

1. A rollback by the agent's guard refuses the whole rollout's model (every file of its
   manifest: the square one and each per-frame-size variant), not only the file that failed,
   until the gateway offers another manifest: a later shape change (or the square file) must
   not bring the same bad model version back. The refusal survives a restart and is reported
   like any remembered refusal (``rolled_back``, against the rollout that offers it).
2. ``POST /v1/rollouts`` re-checks a stored manifest's fields like ``POST /v1/models`` does: a
   manifest stored before the square-primary rule (or written straight into the store) with a
   rectangular own file is refused with the publish's 422 wording, and nothing changes.

Agent side: the fake gateway of ``test_edge_updater`` and the synthetic 192x320 model of
``test_rollout_shape_faults``. Gateway side: ``test_rollouts``' env.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from edge_agent.model_slot import LoadedModel
from edge_agent.rollback_guard import GuardLimits
from fleet.db import ModelManifestRow, RolloutRow
from roadloop.release.signing import build_manifest, manifest_sha256, sign_manifest

from .test_edge_updater import (  # noqa: F401  (fixtures)
    Rig,
    baseline,
    gateway,
    models,
    public_b64,
    rig,
    sign,
    signing_key,
)
from .test_rollout_shape_faults import _assign, _rollout, _sha, _state, wide  # noqa: F401
from .test_rollouts import CLASSES as FLEET_CLASSES
from .test_rollouts import Env, env  # noqa: F401  (fixture)

WIDE = [192, 320]


def _guard_rolls_back(rg: Rig) -> dict[str, Any]:
    """Feed the serving model errors until the guard takes it back; the heartbeat fields."""
    rg.updater.guard.limits = GuardLimits(max_error_rate=0.05, bad_windows=1)
    bad = rg.slot.current
    for _ in range(10):
        rg.updater.observe_frame(bad, 5.0, [], np.zeros((1, 1, 3), np.uint8))
        rg.updater.observe_error(bad)
    return rg.updater.heartbeat_fields()


# =========================================================================== 1. guard rollback
@pytest.mark.parametrize(
    "first, then", [(WIDE, None), (None, WIDE)], ids=["wide-then-square", "square-then-wide"]
)
def test_guard_rollback_refuses_every_file_of_the_rollout(
    rig: Rig, models, wide, signing_key, caplog, first, then  # noqa: F811
) -> None:
    caplog.set_level("INFO", logger="edge_agent.updater")
    square = models["candidate"]
    manifest = _rollout(rig, square, wide, signing_key)
    bad_file, other_file = (wide, square) if first else (square, wide)
    _assign(rig, manifest, "serve", first)
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == _sha(bad_file)
    fields = _guard_rolls_back(rig)
    assert fields["update_status"] == "rolled_back" and rig.slot.sha256 == rig.base_sha

    # the camera's frame size changes (or the gateway offers the square file): same rollout
    _assign(rig, manifest, "serve", then)
    assert rig.updater.poll_once() == "skipped"
    assert rig.slot.sha256 == rig.base_sha, "the rolled-back model came back as its other file"
    assert _sha(other_file) not in [
        p.rsplit("/", 1)[-1] for m, p, _ in rig.gw.requests if m == "GET"
    ], "the rollout's other file was downloaded"
    fields = rig.updater.heartbeat_fields()
    assert fields["update_status"] == "rolled_back" and fields["rollout_id"] == "ro-1"
    assert "rolled back to" in (fields["update_reason"] or "")
    assert "until the gateway offers another manifest" in (fields["update_reason"] or "")
    assert "rolled back earlier" in caplog.text

    # a restarted agent remembers it (updater.json)
    again = rig.new_updater()
    again.restore()
    assert again.poll_once() == "skipped" and again.slot.sha256 == rig.base_sha
    again.stop()

    # another manifest (a new rollout of the same files) is judged afresh: the file that failed
    # stays refused, the other one serves
    fresh = _rollout(rig, square, wide, signing_key)
    fresh = sign({**fresh, "rollout_id": "ro-2", "model_version": "8"}, signing_key)
    rig.gw.body = {"assignment": {"mode": "serve", "rollout_id": "ro-2", "stage": "all",
                                  "percent": 100, **({"input_shape": then} if then else {})},
                   "manifest": fresh, "previous_model_version": None, "baseline": None}
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == _sha(other_file)
    assert rig.slot.current.rollout_id == "ro-2"


def test_guard_rollback_after_restart_refuses_the_rollout_too(
    rig: Rig, models, wide, signing_key  # noqa: F811
) -> None:
    """The model restored from updater.json after a restart is taken back by the guard: the
    refusal covers its rollout's other file as well."""
    square = models["candidate"]
    manifest = _rollout(rig, square, wide, signing_key)
    _assign(rig, manifest, "serve", WIDE)
    assert rig.updater.poll_once() == "serving"
    base = rig.updater._previous
    again = rig.new_updater()
    again.slot.swap(LoadedModel.from_detector(base.detector))  # started on --model
    again.restore()
    assert again.slot.sha256 == _sha(wide)
    rig.updater, rig.slot = again, again.slot
    try:
        assert _guard_rolls_back(rig)["update_status"] == "rolled_back"
        assert rig.slot.sha256 == rig.base_sha
        _assign(rig, manifest, "serve", None)
        assert rig.updater.poll_once() == "skipped" and rig.slot.sha256 == rig.base_sha
        assert any(k.startswith("manifest:") for k in _state(rig)["rejected"])
    finally:
        again.stop()


# =========================================================================== 2. POST /v1/rollouts
def _store_rectangular_primary(env: Env, rid: str) -> dict:  # noqa: F811
    """A manifest with a 192x320 own file written straight into the store (as before the
    square rule): signed, its row recorded, never through ``POST /v1/models``."""
    wide_f, square_f = env.tmp / f"{rid}-w.onnx", env.tmp / f"{rid}-s.onnx"
    wide_f.write_bytes(os.urandom(200))
    square_f.write_bytes(os.urandom(300))
    m = build_manifest("9", wide_f, 320, FLEET_CLASSES, rid, input_shape=(320, 320),
                       variants={(192, 320): square_f})
    m["input_shape"], m["variants"][0]["input_shape"] = [192, 320], [320, 320]
    m = sign_manifest(m, env.key)
    gw = env.client.app.state.gateway
    with gw.db.write() as session:
        session.add(ModelManifestRow(
            manifest_sha256=manifest_sha256(m), file_sha256=m["sha256"], size=m["size"],
            model_version="9", rollout_id=rid, key_id=m["key_id"], manifest=m,
            path=f"{m['sha256']}.onnx", published_at=gw.now(), published_by="test"))
        session.commit()
    return m


@pytest.mark.parametrize("by", ["manifest_sha256", "model_version"])
def test_create_rollout_rechecks_a_stored_rectangular_primary(env: Env, by: str) -> None:  # noqa: F811
    live = env.rollout("5")  # a live rollout that a refused create must not cancel
    m = _store_rectangular_primary(env, "ro-wide")
    key = {"manifest_sha256": manifest_sha256(m)} if by == "manifest_sha256" \
        else {"model_version": "9"}
    r = env.post("/v1/rollouts", json={**key, "hold_seconds": 60})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("manifest rejected: ")
    assert "input_shape [192, 320] is not square" in detail
    gw = env.client.app.state.gateway
    with gw.db.read() as session:
        assert session.get(RolloutRow, "ro-wide") is None
        statuses = {ro.rollout_id: ro.status for ro in session.scalars(select(RolloutRow))}
    assert statuses == {live["rollout_id"]: "active"}


def test_publish_and_create_share_the_wording(env: Env) -> None:  # noqa: F811
    """The 422 of POST /v1/rollouts is the publish's, word for word."""
    m = _store_rectangular_primary(env, "ro-wide2")
    created = env.post("/v1/rollouts", json={"manifest_sha256": manifest_sha256(m)})
    published = env.post("/v1/models", data={"manifest": json.dumps(m)})
    assert created.status_code == published.status_code == 422
    assert created.json()["detail"] == published.json()["detail"]
