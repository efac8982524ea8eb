"""The edge inference core: letterbox, NMS, model loading errors, and parity with Ultralytics.

Synthetic ONNX graphs (built with ``onnx.helper``) cover decoding, NMS and batching without
shared data; the parity tests run the shared 320 checkpoint's ONNX on real frames and skip
when ``../shared`` is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import Detection, InvalidModelError, OnnxDetector, letterbox, nms

from .helpers import SHARED_DIR, needs_shared

ONNX_320 = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"
PT_320 = SHARED_DIR / "models" / "atl_v2_yolo11n_320.pt"
VIDEOS_DIR = SHARED_DIR / "videos"
ATL_IMAGES = SHARED_DIR / "datasets" / "atl_v2" / "images"
VIDEOS = sorted(VIDEOS_DIR.glob("*.mp4"))
ATL_TEST = sorted((ATL_IMAGES / "test").glob("*.jpg"))

CONF, IOU = 0.25, 0.7  # the same thresholds on both sides of every parity check


# ---------------------------------------------------------------- synthetic models
def _constant_output_model(
    path: Path,
    output: np.ndarray,
    *,
    input_shape: list,
    names: dict | None = None,
    imgsz: list | None = None,
) -> Path:
    """An ONNX graph whose output is ``output`` (C, N) broadcast over the input's batch.

    ``out = ReduceMean(images) * 0 + const``; the batch dim follows the input, so a dynamic
    input gives a dynamic-batch model.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, n = output.shape
    const = numpy_helper.from_array(output.astype(np.float32)[None], name="const")
    zero = numpy_helper.from_array(np.zeros((), np.float32), name="zero")
    axes = numpy_helper.from_array(np.array([1, 2, 3], np.int64), name="axes")
    shape = numpy_helper.from_array(np.array([-1, 1, 1], np.int64), name="shape3")
    nodes = [
        helper.make_node("ReduceMean", ["images", "axes"], ["m"], keepdims=1),
        helper.make_node("Reshape", ["m", "shape3"], ["m3"]),
        helper.make_node("Mul", ["m3", "zero"], ["z"]),
        helper.make_node("Add", ["z", "const"], ["output0"]),
    ]
    batch = input_shape[0]
    graph = helper.make_graph(
        nodes,
        "const_det",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, c, n])],
        initializer=[const, zero, axes, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {"task": "detect", "stride": "32"}
    if names is not None:
        meta["names"] = str(names)
    if imgsz is not None:
        meta["imgsz"] = str(imgsz)
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(model, str(path))
    return path


def _raw(
    rows: list[tuple[float, float, float, float, int, float]], nc: int, n: int = 8
) -> np.ndarray:
    """Build a (4 + nc, n) YOLO output from (cx, cy, w, h, class, score) rows; other anchors score 0."""
    out = np.zeros((4 + nc, n), np.float32)
    for j, (cx, cy, w, h, cls, score) in enumerate(rows):
        out[:4, j] = (cx, cy, w, h)
        out[4 + cls, j] = score
    return out


NAMES = {0: "car", 1: "truck"}


@pytest.fixture
def overlap_model(tmp_path: Path) -> Path:
    # Two heavily overlapping cars, a truck on top of them, and a lone low-score car.
    rows = [
        (32, 32, 20, 20, 0, 0.9),
        (33, 32, 20, 20, 0, 0.8),  # IoU ~0.9 with the first: suppressed
        (32, 33, 20, 20, 1, 0.7),  # same place, other class: kept
        (10, 10, 6, 6, 0, 0.1),  # below conf: dropped
    ]
    return _constant_output_model(
        tmp_path / "overlap.onnx", _raw(rows, nc=2), input_shape=["batch", 3, 64, 64], names=NAMES
    )


# ---------------------------------------------------------------- letterbox
@pytest.mark.parametrize(
    ("hw", "resized_hw", "pad"),
    [
        ((360, 640), (180, 320), (0, 70)),  # wide: bars top and bottom
        ((640, 360), (320, 180), (70, 0)),  # tall: bars left and right
        ((320, 320), (320, 320), (0, 0)),  # already square at size
        ((101, 333), (97, 320), (0, 111)),  # odd padding: split 111 / 112
    ],
)
def test_letterbox_shapes_and_padding(hw, resized_hw, pad) -> None:
    img = np.full((*hw, 3), 200, np.uint8)
    out, ratio, (pad_w, pad_h) = letterbox(img, 320)
    assert out.shape == (320, 320, 3) and out.dtype == np.uint8
    assert (pad_w, pad_h) == pad
    assert ratio == pytest.approx((resized_hw[1] / hw[1], resized_hw[0] / hw[0]))
    rh, rw = resized_hw
    assert (out[pad_h : pad_h + rh, pad_w : pad_w + rw] == 200).all()
    grey = np.ones(out.shape[:2], bool)
    grey[pad_h : pad_h + rh, pad_w : pad_w + rw] = False
    assert (out[grey] == 114).all()


def test_letterbox_scales_up_small_frames_and_takes_tuples() -> None:
    out, ratio, pad = letterbox(np.zeros((40, 80, 3), np.uint8), (160, 160))
    assert out.shape == (160, 160, 3)
    assert ratio == (2.0, 2.0) and pad == (0, 40)


# ---------------------------------------------------------------- NMS
def test_nms_is_class_wise() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    same = np.array([0, 0, 0, 0])
    assert nms(boxes, scores, 0.5, class_ids=same).tolist() == [0, 3]
    mixed = np.array([0, 0, 1, 0])  # box 2 overlaps box 0 but is another class
    assert nms(boxes, scores, 0.5, class_ids=mixed).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.5, class_ids=mixed, max_det=2).tolist() == [0, 2]
    assert nms(boxes, scores, 0.95, class_ids=same).tolist() == [0, 1, 2, 3]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_nms_matrix_and_loop_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_agent.boxes as boxes_mod

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 120))
        xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (n, 2)).astype(np.float32)], 1)
        scores = rng.random(n).astype(np.float32)
        classes = rng.integers(0, 3, n)
        thr, max_det = float(rng.uniform(0.2, 0.8)), (None if trial % 2 else 5)
        matrix = boxes_mod.nms(boxes, scores, thr, class_ids=classes, max_det=max_det)
        monkeypatch.setattr(boxes_mod, "MATRIX_NMS_MAX_BOXES", 0)
        loop = boxes_mod.nms(boxes, scores, thr, class_ids=classes, max_det=max_det)
        monkeypatch.undo()
        assert matrix.tolist() == loop.tolist()


