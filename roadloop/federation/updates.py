"""Screening of site updates before they reach an aggregator.

A site's reply is checked on its own (same keys, shapes and dtypes as the model sent,
every value finite, a believable example count, an update norm below an absolute cap and
below a fraction of the global model's own norm) and then against the round (with three or
more replies, an update whose norm is more than ``max_norm_ratio`` times the round's median
is refused). Refused updates are named with a reason and the round goes on with the others.
The example counts of the accepted updates weigh FedAvg only after ``capped_weights``. This is hygiene, not robustness: a poisoned
update shaped like an honest one passes here, and the Byzantine-robust aggregators
(trimmed mean, median, Krum, Bulyan) are what bound its effect.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CandidateUpdate:
    """One site's reply: its arrays and the example count it claims."""

    key: str  # who sent it (site name, or node id when the site is unknown)
    arrays: Mapping[str, Any]
    num_examples: Any
    max_examples: int | None = None  # what the site declared before the round, if known


@dataclass
class ScreeningResult:
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # key -> reason
    norms: dict[str, float] = field(default_factory=dict)  # key -> L2 norm of the update


def _count(value: Any, max_examples: int | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"num-examples is {type(value).__name__}, not a number"
    if not math.isfinite(float(value)) or float(value) != int(value) or int(value) <= 0:
        return f"num-examples {value!r} is not a positive whole number"
    if max_examples is not None and int(value) > max_examples:
        return f"num-examples {int(value)} exceeds the {max_examples} frames the site declared"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over every array (float64 accumulation)."""
    total = 0.0
    for key, ref in reference.items():
        diff = np.asarray(arrays[key], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def model_norm(reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the whole model (float64 accumulation)."""
    total = 0.0
    for value in reference.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def check_update(
    candidate: CandidateUpdate,
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float,
    max_model_ratio: float = math.inf,
    reference_norm: float | None = None,
) -> tuple[str | None, float | None]:
    """``(reason, norm)``: reason is None when the update may be aggregated.

    ``max_model_ratio`` bounds the update against ``reference_norm`` (the global model's
    norm, computed when not given), which needs no other reply to compare with. A model of
    norm 0 gives no scale: only the absolute cap applies to it.
    """
    reason = _count(candidate.num_examples, candidate.max_examples)
    if reason:
        return reason, None
    arrays = candidate.arrays
    missing = [k for k in reference if k not in arrays]
    extra = [k for k in arrays if k not in reference]
    if missing or extra:
        example = (missing or extra)[0]
        reason = (
            f"keys differ from the model sent: {len(missing)} missing, "
            f"{len(extra)} unexpected (e.g. {example!r})"
        )
        return reason, None
    for key, ref in reference.items():
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            return f"{key}: {type(value).__name__}, not an array", None
        # Exactly the model's dtype: a float64 reply would turn the aggregate float64, a
        # float16 one would round every site's share.
        if value.dtype != np.asarray(ref).dtype:
            return f"{key}: dtype {value.dtype}, expected {np.asarray(ref).dtype}", None
        if value.shape != np.shape(ref):
            return f"{key}: shape {value.shape}, expected {np.shape(ref)}", None
        if not np.isfinite(value).all():
            return f"{key}: non-finite values", None
    norm = update_norm(arrays, reference)
    if not math.isfinite(norm):
        return "update norm overflows", None
    if norm > max_norm:
        return f"update norm {norm:.4g} exceeds the cap {max_norm:.4g}", norm
    if math.isfinite(max_model_ratio):
        if reference_norm is None:
            reference_norm = model_norm(reference)
        if reference_norm > 0 and norm > max_model_ratio * reference_norm:
            return (
                f"update norm {norm:.4g} is more than {max_model_ratio:g}x the global "
                f"model's norm {reference_norm:.4g}"
            ), norm
    return None, norm


def screen_updates(
    candidates: Sequence[CandidateUpdate],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float,
    max_norm_ratio: float,
    max_model_ratio: float = math.inf,
) -> ScreeningResult:
    """Check each update, then refuse norms far above the round's median (3+ replies)."""
    result = ScreeningResult()
    passing: list[str] = []
    reference_norm = model_norm(reference) if math.isfinite(max_model_ratio) else None
    for candidate in candidates:
        if candidate.key in result.norms or candidate.key in result.rejected:
            result.rejected[candidate.key] = "a second reply from the same sender"
            continue
        reason, norm = check_update(
            candidate, reference, max_norm=max_norm, max_model_ratio=max_model_ratio,
            reference_norm=reference_norm,
        )
        if norm is not None:
            result.norms[candidate.key] = norm
        if reason:
            result.rejected[candidate.key] = reason
        else:
            passing.append(candidate.key)
    if len(passing) >= 3:
        median = float(np.median([result.norms[k] for k in passing]))
        if median > 0:
            for key in list(passing):
                if result.norms[key] > max_norm_ratio * median:
                    result.rejected[key] = (
                        f"update norm {result.norms[key]:.4g} is more than {max_norm_ratio:g}x "
                        f"the round's median {median:.4g}"
                    )
                    passing.remove(key)
    result.accepted = passing
    return result


def capped_weights(counts: Mapping[str, int], max_ratio: float) -> dict[str, int]:
    """Each site's example count as its FedAvg weight, cut to ``max_ratio`` x the low median.

    A site's count is its own claim (bounded only by the frames it declared, also its own
    claim), so one site claiming 10**9 frames would otherwise be the average. While at least
    half the round's sites are honest, the low median of its counts is at most an honest
    site's count (a lie can only lower it, and with it the cap). With two
    sites it is the smaller count: the cap then limits the larger one to ``max_ratio``x the
    other's weight (its share at most ``max_ratio / (1 + max_ratio)``) but cannot remove its
    influence; no weighting can tell two sites' honest counts from a lie.
    """
    if not counts:
        return {}
    cap = max(1, int(max_ratio * statistics.median_low(counts.values())))
    return {key: min(int(count), cap) for key, count in counts.items()}
