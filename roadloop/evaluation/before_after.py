"""The before/after table: what the learning loop did to the model, per held-out test set.

Rows, per test set (the benchmark's per-source test sets, e.g. ``atl_v2`` and ``manaus_v4``,
and ``all``): the **start** checkpoint (the weights training started from), the **production**
model the loop promoted and the **candidate** when it is another version. Production and
candidate figures are read from each version's own benchmark report (where that version was
the candidate); the start checkpoint is in no report, so :func:`evaluate_start_checkpoint`
scores it once with the report's evaluator, image size, split and confidence, on the report's
test-set files, so every row compares.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from roadloop.evaluation.results import BenchmarkResults, DetectionMetrics
from roadloop.evaluation.testsets import ALL
from roadloop.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

JSON_NAME = "demo_before_after.json"
MARKDOWN_NAME = "demo_before_after.md"
Role = Literal["start", "production", "candidate"]
ROLES: tuple[Role, ...] = ("start", "production", "candidate")
#: The format of the mAP columns: the start checkpoint exists as PyTorch weights only.
MAP_FORMAT = "pytorch"
INT8_FORMAT = "onnx_int8"


class BeforeAfterRow(BaseModel):
    role: Role
    model: str  # "v3", or the start checkpoint's file name
    test_set: str
    n_images: int
    map50: float
    map50_95: float
    int8_map50_95: float | None = None  # the platform's INT8 export; None: not in a report
    figures_from: str  # "benchmark report of v3" | "evaluated for this table"


class BeforeAfterTable(BaseModel):
    """Everything the table shows; ``model_dump_json()`` is its JSON file."""

    created_at: str
    imgsz: int
    split: str
    conf: float
    test_sets: list[str]
    rows: list[BeforeAfterRow] = Field(default_factory=list)
    start_checkpoint: str | None = None  # the file training starts from
    start_eval_seconds: float | None = None  # the wall time of scoring it, for the record
    notes: list[str] = Field(default_factory=list)

    def row(self, role: Role, test_set: str) -> BeforeAfterRow | None:
        return next((r for r in self.rows if r.role == role and r.test_set == test_set), None)

    def delta_vs_start(self, row: BeforeAfterRow) -> float | None:
        """``row``'s mAP50-95 minus the start checkpoint's on the same test set."""
        start = self.row("start", row.test_set)
        if start is None or row.role == "start":
            return None
        return row.map50_95 - start.map50_95


def table_test_sets(results: BenchmarkResults) -> list[str]:
    """The report's per-source test sets, then ``all`` (robustness slices are left out)."""
    sources = results.test_sets_of_kind("source")
    return [*sources, *([ALL] if ALL in results.test_sets else [])]


def report_rows(results: BenchmarkResults, role: Role, version: str,
                test_sets: list[str]) -> list[BeforeAfterRow]:
    """``version``'s rows from its own benchmark report (where it was the ``candidate``)."""
    rows = []
    for ts in test_sets:
        metrics = results.get("candidate", MAP_FORMAT, ts)
        if metrics is None:
            continue
        int8 = results.get("candidate", INT8_FORMAT, ts)
        rows.append(BeforeAfterRow(
            role=role, model=f"v{version}", test_set=ts, n_images=metrics.n_images,
            map50=metrics.map50, map50_95=metrics.map50_95,
            int8_map50_95=int8.map50_95 if int8 is not None else None,
            figures_from=f"benchmark report of v{version}",
        ))
    return rows


def start_rows(metrics: Mapping[str, DetectionMetrics], checkpoint: str) -> list[BeforeAfterRow]:
    return [
        BeforeAfterRow(role="start", model=checkpoint, test_set=ts, n_images=m.n_images,
                       map50=m.map50, map50_95=m.map50_95, figures_from="evaluated for this table")
        for ts, m in metrics.items()
    ]


def build_before_after(
    reference: BenchmarkResults,
    *,
    production: tuple[str, BenchmarkResults] | None = None,
    candidate: tuple[str, BenchmarkResults] | None = None,
    start: tuple[str, Mapping[str, DetectionMetrics]] | None = None,
    start_eval_seconds: float | None = None,
    notes: list[str] | None = None,
) -> BeforeAfterTable:
    """The table over ``reference``'s test sets (the report the start was scored against).

    ``production`` / ``candidate``: (version, that version's own report); a candidate equal to
    production is left out. ``start``: (checkpoint name, metrics per test set).
    """
    test_sets = table_test_sets(reference)
    table = BeforeAfterTable(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"), imgsz=reference.imgsz,
        split=reference.split, conf=reference.conf, test_sets=test_sets,
        start_checkpoint=start[0] if start else None, start_eval_seconds=start_eval_seconds,
        notes=list(notes or []),
    )
    if start is not None:
        table.rows += start_rows({t: start[1][t] for t in test_sets if t in start[1]}, start[0])
    if production is not None:
        table.rows += report_rows(production[1], "production", production[0], test_sets)
    if candidate is not None and (production is None or candidate[0] != production[0]):
        table.rows += report_rows(candidate[1], "candidate", candidate[0], test_sets)
    order = {t: i for i, t in enumerate(test_sets)}
    table.rows.sort(key=lambda r: (order.get(r.test_set, len(order)), ROLES.index(r.role)))
    return table


