"""The GPU serving path, on CPU: the serving graph (letterbox + detector + NMS in one ONNX
model) against the edge agent's pipeline, provider selection, and the cross-camera batcher.

Synthetic constant-output detectors cover NMS, the letterbox mapping and padding rows
exactly; the parity tests run the shared gpu checkpoint on real frames and skip without
``../shared``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.inference import Detection, OnnxDetector
from roadloop.serving.batched import (
    CPU_EP,
    CUDA_EP,
    FrameBatcher,
    ServingConfigError,
    ServingSession,
    batch_buckets,
    select_providers,
)
from roadloop.serving.graph import build_serving_graph

from .helpers import SHARED_DIR, needs_shared
from .test_edge_inference import NAMES, _constant_output_model, _raw

ONNX_GPU_320 = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu_320.onnx"
PT_GPU = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu.pt"
HIGHWAY = SHARED_DIR / "videos" / "highway_overpass.mp4"  # 1280x720


def _video_frames(n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(HIGHWAY))
    frames = []
    for i in range(n):
        cap.set(cv2.CAP_PROP_POS_FRAMES, 20 + 60 * i)
        ok, frame = cap.read()
        assert ok
        frames.append(frame)
    cap.release()
    return frames


def _assert_match(mine: list[Detection], ref: list[Detection], conf: float, px: float) -> None:
    """Every detection clear of the threshold on one side has a twin on the other: same
    class, corners within one model pixel (``px`` frame pixels), confidence within 0.01.
    Resize rounding differs slightly between ``cv2.resize`` on uint8 and ONNX ``Resize``."""
    margin = 0.02
    for a_list, b_list in ((mine, ref), (ref, mine)):
        for a in a_list:
            if a.confidence < conf + margin:
                continue
            twins = [
                b
                for b in b_list
                if b.class_id == a.class_id
                and np.allclose(a.xyxy, b.xyxy, atol=px)
                and abs(a.confidence - b.confidence) <= 0.01
            ]
            assert len(twins) == 1, (a, b_list)


# ---------------------------------------------------------------- synthetic, exact
@pytest.fixture
def overlap_detector(tmp_path: Path) -> Path:
    rows = [
        (32, 32, 20, 20, 0, 0.9),
        (33, 32, 20, 20, 0, 0.8),  # IoU ~0.9 with the first, same class: suppressed
        (32, 33, 20, 20, 1, 0.7),  # same place, other class: kept
        (10, 10, 6, 6, 0, 0.1),  # below conf: dropped
        (50, 20, 8, 8, 1, 0.6),  # alone: kept
    ]
    out = _raw(rows, nc=2)
    out[4, 4] = 0.5  # anchor 4 also scores 0.5 as class 0: single label, counts as class 1 only
    return _constant_output_model(
        tmp_path / "overlap.onnx", out, input_shape=["batch", 3, 64, 64], names=NAMES
    )


@pytest.mark.parametrize("frame_hw", [(48, 80), (64, 64), (100, 30)])
def test_serving_graph_equals_edge_detector_on_synthetic_outputs(
    overlap_detector: Path, tmp_path: Path, frame_hw: tuple[int, int]
) -> None:
    info = build_serving_graph(overlap_detector, tmp_path / "serve.onnx", frame_hw=frame_hw)
    assert info.batch is None and info.input_hw == (64, 64) and info.class_names == ["car", "truck"]
    session = ServingSession(info.path, device="cpu", intra_op_threads=1)
    assert session.providers == [CPU_EP] and session.frame_hw == frame_hw
    frames = np.random.default_rng(0).integers(0, 255, (3, *frame_hw, 3), dtype=np.uint8)
    ref = OnnxDetector(overlap_detector, intra_op_threads=1).detect_batch(list(frames))
    got = session.detect(frames)
    assert [[d.class_id for d in f] for f in got] == [[0, 1, 1]] * 3
    for mine, theirs in zip(got, ref):
        assert [d.class_id for d in mine] == [d.class_id for d in theirs]
        assert np.allclose([d.xyxy for d in mine], [d.xyxy for d in theirs], atol=1e-3)
        assert np.allclose([d.confidence for d in mine], [d.confidence for d in theirs])
    bound = ServingSession(info.path, device="cpu", intra_op_threads=1, io_binding=True)
    assert bound.detect(frames) == got  # the IO-binding path the CUDA provider takes
    boxes, scores, classes, count = session.run(frames)
    assert boxes.shape == (3, 8, 4)  # K = min(max_det, anchors): one class per anchor
    assert count.tolist() == [3, 3, 3]
    assert (scores[:, 3:] == 0).all() and (classes[:, 3:] == -1).all() and (boxes[:, 3:] == 0).all()


def test_max_detections_keeps_the_best(overlap_detector: Path, tmp_path: Path) -> None:
    info = build_serving_graph(
        overlap_detector, tmp_path / "serve.onnx", frame_hw=(64, 64), max_detections=2
    )
    session = ServingSession(info.path, device="cpu")
    (dets,) = session.detect(np.zeros((1, 64, 64, 3), np.uint8))
    assert [round(d.confidence, 2) for d in dets] == [0.9, 0.7]


@pytest.mark.parametrize(("batch", "nms_chunk"),
                         [(1, 8), (5, 8), (8, 8), (16, 8), (24, 8), (32, 16), (32, 32)])
def test_nms_folding_keeps_images_and_classes_apart(
    overlap_detector: Path, tmp_path: Path, batch: int, nms_chunk: int
) -> None:
    """NMS runs once per chunk of ``nms_chunk`` images (else per image) on offset boxes:
    every image of a batch holds the same boxes, so one image's box leaking into another's
    group would suppress it there. Each image must come out as it does alone."""
    info = build_serving_graph(overlap_detector, tmp_path / "serve.onnx", frame_hw=(48, 80),
                               nms_chunk=nms_chunk)
    session = ServingSession(info.path, device="cpu", intra_op_threads=1)
    frames = np.random.default_rng(batch).integers(0, 255, (batch, 48, 80, 3), dtype=np.uint8)
    (alone,) = session.detect(frames[:1])
    assert [d.class_id for d in alone] == [0, 1, 1]
    assert session.detect(frames) == [alone] * batch


def test_only_the_best_candidates_enter_nms(overlap_detector: Path, tmp_path: Path) -> None:
    info = build_serving_graph(
        overlap_detector, tmp_path / "serve.onnx", frame_hw=(64, 64), max_candidates=2
    )
    session = ServingSession(info.path, device="cpu")
    (dets,) = session.detect(np.zeros((1, 64, 64, 3), np.uint8))
    # The two best anchors (0.9 and 0.8, class 0) overlap: only the 0.9 one is left.
    assert [(d.class_id, round(d.confidence, 2)) for d in dets] == [(0, 0.9)]
    with pytest.raises(ValueError, match="max_candidates"):
        build_serving_graph(
            overlap_detector, tmp_path / "x.onnx", frame_hw=(64, 64), max_candidates=0
        )
    with pytest.raises(ValueError, match="resize must be one of"):
        build_serving_graph(
            overlap_detector, tmp_path / "x.onnx", frame_hw=(64, 64), resize="nearest"  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="nms_chunk"):
        build_serving_graph(overlap_detector, tmp_path / "x.onnx", frame_hw=(64, 64), nms_chunk=0)
    assert not (tmp_path / "x.onnx").exists()


def test_static_batch_graph_pads_partial_batches(tmp_path: Path) -> None:
    model = _constant_output_model(
        tmp_path / "static2.onnx",
        _raw([(32, 32, 20, 20, 0, 0.9)], nc=2),
        input_shape=[2, 3, 64, 64],
        names=NAMES,
    )
    info = build_serving_graph(model, tmp_path / "serve.onnx", frame_hw=(64, 64))
    assert info.batch == 2
    session = ServingSession(info.path, device="cpu")
    got = session.detect(np.zeros((3, 64, 64, 3), np.uint8))
    assert [len(d) for d in got] == [1, 1, 1]
    with pytest.raises(ValueError, match="exactly 2"):
        session.run(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        session.run(np.zeros((2, 32, 64, 3), np.uint8))


# ---------------------------------------------------------------- providers
def test_provider_selection_falls_back_to_cpu_and_says_why() -> None:
    choice = select_providers("auto", "fp32", available=[CPU_EP])
    assert choice.device == "cpu" and choice.providers == [CPU_EP]
    assert CUDA_EP in choice.reason
    cuda = select_providers("auto", "fp16", available=[CUDA_EP, CPU_EP], device_id=1)
    assert cuda.device == "cuda" and cuda.precision == "fp16"
    assert cuda.providers == [(CUDA_EP, {"device_id": 1}), CPU_EP]
    assert select_providers("cpu", "fp32", available=[CUDA_EP, CPU_EP]).device == "cpu"


@pytest.mark.parametrize(
    ("device", "precision", "match"),
    [
        ("auto", "fp16", "fp16 serving needs the CUDA"),
        ("cpu", "fp16", "fp16 serving needs the CUDA"),
        ("cuda", "fp32", "onnxruntime-gpu"),
        ("auto", "int4", "precision"),
        ("tpu", "fp32", "device"),
    ],
)
def test_impossible_provider_requests_are_refused(device: str, precision: str, match: str) -> None:
    with pytest.raises(ServingConfigError, match=match):
        select_providers(device, precision, available=[CPU_EP])  # type: ignore[arg-type]


def test_fp16_graph_builds_but_is_refused_on_cpu(overlap_detector: Path, tmp_path: Path) -> None:
    import onnx

    info = build_serving_graph(
        overlap_detector, tmp_path / "serve16.onnx", frame_hw=(48, 80), precision="fp16"
    )
    model = onnx.load(str(info.path))
    assert info.precision == "fp16"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert any(
        i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer
    )  # the detector's constants went to fp16
    if CUDA_EP not in ort.get_available_providers():
        with pytest.raises(ServingConfigError, match="fp16"):
            ServingSession(info.path)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_listed_but_not_initialised_falls_back_on_auto_only(
    overlap_detector: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu lists CUDA on a machine without a usable GPU; ONNX Runtime then runs on
    CPU: ``auto`` says so and uses CPU, an explicit ``cuda`` is refused."""
    info = build_serving_graph(overlap_detector, tmp_path / "serve.onnx", frame_hw=(48, 80))
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    session = ServingSession(info.path)
    assert session.choice.device == "cpu" and "did not initialise" in session.choice.reason
    assert session.providers == [CPU_EP] and not session.io_binding
    assert [len(d) for d in session.detect(np.zeros((2, 48, 80, 3), np.uint8))] == [3, 3]
    with pytest.raises(ServingConfigError, match="did not initialise"):
        ServingSession(info.path, device="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_uint8_resize_graph_is_refused_on_cuda(
    overlap_detector: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's CUDA bilinear Resize truncates its weights on uint8 (nearly black frames
    on an H200): a ``resize="uint8_first"`` graph runs on CPU only. The session here reports CUDA as a
    GPU box's would; the float-resize graph is accepted there."""

    class ReportsCuda(ort.InferenceSession):
        def get_providers(self) -> list[str]:
            return [CUDA_EP, CPU_EP]

    uint8_first = build_serving_graph(
        overlap_detector, tmp_path / "u8.onnx", frame_hw=(48, 80), resize="uint8_first"
    )
    shipped = build_serving_graph(overlap_detector, tmp_path / "f32.onnx", frame_hw=(48, 80))
    assert ServingSession(uint8_first.path, device="cpu").choice.device == "cpu"
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    monkeypatch.setattr(ort, "InferenceSession", ReportsCuda)
    with pytest.raises(ServingConfigError, match="uint8_first"):
        ServingSession(uint8_first.path, device="cuda")
    with pytest.raises(ServingConfigError, match="uint8_first"):
        ServingSession(uint8_first.path)  # auto picks CUDA here
    assert ServingSession(shipped.path, device="cuda").choice.device == "cuda"


