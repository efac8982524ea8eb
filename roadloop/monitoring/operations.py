"""Operational health of a camera's window, from the same heartbeats drift reads.

The design notes' lines, configurable (``OperationsConfig``): a camera is *silent* when no
heartbeat arrived in the window; *fps drop* when its median fps falls under half of the
reference's; P95 latency > 120 ms warns and > 200 ms is critical; detector error rate
(``errors / frames_processed``) > 2 % warns and > 5 % is critical. These say the camera or
its box is unwell, which retraining does not fix, so they never start the learning loop.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from roadloop.monitoring.features import finite_number

Severity = Literal["ok", "warn", "critical", "not_enough_data"]


_MAX_FPS = 1000.0  # beyond any camera: a larger fps (in a heartbeat or a reference) is absurd


class OperationsConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    p95_latency_warn_ms: float = Field(default=120.0, gt=0)
    p95_latency_critical_ms: float = Field(default=200.0, gt=0)
    error_rate_warn: float = Field(default=0.02, ge=0, le=1)
    error_rate_critical: float = Field(default=0.05, ge=0, le=1)
    fps_drop_ratio: float = Field(default=0.5, gt=0, le=1, description="Warn under this × ref fps.")


class OperationalCheck(BaseModel):
    name: str
    severity: Severity
    value: float | None = None
    warn: float | None = None
    critical: float | None = None
    detail: str = ""


def numeric_column(heartbeats: Sequence[Any], key: str, lo: float, hi: float) -> list[float]:
    """The finite numbers in ``[lo, hi]`` the heartbeats carry under ``key``."""
    out = []
    for hb in heartbeats:
        v = finite_number(hb.get(key)) if isinstance(hb, Mapping) else None
        if v is not None and lo <= v <= hi:
            out.append(v)
    return out


def operational_checks(heartbeats: Sequence[Any], *, reference_fps: float | None = None,
                       config: OperationsConfig | None = None) -> list[OperationalCheck]:
    """Silent / fps / latency / error-rate checks of one window's heartbeats."""
    cfg = config or OperationsConfig()
    if not heartbeats:
        return [OperationalCheck(name="silent", severity="critical", value=0,
                                 detail="no heartbeat in the window")]
    checks = [OperationalCheck(name="silent", severity="ok", value=len(heartbeats),
                               detail=f"{len(heartbeats)} heartbeats")]
    fps = numeric_column(heartbeats, "fps", 0, _MAX_FPS)
    ref_fps = finite_number(reference_fps)  # NaN, inf, a bool or a string is no reference either
    if not fps or ref_fps is None or not 0 < ref_fps <= _MAX_FPS:
        checks.append(OperationalCheck(name="fps_drop", severity="not_enough_data",
                                       detail="no fps in the window" if not fps
                                       else "no usable reference fps"))
    else:
        med = statistics.median(fps)
        line = cfg.fps_drop_ratio * ref_fps
        checks.append(OperationalCheck(
            name="fps_drop", severity="warn" if med < line else "ok", value=round(med, 3),
            warn=round(line, 3), detail=f"median fps {med:.2f} vs reference {ref_fps:.2f}"))
    p95 = numeric_column(heartbeats, "latency_p95_ms", 0, 3.6e6)
    if p95:
        worst = max(p95)  # the window's worst heartbeat: a P95 over P95s would hide a bad minute
        sev: Severity = ("critical" if worst > cfg.p95_latency_critical_ms else
                         "warn" if worst > cfg.p95_latency_warn_ms else "ok")
        checks.append(OperationalCheck(name="p95_latency", severity=sev, value=round(worst, 2),
                                       warn=cfg.p95_latency_warn_ms,
                                       critical=cfg.p95_latency_critical_ms,
                                       detail="worst heartbeat P95 latency, ms"))
    else:
        checks.append(OperationalCheck(name="p95_latency", severity="not_enough_data",
                                       detail="no latency reported (no frame processed?)"))
    frames = errors = 0.0
    for hb in heartbeats:
        if not isinstance(hb, Mapping):
            continue
        f, e = finite_number(hb.get("frames_processed")), finite_number(hb.get("errors"))
        if f is not None and e is not None and 0 <= e <= f <= 1e9:
            frames, errors = frames + f, errors + e
    if frames > 0:
        rate = errors / frames
        sev = ("critical" if rate > cfg.error_rate_critical else
               "warn" if rate > cfg.error_rate_warn else "ok")
        checks.append(OperationalCheck(name="error_rate", severity=sev, value=round(rate, 5),
                                       warn=cfg.error_rate_warn, critical=cfg.error_rate_critical,
                                       detail=f"{int(errors)} failed of {int(frames)} frames"))
    else:
        checks.append(OperationalCheck(name="error_rate", severity="not_enough_data",
                                       detail="no frame processed in the window"))
    return checks
