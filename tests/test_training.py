"""Training: start-weight resolution, class-head surgery, a 1-epoch run with callbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.models.training import (
    _INTEGRATIONS,
    TrainConfig,
    adapt_checkpoint_to_taxonomy,
    configure_ultralytics,
    load_source_class_map,
    read_data_yaml,
    resolve_start_weights,
    train_detector,
)

from .helpers import SHARED_DIR, require_shared

TAXONOMY = ["car", "truck", "bus", "two_wheeler", "person"]
ATL_TO_TAXONOMY_ID = {0: 3, 1: 2, 2: 0, 3: 1}  # bike, bus, car, truck → taxonomy ids


@pytest.fixture(scope="module", autouse=True)
def _ultralytics(tmp_path_factory):
    configure_ultralytics(tmp_path_factory.mktemp("ultralytics"))


@pytest.fixture(scope="module")
def atl() -> Path:
    d = SHARED_DIR / "datasets" / "atl_v2"
    require_shared(d / "data.yaml")
    return d


@pytest.fixture(scope="module")
def ckpt320() -> Path:
    p = SHARED_DIR / "models" / "atl_v2_yolo11n_320.pt"
    require_shared(p)
    return p


def make_tiny_dataset(atl: Path, root: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """A few atl_v2 frames relabelled into the taxonomy, as a YOLO dataset in ``root``."""
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        labelled = sorted(p for p in (atl / "labels" / split).glob("*.txt") if p.stat().st_size)
        for lbl in labelled[:n]:
            img = next((atl / "images" / split).glob(lbl.stem + ".*"))
            shutil.copy(img, root / "images" / split / img.name)
            rows = []
            for line in lbl.read_text().splitlines():
                parts = line.split()
                if parts:
                    rows.append(" ".join([str(ATL_TO_TAXONOMY_ID[int(parts[0])]), *parts[1:]]))
            (root / "labels" / split / lbl.name).write_text("\n".join(rows) + "\n")
    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(TAXONOMY)),
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_resolve_falls_back_in_order(ckpt320, tmp_path):
    cfg = TrainConfig(
        model="no_such_weights.pt",
        fallback_weights=[str(tmp_path / "missing.pt"), str(ckpt320), "yolo11n.yaml"],
    )
    r = resolve_start_weights(cfg)
    assert r.kind == "checkpoint"
    assert Path(r.path_or_name) == ckpt320
    assert "no_such_weights.pt" in r.note and "missing.pt" in r.note


def test_resolve_to_scratch_yaml(tmp_path):
    cfg = TrainConfig(model=str(tmp_path / "nope.pt"), fallback_weights=["yolo11n.yaml"])
    r = resolve_start_weights(cfg)
    assert r.kind == "scratch" and r.path_or_name.endswith("yolo11n.yaml")


def test_resolve_nothing_usable_raises(tmp_path):
    cfg = TrainConfig(model=str(tmp_path / "a.pt"), fallback_weights=[str(tmp_path / "b.pt")])
    with pytest.raises(MissingDataError, match="b.pt"):
        resolve_start_weights(cfg)


def test_class_map_from_taxonomy():
    m = load_source_class_map(["bike", "bus", "car", "truck"], TAXONOMY)
    assert m == {"bike": "two_wheeler", "bus": "bus", "car": "car", "truck": "truck"}


def _letterboxed(atl: Path, imgsz: int):
    import torch

    from roadloop.models.quantize import preprocess

    frame = min((atl / "images" / "val").iterdir())
    return frame, torch.from_numpy(preprocess(frame, imgsz))


def test_head_surgery_preserves_car_scores(atl, ckpt320, tmp_path):
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint

    class_map = load_source_class_map(["bike", "bus", "car", "truck"], TAXONOMY)
    out = adapt_checkpoint_to_taxonomy(ckpt320, TAXONOMY, class_map, tmp_path / "adapted.pt")
    assert out.is_file() and not list(tmp_path.glob(".*tmp"))

    src, _ = load_checkpoint(ckpt320)
    new, ckpt = load_checkpoint(out)
    assert list(new.names.values()) == TAXONOMY and new.model[-1].nc == 5
    assert ckpt["roadloop_adaptation"]["rows_copied"]["two_wheeler"] == "bike"

    frame, x = _letterboxed(atl, 320)
    with torch.no_grad():
        a = src(x)[0][0].numpy()  # (4 + 4, anchors)
        b = new(x)[0][0].numpy()  # (4 + 5, anchors)
    np.testing.assert_allclose(b[:4], a[:4], atol=1e-3)  # boxes
    for s_idx, t_idx in ATL_TO_TAXONOMY_ID.items():
        np.testing.assert_allclose(b[4 + t_idx], a[4 + s_idx], atol=1e-4)
    assert b[4 + TAXONOMY.index("person")].max() < 0.05  # fresh prior-biased row

    # end to end through Ultralytics: same car boxes and confidences
    pa = YOLO(str(ckpt320)).predict(str(frame), imgsz=320, conf=0.2, verbose=False, device="cpu")[0]
    pb = YOLO(str(out)).predict(str(frame), imgsz=320, conf=0.2, verbose=False, device="cpu")[0]
    ca = pa.boxes[pa.boxes.cls == 2]
    cb = pb.boxes[pb.boxes.cls == TAXONOMY.index("car")]
    assert len(ca) > 0 and len(ca) == len(cb)
    np.testing.assert_allclose(cb.conf.numpy(), ca.conf.numpy(), atol=1e-3)
    np.testing.assert_allclose(cb.xyxy.numpy(), ca.xyxy.numpy(), atol=0.5)


def test_bad_data_yaml_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(MissingDataError, match="nope.yaml"):
        read_data_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(InvalidInputError) as e:
        read_data_yaml(bad)
    assert e.value.path == bad
    no_names = tmp_path / "nonames.yaml"
    no_names.write_text("train: images/train\nval: images/val\n")
    with pytest.raises(InvalidInputError, match="names"):
        train_detector(TrainConfig(), no_names, tmp_path / "out")


def test_train_one_epoch_from_adapted_checkpoint(atl, ckpt320, tmp_path):
    data_yaml = make_tiny_dataset(atl, tmp_path / "ds")
    calls: list[tuple[int, dict]] = []
    cfg = TrainConfig(
        model=str(ckpt320),
        fallback_weights=["yolo11n.yaml"],
        imgsz=64,
        epochs=1,
        batch=4,
        device="cpu",
        workers=0,
    )
    res = train_detector(
        cfg, data_yaml, tmp_path / "run", on_epoch_end=lambda e, m: calls.append((e, m))
    )

    assert [e for e, _ in calls] == [1]
    metrics = calls[0][1]
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    assert {"metrics/mAP50(B)", "metrics/mAP50-95(B)"} <= metrics.keys()
    assert any(k.startswith("train/") for k in metrics)
    assert res.epochs_run == 1 and res.device == "cpu"
    assert set(res.final_metrics) == {"mAP50", "mAP50-95", "precision", "recall"}
    assert res.best_weights.is_file() and res.last_weights.is_file()
    assert res.train_dir == tmp_path / "run" / "train"
    assert res.class_names == TAXONOMY
    assert res.start_weights.kind == "pretrained" and "re-mapped" in res.start_weights.note


def test_configure_ultralytics_disables_integrations():
    from ultralytics import settings

    assert not any(settings.get(k) for k in (*_INTEGRATIONS, "sync"))