def test_detector_suppresses_same_class_keeps_other_class(overlap_model: Path) -> None:
    det = OnnxDetector(
        overlap_model,
        conf_threshold=0.25,
        iou_threshold=0.45,
        session_config={"session.intra_op.allow_spinning": "0"},
    )
    found = det.detect(np.zeros((64, 64, 3), np.uint8))
    assert [(d.class_name, round(d.confidence, 2)) for d in found] == [("car", 0.9), ("truck", 0.7)]
    car = found[0]
    assert (car.x1, car.y1, car.x2, car.y2) == pytest.approx((22, 22, 42, 42))
    assert all(
        d.model_sha256 == hashlib.sha256(overlap_model.read_bytes()).hexdigest() for d in found
    )
    t = det.last_timings
    assert t is not None and t.batch_size == 1
    assert det.detect_batch([np.zeros((64, 64, 3), np.uint8)] * 3) == [found] * 3
    assert det.last_timings is not None and det.last_timings.batch_size == 3
    assert det.detect_batch([]) == []
    assert det.last_timings is not None and det.last_timings.batch_size == 0


def test_boxes_are_scaled_back_through_the_letterbox_and_clipped(tmp_path: Path) -> None:
    # In the 64x64 letterbox of a 32x128 (HxW) frame the image occupies rows 24..40 at scale 0.5.
    rows = [
        (32, 32, 16, 8, 0, 0.9),
        (62, 32, 8, 8, 1, 0.8),
    ]  # the second box spills past the right edge
    model = _constant_output_model(
        tmp_path / "scale.onnx", _raw(rows, nc=2), input_shape=[1, 3, 64, 64], names=NAMES
    )
    found = OnnxDetector(model).detect(np.zeros((32, 128, 3), np.uint8))
    assert found[0].xyxy == pytest.approx((48, 8, 80, 24))
    assert found[1].xyxy == pytest.approx((116, 8, 128, 24))  # x2 clipped from 132 to the width


