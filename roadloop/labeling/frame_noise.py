"""Salt-and-pepper noise in a frame: the share of isolated impulse pixels.

Some labelled sources ship augmented copies of their frames with heavy salt-and-pepper
noise (Roboflow's "noise" augmentation in atl_v2 and manaus_v4). Replayed as camera traffic,
such frames reach the review queue and waste annotators' time: they say nothing about the
cameras. A pixel is an impulse when its grey level lies more than ``IMPULSE_DELTA`` above
the brightest or below the darkest of its 8 neighbours (OpenCV dilation/erosion with the
centre left out): real edges and texture have a neighbour on their side, an isolated speck
has none. JPEG re-encoding blurs specks a little but keeps most of them.

``DEFAULT_MAX_IMPULSE_SHARE`` (0.1 % of pixels) separates the measured distributions
(``docs/review.md``): real camera video stays under 0.02 %, augmented frames lie at 0.1-5 %.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMPULSE_DELTA = 50
"""Grey levels a pixel must exceed all 8 neighbours by (or fall below them by)."""
DEFAULT_MAX_IMPULSE_SHARE = 0.001
"""Frames with more impulse pixels than this share are too noisy to review."""


def impulse_share(image: np.ndarray, delta: int = IMPULSE_DELTA) -> float:
    """Share of pixels in ``image`` (BGR or grey, uint8) that are isolated impulses."""
    import cv2

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.size == 0:
        return 0.0
    grey = image.astype(np.int16)
    ring = np.ones((3, 3), np.uint8)
    ring[1, 1] = 0
    brightest = cv2.dilate(grey, ring)
    darkest = cv2.erode(grey, ring)
    impulses = (grey - brightest > delta) | (darkest - grey > delta)
    return float(impulses.mean())


def image_impulse_share(path: Path | str, delta: int = IMPULSE_DELTA) -> float:
    """``impulse_share`` of an image file; raises ``InvalidInputError`` if it does not decode."""
    import cv2

    from roadloop.errors import InvalidInputError

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise InvalidInputError(Path(path), "image does not decode")
    return impulse_share(img, delta)


def is_noisy(share: float, max_share: float = DEFAULT_MAX_IMPULSE_SHARE) -> bool:
    return share > max_share


__all__ = [
    "DEFAULT_MAX_IMPULSE_SHARE",
    "IMPULSE_DELTA",
    "image_impulse_share",
    "impulse_share",
    "is_noisy",
]
