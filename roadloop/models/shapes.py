"""Model input shapes: which ones the platform exports, and which one fits a camera.

A shape is ``(h, w)`` in pixels, multiples of 32. ``export_shapes`` turns the settings'
spec (``"square"``, an aspect ``"16:9"`` or an explicit ``"192x320"``) into shapes for a
model trained at ``imgsz``; ``pick_input_shape`` chooses for a camera's frame size.

The choice: letterboxing a ``W×H`` frame into ``(h, w)`` scales it by
``r = min(h/H, w/W)``, so the network sees ``r²·W·H`` frame pixels and pads the rest. Take the
shapes that show the frame at the largest scale (within 1 %), and among those the smallest
input (least padding, least compute). A 1280×720 camera gets 192×320 (the same 180×320 frame
pixels as 320×320, at 60 % of the input); a 640×480 camera keeps 320×320 (192×320 would shrink
it to 192×256); an unknown frame size gets the default (first) shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from roadloop.models.export import STRIDE, input_hw
from roadloop.models.shape_specs import read_shape_spec

_SCALE_TOLERANCE = 0.01


def _round_up(v: float) -> int:
    return max(STRIDE, math.ceil(v / STRIDE - 1e-9) * STRIDE)


def parse_shape(spec: str, imgsz: int) -> tuple[int, int]:
    """One shape spec at ``imgsz``: ``"square"``, ``"W:H"`` (long side ``imgsz``) or ``"HxW"``
    (the grammar: ``roadloop.models.shape_specs``)."""
    kind, values = read_shape_spec(spec)
    if kind == "square":
        return input_hw(imgsz)
    if kind == "aspect":
        aw, ah = values
        if aw >= ah:
            return input_hw((_round_up(imgsz * ah / aw), imgsz))
        return input_hw((imgsz, _round_up(imgsz * aw / ah)))
    return input_hw(values)


def export_shapes(specs: Sequence[str], imgsz: int) -> list[tuple[int, int]]:
    """The distinct shapes of ``specs`` at ``imgsz``, square first (the default artifact)."""
    shapes: list[tuple[int, int]] = [input_hw(imgsz)]
    for spec in specs:
        hw = parse_shape(spec, imgsz)
        if hw not in shapes:
            shapes.append(hw)
    return shapes


def frame_scale(frame_wh: tuple[int, int], hw: tuple[int, int]) -> float:
    """How much a ``W×H`` frame is scaled when letterboxed into ``(h, w)``."""
    fw, fh = frame_wh
    return min(hw[0] / fh, hw[1] / fw)


def pick_input_shape(
    frame_wh: tuple[int, int] | None, shapes: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The shape of ``shapes`` that fits a ``W×H`` frame (module docstring); the first shape
    when the frame size is unknown."""
    if not shapes:
        raise ValueError("no input shapes to pick from")
    if frame_wh is None or min(frame_wh) <= 0:
        return tuple(shapes[0])  # type: ignore[return-value]
    best = max(frame_scale(frame_wh, s) for s in shapes)
    fits = [s for s in shapes if frame_scale(frame_wh, s) >= best * (1 - _SCALE_TOLERANCE)]
    return tuple(min(fits, key=lambda s: (s[0] * s[1], shapes.index(s))))  # type: ignore[return-value]
