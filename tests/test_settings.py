from pathlib import Path

import pytest

from roadloop.settings import Settings


def test_paths_derive_from_home(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "h")
    assert s.dagster_home == tmp_path / "h" / "dagster"
    assert s.frame_store == tmp_path / "h" / "frames"
    assert s.dvc_repo == tmp_path / "h" / "dvc"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow' / 'mlflow.db'}"
    assert s.gateway_url == "http://127.0.0.1:8700"


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "x"))
    monkeypatch.setenv("ROADLOOP_DVC_REMOTE_URL", "s3://bucket/roadloop")
    monkeypatch.setenv("ROADLOOP_MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("ROADLOOP_GATEWAY_PORT", "9999")
    s = Settings()
    assert s.home == tmp_path / "x"
    assert s.frame_store == tmp_path / "x" / "frames"
    assert s.dvc_remote_url == "s3://bucket/roadloop"
    assert s.mlflow_tracking_uri == "http://mlflow.internal:5000"
    assert s.gateway_url == "http://127.0.0.1:9999"


def test_bad_override_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROADLOOP_REPLAY_FRACTION", "1.7")
    with pytest.raises(Exception, match="replay_fraction"):
        Settings()


def test_unknown_profile_rejected() -> None:
    from resources import build_resources

    with pytest.raises(ValueError, match="ROADLOOP_PROFILE"):
        build_resources(profile="nope")


def test_dedupe_policy_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-camera dedupe thresholds come in as JSON and reach the frame-store resource."""
    from resources import build_resources

    monkeypatch.setenv("ROADLOOP_DEDUPE_PER_CAMERA_MAX_HAMMING", '{"window_street": 0}')
    monkeypatch.setenv("ROADLOOP_DEDUPE_MAX_AGE_S", "120")
    settings = Settings(home=tmp_path)
    policy = build_resources(settings, "test")["frame_store"].dedupe_policy()
    assert policy.threshold("window_street") == 0 and policy.threshold("cam_x") == 4
    assert policy.max_age_s == 120.0
    monkeypatch.setenv("ROADLOOP_DEDUPE_MAX_HAMMING", "99")
    with pytest.raises(ValueError, match="dedupe_max_hamming"):
        Settings(home=tmp_path)


def test_export_shapes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resources import build_resources

    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("ROADLOOP_EXPORT_SHAPES", "square")  # rectangles off
    assert build_resources(Settings(), profile="test")["trainer"].shapes(96) == [(96, 96)]
    monkeypatch.setenv("ROADLOOP_EXPORT_SHAPES", "square, 16:9,224x416")
    assert Settings().export_shapes == ["square", "16:9", "224x416"]
    monkeypatch.setenv("ROADLOOP_EXPORT_SHAPES", '["16:9"]')
    assert Settings().export_shapes == ["16:9"]
    monkeypatch.setenv("ROADLOOP_EXPORT_SHAPES", "square,wide")
    with pytest.raises(ValueError, match="wide"):
        build_resources(Settings(), profile="test")


@pytest.mark.parametrize(("env", "name"), [
    ({"ROADLOOP_RETENTION_RAW_FRAMES_DAYS": "inf"}, "retention_raw_frames_days"),
    ({"ROADLOOP_RETENTION_TRAFFIC_DAYS": "1e6"}, "retention_traffic_days"),
    ({"ROADLOOP_DAGSTER_PORT": "99999"}, "dagster_port"),
    ({"ROADLOOP_DEMO_EPOCHS": "-3"}, "demo_epochs"),
    ({"ROADLOOP_DRIFT_MINOR": "0.5", "ROADLOOP_DRIFT_SIGNIFICANT": "0.2"}, "ROADLOOP_DRIFT_MINOR"),
    ({"ROADLOOP_HOME": ""}, "home"),
])
def test_values_that_fail_later_are_refused_at_settings_time(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str) -> None:
    """Found by an audit: an infinite retention crashed the retention job, an empty home was
    the current folder (``roadloop clean`` deleted it), a minor drift line above the
    significant one was accepted."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=name):
        Settings()
