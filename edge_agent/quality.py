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
    earlier run in git).
    """
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))
    return float(std[0, 0]) ** 2
