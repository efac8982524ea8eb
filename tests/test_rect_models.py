"""Rectangular models per camera: shapes, the signed manifest's variants, the gateway's pick
per camera, the agent's choice of the signed variant, and per-shape matching for mAP."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edge_agent.manifest import ManifestError, ManifestVerifier
from edge_agent.updater import _shape_hint
from fleet.db import CameraConfigRow
from roadloop.evaluation.shape_accuracy import match_predictions
from roadloop.models.shapes import export_shapes, parse_shape, pick_input_shape
from roadloop.release.signing import (
    PUBLIC_KEY_FILE,
    build_manifest,
    load_or_create_signing_key,
    sign_manifest,
)
from roadloop.settings import Settings

from .test_rollouts import CLASSES, Env, env  # noqa: F401  (fixture)

SQUARE, WIDE = (320, 320), (192, 320)


def test_shapes_from_settings_and_pick_per_frame_size() -> None:
    assert export_shapes(Settings().export_shapes, 320) == [SQUARE, WIDE]
    assert export_shapes(["16:9"], 480) == [(480, 480), (288, 480)]
    assert parse_shape("9:16", 640) == (640, 384) and parse_shape("224x416", 320) == (224, 416)
    with pytest.raises(ValueError):
        parse_shape("200x320", 320)  # not a multiple of 32
    shapes = [SQUARE, WIDE]
    assert pick_input_shape((1280, 720), shapes) == WIDE
    assert pick_input_shape((1920, 1080), shapes) == WIDE
    assert pick_input_shape((640, 480), shapes) == SQUARE  # 4:3: 192x320 would shrink it
    assert pick_input_shape(None, shapes) == SQUARE
    assert pick_input_shape((720, 1280), shapes) == SQUARE


def _signed(tmp: Path, key, *, variants: bool = True, rid: str = "ro-rect"):
    square = tmp / f"{rid}-320x320.onnx"
    wide = tmp / f"{rid}-192x320.onnx"
    square.write_bytes(os.urandom(300))
    wide.write_bytes(os.urandom(200))
    m = build_manifest("5", square, 320, CLASSES, rid, input_shape=SQUARE if variants else None,
                       variants={WIDE: wide} if variants else None)
    return sign_manifest(m, key), square, wide


def test_manifest_records_shapes_signed_and_old_manifests_still_parse(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "keys")
    verifier = ManifestVerifier(tmp_path / "keys" / PUBLIC_KEY_FILE)
    manifest, _square, wide = _signed(tmp_path, key)
    assert manifest["input_shape"] == [320, 320]
    assert manifest["variants"][0]["input_shape"] == [192, 320]
    m = verifier.verify(manifest)
    picked = m.for_shape([192, 320])
    assert (picked.input_hw, picked.size, picked.file) == (WIDE, 200, wide.name)
    assert picked.sha256 == manifest["variants"][0]["sha256"] != m.sha256
    assert m.for_shape(None) is m and m.for_shape([288, 480]) is m  # unsigned shape: own file
    # The signature covers the variants: swapping a variant's file breaks it.
    tampered = json.loads(json.dumps(manifest))
    tampered["variants"][0]["sha256"] = "0" * 64
    with pytest.raises(ManifestError, match="does not verify"):
        verifier.verify(tampered)
    # A manifest without shapes (older platform) parses as the square model it always was.
    old, _, _ = _signed(tmp_path, key, variants=False, rid="ro-old")
    assert "variants" not in old and "input_shape" not in old
    parsed = verifier.verify(old)
    assert parsed.input_shape is None and parsed.input_hw == SQUARE and parsed.variants == ()
    assert parsed.for_shape([192, 320]) is parsed
    assert _shape_hint({"assignment": {"mode": "serve"}}) is None  # old gateway: no hint


def test_gateway_serves_the_wide_model_to_a_16_9_camera(env: Env) -> None:  # noqa: F811
    devs = env.enroll(4)
    gw = env.client.app.state.gateway
    with gw.db.write() as s:
        for cam, size in (("cam-0", [1280, 720]), ("cam-1", [640, 480])):  # cam-2: unknown
            s.add(CameraConfigRow(camera_id=cam, version=1, document={"traffic": {
                "frame_size": size}}, sha256="0" * 64, updated_at=datetime.now(UTC)))
        s.commit()
    # cam-3 reports its frame size in heartbeats (the newest counts); cam-2's agent is older.
    env.heartbeat(devs[3], frame_width=640, frame_height=480)
    env.heartbeat(devs[3], frame_width=1920, frame_height=1080)
    env.heartbeat(devs[2])
    r = env.post("/v1/heartbeats", devs[3]["access_token"], json={
        "schema_version": 2, "camera_id": "cam-3", "sent_at": env.clock.now.isoformat(),
        "model_version": "old", "frame_width": 0, "frame_height": 1080})
    assert r.status_code == 422 and "frame_width" in r.text
    manifest, square, wide = _signed(env.tmp, env.key)
    # The variant's file must come with the manifest (or be stored already).
    r = env.post("/v1/models", files={"file": (square.name, square.read_bytes())},
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 422 and "variants[0]" in r.json()["detail"]
    r = env.post("/v1/models", files=[("file", (square.name, square.read_bytes())),
                                      ("variant", (wide.name, b"not the signed bytes"))],
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 422 and "rejected" in r.json()["detail"]
    r = env.post("/v1/models", files=[("file", (square.name, square.read_bytes())),
                                      ("variant", (wide.name, wide.read_bytes()))],
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 201, r.text
    r = env.post("/v1/rollouts", json={"model_version": "5", "stages": [
        {"name": "all", "percent": 100, "mode": "serve"}]})
    assert r.status_code == 201, r.text
    bodies = [env.get("/v1/manifest", d["access_token"]).json() for d in devs]
    assert [b["assignment"]["mode"] for b in bodies] == ["serve"] * 4
    assert bodies[0]["assignment"]["input_shape"] == [192, 320]
    assert bodies[3]["assignment"]["input_shape"] == [192, 320]  # from its heartbeat
    assert "input_shape" not in bodies[1]["assignment"]  # 4:3: the square file
    assert "input_shape" not in bodies[2]["assignment"]  # frame size unknown: square
    # What each agent then downloads: the signed variant, byte for byte.
    verifier = ManifestVerifier(env.tmp / "keys" / PUBLIC_KEY_FILE)
    for body, expect in ((bodies[0], wide), (bodies[2], square)):
        m = verifier.verify(body["manifest"]).for_shape(_shape_hint(body))
        got = env.get(f"/v1/models/{m.sha256}", devs[0]["access_token"])
        assert got.status_code == 200 and got.content == expect.read_bytes()


def test_match_predictions_follows_ultralytics_rule() -> None:
    truth_cls, truth = np.array([0, 1]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    pred_cls = np.array([0, 0, 1, 1])
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 26], [50, 50, 60, 60]], float)
    correct = match_predictions(pred_cls, pred, truth_cls, truth)
    assert correct[0].all()  # exact box: a hit at every IoU threshold
    assert not correct[1].any()  # same truth, lower IoU: already taken
    assert correct[2, 0] and not correct[2, -1]  # IoU 0.6: hit at 0.5, miss at 0.95
    assert not correct[3].any()


def test_int8_gate_runs_once_per_shape(monkeypatch, tmp_path: Path) -> None:
    import roadloop.evaluation.shape_accuracy as sa
    from roadloop.evaluation.gates import GateConfig
    from roadloop.evaluation.results import DetectionMetrics

    scores = {"sq.onnx": 0.30, "sq.int8.onnx": 0.295, "wide.onnx": 0.30, "wide.int8.onnx": 0.10}

    def fake(path: Path, data_yaml: Path, *, split: str = "test") -> DetectionMetrics:
        v = scores[Path(path).name]
        return DetectionMetrics(map50=v, map50_95=v, precision=v, recall=v, f1=v,
                                per_class_ap50={"car": v}, per_class_ap50_95={"car": v},
                                per_class_count_mae={"car": 0.0}, count_mae=0.0, n_images=1)

    monkeypatch.setattr(sa, "evaluate_onnx_at_shape", fake)
    out = sa.gate_int8_per_shape(
        {"320x320": (tmp_path / "sq.onnx", tmp_path / "sq.int8.onnx"),
         "192x320": (tmp_path / "wide.onnx", tmp_path / "wide.int8.onnx")},
        tmp_path / "data.yaml", GateConfig())
    assert out["320x320"][0].name == "int8_drop@320x320" and out["320x320"][0].passed
    assert out["192x320"][0].name == "int8_drop@192x320" and not out["192x320"][0].passed
