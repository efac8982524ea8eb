"""Which sites train in a round: enough labelled frames of good enough labels, then a draw.

A site's record comes from what the platform knows of it (the gateway's camera records and
the site's own report of its labelled frames). Eligible sites are drawn without replacement
with probability proportional to ``frames x quality``, so a large, clean site is asked more
often than a small or noisy one but none is shut out; a site below the floors is never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field


class SiteRecord(BaseModel):
    site: str
    frames: int = Field(ge=0)  # locally labelled training frames
    quality: float = Field(1.0, ge=0.0, le=1.0)  # fraction of labels that passed QA
    live: bool = True  # the gateway has heard from the site's cameras recently


class SelectionPolicy(BaseModel):
    min_frames: int = Field(10, ge=0)
    min_quality: float = Field(0.5, ge=0.0, le=1.0)
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    min_sites: int = Field(2, ge=1)


class SiteSelection(BaseModel):
    chosen: list[str]
    eligible: list[str]
    excluded: dict[str, str]  # site -> why it was not eligible


def select_sites(
    records: Sequence[SiteRecord], policy: SelectionPolicy, *, seed: int
) -> SiteSelection:
    """Draw ``max(min_sites, ceil(fraction x eligible))`` eligible sites (all if fewer)."""
    excluded: dict[str, str] = {}
    eligible: list[SiteRecord] = []
    for rec in records:
        if not rec.live:
            excluded[rec.site] = "not live at the gateway"
        elif rec.frames < policy.min_frames:
            excluded[rec.site] = f"{rec.frames} labelled frames < {policy.min_frames}"
        elif rec.quality < policy.min_quality:
            excluded[rec.site] = f"label quality {rec.quality:.2f} < {policy.min_quality:.2f}"
        else:
            eligible.append(rec)
    names = [r.site for r in eligible]
    want = max(policy.min_sites, math.ceil(policy.fraction * len(eligible)))
    if want >= len(eligible):
        return SiteSelection(chosen=names, eligible=names, excluded=excluded)
    weights = np.array([max(r.frames * r.quality, 1e-9) for r in eligible], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(eligible), size=want, replace=False, p=weights / weights.sum())
    chosen = [names[i] for i in sorted(int(i) for i in picked)]
    return SiteSelection(chosen=chosen, eligible=names, excluded=excluded)