def test_a_plain_detector_is_not_a_serving_graph(overlap_detector: Path) -> None:
    with pytest.raises(ServingConfigError, match="not a serving graph"):
        ServingSession(overlap_detector, device="cpu")


# ---------------------------------------------------------------- batcher
def test_batcher_batches_across_cameras_and_flushes_on_deadline(
    overlap_detector: Path, tmp_path: Path
) -> None:
    info = build_serving_graph(overlap_detector, tmp_path / "serve.onnx", frame_hw=(48, 80))
    session = ServingSession(info.path, device="cpu", intra_op_threads=1)
    other = ServingSession(info.path, device="cpu", intra_op_threads=1)
    frames = np.random.default_rng(1).integers(0, 255, (5, 48, 80, 3), dtype=np.uint8)
    with FrameBatcher([session, other], max_batch=4, max_wait_s=0.01) as batcher:
        futures = [batcher.submit(f"cam{i % 2}", f) for i, f in enumerate(frames)]
        results = [f.result(timeout=30) for f in futures]
        with pytest.raises(ValueError, match="frame must be uint8"):
            batcher.submit("cam0", frames[0][:10])
    assert results == session.detect(frames)
    assert batcher.frames_run == 5 and batcher.batches_run >= 2  # 4 full + 1 on the deadline
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("cam0", frames[0])


