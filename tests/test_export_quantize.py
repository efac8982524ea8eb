"""ONNX export round trip and parity, INT8 quantization, and bad-file handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.models.export import export_onnx, load_onnx_metadata, validate_onnx_model
from roadloop.models.quantize import QuantConfig, list_images, preprocess, quantize_int8
from roadloop.models.training import configure_ultralytics

from .helpers import SHARED_DIR, require_shared, synthetic_jpeg

IMGSZ = 128


@pytest.fixture(scope="module", autouse=True)
def _ultralytics(tmp_path_factory):
    configure_ultralytics(tmp_path_factory.mktemp("ultralytics"))


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    """A random-init YOLO11n (3 classes) saved as an Ultralytics checkpoint: no ../shared needed."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    path = tmp_path_factory.mktemp("pt") / "tiny.pt"
    m = YOLO("yolo11n.yaml", task="detect")
    m.model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    m.model.names = {0: "car", 1: "truck", 2: "bus"}
    m.save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tiny_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(tiny_pt, out, imgsz=IMGSZ, dynamic_batch=True)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    """Real atl_v2 train frames when available, else synthetic images."""
    d = SHARED_DIR / "datasets" / "atl_v2" / "images" / "train"
    if d.is_dir():
        return list_images(d)[:4]
    out = tmp_path_factory.mktemp("frames")
    paths = [out / f"f{i}.jpg" for i in range(4)]
    for i, p in enumerate(paths):
        p.write_bytes(synthetic_jpeg(i, (160, 90), pattern="noise"))
    return paths


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_export_round_trip_dynamic_batch(tiny_onnx):
    info = tiny_onnx
    assert info.path.is_file() and len(info.sha256) == 64 and info.size_bytes > 0
    assert info.input_shape == ["batch", 3, IMGSZ, IMGSZ]  # dynamic batch, static spatial dims
    assert info.dynamic_batch and info.imgsz == IMGSZ
    assert info.class_names == ["car", "truck", "bus"] and info.opset > 0
    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    for b in (1, 4):
        out = _run(info.path, np.zeros((b, 3, IMGSZ, IMGSZ), np.float32))
        assert out.shape == (b, 4 + 3, anchors)
    assert load_onnx_metadata(info.path) == info
    assert [p.name for p in info.path.parent.iterdir()] == ["tiny.onnx"]  # no temp leftovers
    import onnx

    softmax = {n.name: n for n in onnx.load(str(info.path)).graph.node if n.op_type == "Softmax"}
    dfl = softmax["/model.23/dfl/Softmax"]  # graph_rewrites: the bins on the last axis
    assert dfl.attribute[0].i == -1


def test_export_matches_pytorch(tiny_pt, tiny_onnx, frames):
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(tiny_pt)
    x = np.concatenate([preprocess(f, IMGSZ) for f in frames[:2]])
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].numpy()
    got = _run(tiny_onnx.path, x)
    np.testing.assert_allclose(got[:, 4:], ref[:, 4:], atol=1e-4)  # class scores
    np.testing.assert_allclose(got[:, :4], ref[:, :4], atol=1e-2, rtol=1e-4)  # pixel boxes


def test_static_export(tiny_pt, tmp_path):
    info = export_onnx(tiny_pt, tmp_path / "static.onnx", imgsz=64, dynamic_batch=False)
    assert info.input_shape == [1, 3, 64, 64] and not info.dynamic_batch


def test_quantize_dynamic_export(tiny_onnx, frames, tmp_path):
    cfg = QuantConfig(num_calibration_frames=3)
    q = quantize_int8(tiny_onnx.path, tmp_path / "tiny_int8.onnx", frames, imgsz=IMGSZ, config=cfg)
    assert q.path.is_file() and q.fp32_sha256 == tiny_onnx.sha256
    assert q.calibration_frames == 3 and q.excluded_nodes > 0 and q.quantized_nodes > 0
    meta = load_onnx_metadata(q.path)  # Ultralytics metadata carried over
    assert meta.class_names == ["car", "truck", "bus"] and meta.input_shape[0] == "batch"
    out = _run(q.path, np.zeros((2, 3, IMGSZ, IMGSZ), np.float32))
    assert out.shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_int8.onnx"]


