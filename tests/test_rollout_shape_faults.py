"""Per-camera model shapes inside a rollout: faults an audit found (audit 9).

1. A shape change inside a rollout (the wide file, then the square one) must not make the
   rollout's other file the model to go back to: a withdrawn rollout (``mode: none``) and the
   rollback guard both return to the model served before the rollout (also from an
   ``updater.json`` an older agent wrote with the other shape as ``previous``).
2. A heartbeat without a frame size (agent restarted, no frame read yet) does not make the
   gateway forget the camera's size: the newest heartbeat that has one (among a bounded number)
   counts.
3. The agent checks the loaded model's HxW against the manifest's always: a manifest without
   ``input_shape`` declares the square ``input_size`` model.
4. The manifest's own file is the square fallback: a rectangular one is refused where it is
   built (``build_manifest``) and published (``POST /v1/models``: 422); the agent's parser
   still accepts what older gateways served.

Agent side: the fake gateway of ``test_edge_updater`` and a synthetic 192x320 ONNX whose
classes match the shared 320 model (no export: fast). Gateway side: ``test_rollouts``' env.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event

from edge_agent.manifest import ManifestVerifier
from edge_agent.rollback_guard import GuardLimits
from fleet import rollout_shapes
from fleet.rollout_shapes import camera_frame_size
from roadloop.release.signing import (
    PUBLIC_KEY_FILE,
    build_manifest,
    check_manifest_fields,
    sign_manifest,
)
from roadloop.release.signing import SignatureError as ManifestRefused

from .test_edge_inference import _constant_output_model, _raw
from .test_edge_updater import (  # noqa: F401  (fixtures)
    CLASSES,
    Rig,
    baseline,
    gateway,
    models,
    public_b64,
    rig,
    sign,
    signing_key,
)
from .test_rect_models import _signed
from .test_rollouts import CLASSES as FLEET_CLASSES
from .test_rollouts import Env, env  # noqa: F401  (fixture)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 192x320 (HxW) detector with the shared model's classes."""
    out = _raw([(160, 96, 40, 30, 2, 0.9)], nc=len(CLASSES))
    return _constant_output_model(
        tmp_path_factory.mktemp("wide") / "model.192x320.onnx", out,
        input_shape=[1, 3, 192, 320], names=dict(enumerate(CLASSES)))


def _rollout(rg: Rig, square: Path, wide: Path, key: Any) -> dict:
    """Manifest of rollout ro-1: the square file + the 192x320 variant; both downloadable."""
    manifest = sign({
        "manifest_version": 1, "model_version": "7", "rollout_id": "ro-1",
        "file": "model.int8.onnx", "sha256": _sha(square), "size": square.stat().st_size,
        "input_size": 320, "input_shape": [320, 320], "class_names": CLASSES,
        "format": "onnx-fp32", "created_at": "2026-11-25T20:00:00Z",
        "variants": [{"input_shape": [192, 320], "file": wide.name,
                      "sha256": _sha(wide), "size": wide.stat().st_size}],
    }, key)
    rg.gw.models[_sha(square)] = square.read_bytes()
    rg.gw.models[_sha(wide)] = wide.read_bytes()
    return manifest


def _assign(rg: Rig, manifest: dict, mode: str, shape: list[int] | None) -> None:
    a: dict[str, Any] = {"mode": mode, "rollout_id": "ro-1", "stage": "all", "percent": 100}
    if shape:
        a["input_shape"] = shape
    rg.gw.body = {"assignment": a, "manifest": manifest if mode != "none" else None,
                   "previous_model_version": None, "baseline": None}


def _wide_then_square(rg: Rig, manifest: dict, square: Path, wide: Path) -> None:
    """The camera gets the wide file, then (frame size unknown / changed) the square one."""
    _assign(rg, manifest, "serve", [192, 320])
    assert rg.updater.poll_once() == "serving" and rg.slot.sha256 == _sha(wide)
    _assign(rg, manifest, "serve", None)
    assert rg.updater.poll_once() == "serving" and rg.slot.sha256 == _sha(square)


def _state(rg: Rig) -> dict:
    return json.loads((rg.state / "updater.json").read_text())


# =========================================================================== 1. rollback
def test_withdrawn_rollout_after_shape_change_returns_to_pre_rollout_model(
    rig: Rig, models, wide, signing_key  # noqa: F811
) -> None:
    square = models["candidate"]
    manifest = _rollout(rig, square, wide, signing_key)
    _wide_then_square(rig, manifest, square, wide)
    # the model to go back to is still the one from before the rollout
    assert _state(rig)["previous"]["sha256"] == rig.base_sha
    assert rig.updater._previous is not None and rig.updater._previous.sha256 == rig.base_sha
    _assign(rig, manifest, "none", [192, 320])  # rolled back (baseline null: --model)
    assert rig.updater.poll_once() == "none"
    assert rig.slot.sha256 == rig.base_sha and rig.slot.current.rollout_id is None
    assert rig.updater.status == "idle" and "withdrawn" in (rig.updater.reason or "")
    assert rig.updater.poll_once() == "unchanged" and rig.slot.sha256 == rig.base_sha