def test_partial_batches_run_padded_to_warmed_up_sizes(
    overlap_detector: Path, tmp_path: Path
) -> None:
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    for absurd in (0, -3):
        with pytest.raises(ValueError, match="max_batch"):
            batch_buckets(absurd)
    info = build_serving_graph(overlap_detector, tmp_path / "serve.onnx", frame_hw=(48, 80))
    session = ServingSession(info.path, device="cpu", intra_op_threads=1)
    frames = np.random.default_rng(2).integers(0, 255, (3, 48, 80, 3), dtype=np.uint8)
    expected = session.detect(frames)
    shapes: list[int] = []
    run = session.run
    session.run = lambda batch: (shapes.append(len(batch)), run(batch))[1]  # type: ignore[method-assign]
    buffers: list[int] = []
    staging = session.staging_buffer
    session.staging_buffer = lambda n: (buffers.append(n), staging(n))[1]  # type: ignore[method-assign]
    # A long deadline: the three frames run when close() flushes them, one batch of 3 → 4.
    with FrameBatcher([session], max_batch=8, max_wait_s=60, warm_up=True) as batcher:
        assert shapes == [1, 2, 4, 8]  # every size once, before any camera's frame
        assert buffers == [8, 8, 8]  # the batcher's own buffers (pinned on CUDA), none extra
        futures = [batcher.submit("cam0", f) for f in frames]
    assert [f.result(timeout=30) for f in futures] == expected
    assert shapes[4:] == [4] and batcher.batch_sizes_run == {4: 1}
    with FrameBatcher([session], max_batch=8) as cold:  # CPU: no warm-up unless asked
        pass
    assert len(shapes) == 5 and cold.batches_run == 0


