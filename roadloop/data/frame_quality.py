"""Cheap per-frame image statistics (``FrameQuality``): brightness, sharpness, dhash.

Computed on the edge before a frame is encoded, or at ingest from its pixels; the fleet
gateway completes what an agent did not send from its one reduced decode (``fleet.jpeg``).
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.quality import laplacian_variance  # one definition with the agent's


class FrameQuality(BaseModel):
    """Cheap per-frame image statistics, computed on the edge or at ingest.

    ``brightness`` and ``sharpness`` are measured on the grey frame at its native resolution
    (an agent measures them before JPEG encoding); ``dhash`` is defined on a 9x8 thumbnail, so
    the scale it was computed from hardly matters (a 1/2 or 1/4 scaled decode gives the same
    hash within a bit).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    brightness: float = Field(ge=0.0, le=255.0, description="Mean luma (grey level), 0-255.")
    sharpness: float = Field(ge=0.0, description="Variance of the Laplacian of the grey image.")
    dhash: str = Field(pattern=r"^[0-9a-f]{16}$", description="64-bit difference hash, hex.")


def _to_grey(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ValueError("image must be a non-empty numpy array")
    if image.ndim == 2:
        grey = image
    elif image.ndim == 3 and image.shape[2] == 3:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and image.shape[2] == 4:
        grey = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    elif image.ndim == 3 and image.shape[2] == 1:
        grey = image[:, :, 0]
    else:
        raise ValueError(f"unsupported image shape {image.shape}")
    if grey.dtype != np.uint8:
        grey = np.clip(grey, 0, 255).astype(np.uint8)
    return grey


def dhash_hex(grey: np.ndarray) -> str:
    """Difference hash: 9x8 thumbnail, one bit per horizontally adjacent pixel pair."""
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def compute_quality(image_bgr: np.ndarray) -> FrameQuality:
    """Brightness, sharpness and dhash of a BGR (or grey) uint8 image.

    Sharpness is measured at the image's native resolution, so compare it between frames
    of the same camera rather than across cameras.
    """
    grey = _to_grey(image_bgr)
    brightness = float(grey.mean())
    sharpness = laplacian_variance(grey)
    return FrameQuality(brightness=brightness, sharpness=sharpness, dhash=dhash_hex(grey))


def dhash_hamming(a: str, b: str) -> int:
    """Number of differing bits between two 16-hex-digit dhashes."""
    for h in (a, b):
        if len(h) != 16:
            raise ValueError(f"dhash must be 16 hex digits, got {h!r}")
    return (int(a, 16) ^ int(b, 16)).bit_count()
