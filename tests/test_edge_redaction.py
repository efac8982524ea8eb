"""Privacy at the edge (edge_agent.redaction): the JPEG that reaches the outbox is redacted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent, FrameResult
from edge_agent.camera_config import CameraConfigChannel, parse_config
from edge_agent.counting import DensityState
from edge_agent.errors import InvalidCameraConfig
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.inference import Detection
from edge_agent.outbox import Outbox
from edge_agent.redaction import RedactionUnavailable, Redactor
from edge_agent.samplers import SampleDecision
from edge_agent.sources import Frame

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import bearer, meta, post_frame

make_env, jpeg = gateway_tests.make_env, gateway_tests.frame_jpeg  # fixtures

BOX = (40, 30, 120, 110)  # the person's box in a 160×200 frame


class _NoFaces:
    kind, name = "face", "test-none"

    def detect(self, image: np.ndarray) -> list:
        return []


def _frame() -> Frame:
    y, x = np.indices((160, 200))
    grey = 128 + 90 * np.sin(x / 2.5) * np.cos(y / 2.5)  # fine texture: a blur removes it
    image = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    return Frame(image, 0, 1_700_000_000.0, "image:test")


def _result(frame: Frame) -> FrameResult:
    person = Detection(4, 0.9, *map(float, BOX), class_name="person")
    car = Detection(0, 0.9, 150.0, 120.0, 195.0, 155.0, class_name="car")
    return FrameResult(frame, [person, car], {"person": 1, "car": 1}, DensityState.NORMAL,
                       False, 0.0, 120.0, 50.0, False, SampleDecision(True, ("base",), 1.0),
                       {"detect_ms": 1.0, "inference_ms": 1.0}, None, "f" * 32)


def _agent(tmp_path: Path, redactor, mode: str | None = None) -> tuple[EdgeAgent, AgentSummary]:
    cfg = AgentConfig(gateway_url="http://127.0.0.1:9", camera_id="cam-1", source="x",
                      model_path=tmp_path / "m.onnx", state_dir=tmp_path)
    agent = EdgeAgent(cfg, redactor=redactor, status_stream=open("/dev/null", "w"))  # noqa: SIM115
    agent.outbox = Outbox(tmp_path / "outbox")
    agent.telemetry = TelemetryWindow("cam-1", "v", ["car", "person"])
    agent.camera_config = CameraConfigChannel("cam-1", tmp_path, base_rate=1.0,
                                              hourly_budget=None)
    if mode is not None:
        assert agent.camera_config.apply({"version": 1, "config": {"privacy": {"mode": mode}}})
    agent.slot = SimpleNamespace(sha256="v")
    agent._load_redactor()
    summary = AgentSummary("cam-1", "d", "v", stopped_by="test")
    return agent, summary


def _queued(agent: EdgeAgent) -> tuple[np.ndarray, dict]:
    [item] = agent.outbox.due(1e12, limit=5)
    image = cv2.imdecode(np.frombuffer(Path(item.path).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    return image, item.metadata


def _run(tmp_path: Path, mode: str | None):
    agent, summary = _agent(tmp_path, Redactor(_NoFaces(), None), mode)
    frame = _frame()
    pipeline = SimpleNamespace(process=lambda f: _result(f), last_model=None)
    agent._process(pipeline, frame, summary)
    image, meta = _queued(agent)
    x1, y1, x2, y2 = BOX
    inside = np.abs(image[y1:y2, x1:x2].astype(int) - frame.image[y1:y2, x1:x2]).mean()
    outside = np.abs(image[:, :30].astype(int) - frame.image[:, :30]).mean()  # JPEG noise only
    return image, meta, inside, outside


def test_mask_blacks_out_the_person_in_the_spooled_jpeg(tmp_path: Path) -> None:
    image, meta, _, outside = _run(tmp_path, "mask")
    x1, y1, x2, y2 = BOX
    assert image[y1 + 5:y2 - 5, x1 + 5:x2 - 5].max() < 30  # solid mask (JPEG ringing aside)
    assert outside < 25  # the rest of the frame is the camera's
    red = meta["redaction"]
    assert red["method"] == "mask" and red["counts"] == {"person": 1, "face": 0}
    assert "test-none" in red["version"] and 0 < red["area_share"] < 1


def test_blur_default_and_off_switch(tmp_path: Path) -> None:
    _, meta, inside, outside = _run(tmp_path / "blur", None)  # no privacy section: blur
    assert meta["redaction"]["method"] == "blur" and inside > 3 * outside
    _, meta, inside, outside = _run(tmp_path / "off", "off")
    assert meta["redaction"]["method"] == "off" and meta["redaction"]["counts"] == {}
    assert inside < 2 * outside + 1  # untouched apart from JPEG


def test_failing_redaction_model_queues_nothing(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Redactor:
        raise RedactionUnavailable("face model missing")

    agent, summary = _agent(tmp_path, broken)
    agent._process(SimpleNamespace(process=_result, last_model=None), _frame(), summary)
    assert agent.outbox.depth() == 0 and summary.frames_sampled == 0
    assert summary.frames_withheld == 1
    assert "face model missing" in (summary.redaction_error or "")
    assert "no frame is queued" in caplog.text
    assert not list((tmp_path / "outbox" / "spool").glob("*.jpg"))


def test_privacy_section_is_checked() -> None:
    assert parse_config({"version": 2, "config": {"privacy": {"mode": "mask"}}}).privacy_mode \
        == "mask"
    with pytest.raises(InvalidCameraConfig):
        parse_config({"version": 2, "config": {"privacy": {"mode": "pixelate"}}})


def test_gateway_schemas_accept_the_record_bounded() -> None:
    from pydantic import ValidationError

    from fleet.camera_config_schemas import CameraConfig
    from fleet.schemas import RedactionIn

    assert CameraConfig.model_validate({"privacy": {"mode": "off"}}).privacy.mode == "off"
    ok = RedactionIn.model_validate({"method": "blur", "version": "x", "counts": {"person": 2},
                                     "area_share": 0.1})
    assert ok.counts == {"person": 2}
    with pytest.raises(ValidationError):
        RedactionIn.model_validate({"method": "blur", "counts": {f"k{i}": 1 for i in range(9)}})
    with pytest.raises(ValidationError):
        RedactionIn.model_validate({"method": "sepia"})


def test_unavailable_redaction_pauses_frame_uploads_until_it_loads(tmp_path: Path) -> None:
    """Frames queued before (redacted then) stay queued while the models cannot load;
    traffic records (no pixels) still go; once the models load, the frames go too."""
    import threading
    import time

    from edge_agent.record_outbox import RecordOutbox

    def broken() -> Redactor:
        raise RedactionUnavailable("face model missing")

    agent, _ = _agent(tmp_path, broken)
    sent: dict[str, list] = {"frames": [], "records": []}
    ok = SimpleNamespace(acknowledged=True, kind="created")
    agent.client = SimpleNamespace(
        upload_frame=lambda data, meta: sent["frames"].append(meta) or ok,
        post_traffic_interval=lambda body: sent["records"].append(body) or ok)
    agent.records = RecordOutbox(tmp_path / "records")
    agent.outbox.put("f1", b"jpeg", {"frame_id": "f1", "redaction": {"method": "blur"}}, 1.0)
    agent.records.put("r1", {"record_id": "r1"})

    def run_until(done) -> None:
        agent._uploads_stop.clear()
        t = threading.Thread(target=agent._upload_loop, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        agent._uploads_stop.set()
        agent._wake_uploader.set()
        t.join(5)

    assert agent.frames_blocked()
    run_until(lambda: sent["records"])
    time.sleep(0.1)  # a frame would have gone with the record
    assert len(sent["records"]) == 1 and sent["frames"] == [] and agent.outbox.depth() == 1

    agent._redactor_source = Redactor(_NoFaces(), None)  # e.g. the package installed since
    agent._load_redactor()
    assert not agent.frames_blocked() and agent.redaction_error is None
    run_until(lambda: sent["frames"])
    assert [m["frame_id"] for m in sent["frames"]] == ["f1"] and agent.outbox.depth() == 0


def test_mode_off_needs_no_redaction_model(tmp_path: Path) -> None:
    def broken() -> Redactor:
        raise RedactionUnavailable("face model missing")

    agent, summary = _agent(tmp_path, broken, mode="off")
    assert not agent.frames_blocked()
    agent._process(SimpleNamespace(process=_result, last_model=None), _frame(), summary)
    assert agent.outbox.depth() == 1 and summary.frames_withheld == 0


def test_gateway_keeps_the_redaction_record_in_the_frame_sidecar(
        make_env: Any, jpeg: bytes) -> None:
    from roadloop.data.frames import FrameStore

    env = make_env()
    frame_jpeg = jpeg
    dev = env.enroll("cam-a")
    record = {"method": "mask", "version": "roadloop-redaction/1 person:detector",
              "counts": {"person": 2, "face": 1}, "area_share": 0.05}
    r = post_frame(env.client, dev["access_token"], meta("f-red", redaction=record), frame_jpeg)
    assert r.status_code == 201, r.text
    # A frame stating no redaction is stored only from a camera configured not to redact.
    r = post_frame(env.client, dev["access_token"], meta("f-none", redaction=None), frame_jpeg)
    assert r.status_code == 422 and "requires redaction" in r.text, r.text
    r = env.client.put("/v1/cameras/cam-a/config", headers=bearer(env.admin), json={
        "config": {"privacy": {"mode": "off"}}, "expected_version": None, "reason": "test"})
    assert r.status_code == 200, r.text
    r = post_frame(env.client, dev["access_token"], meta("f-none", redaction=None), frame_jpeg)
    assert r.status_code == 201, r.text
    store = FrameStore(env.settings.frame_store)
    stored = store.read_record("cam-a", "f-red")
    assert stored is not None and stored.redaction is not None
    assert stored.redaction.model_dump() == record
    unstated = store.read_record("cam-a", "f-none")
    assert unstated is not None and unstated.redaction is None