class StartScores(BaseModel):
    """The start checkpoint scored on each test set (:func:`evaluate_start_checkpoint`)."""

    metrics: dict[str, DetectionMetrics]
    seconds: float
    # Target classes the checkpoint never had (fresh rows after the re-map): they score ~0.
    new_classes: list[str] = Field(default_factory=list)


def evaluate_start_checkpoint(
    checkpoint: Path,
    test_sets: Mapping[str, Path],
    *,
    class_names: list[str],
    imgsz: int,
    split: str,
    conf: float,
) -> StartScores:
    """Score ``checkpoint`` on each test-set YAML the way the benchmark does.

    A checkpoint with other classes (the shared ones have atl_v2's) gets its class head
    re-mapped onto ``class_names`` as training does before it starts
    (``adapt_checkpoint_to_taxonomy``; classes it never had keep a seeded fresh init), in a
    temporary folder.
    """
    import torch

    from roadloop.evaluation.accuracy import evaluate_detector_on_sets
    from roadloop.models.training import adapt_start_to_taxonomy

    t0 = time.monotonic()
    class_names = list(class_names)
    with tempfile.TemporaryDirectory(prefix="roadloop-start-") as tmp:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            weights, _, class_map = adapt_start_to_taxonomy(
                Path(checkpoint), class_names,
                Path(tmp) / f"{Path(checkpoint).stem}_taxonomy.pt")
        new_classes = ([c for c in class_names if c not in class_map.values()]
                       if class_map is not None else [])
        metrics = evaluate_detector_on_sets(
            weights, {ts: Path(yml) for ts, yml in test_sets.items()},
            imgsz=imgsz, split=split, conf=conf,
        )
    seconds = time.monotonic() - t0
    logger.info("start checkpoint %s scored on %d test sets in %.1f s",
                Path(checkpoint).name, len(metrics), seconds)
    return StartScores(metrics=metrics, seconds=seconds, new_classes=new_classes)


_HEADERS = ("test set", "model", "images", "mAP50", "mAP50-95", "INT8 mAP50-95",
            "Δ mAP50-95 vs start", "figures from")


def _cells(table: BeforeAfterTable, row: BeforeAfterRow) -> list[str]:
    delta = table.delta_vs_start(row)
    return [
        row.test_set, f"{row.role} {row.model}", str(row.n_images), f"{row.map50:.3f}",
        f"{row.map50_95:.3f}",
        f"{row.int8_map50_95:.3f}" if row.int8_map50_95 is not None else "n/a",
        f"{round(delta, 3) + 0.0:+.3f}" if delta is not None else "",  # no "-0.000"
        row.figures_from,
    ]


def _caption(table: BeforeAfterTable) -> str:
    return (f"held-out {table.split} split, {table.imgsz} px, PyTorch weights for mAP50/mAP50-95, "
            "the platform's INT8 ONNX export for INT8 (n/a: no INT8 export of that model)")


def render_text(table: BeforeAfterTable) -> list[str]:
    """The table as aligned plain-text lines (for the demo summary)."""
    grid = [list(_HEADERS), *(_cells(table, r) for r in table.rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(_HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return [_caption(table) + ":", *lines, *table.notes]


def render_markdown(table: BeforeAfterTable) -> str:
    lines = ["# Before / after the learning loop", "", _caption(table) + ".", ""]
    lines.append("| " + " | ".join(_HEADERS) + " |")
    lines.append("|" + "---|" * len(_HEADERS))
    lines += ["| " + " | ".join(_cells(table, r)) + " |" for r in table.rows]
    if table.start_eval_seconds is not None:
        lines += ["", f"Scoring the start checkpoint took {table.start_eval_seconds:.0f} s."]
    lines += ["", *(f"- {n}" for n in table.notes)] if table.notes else []
    return "\n".join(lines) + "\n"


def write_before_after(table: BeforeAfterTable, out_dir: Path) -> tuple[Path, Path]:
    """Write the JSON and Markdown files atomically; returns their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME
    for path, text in ((json_path, table.model_dump_json(indent=2)),
                       (md_path, render_markdown(table))):
        write_text_atomic(path, text, parents=True)
    return json_path, md_path
