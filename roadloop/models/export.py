"""ONNX export of Ultralytics detectors, and checks that a file really is a usable ONNX model.

Shape policy: the exported graph has a **dynamic batch** dimension (the benchmark runs
batch 1/4/8) and **static spatial dimensions** (``imgsz`` × ``imgsz``, or ``(h, w)`` for a
rectangular input such as 192×320 for 16:9 cameras; both multiples of the stride, 32). Ultralytics'
``dynamic=True`` makes height and width dynamic too, which leaves ``Shape/Range/Expand``
anchor arithmetic in the graph; we pin height/width back to ``imgsz`` and fold that
arithmetic away with onnxslim. The result has the same operator set as a static export
(constant anchors), quantizes cleanly and runs as fast, yet accepts any batch size.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.fsutil import sha256_file
from roadloop.models.graph_rewrites import rewrite_onnx_file
from roadloop.models.shape_specs import STRIDE

logger = logging.getLogger(__name__)

BATCH_DIM = "batch"


def input_hw(imgsz: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``imgsz`` (a side, or ``(h, w)``) as ``(h, w)``; each a positive multiple of 32."""
    hw = (int(imgsz), int(imgsz)) if isinstance(imgsz, int) else tuple(int(v) for v in imgsz)
    if len(hw) != 2 or any(v <= 0 or v % STRIDE for v in hw):
        raise ValueError(f"input shape must be (h, w), multiples of {STRIDE}; got {imgsz!r}")
    return hw[0], hw[1]


def shape_label(hw: tuple[int, int] | list[int]) -> str:
    """``"192x320"``: how a shape names files and report rows."""
    return f"{int(hw[0])}x{int(hw[1])}"


class OnnxModelInfo(BaseModel):
    """What a deployed ONNX detector is: file identity, tensor shapes, classes."""

    path: Path
    sha256: str
    size_bytes: int
    input_name: str
    input_shape: list[int | str]  # e.g. ["batch", 3, 320, 320]
    output_shape: list[int | str]  # e.g. ["batch", 4 + nc, anchors]
    imgsz: int  # the long side (the square size for a square model)
    class_names: list[str]
    opset: int

    @property
    def dynamic_batch(self) -> bool:
        return isinstance(self.input_shape[0], str)

    @property
    def input_hw(self) -> tuple[int, int]:
        """(h, w) of the input; ``(imgsz, imgsz)`` when the spatial dims are dynamic."""
        h, w = self.input_shape[2], self.input_shape[3]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
        return self.imgsz, self.imgsz


def _dims(value_info) -> list[int | str]:
    return [
        d.dim_param if d.dim_param else int(d.dim_value)
        for d in value_info.type.tensor_type.shape.dim
    ]