def test_detect_batch_dynamic_and_static_match_single(overlap_model: Path, tmp_path: Path) -> None:
    frames = [
        np.zeros((64, 64, 3), np.uint8),
        np.zeros((48, 96, 3), np.uint8),
        np.zeros((90, 30, 3), np.uint8),
    ]
    dynamic = OnnxDetector(overlap_model)
    assert dynamic.dynamic_batch
    batched = dynamic.detect_batch(frames)
    assert dynamic.last_timings.batch_size == 3
    assert batched == [dynamic.detect(f) for f in frames]
    static_model = _constant_output_model(
        tmp_path / "static2.onnx",
        _raw([(32, 32, 20, 20, 0, 0.9)], nc=2),
        input_shape=[2, 3, 64, 64],
        names=NAMES,
    )
    static = OnnxDetector(static_model)
    assert static.batch_size == 2
    out = static.detect_batch(frames)  # 3 frames through a batch-2 model: 2 + 1 padded
    assert len(out) == 3 and all(len(d) == 1 for d in out)
    assert static.detect_batch([]) == []


def test_unavailable_providers_fall_back_or_fail_clearly(overlap_model: Path) -> None:
    det = OnnxDetector(overlap_model, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert det.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="none of the providers"):
        OnnxDetector(overlap_model, providers=["NoSuchExecutionProvider"])


def test_names_from_metadata_and_override(overlap_model: Path) -> None:
    assert OnnxDetector(overlap_model).class_names == ["car", "truck"]
    assert OnnxDetector(overlap_model, class_names=["a", "b"]).class_names == ["a", "b"]
    with pytest.raises(InvalidModelError, match="2 classes but 3"):
        OnnxDetector(overlap_model, class_names=["a", "b", "c"])


# ---------------------------------------------------------------- bad models
def test_text_file_is_invalid_model_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "not_a_model.onnx"
    bad.write_text("this is not a protobuf\n")
    with pytest.raises(InvalidModelError) as err:
        OnnxDetector(bad)
    assert err.value.path == bad and str(bad) in str(err.value)
    assert bad.read_text() == "this is not a protobuf\n"  # nothing lost


def test_truncated_model_is_invalid(overlap_model: Path, tmp_path: Path) -> None:
    source = ONNX_320 if ONNX_320.is_file() else overlap_model
    data = source.read_bytes()
    cut = tmp_path / "truncated.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError, match="truncated.onnx"):
        OnnxDetector(cut)


def test_missing_file_is_invalid_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="no such model file"):
        OnnxDetector(tmp_path / "absent.onnx")


def test_rectangular_input_letterboxes_to_its_own_shape(tmp_path: Path) -> None:
    """A 64x96 (HxW) model: frames letterbox to 64x96, boxes map back through it."""
    out = _raw([(8, 8, 4, 4, 0, 0.9)], nc=2)
    wide = _constant_output_model(tmp_path / "wide.onnx", out, input_shape=[1, 3, 64, 96], names=NAMES)
    det = OnnxDetector(wide)
    assert det.input_hw == (64, 96) and det.input_size == 96
    blob, metas = det.preprocess([np.zeros((128, 192, 3), np.uint8)])
    assert blob.shape == (1, 3, 64, 96) and metas[0].pad == (0, 0)
    (box,) = det.detect(np.zeros((128, 192, 3), np.uint8))  # exactly 2x the input: no padding
    assert box.xyxy == pytest.approx((12.0, 12.0, 20.0, 20.0))
    with pytest.raises(InvalidModelError, match="fixed at 64x96"):
        OnnxDetector(wide, imgsz=64)


