"""The grammar of an export-shape spec: ``"square"``, an aspect ``"W:H"`` or an explicit
``"HxW"`` (pixels, multiples of ``STRIDE``).

A leaf module (``re`` only): the settings check ``ROADLOOP_EXPORT_SHAPES`` with it when they
load, without importing the export code (ONNX) that ``roadloop.models.shapes`` needs to turn
a spec into a shape.
"""

from __future__ import annotations

import re
from typing import Literal

STRIDE = 32  # a YOLO input side is a multiple of the network's largest stride

_ASPECT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_EXPLICIT = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

ShapeSpec = (tuple[Literal["square"], None] | tuple[Literal["aspect"], tuple[float, float]]
             | tuple[Literal["hw"], tuple[int, int]])


def read_shape_spec(spec: str) -> ShapeSpec:
    """``("square", None)``, ``("aspect", (w, h))`` or ``("hw", (h, w))``; ``ValueError``
    saying why for anything else."""
    text = spec.strip().lower()
    if text == "square":
        return "square", None
    if m := _ASPECT.match(text):
        aw, ah = float(m.group(1)), float(m.group(2))
        if aw <= 0 or ah <= 0:
            raise ValueError(f"aspect {spec!r} must be positive")
        return "aspect", (aw, ah)
    if m := _EXPLICIT.match(text):
        h, w = int(m.group(1)), int(m.group(2))
        if h <= 0 or w <= 0 or h % STRIDE or w % STRIDE:
            raise ValueError(
                f"shape {spec!r}: height and width must be positive multiples of {STRIDE}")
        return "hw", (h, w)
    raise ValueError(f"input shape {spec!r} is not 'square', an aspect 'W:H' (e.g. 16:9) or "
                     "'HxW' (e.g. 192x320)")


__all__ = ["STRIDE", "ShapeSpec", "read_shape_spec"]
