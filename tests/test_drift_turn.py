"""The demo's drift camera plays only ATL's camera-replay share, split into day and night."""

from pathlib import Path

import pytest

from launch.drift_turn import DriftTurnOutcome, prepare_streams
from roadloop.data.replay import NIGHT_MAX_BRIGHTNESS
from roadloop.data.splits import REPLAYABLE_SPLIT, is_replay_frame
from roadloop.settings import Settings
from tests.helpers import SHARED_DIR

ATL = SHARED_DIR / "datasets" / "atl_v2" / "images" / REPLAYABLE_SPLIT


@pytest.mark.skipif(not ATL.is_dir(), reason="needs ../shared/datasets/atl_v2")
def test_streams_are_the_replay_share_split_by_luma(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    settings = Settings(home=tmp_path, shared_dir=SHARED_DIR)
    day, night = prepare_streams(settings)
    links = [*day.iterdir(), *night.iterdir()]
    assert links and all(p.is_symlink() for p in links)
    for link in links:  # never a seed-training, val or test frame
        target = link.resolve()
        assert target.parent == ATL.resolve()
        assert is_replay_frame("atl_v2", REPLAYABLE_SPLIT, target.stem, settings.replay_fraction)
    for folder, dark in ((day, False), (night, True)):
        for link in folder.iterdir():
            luma = float(np.mean(cv2.imread(str(link), cv2.IMREAD_GRAYSCALE)))
            assert (luma < NIGHT_MAX_BRIGHTNESS) is dark, link
    # a second call rebuilds the folders, never duplicating or keeping stale links
    day2, _ = prepare_streams(settings)
    assert sorted(p.name for p in day2.iterdir()) == sorted(p.name for p in day.iterdir())


def test_no_streams_without_the_dataset(tmp_path: Path) -> None:
    assert prepare_streams(Settings(home=tmp_path, shared_dir=tmp_path / "none")) is None


def test_outcome_lines_name_what_fired() -> None:
    out = DriftTurnOutcome(shifted_at="06:42:10", windows=[
        {"window": "2026-11-27-06:41", "verdict": "ok", "metric": "", "score": None},
        {"window": "2026-11-27-06:43", "verdict": "significant", "metric": "embeddings",
         "score": 0.98},
    ], queued=12, reviewed=12, dataset_md5="abc")
    text = "\n".join(out.lines())
    assert "06:43: significant embeddings=0.980" in text and "06:41: ok" in text
    assert "12 frames" in text
