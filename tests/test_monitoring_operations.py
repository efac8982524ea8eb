"""``roadloop.monitoring.operations``: a window's silent / fps / P95 latency / error-rate checks
on the design notes' lines, and bad heartbeat values that must not crash or decide them."""

from __future__ import annotations

from typing import Any

import pytest

from roadloop.monitoring.operations import (
    OperationalCheck,
    OperationsConfig,
    operational_checks,
)

CHECKS = ["silent", "fps_drop", "p95_latency", "error_rate"]


def hb(**kw: Any) -> dict[str, Any]:
    """A healthy heartbeat of a 30 s window at 30 fps."""
    return {"camera_id": "cam1", "frames_processed": 900, "fps": 30.0, "latency_p50_ms": 30.0,
            "latency_p95_ms": 60.0, "errors": 0, **kw}


def checks(heartbeats: list[Any], **kw: Any) -> dict[str, OperationalCheck]:
    out = operational_checks(heartbeats, **kw)
    return {c.name: c for c in out}


def test_a_healthy_window_is_ok_everywhere() -> None:
    got = checks([hb(), hb(), hb()], reference_fps=30.0)
    assert list(got) == CHECKS
    assert {n: c.severity for n, c in got.items()} == dict.fromkeys(CHECKS, "ok")
    assert got["silent"].value == 3
    assert got["fps_drop"].value == 30.0 and got["fps_drop"].warn == 15.0
    assert got["p95_latency"].value == 60.0
    assert got["error_rate"].value == 0.0


@pytest.mark.parametrize("window", [[], ()])
def test_a_silent_window_is_critical(window: Any) -> None:
    out = operational_checks(window, reference_fps=30.0)
    assert len(out) == 1
    assert (out[0].name, out[0].severity, out[0].value) == ("silent", "critical", 0)


@pytest.mark.parametrize(("p95", "severity"), [
    (60.0, "ok"), (119.0, "ok"), (120.0, "ok"), (121.0, "warn"), (200.0, "warn"),
    (201.0, "critical"), (5000.0, "critical"),
])
def test_p95_latency_lines(p95: float, severity: str) -> None:
    c = checks([hb(latency_p95_ms=p95)])["p95_latency"]
    assert (c.severity, c.value, c.warn, c.critical) == (severity, p95, 120.0, 200.0)


def test_the_worst_heartbeat_decides_the_latency() -> None:
    c = checks([hb(latency_p95_ms=50.0)] * 9 + [hb(latency_p95_ms=201.0)])["p95_latency"]
    assert (c.severity, c.value) == ("critical", 201.0)


@pytest.mark.parametrize(("errors", "severity"), [
    (0, "ok"), (10, "ok"), (20, "ok"), (30, "warn"), (50, "warn"), (60, "critical"),
    (1000, "critical"),
])
def test_error_rate_lines(errors: int, severity: str) -> None:
    # two heartbeats of 500 frames: the rate is errors over all frames of the window
    c = checks([hb(frames_processed=500, errors=errors // 2),
                hb(frames_processed=500, errors=errors - errors // 2)])["error_rate"]
    assert c.severity == severity
    assert c.value == pytest.approx(errors / 1000)
    assert (c.warn, c.critical) == (0.02, 0.05)


@pytest.mark.parametrize(("fps", "severity"), [
    ([30.0, 29.0, 31.0], "ok"), ([16.0, 15.5, 16.0], "ok"), ([14.0, 14.9, 14.0], "warn"),
    ([2.0, 30.0, 3.0], "warn"),  # the median, not one good heartbeat
    ([30.0, 1.0, 30.0], "ok"),  # nor one bad one
])
def test_fps_drop_under_half_the_reference_warns(fps: list[float], severity: str) -> None:
    c = checks([hb(fps=f) for f in fps], reference_fps=30.0)["fps_drop"]
    assert (c.severity, c.warn) == (severity, 15.0)
    assert c.value == sorted(fps)[1]
    assert c.critical is None  # an fps drop only warns


@pytest.mark.parametrize("ref", [None, 0, -30.0, float("nan"), float("inf"), True, "30"])
def test_without_a_usable_reference_fps_the_fps_check_has_no_data(ref: Any) -> None:
    got = checks([hb(fps=1.0), hb(fps=1.0)], reference_fps=ref)
    assert got["fps_drop"].severity == "not_enough_data"
    assert got["fps_drop"].value is None
    assert got["p95_latency"].severity == "ok"


BAD_VALUES: list[Any] = [None, float("nan"), float("inf"), -float("inf"), -1, True, "30",
                         [30], {"v": 30}, 1e12]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_absurd_values_are_not_enough_data(bad: Any) -> None:
    window = [hb(fps=bad, latency_p95_ms=bad, frames_processed=bad, errors=bad)] * 3
    got = checks(window, reference_fps=30.0)
    assert got["silent"].severity == "ok"
    for name in ("fps_drop", "p95_latency", "error_rate"):
        assert got[name].severity == "not_enough_data", name
        assert got[name].value is None and got[name].detail


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_absurd_values_among_good_ones_are_ignored(bad: Any) -> None:
    window = [hb(fps=bad, latency_p95_ms=bad, frames_processed=bad, errors=bad),
              hb(fps=10.0, latency_p95_ms=150.0, frames_processed=1000, errors=40),
              "not a heartbeat", None, 7]
    got = checks(window, reference_fps=30.0)
    assert got["silent"].value == 5
    assert (got["fps_drop"].severity, got["fps_drop"].value) == ("warn", 10.0)
    assert (got["p95_latency"].severity, got["p95_latency"].value) == ("warn", 150.0)
    assert (got["error_rate"].severity, got["error_rate"].value) == ("warn", 0.04)


@pytest.mark.parametrize("beat", [
    {}, {"fps": 30.0}, {"frames_processed": 0, "errors": 0},
    {"frames_processed": 100, "errors": 101},  # more failed frames than processed
    {"frames_processed": 100, "errors": -1}, {"frames_processed": 2e9, "errors": 0},
    {"latency_p95_ms": -5.0}, {"latency_p95_ms": 4e6},
], ids=repr)
def test_missing_or_impossible_counts_are_not_enough_data(beat: dict[str, Any]) -> None:
    got = checks([beat], reference_fps=None)
    assert got["silent"].severity == "ok"
    assert got["error_rate"].severity == "not_enough_data"
    assert got["p95_latency"].severity == "not_enough_data"
    assert got["fps_drop"].severity == "not_enough_data"


def test_a_window_of_garbage_is_not_silent_but_says_nothing_else() -> None:
    got = checks(["x", None, 3, [1], {"fps": "fast"}], reference_fps=30.0)
    assert (got["silent"].severity, got["silent"].value) == ("ok", 5)
    assert {got[n].severity for n in CHECKS[1:]} == {"not_enough_data"}


def test_the_lines_are_configurable() -> None:
    cfg = OperationsConfig(p95_latency_warn_ms=50, p95_latency_critical_ms=100,
                           error_rate_warn=0.001, error_rate_critical=0.5, fps_drop_ratio=0.9)
    got = checks([hb(latency_p95_ms=60.0, errors=9, fps=26.0)], reference_fps=30.0, config=cfg)
    assert got["p95_latency"].severity == "warn"
    assert got["error_rate"].severity == "warn"
    assert got["fps_drop"].severity == "warn" and got["fps_drop"].warn == 27.0
