"""The camera's configuration on the agent: checks, live apply to the sampler, boost expiry on
an injected clock, rejection keeping the last good document, persistence across a restart,
the conditional GET, and the heartbeat fields. No gateway process here (the end-to-end test
is in tests/test_edge_agent_e2e.py); the client talks to an ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

from edge_agent.agent import FramePipeline
from edge_agent.camera_config import CONFIG_FILE, CameraConfigChannel, parse_config
from edge_agent.client import GatewayClient
from edge_agent.errors import GatewayError, InvalidCameraConfig
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.identity import DeviceIdentity
from edge_agent.model_slot import LoadedModel, ModelSlot
from edge_agent.samplers import FrameSampler, SamplerConfig
from edge_agent.sources import Frame

T0 = 1_780_000_000.0  # agent clock, unix seconds
UNTIL_ISO = "2026-05-28T20:28:20+00:00"  # T0 + 100 s
UNTIL = T0 + 100.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(version: int, config: dict[str, Any], camera_id: str = "cam-1") -> dict[str, Any]:
    return {"camera_id": camera_id, "version": version, "sha256": f"{version:064x}",
            "config": config, "updated_at": None, "updated_by": "admin-token:1"}


def boosted(base_rate: float = 0.05, budget: float = 720.0, factor: float = 4.0,
            until: str = UNTIL_ISO, **more: Any) -> dict[str, Any]:
    return {"sampling": {"base_rate": base_rate, "hourly_budget": budget,
                         "boost": {"factor": factor, "until": until, "reason": "drift"}}, **more}


def channel(tmp_path: Path, clock: Clock | None = None, **defaults: Any) -> CameraConfigChannel:
    return CameraConfigChannel("cam-1", tmp_path / "state",
                               base_rate=defaults.get("base_rate", 0.01),
                               hourly_budget=defaults.get("hourly_budget", 360.0),
                               clock=clock or Clock())


# ---------------------------------------------------------------- checks
def test_a_valid_document_is_parsed() -> None:
    cfg = parse_config(answer(3, {**boosted(), "notes": "n"}), etag='"3-ab"')
    assert (cfg.version, cfg.etag, cfg.base_rate, cfg.hourly_budget) == (3, '"3-ab"', 0.05, 720.0)
    assert cfg.boost is not None and (cfg.boost.factor, cfg.boost.until) == (4.0, UNTIL)
    assert cfg.boost.reason == "drift" and cfg.notes == "n"
    assert parse_config(answer(0, {})).base_rate is None
    assert parse_config(answer(1, boosted(until="2026-05-28T22:28:20+02:00"))).boost.until == UNTIL
    assert parse_config(answer(1, boosted(until="2026-05-28T20:28:20Z"))).boost.until == UNTIL


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"sampling": {"base_rate": 1.5}}, "sampling.base_rate must be >= 0 and <= 1"),
        ({"sampling": {"base_rate": float("nan")}}, "sampling.base_rate"),
        ({"sampling": {"base_rate": True}}, "sampling.base_rate must be a number"),
        ({"sampling": {"base_rate": "0.5"}}, "sampling.base_rate must be a number"),
        ({"sampling": {"hourly_budget": 0}}, "sampling.hourly_budget must be > 0"),
        ({"sampling": {"hourly_budget": 1e9}}, "sampling.hourly_budget"),
        (boosted(factor=0.5), "sampling.boost.factor"),
        (boosted(factor=25), "sampling.boost.factor"),
        (boosted(until="2026-05-28T20:28:20"), "must carry a time zone"),
        (boosted(until="next tuesday"), "not an ISO 8601 time"),
        ({"sampling": {"boost": {"factor": 2, "until": UNTIL_ISO}}}, "sampling.boost.reason"),
        ({"sampling": [0.1]}, "sampling must be an object"),
        ({"notes": "n" * 1001}, "notes"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(config: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidCameraConfig, match=words) as info:
        parse_config(answer(7, config))
    assert info.value.version == 7


def test_unknown_sections_and_keys_are_ignored_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ch = channel(tmp_path)
    newer = {"sampling": {"base_rate": 0.2, "jitter": 3}, "zones": [{"id": "z1"}], "lines": {}}
    with caplog.at_level(logging.WARNING, logger="edge_agent.camera_config"):
        assert ch.apply(answer(1, newer))
        assert ch.apply(answer(2, {**newer, "notes": "again"}))
    assert ch.applied.version == 2 and ch.effective_sampling().base_rate == 0.2
    warned = [r.getMessage() for r in caplog.records if "unknown" in r.getMessage()]
    assert sorted(warned) == sorted(f"camera configuration: {k!r} is unknown to this agent; "
                                    "ignored" for k in ("lines", "zones", "sampling.jitter"))


# ---------------------------------------------------------------- in force
def test_boost_multiplies_until_the_agents_clock_passes_it(tmp_path: Path) -> None:
    clock = Clock()
    ch = channel(tmp_path, clock)
    assert ch.effective_sampling() == (eff := ch.effective_sampling())
    assert (eff.base_rate, eff.hourly_budget, eff.boost_until) == (0.01, 360.0, None)
    assert ch.apply(answer(1, boosted()))
    eff = ch.effective_sampling()
    assert (eff.base_rate, eff.hourly_budget) == (pytest.approx(0.2), 2880.0)
    assert eff.boost_until == UNTIL_ISO
    clock.now = UNTIL - 0.001
    assert ch.effective_sampling().boost_until == UNTIL_ISO
    clock.now = UNTIL  # over: the configured rates, with no new document
    eff = ch.effective_sampling()
    assert (eff.base_rate, eff.hourly_budget, eff.boost_until) == (0.05, 720.0, None)

    # The boosted base rate is capped at 1; values the document omits are the agent's own.
    clock.now = T0
    assert ch.apply(answer(2, {"sampling": {"base_rate": 0.5, "boost": {
        "factor": 4, "until": UNTIL_ISO, "reason": "r"}}}))
    eff = ch.effective_sampling()
    assert (eff.base_rate, eff.hourly_budget) == (1.0, 1440.0)
    unlimited = channel(tmp_path / "u", clock, hourly_budget=None)
    unlimited.apply(answer(1, {"sampling": {"boost": {"factor": 3, "until": UNTIL_ISO,
                                                      "reason": "r"}}}))
    assert (unlimited.effective_sampling().base_rate,
            unlimited.effective_sampling().hourly_budget) == (pytest.approx(0.03), None)


def test_a_rejected_document_keeps_the_last_good_one(tmp_path: Path) -> None:
    ch = channel(tmp_path)
    assert ch.apply(answer(1, boosted()), '"1-a"')
    kept = (tmp_path / "state" / CONFIG_FILE).read_text()
    assert not ch.apply(answer(2, {"sampling": {"base_rate": 0.3, "hourly_budget": -5}}), '"2-b"')
    assert ch.applied.version == 1 and ch.effective_sampling().base_rate == pytest.approx(0.2)
    assert ch.error == {"version": 2, "reason": "sampling.hourly_budget must be > 0 and <= "
                        "100000, got -5"}
    fields = ch.heartbeat_fields()
    assert fields["config_version"] == 1 and fields["config_error"]["version"] == 2
    assert (tmp_path / "state" / CONFIG_FILE).read_text() == kept  # not overwritten
    assert not ch.apply(answer(3, {}, camera_id="cam-2"))  # another camera's document
    assert ch.applied.version == 1 and "cam-2" in ch.error["reason"]
    assert ch.apply(answer(4, {"sampling": {"base_rate": 0.3}}))
    assert ch.error is None and ch.heartbeat_fields()["config_version"] == 4


def test_the_document_in_force_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    first = channel(tmp_path, clock)
    assert not first.load()  # nothing kept yet
    assert first.apply(answer(5, boosted(notes="kept")), '"5-x"')
    kept = json.loads((tmp_path / "state" / CONFIG_FILE).read_text())
    assert kept["version"] == 5 and kept["config"]["notes"] == "kept"
    assert not list((tmp_path / "state").glob(".*"))  # no temp file left behind

    again = channel(tmp_path, clock)  # a restarted agent, before the gateway answers
    assert again.load()
    assert again.applied.version == 5 and again.applied.etag == '"5-x"'
    assert again.effective_sampling() == first.effective_sampling()
    assert again.effective_sampling().hourly_budget == 2880.0

    (tmp_path / "state" / CONFIG_FILE).write_text('{"version": 6, "config": {"sampling": 1}}')
    broken = channel(tmp_path, clock)
    assert not broken.load() and broken.applied.version == 0
    (tmp_path / "state" / CONFIG_FILE).write_text("{not json")
    assert not channel(tmp_path, clock).load()


# ---------------------------------------------------------------- live apply
class _NoBoxes:
    class_names: ClassVar[list[str]] = ["car"]
    last_timings = None
    model_sha256 = "0" * 64
    model_path = Path("none.onnx")

    def detect(self, image: np.ndarray) -> list[Any]:
        return []


def _frames(pipeline: FramePipeline, n: int, start: float) -> int:
    image = np.full((24, 32, 3), 128, np.uint8)
    return sum(pipeline.process(Frame(image, i, start + i, f"t:{i}")).decision.sampled
               for i in range(n))


def test_the_frame_loop_picks_up_rates_without_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    ch = channel(tmp_path, clock, base_rate=0.0, hourly_budget=None)
    slot = ModelSlot(LoadedModel(detector=_NoBoxes(), sha256="0" * 64, path=Path("m")))
    pipeline = FramePipeline(slot, sampler_config=SamplerConfig(base_rate=0.0, edge_cases=False,
                                                                hourly_budget=None),
                             sampling=ch.effective_sampling)
    assert _frames(pipeline, 20, T0) == 0
    # Applied by another thread (here: the test), in force from the next frame.
    ch.apply(answer(1, {"sampling": {"base_rate": 0.05, "hourly_budget": 3600.0, "boost": {
        "factor": 20, "until": UNTIL_ISO, "reason": "drift"}}}))
    assert _frames(pipeline, 20, T0 + 20) == 20  # 0.05 x 20 = every frame
    assert pipeline.sampler.config.base_rate == 1.0
    assert pipeline.sampler.bucket is not None and pipeline.sampler.bucket.capacity == 72_000
    clock.now = UNTIL + 1  # the boost ends by itself
    assert _frames(pipeline, 40, T0 + 40) < 10
    assert pipeline.sampler.config.base_rate == 0.05
    assert pipeline.sampler.bucket.capacity == 3600.0


def test_sampler_set_rates_keeps_the_buckets_fill_fraction() -> None:
    sampler = FrameSampler(SamplerConfig(base_rate=1.0, hourly_budget=10, budget_policy="stop"))
    taken = [sampler.decide([], now=100.0).sampled for _ in range(15)]
    assert taken.count(True) == 10  # the bucket is empty
    sampler.set_rates(1.0, 40, now=100.0)  # an empty bucket stays empty: no burst
    assert not sampler.decide([], now=100.0).sampled
    sampler.set_rates(1.0, 3600, now=101.0)  # refills at the new rate: one frame a second
    assert sampler.decide([], now=102.5).sampled
    half = FrameSampler(SamplerConfig(base_rate=1.0, hourly_budget=10, budget_policy="stop"))
    for _ in range(5):
        half.decide([], now=0.0)
    half.set_rates(1.0, 100, now=0.0)
    assert half.bucket.tokens == pytest.approx(50.0)  # half full stays half full
    half.set_rates(0.5, None, now=0.0)
    assert half.bucket is None and half.config.base_rate == 0.5
    with pytest.raises(ValueError, match="base_rate"):
        half.set_rates(2.0, None, now=0.0)
    assert half.config.base_rate == 0.5


# ---------------------------------------------------------------- the conditional GET
@dataclass
class _Gateway:
    """``GatewayClient`` over an ``httpx.MockTransport``: answers GET config from ``doc``."""

    doc: dict[str, Any]
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    status: int | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        match = request.headers.get("if-none-match")
        self.seen.append((request.url.path, match))
        if self.status is not None:
            return httpx.Response(self.status, json={"detail": "no"})
        etag = f'"{self.doc["version"]}-x"'
        if match == etag:
            return httpx.Response(304, headers={"ETag": etag})
        return httpx.Response(200, json=self.doc, headers={"ETag": etag})


def _client(tmp_path: Path, gw: _Gateway) -> GatewayClient:
    state = tmp_path / "client"
    DeviceIdentity("dev-1", "cam-1", "http://gw", "access", "refresh", expires_at=4e9,
                   ttl_s=3600).save(state)
    return GatewayClient("http://gw", state, transport=httpx.MockTransport(gw.handler))


def test_polls_are_conditional_and_a_rejected_document_is_not_refetched(tmp_path: Path) -> None:
    gw = _Gateway(answer(1, boosted()))
    client, ch = _client(tmp_path, gw), channel(tmp_path)
    assert ch.poll(client) and ch.applied.version == 1
    assert not ch.poll(client)  # unchanged: 304
    assert gw.seen == [("/v1/cameras/cam-1/config", None),
                       ("/v1/cameras/cam-1/config", '"1-x"')]
    gw.doc = answer(2, {"sampling": {"base_rate": 9}})
    assert ch.poll(client) and ch.applied.version == 1 and ch.error["version"] == 2
    assert not ch.poll(client)  # the rejected document is not fetched again and again
    assert gw.seen[-1] == ("/v1/cameras/cam-1/config", '"2-x"')
    gw.status = 403
    with pytest.raises(GatewayError, match="own camera"):
        ch.poll(client)
    client.close()


def test_heartbeats_report_the_configuration_in_force(tmp_path: Path) -> None:
    clock = Clock()
    ch = channel(tmp_path, clock)
    tw = TelemetryWindow("cam-1", "abc", ["car"])
    plain = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0,
                                camera_config=ch.heartbeat_fields()).to_json())
    assert plain["config_version"] == 0 and plain["config_error"] is None
    assert (plain["sampling_base_rate"], plain["sampling_hourly_budget"]) == (0.01, 360.0)
    ch.apply(answer(3, boosted()))
    ch.apply(answer(4, {"sampling": {"base_rate": -1}}))
    hb = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0,
                             camera_config=ch.heartbeat_fields()).to_json())
    assert hb["config_version"] == 3 and hb["config_error"]["version"] == 4
    assert hb["sampling_base_rate"] == pytest.approx(0.2) and hb["sampling_hourly_budget"] == 2880
    assert hb["sampling_boost_until"] == UNTIL_ISO
    clock.now = UNTIL + 5
    after = ch.heartbeat_fields()
    assert (after["sampling_base_rate"], after["sampling_boost_until"]) == (0.05, None)
