"""The serving graph's preprocessing as an ONNX graph: uint8 BGR camera frames → the
detector's letterboxed float RGB input, with the edge agent's letterbox geometry."""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_agent.inference import _letterbox_params
from roadloop.serving.onnx_builder import GraphBuilder, model_like

FRAMES_INPUT = "frames"
PAD_VALUE = 114.0
PRE_PREFIX = "serve_pre/"
ResizeMode = Literal["float", "uint8_first", "separable"]
RESIZE_MODES: tuple[str, ...] = ("float", "uint8_first", "separable")


def preprocess_model(
    frame_hw: tuple[int, int],
    input_hw: tuple[int, int],
    batch: int | str,
    like: onnx.ModelProto,
    *,
    resize: ResizeMode = "float",
) -> onnx.ModelProto:
    """uint8 BGR NHWC frames → the detector's float NCHW RGB input, letterboxed.

    ``resize`` says how the frames are scaled down (each bilinear with half-pixel centres, as
    ``cv2.resize``; all three agree with the edge pipeline within one grey level):

    - ``"float"``: Cast to float → NCHW → RGB → Resize → Round, so the resize works on float
      pixels as ``cv2.resize`` rounds its uint8 result.
    - ``"uint8_first"`` (CPU only): NCHW and Resize on the uint8 frames, then RGB and Cast on
      the resized image only, so a quarter or less of the pixels go through the float steps;
      pixels may differ from ``cv2.resize``'s by one grey level (its own rounding). ONNX
      Runtime's CUDA bilinear kernel casts its weights to the tensor's type, so on uint8 they
      truncate to 0 and the output is nearly black (measured on an H200): ``ServingSession``
      refuses such a graph on CUDA.
    - ``"separable"``: Cast, then the two axes one after the other on the NHWC layout (the
      width as the last-but-one axis of ``[B, H, W, 3]``, then the height of
      ``[B, 1, H, W' × 3]``), then NCHW and RGB on the resized image. Bilinear is separable,
      so the values are the float path's up to float rounding; the full-size frame is
      neither transposed nor gathered, which the float path does to all of its pixels.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    h, w = frame_hw
    (new_w, new_h), (top, bottom, left, right) = _letterbox_params(frame_hw, input_hw)
    b = GraphBuilder(PRE_PREFIX)
    rgb_order = b.const("rgb_order", np.array([2, 1, 0], np.int64))

    def sized(x: str, name: str, last_two: tuple[int, int]) -> str:
        """Bilinear Resize of ``x``'s last two axes to ``last_two``, the others kept."""
        shape = b.op("Shape", [x], f"{name}_shape")
        outer = b.op(
            "Slice",
            [shape, b.const(f"{name}_from", np.array([0], np.int64)),
             b.const(f"{name}_to", np.array([2], np.int64))],
            f"{name}_outer",
        )
        sizes = b.op(
            "Concat", [outer, b.const(f"{name}_hw", np.array(last_two, np.int64))],
            f"{name}_sizes", axis=0,
        )
        return b.op("Resize", [x, "", "", sizes], name, mode="linear",
                    coordinate_transformation_mode="half_pixel")

    if resize == "separable":
        x = b.op("Cast", [FRAMES_INPUT], "float", to=TensorProto.FLOAT)
        if new_w != w:
            x = sized(x, "resized_w", (new_w, 3))  # [B, H, W', 3]: W' is the last-but-one axis
        if new_h != h:
            rows = b.const("rows_shape", np.array([-1, 1, h, new_w * 3], np.int64))
            x = b.op("Reshape", [x, rows], "rows")
            x = sized(x, "resized_h", (new_h, new_w * 3))  # [B, 1, H', W' × 3]
        if (new_h, new_w) != (h, w):
            x = b.op("Round", [x], "rounded")
            nhwc = b.const("nhwc_shape", np.array([-1, new_h, new_w, 3], np.int64))
            x = b.op("Reshape", [x, nhwc], "nhwc")
        x = b.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
        x = b.op("Gather", [x, rgb_order], "rgb", axis=1)
    else:
        if resize == "uint8_first":
            x = b.op("Transpose", [FRAMES_INPUT], "nchw", perm=[0, 3, 1, 2])
        else:
            x = b.op("Cast", [FRAMES_INPUT], "float", to=TensorProto.FLOAT)
            x = b.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
            x = b.op("Gather", [x, rgb_order], "rgb", axis=1)
        if (new_h, new_w) != (h, w):
            x = sized(x, "resized", (new_h, new_w))
            if resize == "float":
                x = b.op("Round", [x], "rounded")  # cv2.resize on uint8 rounds to whole levels
        if resize == "uint8_first":
            x = b.op("Gather", [x, rgb_order], "rgb", axis=1)
            x = b.op("Cast", [x], "float", to=TensorProto.FLOAT)
    # ÷255 before the padding, on the resized image only: the pad value is divided instead
    # (float32 division is correctly rounded, so every pixel is the same as padding first).
    scale = np.float32(255.0)
    padded = bool(top or bottom or left or right)
    x = b.op("Div", [x, b.const("scale", np.array(scale))], "scaled" if padded else "pixels")
    if padded:
        pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
        b.op(
            "Pad",
            [x, b.const("pads", pads),
             b.const("pad_value", np.array(np.float32(PAD_VALUE) / scale, np.float32))],
            "pixels",
            mode="constant",
        )
    ih, iw = input_hw
    return model_like(
        b,
        [helper.make_tensor_value_info(FRAMES_INPUT, TensorProto.UINT8, [batch, h, w, 3])],
        [helper.make_tensor_value_info(PRE_PREFIX + "pixels", TensorProto.FLOAT, [batch, 3, ih, iw])],
        like,
        "serving_preprocess",
    )