def test_wrong_rank_input_is_rejected(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["output0"])],
        "rank3",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [3, 64, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "rank3.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InvalidModelError, match="rank 3"):
        OnnxDetector(path)


def test_dynamic_spatial_dims_need_imgsz(tmp_path: Path) -> None:
    out = _raw([(8, 8, 4, 4, 0, 0.9)], nc=2)
    no_size = _constant_output_model(
        tmp_path / "dyn.onnx", out, input_shape=["b", 3, "h", "w"], names=NAMES
    )
    with pytest.raises(InvalidModelError, match="imgsz"):
        OnnxDetector(no_size)
    assert OnnxDetector(no_size, imgsz=64).input_size == 64
    sized = _constant_output_model(
        tmp_path / "dyn2.onnx", out, input_shape=["b", 3, "h", "w"], names=NAMES, imgsz=[64, 64]
    )
    assert OnnxDetector(sized).input_size == 64


def test_bad_frames_are_rejected(overlap_model: Path) -> None:
    det = OnnxDetector(overlap_model)
    with pytest.raises(ValueError, match="uint8"):
        det.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        det.detect(np.zeros((0, 10, 3), np.uint8))
    # Grey frames are converted: the same detections as the BGR frame.
    grey = det.detect(np.zeros((20, 20), np.uint8))
    assert [d.class_name for d in grey] == ["car", "truck"]
    assert grey == det.detect(np.zeros((20, 20, 3), np.uint8))


# edge_agent.inference loads no platform package: test_edge_agent_units checks every agent module.


# ---------------------------------------------------------------- parity with Ultralytics (real data)
# What _real_frames reads, plus the model each parity test runs.
REAL_FRAMES = (VIDEOS_DIR / "*.mp4", ATL_IMAGES / "test" / "*.jpg")


@pytest.fixture(scope="module")
def ultralytics_yolo(tmp_path_factory: pytest.TempPathFactory):
    from roadloop.models.training import configure_ultralytics

    configure_ultralytics(tmp_path_factory.mktemp("yolo_cfg"))  # integrations and sync off
    from ultralytics import YOLO

    return YOLO


def _real_frames() -> list[np.ndarray]:
    frames = []
    for video in VIDEOS:
        cap = cv2.VideoCapture(str(video))
        for index in (20, 120):
            cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, frame = cap.read()
            if ok:
                frames.append(frame)
        cap.release()
    frames.append(np.ascontiguousarray(frames[0][:, 100:420]))  # a tall crop: bars left and right
    frames += [cv2.imread(str(p)) for p in ATL_TEST[:4]]
    return frames


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def _assert_same(mine: list[Detection], theirs) -> None:
    boxes = theirs.xyxy.cpu().numpy()
    conf = theirs.conf.cpu().numpy()
    cls = theirs.cls.cpu().numpy().astype(int)
    assert len(mine) == len(boxes)
    if not mine:
        return
    ours = np.array([d.xyxy for d in mine])
    iou = _box_iou(boxes, ours)
    for i in range(len(boxes)):
        j = int(iou[i].argmax())
        assert iou[i, j] >= 0.99
        assert mine[j].class_id == cls[i]
        assert abs(mine[j].confidence - conf[i]) <= 1e-3


@needs_shared(ONNX_320, *REAL_FRAMES)
def test_parity_with_ultralytics_onnx_predict(ultralytics_yolo) -> None:
    frames = _real_frames()
    det = OnnxDetector(ONNX_320, conf_threshold=CONF, iou_threshold=IOU, intra_op_threads=1)
    assert det.input_size == 320 and det.class_names == ["bike", "bus", "car", "truck"]
    yolo = ultralytics_yolo(str(ONNX_320), task="detect")
    total = 0
    for frame in frames:
        theirs = yolo.predict(frame, imgsz=320, conf=CONF, iou=IOU, verbose=False)[0].boxes
        mine = det.detect(frame)
        _assert_same(mine, theirs)
        total += len(mine)
    assert total > 0  # the checkpoint finds real cars in these frames
    # Batched through the static batch-1 model gives the same answer as one by one.
    assert det.detect_batch(frames[:3]) == [det.detect(f) for f in frames[:3]]


@needs_shared(PT_320, *REAL_FRAMES, ATL_IMAGES / "train" / "*.jpg")
def test_rectangular_export_parity_and_int8(ultralytics_yolo, tmp_path: Path) -> None:
    """A 192x320 export (16:9 cameras, no padding rows): same detections as Ultralytics'
    predict on that file, and roadloop's INT8 quantizer calibrates it at its own shape."""
    from roadloop.models.quantize import quantize_int8

    pt = tmp_path / "model.pt"
    shutil.copy(PT_320, pt)
    rect = Path(
        ultralytics_yolo(str(pt)).export(format="onnx", imgsz=(192, 320), simplify=False,
                                         verbose=False)
    )
    det = OnnxDetector(rect, conf_threshold=CONF, iou_threshold=IOU, intra_op_threads=1)
    assert det.input_hw == (192, 320) and det.input_size == 320
    yolo = ultralytics_yolo(str(rect), task="detect")
    frames = _real_frames()
    total = 0
    for frame in frames:
        theirs = yolo.predict(frame, imgsz=(192, 320), conf=CONF, iou=IOU, verbose=False)[0].boxes
        mine = det.detect(frame)
        _assert_same(mine, theirs)
        total += len(mine)
    assert total > 0

    calib = sorted((ATL_IMAGES / "train").glob("*.jpg"))[:8]
    info = quantize_int8(rect, tmp_path / "rect_int8.onnx", calib, imgsz=(192, 320))
    q = OnnxDetector(info.path, conf_threshold=CONF, iou_threshold=IOU, intra_op_threads=1)
    assert q.input_hw == (192, 320)
    assert sum(len(q.detect(f)) for f in frames) > 0  # still finds the cars


def test_letterbox_matches_ultralytics_pixels(ultralytics_yolo) -> None:
    from ultralytics.data.augment import LetterBox

    for hw in [(360, 640), (640, 360), (101, 333), (333, 101), (720, 1280), (200, 200)]:
        img = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
        theirs = LetterBox((320, 320), auto=False, stride=32)(image=img)
        mine, _, _ = letterbox(img, 320)
        assert np.array_equal(mine, theirs), hw


@needs_shared(PT_320, *REAL_FRAMES)
def test_dynamic_batch_export_and_int8_qdq_model(ultralytics_yolo, tmp_path: Path) -> None:
    """A dynamic-batch export batches for real; an INT8 QDQ copy loads and runs alike."""
    pt = tmp_path / "model.pt"
    shutil.copy(PT_320, pt)
    exported = Path(
        ultralytics_yolo(str(pt)).export(
            format="onnx", imgsz=160, dynamic=True, simplify=False, verbose=False
        )
    )
    frames = _real_frames()[:3]
    det = OnnxDetector(exported, intra_op_threads=1)
    assert det.dynamic_batch and det.input_size == 160
    batched = det.detect_batch(frames)
    single = [det.detect(f) for f in frames]
    assert all(single)  # cars in every frame, so the comparison below compares boxes
    for a, b in zip(batched, single):
        assert [d.class_id for d in a] == [d.class_id for d in b]
        assert np.allclose([d.xyxy for d in a], [d.xyxy for d in b], atol=1e-2) if a else not b

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from roadloop.models.quantize import DETECT_TAIL_PATTERN, matching_nodes

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._blobs = iter([{det.input_name: det.preprocess([f])[0]} for f in frames])

        def get_next(self):
            return next(self._blobs, None)

    int8 = tmp_path / "model_int8.onnx"
    quantize_static(
        str(exported),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # The decode tail stays float as in roadloop's quantizer: quantized, its box/score
        # concat rounds every class score to 0 and the copy detects nothing.
        nodes_to_exclude=matching_nodes(exported, [DETECT_TAIL_PATTERN]),
    )
    q = OnnxDetector(int8, intra_op_threads=1, class_names=det.class_names)
    assert q.model_sha256 != det.model_sha256 and q.input_size == 160
    out = q.detect_batch(frames)
    assert len(out) == 3 and all(out)  # still finds cars in every frame
    assert all(isinstance(d, Detection) for ds in out for d in ds)
    assert all(d.model_sha256 == q.model_sha256 for ds in out for d in ds)


def test_agent_detectors_get_the_agent_session_config(overlap_model: Path, tmp_path: Path) -> None:
    """Every detector the agent builds (baseline and rollouts, ``make_detector``) carries
    ``AgentConfig``'s threads and session config: spin-waiting off unless replaced."""
    import dataclasses

    from edge_agent.agent import AGENT_SESSION_CONFIG, AgentConfig, make_detector
    from edge_agent.cli import _config_entry

    key = "session.intra_op.allow_spinning"
    cfg = AgentConfig(gateway_url="http://127.0.0.1:9", camera_id="cam-1", source="x",
                      model_path=overlap_model, state_dir=tmp_path, intra_op_threads=2)
    det = make_detector(cfg, overlap_model)
    opts = det.session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry(key) == "0"
    assert len(det.detect(np.zeros((64, 64, 3), np.uint8))) == 2  # still detects
    spin = make_detector(dataclasses.replace(cfg, session_config={key: "1"}), overlap_model)
    assert spin.session.get_session_options().get_session_config_entry(key) == "1"
    cfg.session_config[key] = "1"  # each config owns its dict
    assert AGENT_SESSION_CONFIG[key] == "0"
    assert _config_entry(f"{key}=1") == (key, "1")
    with pytest.raises(argparse.ArgumentTypeError):
        _config_entry("no-equals-sign")


def test_box_iou_matrix_agrees_with_one_to_many_and_is_zero_for_empty_unions() -> None:
    from edge_agent.boxes import box_iou_matrix, box_iou_one_to_many

    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, (12, 2))
    a = np.concatenate([corners, corners + rng.uniform(1, 50, (12, 2))], axis=1)
    b = a[::-1].copy()
    matrix = box_iou_matrix(a, b)
    for i in range(len(a)):
        np.testing.assert_allclose(matrix[i], box_iou_one_to_many(a[i], b))
    point = np.array([[5.0, 5.0, 5.0, 5.0]])
    assert box_iou_matrix(point, point).tolist() == [[0.0]]
