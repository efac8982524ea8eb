"""Privacy accounting for site-level DP-FedAvg with Opacus' RDP accountant.

Each round releases the mean of the sampled sites' clipped updates plus Gaussian noise of
``noise_multiplier x clipping_norm / sites`` per coordinate (Flower's client-side fixed
clipping). Neighbouring datasets differ in one site's data, so each round is a Gaussian
mechanism and the accountant composes the rounds. No amplification by sampling is claimed:
Flower samples a fixed number of sites without replacement, not the Poisson sampling the
RDP amplification bound assumes (Flower's own accountant makes the same choice). ``epsilon`` is for ``(epsilon, delta)``-DP at site level —
what a site's frames reveal, not what one frame reveals.
"""

from __future__ import annotations

import math


class SitePrivacyLedger:
    """Cumulative epsilon of a federation's rounds (Opacus ``RDPAccountant``)."""

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        if noise_multiplier <= 0 or not math.isfinite(noise_multiplier):
            raise ValueError("noise_multiplier must be positive and finite")
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self._accountant = RDPAccountant()
        self.rounds = 0

    def record_round(self) -> float:
        """Compose one noisy release; returns the cumulative epsilon."""
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        self.rounds += 1
        return self.epsilon

    @property
    def epsilon(self) -> float:
        if self.rounds == 0:
            return 0.0
        return float(self._accountant.get_epsilon(self.delta))