@pytest.mark.parametrize(
    ("frame_hw", "input_hw"),
    [((720, 1280), (320, 320)), ((48, 80), (96, 128)), ((481, 653), (320, 256))],
    ids=["down", "up", "odd"],
)
def test_resize_modes_give_the_same_pixels(
    overlap_detector: Path, frame_hw: tuple[int, int], input_hw: tuple[int, int]
) -> None:
    """The separable resize (width, then height, on NHWC) equals the float path's bilinear up
    to float rounding (one grey level where a value lands on .5); the uint8 resize differs
    by its own rounding, also at most one level."""
    import onnx

    from roadloop.serving.letterbox import RESIZE_MODES, preprocess_model

    like = onnx.load(str(overlap_detector))
    frames = np.random.default_rng(5).integers(0, 256, (2, *frame_hw, 3), dtype=np.uint8)
    pixels = {}
    for mode in RESIZE_MODES:
        model = preprocess_model(frame_hw, input_hw, "B", like, resize=mode)
        session = ort.InferenceSession(model.SerializeToString(), providers=[CPU_EP])
        (pixels[mode],) = session.run(None, {"frames": frames})
        assert pixels[mode].shape == (2, 3, *input_hw)
    levels = np.abs(pixels["separable"] - pixels["float"]) * 255
    assert levels.max() <= 1 + 1e-3 and (levels > 0.5).mean() < 0.01
    assert np.abs(pixels["uint8_first"] - pixels["float"]).max() * 255 <= 1 + 1e-3
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess_model(frame_hw, input_hw, "B", like, resize="nearest")  # type: ignore[arg-type]


# ---------------------------------------------------------------- real model, real frames
@needs_shared(ONNX_GPU_320, HIGHWAY)
@pytest.mark.parametrize("resize", ["float", "uint8_first", "separable"])
def test_serving_graph_matches_edge_pipeline_batch1(tmp_path: Path, resize: str) -> None:
    frames = _video_frames(3)
    info = build_serving_graph(ONNX_GPU_320, tmp_path / "serve.onnx", frame_hw=(720, 1280),
                               resize=resize)
    assert info.batch == 1
    session = ServingSession(info.path, device="cpu", intra_op_threads=1)
    edge = OnnxDetector(ONNX_GPU_320, intra_op_threads=1)
    total = 0
    for frame in frames:
        (mine,) = session.detect(frame[None])
        _assert_match(mine, edge.detect(frame), edge.conf_threshold, px=1280 / 320)
        total += len(mine)
    assert total > 0


