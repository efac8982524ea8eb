"""``benchmarks.drift_streams``: the drift benchmark's streams and their truth, on a tiny fake
shared tree (three 32x18 videos, a handful of stills) — no agent, no gateway."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks import drift_streams as ds

SIZE = (32, 18)
FPS, WINDOW_S = 2.0, 2.0  # 4 frames a window
SMALL = {"windows_pre": 2, "windows_post": 3, "stable_windows": 3, "fps": FPS, "window_s": WINDOW_S}


def _video(path: Path, seed: int, n: int = 7, fps: float = 4.0) -> None:
    rng = np.random.default_rng(seed)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (64, 36))
    if not w.isOpened():  # pragma: no cover - OpenCV without FFV1
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 36))
    base = rng.integers(60, 200, (36, 64, 3), dtype=np.uint8)
    for i in range(n):  # a textured scene with a moving bright block
        f = base.copy()
        f[10:20, 5 * i : 5 * i + 10] = 250
        w.write(f)
    w.release()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    (root / "videos").mkdir()
    for i, name in enumerate(["cctv_street", "highway_overpass", "window_street"]):
        _video(root / "videos" / f"{name}.mp4", i)
    rng = np.random.default_rng(7)
    atl = root / "datasets" / "atl_v2" / "images" / "train"
    manaus = root / "datasets" / "manaus_v4" / "images" / "val"
    atl.mkdir(parents=True)
    manaus.mkdir(parents=True)
    # 3 day (grey ~ 170), 2 night (~ 20), 1 in between (~ 85): unused.
    for name, level in [("d1", 170), ("d2", 160), ("d3", 180), ("n1", 20), ("n2", 25), ("m1", 85)]:
        img = np.clip(level + rng.normal(0, 8, (40, 80, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(atl / f"{name}.png"), img)
    for k in range(3):
        img = np.clip(120 + rng.normal(0, 40, (50, 50, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(manaus / f"x{k}.png"), img)
    return root


def _frames(spec: ds.StreamSpec, shared: Path) -> list[np.ndarray]:
    return list(ds.iter_stream(spec, shared, size=SIZE, fps=FPS))


def test_streams_truth_and_pixels(shared: Path) -> None:
    _groups, info = ds.still_groups(shared / "datasets")
    assert (info["atl_day"], info["atl_night"], info["atl_unused"], info["manaus"]) == (3, 2, 1, 3)

    specs = {s.name: s for s in ds.default_streams(**SMALL)}
    kinds = {s.kind for s in specs.values()}
    assert kinds == {"stable", "abrupt", "gradual"}
    assert sum(s.kind == "stable" for s in specs.values()) == 3
    stable = {s.before: _frames(s, shared) for s in specs.values() if s.kind == "stable"}
    for base, frames in stable.items():
        assert len(frames) == 12 and frames[0].shape == (18, 32, 3)
        assert not np.array_equal(frames[0], frames[1])  # time moves on (resampled, looped)

    for spec in specs.values():
        truth = ds.truth_of(spec, shared, fps=FPS, window_s=WINDOW_S, size=SIZE)
        frames = _frames(spec, shared)
        assert len(frames) == spec.n_frames == truth["n_windows"] * 4
        if spec.kind == "stable":
            assert truth["onset_s"] is None and truth["onset_window"] is None
            continue
        onset = spec.onset_frame
        assert truth["onset_window"] == math.floor(onset / 4) == 2  # window 0 holds the onset
        assert spec.severity(onset - 1) == 0.0 and spec.severity(onset) > 0.0
        if spec.transform is not None:  # pixels are the base video's until the onset, then not
            base = stable[spec.before]
            assert all(np.array_equal(frames[i], base[i]) for i in range(onset))
            assert not np.array_equal(frames[onset], base[onset])
        if spec.kind == "gradual":
            sev = [spec.severity(i) for i in range(spec.n_frames)]
            assert sev == sorted(sev) and sev[onset + spec.ramp_frames - 1] == 1.0
            assert 0 < sev[onset] < 0.2

    # Mid-window onsets land inside window ``windows_pre``, not on its start.
    assert specs["noise_cctv_street"].onset_frame == 10 == specs["knocked_cctv_street"].onset_frame

    # Fog lightens and flattens; blur kills edges.
    fog = _frames(specs["fog_highway_overpass"], shared)
    base = stable["video:highway_overpass.mp4"]
    assert fog[9].mean() > base[9].mean() + 20 and fog[9].std() < base[9].std()
    blurred = _frames(specs["blur_window_street"], shared)
    lap = lambda im: cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()
    assert lap(blurred[9]) < 0.5 * lap(stable["video:window_street.mp4"][9])

    # day -> night: day stills (bright) before the onset, night stills (dark) after.
    d2n = _frames(specs["day_to_night"], shared)
    assert min(f.mean() for f in d2n[:8]) > 140 and max(f.mean() for f in d2n[8:]) < 40
    a2m = _frames(specs["atl_to_manaus"], shared)
    assert min(f.mean() for f in a2m[:8]) > 140 and all(80 < f.mean() < 140 for f in a2m[8:])


def test_render_is_deterministic_and_reused(shared: Path, tmp_path: Path) -> None:
    spec = ds.stream_by_name("noise_cctv_street", **SMALL)
    kw = {"fps": FPS, "window_s": WINDOW_S, "size": SIZE}
    a = ds.render_stream(spec, shared, tmp_path / "a", **kw)
    b = ds.render_stream(spec, shared, tmp_path / "b", **kw)
    assert a["frames_sha256"] == b["frames_sha256"]
    video = tmp_path / "a" / spec.name / a["video"]
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == spec.n_frames and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    stamp = video.stat().st_mtime_ns
    assert ds.render_stream(spec, shared, tmp_path / "a", **kw)["frames_sha256"] == a["frames_sha256"]
    assert video.stat().st_mtime_ns == stamp  # same definition: the file is reused
    spec.seed += 1  # other noise
    c = ds.render_stream(spec, shared, tmp_path / "a", **kw)
    assert c["frames_sha256"] != a["frames_sha256"]
    assert json.loads((tmp_path / "a" / spec.name / "truth.json").read_text())["seed"] == spec.seed


def test_score_stream_delay_and_false_alarms() -> None:
    from benchmarks.drift_detection import score_stream

    # Evaluated windows 4..11, onset in window 8: 4-7 are stable, 8 is delay 0.
    v = {4: "ok", 5: "minor", 6: "ok", 7: "not_enough_data", 8: "ok", 9: "minor",
         10: "significant", 11: "ok"}
    s = score_stream(v, onset_window=8)
    assert (s["stable_windows"], s["shifted_windows"], s["no_verdict_windows"]) == (4, 4, 1)
    assert (s["false_alarms_any"], s["false_alarms_significant"], s["minor_false_alarms"]) == (1, 0, 1)
    assert (s["delay_any"], s["delay_significant"]) == (1, 2)
    assert not s["missed_any"]
    stable = score_stream({4: "ok", 5: "significant", 6: "ok"}, onset_window=None)
    assert stable["stable_windows"] == 3 and stable["false_alarms_significant"] == 1
    assert stable["delay_any"] is None and not stable["missed_any"]
    missed = score_stream({4: "ok", 8: "minor"}, onset_window=8)
    assert missed["delay_any"] == 0 and missed["missed_significant"]