def _load_proto(path: Path):
    """Parse the file as ONNX; anything that is not a well-formed model is InvalidInputError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"ONNX model not found: {path}", path)
    if path.stat().st_size == 0:
        raise InvalidInputError(path, "file is empty, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, truncated protobuf, missing external data ...
        raise InvalidInputError(
            path, f"not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from exc
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise InvalidInputError(
            path, "ONNX graph has no nodes, inputs or outputs (not an ONNX model?)"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InvalidInputError(path, f"ONNX model fails the checker: {exc}") from exc
    return model


def validate_onnx_model(path: Path, *, check_runtime: bool = True) -> None:
    """Raise :class:`InvalidInputError` naming ``path`` unless it is an ONNX detector ORT can load.

    Checks: parses as ONNX, passes ``onnx.checker``, has one rank-4 image input, and (with
    ``check_runtime``) builds an ONNX Runtime CPU session.
    """
    path = Path(path)
    model = _load_proto(path)
    inputs = model.graph.input
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise InvalidInputError(path, "expected one NCHW image input")
    if check_runtime:
        import onnxruntime as ort

        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InvalidInputError(path, f"ONNX Runtime cannot load the model: {exc}") from exc


def _class_names(meta: dict[str, str], output_shape: list[int | str]) -> list[str]:
    raw = meta.get("names")
    if raw:
        try:
            names = ast.literal_eval(raw)
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, (list, tuple)):
                return [str(n) for n in names]
        except (ValueError, SyntaxError):
            pass
    channels = output_shape[1] if len(output_shape) > 1 else None
    if isinstance(channels, int) and channels > 4:
        return [f"class{i}" for i in range(channels - 4)]
    return []


def load_onnx_metadata(path: Path) -> OnnxModelInfo:
    """Read identity, shapes, class names and opset from an ONNX detector (validated first)."""
    path = Path(path)
    model = _load_proto(path)
    meta = {p.key: p.value for p in model.metadata_props}
    inp, out = model.graph.input[0], model.graph.output[0]
    in_shape, out_shape = _dims(inp), _dims(out)
    if len(in_shape) != 4:
        raise InvalidInputError(path, f"expected an NCHW image input, got shape {in_shape}")
    spatial = [d for d in in_shape[2:4] if isinstance(d, int) and d > 0]
    imgsz = max(spatial) if spatial else None
    if imgsz is None and meta.get("imgsz"):
        try:
            imgsz = int(ast.literal_eval(meta["imgsz"])[0])
        except (ValueError, SyntaxError, TypeError, IndexError):
            imgsz = None
    if imgsz is None:
        raise InvalidInputError(
            path, "cannot tell the input image size (dynamic dims, no metadata)"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxModelInfo(
        path=path.absolute(),
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        input_name=inp.name,
        input_shape=in_shape,
        output_shape=out_shape,
        imgsz=imgsz,
        class_names=_class_names(meta, out_shape),
        opset=opset,
    )


def _pin_spatial_dims(onnx_path: Path, hw: tuple[int, int]) -> None:
    """Turn an all-dynamic Ultralytics export into dynamic-batch, static-HW (see module doc)."""
    import onnx
    import onnxslim
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(onnx_path))
    for dim_name, size in zip(("height", "width"), hw, strict=True):
        make_dim_param_fixed(model.graph, dim_name, size)
    slim = onnxslim.slim(model)
    meta = {p.key: p.value for p in model.metadata_props}
    if not slim.metadata_props:  # keep Ultralytics' metadata (names, stride, imgsz ...)
        for k, v in meta.items():
            slim.metadata_props.add(key=k, value=v)
    onnx.save(slim, str(onnx_path))


def _check_runs(
    onnx_path: Path, hw: tuple[int, int], nc: int, batches: tuple[int, ...]
) -> None:
    """Run the model on zeros; the output must be (batch, 4 + nc, anchors)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in batches:
        out = sess.run(None, {name: np.zeros((b, 3, *hw), np.float32)})[0]
        if out.ndim != 3 or out.shape[0] != b or out.shape[1] != 4 + nc:
            raise RuntimeError(
                f"exported {onnx_path} gave output shape {out.shape} for batch {b}, "
                f"expected ({b}, {4 + nc}, anchors)"
            )


def export_onnx(
    weights: Path,
    out_path: Path,
    *,
    imgsz: int | tuple[int, int],
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> OnnxModelInfo:
    """Export an Ultralytics ``.pt`` detector to ``out_path`` (fp32, no NMS in the graph).

    ``imgsz`` is the square side or ``(h, w)`` (multiples of 32), e.g. ``(192, 320)``: a
    16:9 camera frame letterboxed into it wastes no pixels on padding.

    Ultralytics writes the ``.onnx`` next to its weights, so the checkpoint is staged into a
    temporary folder beside ``out_path`` (the source may be read-only), exported there,
    checked with ONNX Runtime (batch 1, and batch 2 when dynamic) and moved into place with
    ``os.replace``. On any failure nothing is left at ``out_path``.
    """
    weights, out_path = Path(weights), Path(out_path)
    hw = input_hw(imgsz)
    if not weights.is_file():
        raise MissingDataError(f"weights to export not found: {weights}", weights)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    from roadloop.models.training import configure_ultralytics

    configure_ultralytics()
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(
        dir=out_path.parent, prefix=f".{out_path.stem}-export-"
    ) as tmp:
        staged = Path(tmp) / "model.pt"
        shutil.copy2(weights, staged)
        try:
            model = YOLO(str(staged), task="detect")
        except Exception as exc:
            raise InvalidInputError(
                weights, f"not a loadable Ultralytics checkpoint: {exc}"
            ) from exc
        nc = len(model.names)
        logger.info(
            "exporting %s to ONNX (imgsz=%s, dynamic_batch=%s)", weights, shape_label(hw),
            dynamic_batch,
        )
        kwargs = {"opset": opset} if opset is not None else {}
        exported = Path(
            model.export(
                format="onnx",
                imgsz=hw[0] if hw[0] == hw[1] else list(hw),
                dynamic=dynamic_batch,
                batch=1,
                simplify=True,
                half=False,
                nms=False,
                device="cpu",
                verbose=False,
                **kwargs,
            )
        )
        if dynamic_batch:
            _pin_spatial_dims(exported, hw)
        rewrite_onnx_file(exported, exported)  # exact, cheaper DFL softmax (graph_rewrites)
        _check_runs(exported, hw, nc, (1, 2) if dynamic_batch else (1,))
        os.replace(exported, out_path)
    info = load_onnx_metadata(out_path)
    logger.info("exported %s (%s, %d bytes)", out_path, info.sha256[:12], info.size_bytes)
    return info
