"""evidently, as its users run it: a ``DataDriftTable`` over the heartbeat features and the drift
method of an ``EmbeddingsDriftMetric`` over frame embeddings; scores on the design notes' 0–1 scale."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from roadloop.monitoring.features import (
    CLASS_MIX,
    LOW_CONFIDENCE_SHARE,
    NUMERIC_FEATURES,
    WindowFeatures,
    expand,
    expand_classes,
)
from roadloop.monitoring.models import DriftConfig

_UNIT_WASSERSTEIN = None


def unit_wasserstein_test() -> Any:
    """evidently StatTest: first Wasserstein distance of a feature already scaled to [0, 1]
    (unlike evidently's ``wasserstein``, not divided by the reference's std, so a camera
    whose reference barely varied does not alarm on a one-bin wobble)."""
    global _UNIT_WASSERSTEIN
    if _UNIT_WASSERSTEIN is None:
        from evidently.calculations.stattests.registry import StatTest, register_stattest
        from evidently.core import ColumnType

        def impl(reference: pd.Series, current: pd.Series, feature_type: Any,
                 threshold: float) -> tuple[float, bool]:
            value = float(stats.wasserstein_distance(reference, current))
            return value, value >= threshold

        test = StatTest(name="unit_wasserstein",
                        display_name="Wasserstein distance (feature scaled to [0, 1])",
                        allowed_feature_types=[ColumnType.Numerical], default_threshold=0.1)
        register_stattest(test, default_impl=impl)
        _UNIT_WASSERSTEIN = test
    return _UNIT_WASSERSTEIN


def _padded_frame(columns: dict[str, Sequence[Any]]) -> pd.DataFrame:
    n = max((len(v) for v in columns.values()), default=0)
    data: dict[str, Any] = {}
    for name, values in columns.items():
        if name == CLASS_MIX:
            data[name] = pd.Series(list(values) + [None] * (n - len(values)), dtype="object")
        else:
            data[name] = np.concatenate([np.asarray(values, dtype=np.float64),
                                         np.full(n - len(values), np.nan)])
    return pd.DataFrame(data)


def _feature_columns(wf: WindowFeatures, names: Sequence[str], cap: int) -> dict[str, Any]:
    cols: dict[str, Any] = {}
    by_name = {f.name: f for f in NUMERIC_FEATURES}
    for name in names:
        if name == CLASS_MIX:
            cols[name] = expand_classes(wf.class_counts, cap)
        else:
            cols[name] = expand(wf.histograms[name], by_name[name], cap)
    return cols


def _table_report(ref: WindowFeatures, cur: WindowFeatures, names: Sequence[str],
                  thresholds: dict[str, float], cap: int) -> Any:
    from evidently import ColumnMapping
    from evidently.metrics import DataDriftTable
    from evidently.report import Report

    tests = {n: ("jensenshannon" if n == CLASS_MIX else unit_wasserstein_test()) for n in names}
    report = Report(metrics=[DataDriftTable(
        columns=list(names), per_column_stattest=tests,
        per_column_stattest_threshold={n: thresholds[n] for n in names})])
    mapping = ColumnMapping(
        numerical_features=[n for n in names if n != CLASS_MIX],
        categorical_features=[n for n in names if n == CLASS_MIX])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report.run(reference_data=_padded_frame(_feature_columns(ref, names, cap)),
                   current_data=_padded_frame(_feature_columns(cur, names, cap)),
                   column_mapping=mapping)
    return report


def _table_scores(report: Any) -> tuple[dict[str, float], float]:
    result = report.as_dict()["metrics"][0]["result"]
    scores = {c: float(v["drift_score"]) for c, v in result["drift_by_columns"].items()}
    return scores, float(result["share_of_drifted_columns"])


# evidently's EmbeddingsDriftMetric also fits a t-SNE of both sets on every run, for its plot
# only: ~30 CPU-s for a 1000-row reference, and sklearn refuses it (ValueError) for 30 rows or
# fewer (perplexity 30). The score is its drift method's, so that runs directly; the Report
# is built only when an HTML report is asked for, and only where the t-SNE can run.
TSNE_MIN_ROWS = 31


def _embedding_frames(ref: np.ndarray, cur: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    cols = [f"e{i}" for i in range(ref.shape[1])]
    return pd.DataFrame(ref, columns=cols), pd.DataFrame(cur, columns=cols)


def _embedding_method() -> Any:
    from evidently.metrics.data_drift.embedding_drift_methods import model

    return model(threshold=0.55, bootstrap=False)


def embedding_drift_score(ref: np.ndarray, cur: np.ndarray) -> float:
    """evidently's domain-classifier drift method (what ``EmbeddingsDriftMetric`` runs) on
    reference vs window embeddings, as ``2·AUC − 1``."""
    ref_df, cur_df = _embedding_frames(ref, cur)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc, _, _ = _embedding_method()(cur_df, ref_df)
    return score_from_auc(float(auc))


def embedding_report(ref: np.ndarray, cur: np.ndarray) -> Any | None:
    """evidently's ``EmbeddingsDriftMetric`` report, for HTML; None where too few rows."""
    from evidently import ColumnMapping
    from evidently.metrics import EmbeddingsDriftMetric
    from evidently.report import Report

    if len(ref) + len(cur) < TSNE_MIN_ROWS:
        return None
    ref_df, cur_df = _embedding_frames(ref, cur)
    report = Report(metrics=[EmbeddingsDriftMetric("frames", drift_method=_embedding_method())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report.run(reference_data=ref_df, current_data=cur_df,
                   column_mapping=ColumnMapping(embeddings={"frames": list(ref_df.columns)}))
    return report


def embedding_null_scores(pool: np.ndarray, n: int, draws: int, seed: int = 0) -> list[float]:
    """Scores of ``draws`` random ``n``-row subsets of the reference against the rest: what the
    domain classifier gives on no drift at all with a window this size (seeded, repeatable)."""
    if n < 2 or len(pool) < 2 * n or draws <= 0:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        idx = rng.permutation(len(pool))
        out.append(embedding_drift_score(pool[idx[n:]], pool[idx[:n]]))
    return out


def score_from_auc(auc: float) -> float:
    return max(0.0, 2.0 * auc - 1.0) if math.isfinite(auc) else 0.0


def subsample(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if len(rows) <= n:
        return rows
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return rows[idx]


def enough(wf: WindowFeatures, name: str, cfg: DriftConfig) -> bool:
    if name == CLASS_MIX or name == "confidence" or name == LOW_CONFIDENCE_SHARE:
        return wf.samples(name) >= cfg.min_boxes
    return wf.samples(name) >= cfg.min_frames




def heartbeat_metric_names() -> list[str]:
    return [*(f.name for f in NUMERIC_FEATURES), CLASS_MIX, LOW_CONFIDENCE_SHARE]


def heartbeat_values(ref: WindowFeatures, cur: WindowFeatures, names: Sequence[str],
                      cfg: DriftConfig, thresholds: dict[str, float],
                      reports: list[Any] | None = None) -> dict[str, float]:
    """Scores of the named heartbeat metrics both sides have enough data for."""
    out: dict[str, float] = {}
    tested = [n for n in names if n != LOW_CONFIDENCE_SHARE and enough(ref, n, cfg)
              and enough(cur, n, cfg) and (n == CLASS_MIX or ref.histograms[n].same_bins(
                  cur.histograms[n]))]
    if tested:
        report = _table_report(ref, cur, tested, {n: thresholds.get(n, cfg.minor) for n in tested},
                               cfg.max_samples)
        if reports is not None:
            reports.append(report)
        out.update(_table_scores(report)[0])
    if (LOW_CONFIDENCE_SHARE in names and enough(ref, LOW_CONFIDENCE_SHARE, cfg)
            and enough(cur, LOW_CONFIDENCE_SHARE, cfg)):
        r, c = ref.low_confidence_share(), cur.low_confidence_share()
        if r is not None and c is not None:
            out[LOW_CONFIDENCE_SHARE] = max(0.0, c - r)
    return out
