"""Frame-level DP-SGD on YOLO (roadloop.federation.private_training), on 4 frames at 64 px."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import yaml

from roadloop.errors import InvalidInputError
from roadloop.federation.private_training import (
    PrivateTrainConfig,
    build_frames,
    dataset_view,
    evaluate_detector,
    load_detector,
    per_frame_loss,
    prepare_variant,
    train_private,
)

IMGSZ = 64


@pytest.fixture(scope="module")
def tiny(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-frame copy of atl_v2 (train and val), so nothing is written to the shared data."""
    src = shared_dir / "datasets" / "atl_v2"
    root = tmp_path_factory.mktemp("tiny_atl")
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for img in sorted((src / "images" / split).iterdir())[:4]:
            shutil.copy(img, root / "images" / split / img.name)
            label = src / "labels" / split / f"{img.stem}.txt"
            if label.is_file():
                shutil.copy(label, root / "labels" / split / label.name)
    names = yaml.safe_load((src / "data.yaml").read_text())["names"]
    spec = {"train": "images/train", "val": "images/val", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def view(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset_view(tiny / "data.yaml", tmp_path_factory.mktemp("view"))


@pytest.fixture(scope="module")
def base(shared_dir: Path):
    return load_detector(shared_dir / "models" / "atl_v2_yolo11n_320.pt")


@pytest.fixture(scope="module")
def frames(view: Path):
    return build_frames(view, "train", IMGSZ, max_frames=4)


def _cfg(variant: str, steps: int) -> PrivateTrainConfig:
    return PrivateTrainConfig(variant=variant, imgsz=IMGSZ, batch=2, max_steps=steps, lr=1e-3)


@pytest.mark.parametrize("variant", ["groupnorm", "frozen_bn"])
def test_private_step_runs_and_epsilon_grows_with_steps(base, frames, variant: str) -> None:
    one = train_private(prepare_variant(base, variant), frames, _cfg(variant, 1))
    two = train_private(prepare_variant(base, variant), frames, _cfg(variant, 2))
    assert one.private and one.steps == 1 and two.steps == 2
    assert one.epsilon is not None and two.epsilon is not None
    assert math.isfinite(one.epsilon) and 0 < one.epsilon < two.epsilon
    assert one.delta == 1e-5 and one.sample_rate == pytest.approx(0.5)


def test_plain_variant_is_not_private(base, frames) -> None:
    result = train_private(prepare_variant(base, "plain"), frames, _cfg("plain", 1))
    assert not result.private and result.epsilon is None and result.steps == 1


def test_frozen_batchnorm_is_untouched_while_the_rest_trains(base, frames) -> None:
    import torch

    model = prepare_variant(base, "frozen_bn")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 81
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_private(model, frames, _cfg("frozen_bn", 2))
    after = model.state_dict()
    bn_keys = [k for k in before if ".bn." in k and not k.endswith("num_batches_tracked")]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)
    conv_keys = [k for k in before if k.endswith("conv.weight") and ".dfl." not in k]
    assert any(not torch.equal(before[k], after[k]) for k in conv_keys)


def test_groupnorm_variant_has_no_batchnorm_and_validates(base, view) -> None:
    import torch

    model = prepare_variant(base, "groupnorm")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 81
    metrics = evaluate_detector(model, view, IMGSZ, batch=4)
    assert 0.0 <= metrics["mAP50"] <= 1.0


@pytest.mark.parametrize("variant", ["groupnorm", "frozen_bn"])
def test_opacus_per_frame_gradients_equal_each_frame_alone(base, frames, variant: str) -> None:
    """The batch loss must not couple frames: Opacus' per-frame grads = each frame's own."""
    import torch
    from opacus.grad_sample import GradSampleModule
    from ultralytics.data.dataset import YOLODataset

    model = prepare_variant(base, variant)
    criterion = model.init_criterion()
    batch = YOLODataset.collate_fn([frames[0], frames[1]])
    wrapped = GradSampleModule(model, loss_reduction="mean")
    loss, _ = per_frame_loss(criterion, wrapped(batch["img"].float() / 255), batch)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_frame = [torch.cat([p.grad_sample[i].flatten() for p in params]) for i in range(2)]
    wrapped.disable_hooks()
    for i in range(2):
        alone = YOLODataset.collate_fn([frames[i]])
        loss_i, _ = per_frame_loss(criterion, model(alone["img"].float() / 255), alone)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss_i, params)])
        assert (per_frame[i] - grad).norm() <= 1e-4 * grad.norm()


def test_dataset_view_keeps_the_source_unwritten(tiny: Path, frames) -> None:
    assert len(frames) == 4
    assert not list(tiny.rglob("*.cache"))


def test_unknown_variant_is_refused(base) -> None:
    with pytest.raises(InvalidInputError):
        prepare_variant(base, "layernorm")  # type: ignore[arg-type]