def test_guard_rollback_after_shape_change_returns_to_pre_rollout_model(
    rig: Rig, models, wide, signing_key  # noqa: F811
) -> None:
    square = models["candidate"]
    manifest = _rollout(rig, square, wide, signing_key)
    _wide_then_square(rig, manifest, square, wide)
    rig.updater.guard.limits = GuardLimits(max_error_rate=0.05, bad_windows=1)
    bad = rig.slot.current
    for _ in range(10):
        rig.updater.observe_frame(bad, 5.0, [], np.zeros((1, 1, 3), np.uint8))
        rig.updater.observe_error(bad)
    fields = rig.updater.heartbeat_fields()
    assert fields["update_status"] == "rolled_back" and fields["rollout_id"] == "ro-1"
    assert rig.slot.sha256 == rig.base_sha, "rolled back to the rollout's other file"
    assert _state(rig)["serving"]["sha256"] == rig.base_sha


def test_shape_change_keeps_the_pre_rollout_latency_baseline(
    rig: Rig, models, wide, signing_key  # noqa: F811
) -> None:
    square = models["candidate"]
    manifest = _rollout(rig, square, wide, signing_key)
    img = np.zeros((1, 1, 3), np.uint8)
    for _ in range(20):  # the model before the rollout: 40 ms
        rig.updater.observe_frame(rig.slot.current, 40.0, [], img)
    _assign(rig, manifest, "serve", [192, 320])
    assert rig.updater.poll_once() == "serving"
    assert rig.updater.guard.baseline_p95 == pytest.approx(40.0)
    for _ in range(20):  # the wide file is faster: not the yardstick for the square one
        rig.updater.observe_frame(rig.slot.current, 10.0, [], img)
    _assign(rig, manifest, "serve", None)
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == _sha(square)
    assert rig.updater.guard.armed_sha == _sha(square)
    assert rig.updater.guard.baseline_p95 == pytest.approx(40.0)
    assert _state(rig)["serving"]["baseline_p95"] == pytest.approx(40.0)


@pytest.mark.parametrize("how", ["withdrawn", "guard"])
def test_older_state_with_the_other_shape_as_previous_is_not_gone_back_to(
    rig: Rig, models, wide, signing_key, how: str  # noqa: F811
) -> None:
    """An updater.json written before the fix: previous = the rollout's other file."""
    square = models["candidate"]
    manifest = _rollout(rig, square, wide, signing_key)
    _assign(rig, manifest, "serve", [192, 320])
    assert rig.updater.poll_once() == "serving"
    wide_loaded = rig.slot.current
    _assign(rig, manifest, "serve", None)
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == _sha(square)
    u = rig.updater
    u._previous, u.state.previous = wide_loaded, wide_loaded.record()
    if how == "withdrawn":
        _assign(rig, manifest, "none", None)
        assert u.poll_once() == "none"
    else:
        u.guard.limits = GuardLimits(max_error_rate=0.05, bad_windows=1)
        for _ in range(10):
            u.observe_frame(rig.slot.current, 5.0, [], np.zeros((1, 1, 3), np.uint8))
            u.observe_error(rig.slot.current)
        assert u.heartbeat_fields()["update_status"] == "rolled_back"
    assert rig.slot.sha256 == rig.base_sha  # the model the agent was started with


# =========================================================================== 3. HxW always
def test_square_manifest_refuses_a_rectangular_file(
    rig: Rig, wide, signing_key  # noqa: F811
) -> None:
    data = wide.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    fields = {"manifest_version": 1, "model_version": "7", "rollout_id": "ro-1",
              "file": "m.onnx", "sha256": sha, "size": len(data), "input_size": 320,
              "class_names": CLASSES, "format": "onnx-fp32",
              "created_at": "2026-11-25T20:00:00Z"}
    rig.gw.models[sha] = data
    rig.gw.assign("serve", sign(fields, signing_key))  # no input_shape: 320x320 declared
    assert rig.updater.poll_once() == "rolled_back"
    assert rig.slot.sha256 == rig.base_sha
    assert "has input 192x320, the manifest says 320x320" in (rig.updater.reason or "")
    # the refusal is the pair's: the same file under a manifest that says 192x320 serves
    rig.gw.assign("serve", sign({**fields, "input_shape": [192, 320]}, signing_key))
    assert rig.updater.poll_once() == "serving" and rig.slot.sha256 == sha
    assert rig.slot.current.detector.input_hw == (192, 320)


