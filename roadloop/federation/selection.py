"""Which sites train in a round: enough labelled frames of good enough labels, then a draw.

A site's record comes from what the platform knows of it (the gateway's camera records and
the site's own report of its labelled frames). Eligible sites are drawn without replacement
with probability proportional to ``frames x quality``, so a large, clean site is asked more
often than a small or noisy one but none is shut out; a site below the floors is never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SiteRecord(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    site: str
    frames: int = Field(ge=0)  # locally labelled training frames
    quality: float = Field(1.0, ge=0.0, le=1.0)  # fraction of labels that passed QA
    live: bool = True  # the gateway has heard from the site's cameras recently


class PlatformSiteRecord(BaseModel):
    """What the platform knows of a site: is the gateway hearing from its cameras."""

    live: bool
    cameras: list[str] = Field(default_factory=list)
    last_seen: str | None = None  # ISO time the gateway last heard from any of its cameras


def sites_live_at_gateway(
    site_cameras: dict[str, list[str]],
    last_seen: dict[str, datetime | None],
    now: datetime,
    within: timedelta,
) -> dict[str, PlatformSiteRecord]:
    """A site is live when the gateway heard from one of its cameras within ``within``."""
    out: dict[str, PlatformSiteRecord] = {}
    for site, cameras in site_cameras.items():
        seen = [t for c in cameras if (t := last_seen.get(c)) is not None]
        latest = max(seen, default=None)
        out[site] = PlatformSiteRecord(
            live=latest is not None and now - latest <= within,
            cameras=list(cameras),
            last_seen=latest.isoformat() if latest else None,
        )
    return out


def merge_platform_records(
    reported: SiteRecord, platform: PlatformSiteRecord | None
) -> SiteRecord:
    """The site's own report, with liveness from the platform where the platform knows it."""
    if platform is None:
        return reported
    return reported.model_copy(update={"live": reported.live and platform.live})


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