def test_quantized_real_model_tracks_fp32(tmp_path):
    fp32 = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"
    ds = SHARED_DIR / "datasets" / "atl_v2"
    require_shared(fp32, ds)
    train = list_images(ds / "images" / "train")
    q = quantize_int8(
        fp32, tmp_path / "int8.onnx", train, imgsz=320, config=QuantConfig(num_calibration_frames=8)
    )
    x = np.concatenate([preprocess(f, 320) for f in list_images(ds / "images" / "val")[:1]])
    a, b = _run(fp32, x)[0], _run(q.path, x)[0]
    score_a, score_b = a[4:].max(0), b[4:].max(0)  # best class score per anchor
    assert np.corrcoef(score_a, score_b)[0, 1] > 0.9
    top_a, top_b = set(np.argsort(-score_a)[:20]), set(np.argsort(-score_b)[:20])
    assert len(top_a & top_b) >= 10  # the most confident anchors mostly agree
    assert score_b.max() > 0.1  # not the collapsed all-zero output of naive quantization


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture
def not_onnx(tmp_path) -> Path:
    p = tmp_path / "model.onnx"
    p.write_text("this is a text file, not a model\n")
    return p


@pytest.fixture
def truncated_onnx(tiny_onnx, tmp_path) -> Path:
    data = tiny_onnx.path.read_bytes()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize("bad", ["not_onnx", "truncated_onnx"])
def test_bad_onnx_is_named(bad, request):
    path = request.getfixturevalue(bad)
    for fn in (validate_onnx_model, load_onnx_metadata):
        with pytest.raises(InvalidInputError) as e:
            fn(path)
        assert e.value.path == path and path.name in str(e.value)


@pytest.mark.parametrize("bad", ["not_onnx", "truncated_onnx"])
def test_quantize_bad_model_leaves_nothing(bad, request, frames, tmp_path):
    path = request.getfixturevalue(bad)
    out_dir = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=path.name):
        quantize_int8(path, out_dir / "q.onnx", frames, imgsz=IMGSZ)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_quantize_bad_calibration_image_leaves_nothing(tiny_onnx, frames, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InvalidInputError, match="broken.jpg"):
        quantize_int8(
            tiny_onnx.path,
            out_dir / "q.onnx",
            [broken, *frames],
            imgsz=IMGSZ,
            config=QuantConfig(num_calibration_frames=5),
        )
    assert list(out_dir.iterdir()) == []


def test_missing_model_is_missing_data(tmp_path):
    with pytest.raises(MissingDataError):
        validate_onnx_model(tmp_path / "absent.onnx")


def test_failed_export_leaves_nothing(tmp_path):
    fake = tmp_path / "fake.pt"
    fake.write_text("not a checkpoint")
    out_dir = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="fake.pt"):
        export_onnx(fake, out_dir / "m.onnx", imgsz=64)
    assert not any(out_dir.iterdir())


def test_rectangular_export_quantize_and_agent_on_16_9_frame(tiny_pt, frames, tmp_path):
    from edge_agent.inference import OnnxDetector

    info = export_onnx(tiny_pt, tmp_path / "wide.onnx", imgsz=(64, 96), dynamic_batch=True)
    assert info.input_shape[1:] == [3, 64, 96] and info.input_hw == (64, 96)
    assert info.imgsz == 96  # the long side, like the manifest's input_size
    q = quantize_int8(info.path, tmp_path / "wide.int8.onnx", frames, imgsz=(64, 96),
                      config=QuantConfig(num_calibration_frames=2))
    det = OnnxDetector(q.path, conf_threshold=0.0)
    assert det.input_hw == (64, 96)
    frame = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)  # 16:9
    for d in det.detect(frame):
        assert 0 <= d.x1 <= d.x2 <= 160 and 0 <= d.y1 <= d.y2 <= 90