# =========================================================================== 2. frame size
def _serve_rect_rollout(env: Env) -> dict:  # noqa: F811
    [dev] = env.enroll(1)
    manifest, square, wide = _signed(env.tmp, env.key)
    r = env.post("/v1/models", files=[("file", (square.name, square.read_bytes())),
                                      ("variant", (wide.name, wide.read_bytes()))],
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 201, r.text
    r = env.post("/v1/rollouts", json={"model_version": "5", "stages": [
        {"name": "all", "percent": 100, "mode": "serve"}]})
    assert r.status_code == 201, r.text
    return dev


def _shape(env: Env, dev: dict) -> Any:  # noqa: F811
    env.client.app.state.gateway.manifests.invalidate()
    return env.get("/v1/manifest", dev["access_token"]).json()["assignment"].get("input_shape")


def test_sizeless_heartbeat_keeps_the_known_frame_size(env: Env) -> None:  # noqa: F811
    dev = _serve_rect_rollout(env)
    env.heartbeat(dev, frame_width=640, frame_height=480)
    env.heartbeat(dev, frame_width=1920, frame_height=1080)  # the newest size counts
    assert _shape(env, dev) == [192, 320]
    env.heartbeat(dev)  # restarted, no frame yet: frame size null
    env.heartbeat(dev, frame_width=None, frame_height=None)
    assert _shape(env, dev) == [192, 320], "the gateway forgot the camera's 16:9 size"
    env.heartbeat(dev, frame_width=640, frame_height=480)  # a real change still counts
    assert _shape(env, dev) is None


def test_frame_size_lookup_is_bounded(env: Env, monkeypatch) -> None:  # noqa: F811
    dev = _serve_rect_rollout(env)
    gw = env.client.app.state.gateway
    monkeypatch.setattr(rollout_shapes, "HEARTBEAT_SIZE_WINDOW", 3)
    env.heartbeat(dev, frame_width=1920, frame_height=1080)
    for _ in range(2):
        env.heartbeat(dev)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    def lookup() -> tuple[int, int] | None:
        with gw.db.read() as session:
            engine = session.get_bind()
            event.listen(engine, "before_cursor_execute", seen)
            try:
                return camera_frame_size(session, dev["camera_id"])
            finally:
                event.remove(engine, "before_cursor_execute", seen)

    assert lookup() == (1920, 1080)
    env.heartbeat(dev)  # a third sizeless one: the sized one is out of the window
    assert lookup() is None  # no frames uploaded either: the square file
    hb = [s for s in statements if "heartbeats" in s]
    assert hb and all("LIMIT" in s.upper() for s in hb)
    # the two JSON fields, not whole payloads (SQLite: JSON_EXTRACT; PostgreSQL: ->)
    assert all("JSON_EXTRACT" in s.upper() or "->" in s for s in hb)


# =========================================================================== 4. square primary
def test_build_manifest_refuses_a_rectangular_own_file(tmp_path: Path) -> None:
    square, wide = tmp_path / "s.onnx", tmp_path / "w.onnx"
    square.write_bytes(b"square")
    wide.write_bytes(b"wide")
    with pytest.raises(ValueError, match=r"input_shape \[192, 320\] is not square"):
        build_manifest("5", wide, 320, FLEET_CLASSES, "ro-w", input_shape=(192, 320),
                       variants={(320, 320): square})
    with pytest.raises(ValueError, match="not square"):
        build_manifest("5", wide, 320, FLEET_CLASSES, "ro-w", input_shape=(192, 320))
    ok = build_manifest("5", square, 320, FLEET_CLASSES, "ro-w", input_shape=(320, 320),
                        variants={(192, 320): wide})
    assert ok["input_shape"] == [320, 320]


def test_gateway_refuses_a_rectangular_own_file_agent_still_parses_it(
    env: Env,  # noqa: F811
) -> None:
    wide, square = env.tmp / "w.onnx", env.tmp / "s.onnx"
    wide.write_bytes(os.urandom(200))
    square.write_bytes(os.urandom(300))
    # signed by hand past build_manifest, as an older platform or another tool might
    m = build_manifest("5", wide, 320, FLEET_CLASSES, "ro-w", input_shape=(320, 320),
                       variants={(192, 320): square})
    m["input_shape"], m["variants"][0]["input_shape"] = [192, 320], [320, 320]
    m = sign_manifest(m, env.key)
    files = [("file", (wide.name, wide.read_bytes())),
             ("variant", (square.name, square.read_bytes()))]
    r = env.post("/v1/models", files=files, data={"manifest": json.dumps(m)})
    assert r.status_code == 422, r.text
    assert "input_shape [192, 320] is not square" in r.json()["detail"]
    with pytest.raises(ManifestRefused, match="not square"):
        check_manifest_fields(m)
    # nothing was kept: the rollout id is still free for the corrected manifest
    good, _, _ = _signed(env.tmp, env.key, rid="ro-w")
    sq, wd = env.tmp / "ro-w-320x320.onnx", env.tmp / "ro-w-192x320.onnx"
    r = env.post("/v1/models", files=[("file", (sq.name, sq.read_bytes())),
                                      ("variant", (wd.name, wd.read_bytes()))],
                 data={"manifest": json.dumps(good)})
    assert r.status_code == 201, r.text
    # agents keep accepting such a manifest (an older gateway may serve one)
    parsed = ManifestVerifier(env.tmp / "keys" / PUBLIC_KEY_FILE).verify(m)
    assert parsed.input_hw == (192, 320) and parsed.for_shape([320, 320]).input_hw == (320, 320)
