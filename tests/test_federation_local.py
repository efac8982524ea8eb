"""A site's side of federated training: weight arrays, checkpoints, local training, eval."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from roadloop.errors import InvalidInputError
from roadloop.federation.local_training import (
    FEDBN_STATE_FILE,
    SiteUpdate,
    evaluate_arrays,
    train_on_site,
)
from roadloop.federation.models import FederationConfig, SiteSpec
from roadloop.federation.weights import (
    load_arrays,
    load_detection_model,
    norm_layer_keys,
    save_checkpoint,
    state_arrays,
)
from roadloop.models.training import configure_ultralytics

from .helpers import SHARED_DIR, require_shared

TAXONOMY = ["car", "truck", "bus", "two_wheeler", "person"]
ATL_TO_TAXONOMY_ID = {0: 3, 1: 2, 2: 0, 3: 1}  # bike, bus, car, truck


@pytest.fixture(scope="module", autouse=True)
def _ultralytics(tmp_path_factory):
    configure_ultralytics(tmp_path_factory.mktemp("ultralytics"))


@pytest.fixture(scope="module")
def template() -> Path:
    p = SHARED_DIR / "models" / "atl_v2_yolo11n_320.pt"
    require_shared(p, SHARED_DIR / "datasets" / "atl_v2" / "data.yaml")
    return p


@pytest.fixture(scope="module")
def site_yaml(template, tmp_path_factory) -> Path:
    """4 train + 2 val atl_v2 frames relabelled into the taxonomy."""
    atl = SHARED_DIR / "datasets" / "atl_v2"
    root = tmp_path_factory.mktemp("site")
    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        labelled = sorted(p for p in (atl / "labels" / split).glob("*.txt") if p.stat().st_size)
        for lbl in labelled[:n]:
            img = next((atl / "images" / split).glob(lbl.stem + ".*"))
            shutil.copy(img, root / "images" / split / img.name)
            rows = [
                " ".join([str(ATL_TO_TAXONOMY_ID[int(parts[0])]), *parts[1:]])
                for parts in (line.split() for line in lbl.read_text().splitlines())
                if parts
            ]
            (root / "labels" / split / lbl.name).write_text("\n".join(rows) + "\n")
    names = dict(enumerate(TAXONOMY))
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


@pytest.fixture(scope="module")
def global_arrays(template) -> dict[str, np.ndarray]:
    return state_arrays(load_detection_model(template, TAXONOMY))


def _cfg(**kw) -> FederationConfig:
    base = {"imgsz": 64, "batch": 2, "min_train_sites": 1, "min_available_sites": 1}
    return FederationConfig(**{**base, **kw})


def _train(global_arrays, site_yaml, template, work_dir, **cfg) -> SiteUpdate:
    site = SiteSpec(name="site-a", data_yaml=site_yaml, frames=4)
    return train_on_site(
        global_arrays,
        site,
        _cfg(**cfg),
        template_checkpoint=template,
        work_dir=work_dir,
        server_round=1,
    )


@pytest.fixture(scope="module")
def plain_update(global_arrays, site_yaml, template, tmp_path_factory) -> SiteUpdate:
    return _train(global_arrays, site_yaml, template, tmp_path_factory.mktemp("plain"))


def _param_distance(update: dict[str, np.ndarray], start: dict[str, np.ndarray], keys) -> float:
    return float(np.sqrt(sum(float(np.sum((update[k] - start[k]) ** 2)) for k in keys)))


def test_state_arrays_round_trip(template):
    model = load_detection_model(template)
    arrays = state_arrays(model)
    float_keys = [k for k, t in model.state_dict().items() if t.is_floating_point()]
    assert list(arrays) == float_keys
    assert not any("num_batches_tracked" in k for k in arrays)
    assert all(a.dtype == np.float32 for a in arrays.values())
    norms = norm_layer_keys(model)
    assert norms < set(arrays)
    assert "model.0.bn.running_var" in norms and "model.0.bn.weight" in norms
    assert "model.0.conv.weight" not in norms

    shifted = {k: v + np.float32(0.25) for k, v in arrays.items()}
    load_arrays(model, shifted)
    back = state_arrays(model)
    assert all(np.array_equal(back[k], shifted[k]) for k in arrays)

    other = load_detection_model(template)
    load_arrays(other, {k: v for k, v in arrays.items() if k not in norms}, skip=norms)
    assert np.array_equal(state_arrays(other)["model.0.conv.weight"], arrays["model.0.conv.weight"])


@pytest.mark.parametrize("break_it", ["shape", "nan", "missing", "unexpected"])
def test_load_arrays_rejects_bad_arrays(template, break_it):
    model = load_detection_model(template)
    before = state_arrays(model)
    arrays = {k: v + np.float32(1.0) for k, v in before.items()}
    key = "model.0.conv.weight"
    if break_it == "shape":
        arrays[key] = arrays[key][:1]
    elif break_it == "nan":
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = np.nan
    elif break_it == "missing":
        del arrays[key]
    else:
        arrays["model.99.extra"] = np.zeros(3, np.float32)
    with pytest.raises(InvalidInputError, match="shape|NaN|missing|unexpected"):
        load_arrays(model, arrays)
    after = state_arrays(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)  # nothing half-loaded


def test_save_checkpoint_loads_predicts_and_exports(global_arrays, template, tmp_path):
    from ultralytics import YOLO

    arrays = {k: v * np.float32(0.999) for k, v in global_arrays.items()}
    dest = save_checkpoint(
        arrays, template, tmp_path / "global.pt", class_names=TAXONOMY, meta={"round": 2}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["global.pt"]  # no temp file left
    yolo = YOLO(dest)
    assert yolo.names == dict(enumerate(TAXONOMY))
    assert yolo.model.nc == len(TAXONOMY)
    loaded = state_arrays(yolo.model)
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    frame = next((SHARED_DIR / "datasets" / "atl_v2" / "images" / "val").glob("*.jpg"))
    result = yolo.predict(frame, imgsz=128, verbose=False)[0]
    assert result.boxes is not None and result.names == dict(enumerate(TAXONOMY))
    onnx = Path(yolo.export(format="onnx", imgsz=64))
    assert onnx.is_file() and onnx.stat().st_size > 1_000_000


def test_train_on_site_changes_weights(plain_update, global_arrays):
    assert set(plain_update.arrays) == set(global_arrays)
    assert plain_update.num_examples == 4
    assert plain_update.metrics["optimizer_steps"] == 2  # 4 images, batch 2, nbs = batch
    assert plain_update.metrics["train/box_loss"] > 0
    changed = [
        k for k in global_arrays if not np.array_equal(plain_update.arrays[k], global_arrays[k])
    ]
    assert "model.0.conv.weight" in changed
    assert all(np.isfinite(a).all() for a in plain_update.arrays.values())


def test_fedprox_keeps_weights_closer_to_global(
    plain_update, global_arrays, site_yaml, template, tmp_path
):
    prox = _train(global_arrays, site_yaml, template, tmp_path, proximal_mu=1e4)
    trainable = [
        k
        for k, p in load_detection_model(template, TAXONOMY).named_parameters()
        if ".dfl." not in k
    ]
    d_plain = _param_distance(plain_update.arrays, global_arrays, trainable)
    d_prox = _param_distance(prox.arrays, global_arrays, trainable)
    assert 0 < d_prox < 0.5 * d_plain, (d_prox, d_plain)


def test_fedbn_keeps_norm_arrays_on_the_site(global_arrays, site_yaml, template, tmp_path):
    norms = norm_layer_keys(load_detection_model(template, TAXONOMY))
    first = _train(global_arrays, site_yaml, template, tmp_path, norm_layers="local")
    state_file = tmp_path / FEDBN_STATE_FILE
    with np.load(state_file) as saved:
        assert set(saved.files) == norms
        assert all(np.array_equal(saved[k], first.arrays[k]) for k in norms)

    # A global model whose running variances are far off: a site that (wrongly) started from
    # them would still be near 1e3 after two BN updates (momentum 0.03).
    var_keys = [k for k in norms if k.endswith("running_var")]
    skewed = {**global_arrays, **{k: np.full_like(global_arrays[k], 1e3) for k in var_keys}}
    second = _train(skewed, site_yaml, template, tmp_path, norm_layers="local")
    assert set(second.arrays) == set(global_arrays)  # the update still carries every key
    assert max(float(second.arrays[k].max()) for k in var_keys) < 500
    assert not np.array_equal(
        second.arrays["model.0.bn.running_var"], first.arrays["model.0.bn.running_var"]
    )
    with np.load(state_file) as saved:
        assert all(np.array_equal(saved[k], second.arrays[k]) for k in norms)


def test_fedbn_state_of_another_model_is_refused(global_arrays, site_yaml, template, tmp_path):
    np.savez(tmp_path / FEDBN_STATE_FILE, **{"model.0.bn.weight": np.ones(16, np.float32)})
    with pytest.raises(InvalidInputError, match="FedBN state"):
        _train(global_arrays, site_yaml, template, tmp_path, norm_layers="local")


def test_evaluate_arrays_reports_map(global_arrays, site_yaml, template, tmp_path):
    out = evaluate_arrays(
        global_arrays,
        site_yaml,
        split="val",
        template_checkpoint=template,
        imgsz=320,
        work_dir=tmp_path,
    )
    assert out["num_examples"] == 2
    assert set(out) == {"mAP50", "mAP50-95", "precision", "recall", "num_examples"}
    assert 0 < out["mAP50"] <= 1 and 0 <= out["mAP50-95"] <= out["mAP50"]
