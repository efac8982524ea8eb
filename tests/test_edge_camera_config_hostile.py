"""Hostile camera configuration documents on the agent (``edge_agent.camera_config``).

D4: a boost ``until`` past year 9999 UTC (``9999-12-31T23:59:59-14:00`` is year 10000 in
UTC) used to pass the checks, be put in force and kept, and then break ``until_iso`` on every
call: ``apply``, every frame's ``FramePipeline.process``, ``heartbeat_fields``, and a restart
that loaded the kept file. ``until`` is now bounded like the gateway's (2000 ≤ t < 2100 UTC).

D5: a NaN in a section the agent ignores used to be put in force, then ``_save`` raised
(``allow_nan=False``): ``apply`` raised, no ``config_error``, never kept. A document that
cannot be kept as strict JSON is now refused like a bad value.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent import camera_config
from edge_agent.agent import FramePipeline
from edge_agent.camera_config import CONFIG_FILE, CameraConfigChannel, parse_config
from edge_agent.errors import InvalidCameraConfig
from edge_agent.model_slot import LoadedModel, ModelSlot
from edge_agent.samplers import SamplerConfig
from edge_agent.sources import Frame

from .test_edge_camera_config import _NoBoxes

T0 = 1_780_000_000.0  # agent clock, unix seconds (2026-05-28)
GOOD_UNTIL = "2026-05-28T20:28:20+00:00"  # T0 + 100 s
FAR = "9999-12-31T23:59:59-14:00"  # year 10000 in UTC


def answer(version: int, config: dict[str, Any]) -> dict[str, Any]:
    return {"camera_id": "cam", "version": version, "sha256": f"{version:064x}",
            "config": config}


def boosted(until: str, base_rate: float = 0.05) -> dict[str, Any]:
    return {"sampling": {"base_rate": base_rate, "hourly_budget": 720.0,
                         "boost": {"factor": 2, "until": until, "reason": "x"}}}


def channel(tmp_path: Path) -> CameraConfigChannel:
    return CameraConfigChannel("cam", tmp_path / "state", base_rate=0.01, hourly_budget=360.0,
                               clock=lambda: T0)


def kept_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / CONFIG_FILE


def _process_frames(ch: CameraConfigChannel, n: int = 3) -> None:
    slot = ModelSlot(LoadedModel(detector=_NoBoxes(), sha256="0" * 64, path=Path("m")))
    pipeline = FramePipeline(slot, sampler_config=SamplerConfig(
        base_rate=0.0, edge_cases=False, hourly_budget=None), sampling=ch.effective_sampling)
    image = np.full((24, 32, 3), 128, np.uint8)
    for i in range(n):
        pipeline.process(Frame(image, i, T0 + i, f"t:{i}"))


# ---------------------------------------------------------------- D4: boost.until bounds
def test_a_boost_beyond_year_9999_is_refused_and_the_last_good_document_stays(
        tmp_path: Path) -> None:
    ch = channel(tmp_path)
    assert ch.apply(answer(1, boosted(GOOD_UNTIL)), '"1-a"')
    kept = kept_path(tmp_path).read_text()

    assert ch.apply(answer(2, boosted(FAR, base_rate=0.5)), '"2-b"') is False
    assert ch.applied.version == 1
    assert ch.error is not None and ch.error["version"] == 2
    assert "sampling.boost.until" in ch.error["reason"]
    assert kept_path(tmp_path).read_text() == kept  # not overwritten

    hb = ch.heartbeat_fields()  # the heartbeat thread keeps sending
    assert hb["config_version"] == 1 and hb["config_error"]["version"] == 2
    assert hb["sampling_boost_until"] == GOOD_UNTIL
    assert ch.effective_sampling().base_rate == pytest.approx(0.1)
    _process_frames(ch)  # frames are not detector failures


def test_a_far_boost_as_the_first_document_leaves_frames_and_heartbeats_working(
        tmp_path: Path) -> None:
    ch = channel(tmp_path)
    assert ch.apply(answer(2, boosted(FAR)), '"2-x"') is False
    assert ch.applied.version == 0 and ch.error is not None
    assert not kept_path(tmp_path).exists()
    assert ch.heartbeat_fields()["sampling_boost_until"] is None
    _process_frames(ch)
    # a restarted agent finds nothing kept and starts on its own rates
    again = channel(tmp_path)
    assert not again.load()
    assert again.effective_sampling().base_rate == 0.01


def test_a_far_boost_already_kept_on_disk_is_refused_at_load(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kept_path(tmp_path).parent.mkdir(parents=True)
    kept_path(tmp_path).write_text(json.dumps({
        "version": 2, "sha256": "0" * 64, "etag": '"2-x"', "camera_id": "cam",
        "config": boosted(FAR)}))
    ch = channel(tmp_path)
    with caplog.at_level(logging.ERROR, logger="edge_agent.camera_config"):
        assert ch.load() is False  # not a crash at start
    assert "sampling.boost.until" in caplog.text
    assert ch.applied.version == 0
    assert ch.heartbeat_fields()["config_version"] == 0
    _process_frames(ch)


@pytest.mark.parametrize(
    ("until", "ok"),
    [
        ("2000-01-01T00:00:00Z", True),
        ("2099-12-31T23:59:59Z", True),
        ("2100-01-01T00:59:59+01:00", True),  # 2099-12-31T23:59:59Z
        ("2100-01-01T00:00:00Z", False),
        ("2099-12-31T23:00:00-01:00", False),  # 2100-01-01T00:00:00Z
        ("1999-12-31T23:59:59Z", False),
        ("0001-01-01T00:00:00+14:00", False),  # before year 1 in UTC
        ("9999-12-31T23:59:59+00:00", False),
        (FAR, False),
    ],
)
def test_boost_until_lies_in_the_gateways_bounds(until: str, ok: bool) -> None:
    if ok:
        cfg = parse_config(answer(1, boosted(until)))
        assert cfg.boost is not None
        assert cfg.boost.until_iso  # converts back without error
    else:
        with pytest.raises(InvalidCameraConfig, match=r"sampling\.boost\.until must be from "
                           r"2000-01-01 to before 2100-01-01 UTC"):
            parse_config(answer(1, boosted(until)))


# ---------------------------------------------------------------- D5: not storable
@pytest.mark.parametrize(
    "config",
    [
        {"sampling": {"base_rate": 0.2}, "future": {"x": float("nan")}},
        {"sampling": {"base_rate": 0.2}, "future": [float("inf")]},
        {"sampling": {"base_rate": 0.2, "future_key": float("-inf")}},
        {"privacy": {"mode": "mask", "level": float("nan")}},
        {"sampling": {"boost": {"factor": 2, "until": GOOD_UNTIL, "reason": "x",
                                "weight": float("nan")}}},
    ],
)
def test_a_document_that_cannot_be_kept_is_refused_cleanly(
        tmp_path: Path, config: dict[str, Any]) -> None:
    ch = channel(tmp_path)
    assert ch.apply(answer(1, {"sampling": {"base_rate": 0.1}}), '"1-a"')
    kept = kept_path(tmp_path).read_text()

    assert ch.apply(answer(3, config), '"3-x"') is False  # did raise ValueError
    assert ch.applied.version == 1 and ch.effective_sampling().base_rate == 0.1
    assert ch.error is not None and ch.error["version"] == 3
    assert "cannot be kept as JSON" in ch.error["reason"]
    assert ch.heartbeat_fields()["config_error"]["version"] == 3
    assert kept_path(tmp_path).read_text() == kept

    # what is in force is what a restart brings back
    again = channel(tmp_path)
    assert again.load() and again.applied.version == 1

    # a later, storable document applies and clears the error
    assert ch.apply(answer(4, {"sampling": {"base_rate": 0.2}, "future": {"x": 1}}), '"4-y"')
    assert ch.error is None and json.loads(kept_path(tmp_path).read_text())["version"] == 4


def test_a_nan_in_a_known_field_is_still_named_by_its_own_check() -> None:
    with pytest.raises(InvalidCameraConfig, match=r"sampling\.base_rate"):
        parse_config(answer(1, {"sampling": {"base_rate": float("nan")},
                                "future": {"x": float("nan")}}))


def test_a_kept_file_with_a_nan_is_refused_at_load(tmp_path: Path) -> None:
    kept_path(tmp_path).parent.mkdir(parents=True)
    # json.loads accepts NaN: a kept file written by an older agent (or by hand)
    kept_path(tmp_path).write_text(
        '{"version": 2, "camera_id": "cam", "config": {"sampling": {"base_rate": 0.3}, '
        '"future": {"x": NaN}}}')
    ch = channel(tmp_path)
    assert ch.load() is False and ch.applied.version == 0


def test_a_save_that_fails_for_any_reason_does_not_break_apply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("cannot encode")

    monkeypatch.setattr(camera_config, "write_text_atomic", refuse)
    ch = channel(tmp_path)
    with caplog.at_level(logging.ERROR, logger="edge_agent.camera_config"):
        assert ch.apply(answer(1, {"sampling": {"base_rate": 0.3}}), '"1-a"')
    assert ch.applied.version == 1 and ch.error is None
    assert "cannot keep the camera configuration" in caplog.text
