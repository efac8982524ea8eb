"""The demo's verdict on a rollout (launch.demo.rollout_gate_held): a health rollback that the
fleet recovered from is the gate working; anything else that is not complete is a failure."""

from __future__ import annotations

from launch.demo import LoopOutcome, rollout_gate_held

BASE = "6a6d7b736487d71f"
REASONS = ["device dev-1: shadow agreement F1 0.202 < floor 0.5"]


def test_health_rollback_with_every_agent_back_on_the_baseline_is_the_gate_holding() -> None:
    agents = {"cctv_street": BASE, "window_street": BASE}
    assert rollout_gate_held("rolled_back", REASONS, agents, BASE) is True


def test_rollback_without_a_reason_or_with_an_agent_elsewhere_is_a_failure() -> None:
    assert rollout_gate_held("rolled_back", [], {"a": BASE}, BASE) is False
    assert rollout_gate_held("rolled_back", REASONS, {"a": BASE, "b": "1"}, BASE) is False
    assert rollout_gate_held("rolled_back", REASONS, {}, BASE) is False


def test_other_statuses_are_not_a_held_gate() -> None:
    for status in ("active", "paused", None, "complete"):
        assert rollout_gate_held(status, REASONS, {"a": BASE}, BASE) is False


def test_summary_says_the_gate_held() -> None:
    outcome = LoopOutcome(success=True)
    outcome.rollout = {"rollout_id": "ro-1", "status": "rolled_back", "stage": "shadow",
                       "percent": 5.0, "reasons": REASONS, "gate_held": True}
    assert "rolled back by its health gate" in outcome.summary()


def test_summary_says_a_relaxed_quality_floor_plainly() -> None:
    outcome = LoopOutcome(success=True)
    assert "relaxed demo quality floor" not in outcome.summary()
    outcome.quality_floor = "RELAXED DEMO FLOOR (mAP50 >= 0.02, class AP50 >= 0), ..."
    assert "NOTE: promoted under the relaxed demo quality floor" in outcome.summary()
    assert "RELAXED DEMO FLOOR (mAP50 >= 0.02" in outcome.summary()


def test_summary_shows_the_federated_turn() -> None:
    from launch.federated_turn import FederatedTurnOutcome

    outcome = LoopOutcome(success=True)
    outcome.federated = FederatedTurnOutcome(
        success=True, candidate="3", promoted=False, sites="atl_day, atl_night",
        checks={"candidate_not_worse_than_production": False},
        rounds="| round | sites aggregated |\n| 1 | atl_day, atl_night |",
    )
    text = outcome.summary()
    assert "federated turn: sites atl_day, atl_night; candidate=v3 not promoted" in text
    assert "candidate_not_worse_than_production=FAIL" in text
    assert "| 1 | atl_day, atl_night |" in text
    failed = FederatedTurnOutcome(success=False, error="trained_model did not materialize")
    assert "FAILED (trained_model did not materialize)" in "\n".join(failed.lines())


def test_every_demo_video_has_a_valid_traffic_geometry() -> None:
    import numpy as np

    from edge_agent.traffic import parse_traffic_section
    from launch.demo_geometry import DEMO_TRAFFIC

    assert set(DEMO_TRAFFIC) == {"highway_overpass.mp4", "cctv_street.mp4", "window_street.mp4"}
    configs = {name: parse_traffic_section(section) for name, section in DEMO_TRAFFIC.items()}
    assert all(cfg.lines and cfg.zones for cfg in configs.values())
    # The highway's homography: one 12 m dash period along a dashed line, 3.7 m across a lane.
    h = configs["highway_overpass.mp4"].homography
    (a, b, c) = h.to_world(np.asarray([[482, 470], [500, 408], [633, 470]]))
    assert abs(np.hypot(*(b - a)) - 12.0) < 1.0 and abs(np.hypot(*(c - a)) - 3.7) < 0.4


def test_demo_cameras_get_their_videos_traffic_section_and_keep_other_settings() -> None:
    from launch.demo_geometry import traffic_section
    from launch.demo_traffic import configure_cameras

    class Fleet:
        def __init__(self) -> None:
            self.docs = {"highway_overpass": {"version": 2, "config": {"sampling": {"x": 1}}}}
            self.puts: list[tuple] = []

        def camera_config(self, camera_id: str) -> dict:
            return self.docs.get(camera_id, {"version": 0, "config": {}})

        def put_camera_config(self, camera_id, config, expected_version, reason) -> dict:
            self.puts.append((camera_id, config, expected_version))
            return {}

    fleet = Fleet()
    done = configure_cameras(fleet, [("highway_overpass", "highway_overpass.mp4"),
                                     ("cctv_street", "cctv_street.mp4"), ("x", "other.mp4")])
    assert done == ["highway_overpass", "cctv_street"]
    (cam1, cfg1, v1), (cam2, cfg2, v2) = fleet.puts
    assert (cam1, v1, cfg1["sampling"]) == ("highway_overpass", 2, {"x": 1})
    assert cfg1["traffic"] == traffic_section("highway_overpass.mp4")
    assert (cam2, v2, cfg2) == ("cctv_street", 0, {"traffic": traffic_section("cctv_street.mp4")})


def test_summary_shows_the_traffic_report_and_the_preview() -> None:
    from launch.demo_traffic import TrafficOutcome

    outcome = LoopOutcome(success=True)
    outcome.traffic = TrafficOutcome(
        configured=["cctv_street"], days=["2026-11-27"], report="/h/report.md", records=6,
        total_vehicles=41, line_totals={"cctv_street/boulevard/away": 41},
        preview_url="http://gw/v1/cameras/cctv_street/preview.jpg", token_file="/h/admin-token")
    text = outcome.summary()
    assert "traffic_counts 2026-11-27: 6 interval records, 41 vehicles; report /h/report.md" in text
    assert "cctv_street/boulevard/away=41" in text
    assert "http://gw/v1/cameras/cctv_street/preview.jpg" in text and "/h/admin-token" in text
