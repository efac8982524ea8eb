"""Static INT8 quantization of ONNX detectors with ONNX Runtime.

Why not quantize everything: the YOLO graph ends by concatenating box coordinates (0…imgsz
pixels) with class probabilities (0…1) into one tensor. One 8-bit scale cannot carry both,
so every score rounds to zero (mAP50 0.145 → 0.000 in INSTALL-NOTES). Which nodes stay in
float is chosen by measurement: ``benchmarks/quantization_sweep.py`` →
``benchmarks/results/quantization_sweep.md``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from pydantic import BaseModel, Field

from edge_agent.inference import letterbox as edge_letterbox
from roadloop.errors import EmptyDatasetError, InvalidInputError
from roadloop.fsutil import sha256_file
from roadloop.models.export import validate_onnx_model
from roadloop.models.graph_rewrites import dfl_softmax_last_axis

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def letterbox(image_bgr: np.ndarray, imgsz: int | tuple[int, int], pad_value: int = 114) -> np.ndarray:
    """The edge inference core's letterbox, so calibration sees exactly what inference sees."""
    padded, _, _ = edge_letterbox(image_bgr, imgsz, color=(pad_value, pad_value, pad_value))
    return padded


def preprocess(path: Path, imgsz: int | tuple[int, int]) -> np.ndarray:
    """Image file → 1×3×H×W float32 RGB in [0, 1] (``imgsz``: side or (H, W)); unreadable
    files raise naming them."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InvalidInputError(path, "cannot decode image")
    rgb = cv2.cvtColor(letterbox(img, imgsz), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


class CalibrationReader(CalibrationDataReader):
    """Feeds calibration frames to ONNX Runtime one at a time (batch 1)."""

    def __init__(
        self, image_paths: Sequence[Path], imgsz: int | tuple[int, int], input_name: str = "images"
    ) -> None:
        self.image_paths = [Path(p) for p in image_paths]
        self.imgsz = imgsz
        self.input_name = input_name
        self._it = iter(self.image_paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self._it, None)
        if path is None:
            return None
        return {self.input_name: preprocess(path, self.imgsz)}

    def rewind(self) -> None:
        self._it = iter(self.image_paths)

    def __len__(self) -> int:
        return len(self.image_paths)


# Nodes of the Ultralytics Detect head (model.23 in YOLO11n) after the box/class convs: DFL
# box decode, anchor arithmetic, class sigmoid and the final concat of boxes with scores.
DETECT_TAIL_PATTERN = r"^/model\.23/(?!cv[234]\.)"


class QuantConfig(BaseModel):
    """Static INT8 settings; the defaults are the measured pick.

    Chosen by ``benchmarks/quantization_sweep.py`` (results/quantization_sweep.md) on
    ``atl_v2_yolo11n_320.onnx``, atl_v2 val, 2 shared CPU cores, ORT 1.32: the fastest
    config within 0.015 mAP50-95 of fp32 is QDQ, per-channel int8 weights, uint8
    activations, MinMax over 100 train frames, with only the Detect decode tail
    (``DETECT_TAIL_PATTERN``: DFL, anchors, sigmoid, box/score concat; 24 nodes) in float:
    mAP50 0.136 / mAP50-95 0.062 vs fp32 0.145 / 0.064 (−0.002 abs, −3% rel.), 2.24× fp32
    session speed (30.6 vs 73.9 ms median). Whole graph: mAP 0.000. All tail-only variants
    (32 frames, per-tensor, Percentile, Entropy) were within noise of it (1.8–2.2×, mAP50-95
    0.062–0.075); the whole head in float costs speed (1.5×); int8 activations are slower
    than fp32 on this CPU (0.57×). Re-measured on the gpu checkpoint
    (``benchmarks/results/int8_drop.md``, atl_v2 val / test): 320 px mAP50-95 0.0825 → 0.0814
    / 0.0501 → 0.0497; 480 px 0.1240 → 0.1189 / 0.0665 → 0.0621 (−1.3 / −0.9 / −4.1 / −6.7 %).
    """

    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    per_channel: bool = True
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax"
    num_calibration_frames: int = Field(default=100, ge=1)
    exclude_node_patterns: list[str] = Field(default_factory=lambda: [DETECT_TAIL_PATTERN])
    op_types_to_quantize: list[str] | None = None
    reduce_range: bool = False
    extra_options: dict = Field(default_factory=dict)


class QuantizedModelInfo(BaseModel):
    path: Path
    sha256: str
    size_bytes: int
    fp32_path: Path
    fp32_sha256: str  # lineage: which float model this came from
    excluded_nodes: int
    quantized_nodes: int  # QuantizeLinear/DequantizeLinear (or QLinear*) nodes added
    calibration_frames: int
    config: QuantConfig


def matching_nodes(onnx_path: Path, patterns: Sequence[str]) -> list[str]:
    """Node names of the graph matched by any regex in ``patterns`` (``re.search``)."""
    import onnx

    regexes = [re.compile(p) for p in patterns]
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if any(r.search(n.name) for r in regexes)]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def pick_calibration_frames(images: Sequence[Path], n: int) -> list[Path]:
    """``n`` frames spread evenly over the sorted list (mixes cameras / day and night)."""
    images = sorted(Path(p) for p in images)
    if len(images) <= n:
        return images
    idx = np.linspace(0, len(images) - 1, n).round().astype(int)
    return [images[i] for i in idx]


def _remove_shape_infer_debris(before: set[str]) -> None:
    """ORT's symbolic shape inference dumps ``sym_shape_infer_temp.onnx`` (+ external data)
    into the working directory when it fails; remove what this call left there."""
    import onnx

    debris = Path.cwd() / "sym_shape_infer_temp.onnx"
    if not debris.exists() or str(debris) in before:
        return
    try:
        m = onnx.load(str(debris), load_external_data=False)
        for t in m.graph.initializer:
            for kv in t.external_data:
                if kv.key == "location":
                    (Path.cwd() / kv.value).unlink(missing_ok=True)
    finally:
        debris.unlink(missing_ok=True)


def _pre_process(src: Path, dst: Path) -> None:
    """``quant_pre_process`` with symbolic dims merged (a dynamic batch through ``Resize``
    becomes ``floor(1.0*batch)``, which plain symbolic inference cannot reconcile); if
    symbolic inference still fails, fall back to ONNX's own shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    debris = Path.cwd() / "sym_shape_infer_temp.onnx"
    before = {str(debris)} if debris.exists() else set()
    try:
        quant_pre_process(str(src), str(dst), auto_merge=True)
    except Exception as exc:  # noqa: BLE001 - ORT raises a bare Exception here
        _remove_shape_infer_debris(before)
        logger.warning(
            "symbolic shape inference failed on %s (%s); using ONNX shape inference", src, exc
        )
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration_images: Sequence[Path],
    *,
    imgsz: int | tuple[int, int],
    config: QuantConfig | None = None,
) -> QuantizedModelInfo:
    """Static INT8 quantization of ``fp32_path`` into ``out_path``.

    Runs ``quant_pre_process`` (shape inference + graph optimisation), calibrates on
    ``config.num_calibration_frames`` of ``calibration_images`` (use *train* frames, never
    the evaluation split), keeps nodes matching ``exclude_node_patterns`` in float, copies
    the fp32 model's metadata (class names, stride, imgsz) and writes atomically. On failure
    nothing is left at ``out_path``. ``imgsz`` is the model's input side, or (H, W) for a
    rectangular input.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    config = config or QuantConfig()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    validate_onnx_model(fp32_path, check_runtime=False)
    frames = pick_calibration_frames(calibration_images, config.num_calibration_frames)
    if not frames:
        raise EmptyDatasetError("no calibration images given for INT8 quantization")
    for f in frames:
        if not Path(f).is_file():
            raise InvalidInputError(f, "calibration image not found")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    fp32 = onnx.load(str(fp32_path))
    input_name = fp32.graph.input[0].name
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.stem}-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        q = Path(tmp) / "int8.onnx"
        # The float graph's DFL softmax moved to the last axis first: the same outputs,
        # 0.5 ms less a frame (graph_rewrites); a no-op on graphs exported since.
        source = fp32_path
        if dfl_softmax_last_axis(fp32):  # the model loaded above, rewritten in place
            onnx.checker.check_model(fp32)
            source = Path(tmp) / "fp32.onnx"
            onnx.save(fp32, str(source))
        _pre_process(source, pre)
        excluded = matching_nodes(pre, config.exclude_node_patterns)
        logger.info(
            "quantizing %s: %d calibration frames, %d nodes kept in float, %s",
            fp32_path.name,
            len(frames),
            len(excluded),
            config.model_dump(exclude={"extra_options"}),
        )
        # No CalibMaxIntermediateOutputs: in ORT 1.32 MinMax it discards each chunk uncomputed.
        extra = dict(config.extra_options)
        quantize_static(
            str(pre),
            str(q),
            CalibrationReader(frames, imgsz, input_name),
            quant_format=QuantFormat[config.quant_format],
            op_types_to_quantize=config.op_types_to_quantize,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=QuantType[config.activation_type],
            weight_type=QuantType[config.weight_type],
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod[config.calibrate_method],
            extra_options=extra,
        )
        model = onnx.load(str(q))
        del model.metadata_props[:]
        for p in fp32.metadata_props:
            model.metadata_props.add(key=p.key, value=p.value)
        model.metadata_props.add(key="roadloop_quantization", value=config.model_dump_json())
        model.metadata_props.add(key="roadloop_fp32_sha256", value=sha256_file(fp32_path))
        n_q = sum(
            n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")
            for n in model.graph.node
        )
        final_tmp = Path(tmp) / out_path.name
        onnx.save(model, str(final_tmp))
        ort.InferenceSession(str(final_tmp), providers=["CPUExecutionProvider"])  # loads?
        os.replace(final_tmp, out_path)  # tmp is beside out_path: atomic, same filesystem
    return QuantizedModelInfo(
        path=out_path.absolute(),
        sha256=sha256_file(out_path),
        size_bytes=out_path.stat().st_size,
        fp32_path=fp32_path.absolute(),
        fp32_sha256=sha256_file(fp32_path),
        excluded_nodes=len(excluded),
        quantized_nodes=n_q,
        calibration_frames=len(frames),
        config=config,
    )