@needs_shared(PT_GPU, HIGHWAY)
def test_serving_graph_matches_edge_pipeline_batches_8_and_4(tmp_path: Path) -> None:
    from roadloop.models.export import export_onnx

    detector = export_onnx(PT_GPU, tmp_path / "dyn160.onnx", imgsz=160).path
    frames = _video_frames(4) * 2  # 8: one folded NMS chunk, then 4: one NMS row per image
    info = build_serving_graph(detector, tmp_path / "serve.onnx", frame_hw=(720, 1280))
    assert info.batch is None
    # Resized as uint8 first or axis by axis, the same detections on the same batch.
    for mode in ("uint8_first", "separable"):
        other = build_serving_graph(detector, tmp_path / f"serve_{mode}.onnx",
                                    frame_hw=(720, 1280), resize=mode)
        theirs_all = OnnxDetector(detector, intra_op_threads=1).detect_batch(frames)
        mine_all = ServingSession(other.path, device="cpu", intra_op_threads=1).detect(
            np.stack(frames))
        for mine, theirs in zip(mine_all, theirs_all, strict=True):
            _assert_match(mine, theirs, other.conf_threshold, px=1280 / 160)
    session = ServingSession(info.path, device="cpu", intra_op_threads=1)
    edge = OnnxDetector(detector, intra_op_threads=1)
    got, ref = session.detect(np.stack(frames)), edge.detect_batch(frames)
    assert sum(map(len, got)) > 0
    for mine, theirs in zip(got, ref, strict=True):
        _assert_match(mine, theirs, edge.conf_threshold, px=1280 / 160)
    assert session.detect(np.stack(frames[:4])) == got[:4]


def test_gpu_serving_benchmark_runs_on_cpu_under_a_smoke_name(
    overlap_detector: Path, tmp_path: Path
) -> None:
    from benchmarks import gpu_serving

    video = tmp_path / "tiny.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 48))
    for i in range(6):
        writer.write(np.full((48, 80, 3), 40 * i, np.uint8))
    writer.release()
    args = [
        "--onnx", str(overlap_detector), "--video", str(video), "--device", "cpu",
        "--precisions", "fp32,fp16", "--batches", "1,2", "--frames", "4", "--seconds", "0.05",
        "--warmup", "0.01", "--cameras", "2", "--out", str(tmp_path / "results"),
        "--engines", "network,serving_direct,serving_batched,edge_core",
        "--resize", "separable", "--nms-chunk", "2",
    ]  # fmt: skip
    assert gpu_serving.main(args) == 0
    report = json.loads((tmp_path / "results" / "gpu_serving_smoke_cpu.json").read_text())
    assert not (tmp_path / "results" / "gpu_serving.json").exists()
    assert report["device"] == "cpu" and report["settings"]["precisions"] == ["fp32"]
    got = {(r["engine"], r["batch"]) for r in report["results"]}
    assert got == {
        (e, b)
        for e in ("network", "serving_direct", "serving_batched", "edge_core")
        for b in (1, 2)
    }
    assert all(r["frames_per_s"] > 0 for r in report["results"])
    assert [s["batch"] for s in report["summary"]] == [1, 2]
    assert all(s["best_serving_over_network"] > 0 for s in report["summary"])
    assert report["complete"]
    markdown = (tmp_path / "results" / "gpu_serving_smoke_cpu.md").read_text()
    assert "| fp32 | 2 |" in markdown
    assert (report["settings"]["resize"], report["settings"]["nms_chunk"]) == ("separable", 2)
    assert "serving graph built with resize='separable', nms_chunk=2" in markdown


