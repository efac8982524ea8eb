"""The gpu checkpoint is the default start of training, the demo's agents and the edge agent;
the older shared checkpoints stay as fallbacks and explicit paths still work."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.agent import DEFAULT_MODEL_NAME, find_default_model

from .helpers import SHARED_DIR, require_shared

GPU_PT = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu.pt"
GPU_320 = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu_320.onnx"
OLD_320 = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"


def test_training_falls_back_to_the_gpu_checkpoint_first(roadloop_home: Path) -> None:
    from roadloop.models.training import TrainConfig, resolve_start_weights

    names = [Path(w).name for w in TrainConfig().fallback_weights]
    assert names == [
        "atl_v2_yolo11n_gpu.pt", "atl_v2_yolo11n_480.pt", "atl_v2_yolo11n_320.pt", "yolo11n.yaml",
    ]
    require_shared(GPU_PT)
    r = resolve_start_weights(TrainConfig(model=str(roadloop_home / "absent.pt")))
    assert r.kind == "checkpoint" and Path(r.path_or_name) == GPU_PT.absolute()


def _models_dir(root: Path, *names: str) -> Path:
    d = root / "models"
    d.mkdir(parents=True)
    for n in names:
        (d / n).write_bytes(b"onnx")  # only existence is looked at
    return root


def test_edge_agent_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_MODEL_NAME == "atl_v2_yolo11n_gpu_320.onnx"
    if GPU_320.is_file():
        monkeypatch.delenv("ROADLOOP_SHARED_DIR", raising=False)
        monkeypatch.chdir(tmp_path)  # only the repository-relative ../shared is searched
        assert find_default_model() == GPU_320.resolve()
    # A shared folder with only the older export: it is used.
    old = _models_dir(tmp_path / "old", "atl_v2_yolo11n_320.onnx")
    monkeypatch.setenv("ROADLOOP_SHARED_DIR", str(old))
    assert find_default_model() == (old / "models" / "atl_v2_yolo11n_320.onnx").resolve()
    # Both: the gpu export wins; an explicit name is searched alone.
    both = _models_dir(tmp_path / "both", "atl_v2_yolo11n_320.onnx", DEFAULT_MODEL_NAME)
    monkeypatch.setenv("ROADLOOP_SHARED_DIR", str(both))
    assert find_default_model() == (both / "models" / DEFAULT_MODEL_NAME).resolve()
    assert find_default_model("atl_v2_yolo11n_320.onnx").parent == (both / "models").resolve()


def test_edge_cli_names_both_defaults_when_none_is_found(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edge_agent.agent
    from edge_agent.cli import main

    monkeypatch.setattr(edge_agent.agent, "find_default_model", lambda name=None: None)
    rc = main(["run", "--gateway", "http://127.0.0.1:9", "--camera-id", "c", "--source", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "atl_v2_yolo11n_gpu_320.onnx" in err and "atl_v2_yolo11n_320.onnx" in err


def test_demo_agents_use_the_gpu_export_else_the_old_one(
    roadloop_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launch.demo import _videos_and_model
    from roadloop.settings import get_settings

    shared = _models_dir(tmp_path / "shared", OLD_320.name)
    monkeypatch.setenv("ROADLOOP_SHARED_DIR", str(shared))
    get_settings.cache_clear()
    assert _videos_and_model()[1] == shared / "models" / OLD_320.name
    (shared / "models" / DEFAULT_MODEL_NAME).write_bytes(b"onnx")
    assert _videos_and_model()[1] == shared / "models" / DEFAULT_MODEL_NAME
    get_settings.cache_clear()
