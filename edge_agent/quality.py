"""Sharpness, defined once for the agent and the platform (the gateway keeps an agent's
value when it sends one, so both must measure the same thing)."""

from __future__ import annotations

import cv2
import numpy as np


def laplacian_variance(grey: np.ndarray) -> float:
    """Sharpness: variance of the Laplacian (cv2's 3x3 kernel) of a uint8 grey image.

    Computed in int16 — exact, the kernel's output lies within ±1020 — so it takes 2 bytes a
    pixel where a float64 Laplacian and its variance take 16; the agent's quality stage went
    from 1.27 to 0.79 ms a frame with it (one thread; benchmarks/results/agent_speed.md, the
    earlier run in git). The variance comes from the exact sum and sum of squares
    (E[L²] − E[L]²): OpenCV's ``meanStdDev`` has no vectorised int16 path and took as long
    as the Laplacian itself (0.98 → 0.60 ms for both on a 1280×720 frame).
    """
    lap = cv2.Laplacian(grey, cv2.CV_16S)
    n = lap.size
    if n == 0:
        return 0.0
    mean = cv2.sumElems(lap)[0] / n
    return max(cv2.norm(lap, cv2.NORM_L2SQR) / n - mean * mean, 0.0)