@needs_shared(HIGHWAY)
def test_graph_split_diagnostic_runs_on_cpu(overlap_detector: Path, tmp_path: Path) -> None:
    """``benchmarks.gpu_graph_split`` (run on a GPU box by ``gpu_run.sh split``): every row
    measured, and the candidates' checks against what ships on record."""
    from benchmarks import gpu_graph_split

    assert gpu_graph_split.main([
        "--onnx", str(overlap_detector), "--video", str(HIGHWAY), "--device", "cpu",
        "--precisions", "fp32", "--batches", "2", "--seconds", "0.01",
        "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    doc = json.loads((tmp_path / "out" / "gpu_graph_split_cpu.json").read_text())
    steps = ["float", "nchw", "rgb", "resized", "rounded", "scaled", "pixels"]
    separable_steps = ["float", "resized_w", "rows", "resized_h", "rounded", "nhwc", "nchw",
                       "rgb", "scaled", "pixels"]
    post_steps = ["best_score2", "shifted", "selected", "dense", "topk_0"]  # 3 anchors: no TopK
    assert [r["engine"] for r in doc["rows"]] == [
        "network", "pre", "post", "serving", "pre_resize_u8", "pre_separable", "post_cand_1024",
        "post_chunk_1", "post_chunk_16", "post_chunk_32_cand_1024", "serving_cand_1024",
        "serving_separable", *(f"pre_upto_{s}" for s in steps),
        *(f"pre_separable_upto_{s}" for s in separable_steps),
        *(f"post_upto_{s}" for s in post_steps)]
    assert all(r["frames_per_s"] > 0 and r["iterations"] >= 5 for r in doc["rows"])
    checks = doc["checks"]
    for name in ("pre_resize_u8", "pre_separable"):
        assert checks[f"{name} fp32 b2"]["max_levels"] <= 1.0 + 1e-3  # rounding only
    for name in ("post_cand_1024", "post_chunk_1", "post_chunk_16", "post_chunk_32_cand_1024"):
        assert checks[f"{name} fp32 b2"] == {
            "counts_equal": True, "detections": 6, "candidate_detections": 6,
            "classes_equal": True, "max_box_diff_px": 0.0, "max_score_diff": 0.0}
    assert "| fp32 | 2 | `serving` |" in (tmp_path / "out" / "gpu_graph_split_cpu.md").read_text()


def test_graph_split_cuts_the_postprocessing_at_every_named_step(overlap_detector: Path) -> None:
    """With more anchors than enter NMS (a 640-px export has 8400) every cut point exists,
    the candidates' TopK included; each cut is a model whose output is that step's tensor."""
    import onnx

    from benchmarks.gpu_graph_split import POST_CUTS, _post_step, cut_steps, post_model
    from roadloop.serving import nms

    post = post_model((720, 1280), (640, 640), 4, 8400, onnx.load(str(overlap_detector)))
    cuts = cut_steps(post, nms.POST_PREFIX, _post_step)
    assert [step for step, _ in cuts] == list(POST_CUTS)
    for step, cut in cuts:
        onnx.checker.check_model(cut)
        assert cut.graph.output[0].name == nms.POST_PREFIX + step


def test_gpu_pick_takes_only_candidates_that_pass_and_pay_in_every_precision(
    tmp_path: Path,
) -> None:
    """``benchmarks.gpu_pick`` turns a split report into gpu_serving options: a candidate must
    pass its check and be ≥ 3 % faster than what ships in each precision; pre and post are
    picked apart; the H200 split of 2026-11-28 picks nothing."""
    from benchmarks import gpu_pick

    def rows(times: dict[str, tuple[float, float]]) -> list[dict]:
        return [{"engine": e, "precision": p, "batch": 32, "p50_ms": t[i]}
                for e, t in times.items() for i, p in enumerate(("fp16", "fp32"))]

    same = {"counts_equal": True, "classes_equal": True, "max_box_diff_px": 0.0}
    split = {
        "rows": rows({"pre": (2.0, 2.0), "pre_separable": (1.5, 1.6),
                      "post": (1.4, 1.4), "post_cand_1024": (1.0, 1.0),
                      "post_chunk_16": (1.30, 1.32), "post_chunk_32_cand_1024": (1.37, 1.1)}),
        "checks": {
            **{f"pre_separable {p} b32": {"max_levels": 1.0} for p in ("fp16", "fp32")},
            "post_cand_1024 fp16 b32": {**same, "max_box_diff_px": 477.0},  # fails in fp16
            "post_cand_1024 fp32 b32": same,
            **{f"post_chunk_16 {p} b32": same for p in ("fp16", "fp32")},
            **{f"post_chunk_32_cand_1024 {p} b32": same for p in ("fp16", "fp32")},
        },
    }
    args, why = gpu_pick.pick(split)
    assert args == ["--resize", "separable", "--nms-chunk", "16"]
    assert (why["pre"], why["post"]) == ("pre_separable", "post_chunk_16")
    assert not why["candidates"]["post_chunk_32_cand_1024"]["pays"]  # 2 % in fp16 only
    split["checks"]["pre_separable fp32 b32"] = {"max_levels": 255.0}  # wrong pixels
    assert gpu_pick.pick(split)[0] == ["--nms-chunk", "16"]
    measured = (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_h200_split"
                / "gpu_graph_split.json")
    assert gpu_pick.main([str(measured), "--why", str(tmp_path / "why.json")]) == 0
    assert json.loads((tmp_path / "why.json").read_text())["args"] == []
