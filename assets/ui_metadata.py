"""Metadata the Dagster UI shows for the benchmark report, its comparison check and the review
queue, in the types the UI renders: floats/ints (the Plots tab draws them across
materializations), tables with a schema (rendered inline), and markdown short enough
(< 1000 characters) for the UI to render inline instead of behind "Show Markdown".
"""

from pathlib import Path

import dagster as dg

from roadloop.evaluation.gates import CANDIDATE, DEPLOYED_FORMAT, PRODUCTION, GateOutcome
from roadloop.evaluation.report import key_table_markdown, n_frames, primary_test_set
from roadloop.evaluation.report_context import TrainingProfile
from roadloop.evaluation.results import FORMAT_LABELS, BenchmarkResults
from roadloop.evaluation.testsets import SLICE_DESCRIPTIONS

#: The UI renders a markdown value inline below this many characters (Dagster's MetadataEntry).
INLINE_MARKDOWN_CHARS = 1000

EXPECTED_CLASS_MIX_HELP = (
    "Expected objects per class in this review batch: the sum of the pre-annotation "
    "confidences of that class over the queued frames, i.e. about how many boxes of each class "
    "annotators will check. A rare class here is what the rarity score asked for."
)


def mlflow_artifact_url(ui_base: str, experiment_id: str, run_id: str, artifact: str) -> str:
    """The MLflow UI page of one run artifact (the UI renders an HTML artifact in place)."""
    return (f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
            f"/artifactPath/{artifact.lstrip('/')}")


def _test_set_what(results: BenchmarkResults, name: str) -> str:
    kind = results.test_set_kinds.get(name, "")
    if kind == "all":
        return "every held-out test frame"
    if kind == "source":
        return f"test frames from source {name} (domain shift)"
    if kind == "slice":
        return f"synthetic corruption of every test frame: {SLICE_DESCRIPTIONS.get(name, name)}"
    return kind or "test set"


def testsets_table(results: BenchmarkResults) -> dg.TableMetadataValue:
    schema = dg.TableSchema(columns=[
        dg.TableColumn("test_set", "string"),
        dg.TableColumn("kind", "string", description="all | source | slice (synthetic corruption)"),
        dg.TableColumn("frames", "int", description="frames the benchmark evaluated"),
        dg.TableColumn("what", "string"),
    ])
    records = [
        dg.TableRecord({"test_set": t, "kind": results.test_set_kinds.get(t, ""),
                        "frames": n_frames(results, t), "what": _test_set_what(results, t)})
        for t in results.test_sets
    ]
    return dg.MetadataValue.table(records, schema)


def per_class_table(results: BenchmarkResults, fmt: str = DEPLOYED_FORMAT) -> dg.TableMetadataValue:
    """Per-class AP of the candidate (and production) in the deployed format, primary test set."""
    ts = primary_test_set(results)
    cand, prod = results.get(CANDIDATE, fmt, ts), results.get(PRODUCTION, fmt, ts)
    label = FORMAT_LABELS.get(fmt, fmt)
    columns = [
        dg.TableColumn("class", "string"),
        dg.TableColumn("ap50", "float", description=f"candidate AP50, {label}, test set {ts}"),
        dg.TableColumn("ap50_95", "float", description=f"candidate AP50-95, {label}, test set {ts}"),
        dg.TableColumn("count_mae", "float", description="mean |predicted - labelled| boxes per frame"),
        dg.TableColumn("absent", "bool", description="no ground truth in the test set: no AP"),
    ]
    if prod is not None:
        columns.append(dg.TableColumn("production_ap50_95", "float",
                                      description=f"production AP50-95, {label}, test set {ts}"))
    records = []
    for c in (cand.per_class_count_mae if cand is not None else {}):
        row: dict[str, str | float | bool | None] = {
            "class": c,
            "ap50": cand.per_class_ap50.get(c),
            "ap50_95": cand.per_class_ap50_95.get(c),
            "count_mae": cand.per_class_count_mae.get(c),
            "absent": c in cand.absent_classes,
        }
        if prod is not None:
            row["production_ap50_95"] = prod.per_class_ap50_95.get(c)
        records.append(dg.TableRecord(row))
    return dg.MetadataValue.table(records, dg.TableSchema(columns=columns))


def gates_table(gates: list[GateOutcome]) -> dg.TableMetadataValue:
    schema = dg.TableSchema(columns=[
        dg.TableColumn("gate", "string"),
        dg.TableColumn("passed", "bool"),
        dg.TableColumn("explanation", "string", description="measured values and thresholds"),
    ])
    return dg.MetadataValue.table(
        [dg.TableRecord({"gate": g.name, "passed": g.passed, "explanation": g.description})
         for g in gates],
        schema,
    )


def headline_numbers(results: BenchmarkResults) -> dict[str, dg.MetadataValue]:
    """Numeric metadata for the Plots tab: the candidate's accuracy per format, the INT8 drop,
    P95/mean latency per format and batch size, counting error; production's deployed mAP."""
    ts = primary_test_set(results)
    out: dict[str, dg.MetadataValue] = {}
    deployed = results.get(CANDIDATE, DEPLOYED_FORMAT, ts)
    if deployed is not None:
        out["map50"] = dg.MetadataValue.float(deployed.map50)
        out["map50_95"] = dg.MetadataValue.float(deployed.map50_95)
        out["recall"] = dg.MetadataValue.float(deployed.recall)
        out["test_frames"] = dg.MetadataValue.int(deployed.n_images)
    for fmt in results.formats(CANDIDATE):
        met = results.get(CANDIDATE, fmt, ts)
        if met is not None:
            out[f"map50_{fmt}"] = dg.MetadataValue.float(met.map50)
            out[f"map50_95_{fmt}"] = dg.MetadataValue.float(met.map50_95)
    ref = results.get(CANDIDATE, "onnx_fp32", ts) or results.get(CANDIDATE, "pytorch", ts)
    if deployed is not None and ref is not None:
        out["int8_drop_points"] = dg.MetadataValue.float((ref.map50_95 - deployed.map50_95) * 100)
    prod = results.get(PRODUCTION, DEPLOYED_FORMAT, ts)
    if prod is not None:
        out["production_map50_95"] = dg.MetadataValue.float(prod.map50_95)
    for row in results.latency_rows:
        if row.model == CANDIDATE:
            key = f"{row.format}_b{row.stats.batch}"
            out[f"p95_ms_{key}"] = dg.MetadataValue.float(row.stats.p95_ms)
            out[f"frames_per_s_{key}"] = dg.MetadataValue.float(row.stats.frames_per_s)
    counting = next((r for r in results.counting_rows
                     if r.model == CANDIDATE and r.format == DEPLOYED_FORMAT), None)
    if counting is not None:
        if counting.rel_error is not None:
            out["count_rel_error"] = dg.MetadataValue.float(counting.rel_error)
        out["idf1"] = dg.MetadataValue.float(counting.idf1)
    return out


def benchmark_metadata(
    results: BenchmarkResults,
    gates: list[GateOutcome],
    *,
    markdown: Path,
    html: Path,
    html_url: str | None,
    training: TrainingProfile | None,
) -> dict[str, dg.MetadataValue]:
    """``benchmark_report``'s materialization metadata, the key table first."""
    ts = primary_test_set(results)
    note = training.smoke_note() if training is not None else None
    key_md = key_table_markdown(results)
    lead = f"Test set `{ts}`; {'all gates pass' if all(g.passed for g in gates) else 'blocked'}."
    if note:
        lead = f"**Not a real training run** ({training.summary()}). " + lead
    if len(lead) + len(key_md) + 2 < INLINE_MARKDOWN_CHARS:
        key_md = f"{lead}\n\n{key_md}"
    md: dict[str, dg.MetadataValue] = {
        "key_table": dg.MetadataValue.md(key_md),
        "candidate_version": dg.MetadataValue.text(results.models[CANDIDATE].version
                                                   if CANDIDATE in results.models else "?"),
        "production_version": dg.MetadataValue.text(results.models[PRODUCTION].version
                                                    if PRODUCTION in results.models else "none"),
        **headline_numbers(results),
        "gates": gates_table(gates),
        "per_class": per_class_table(results),
        "test_sets": testsets_table(results),
    }
    if training is not None:
        md["training"] = dg.MetadataValue.text(training.summary())
    if html_url:
        md["html_report"] = dg.MetadataValue.url(html_url)
    md["html"] = dg.MetadataValue.path(str(html))
    md["report"] = dg.MetadataValue.md(markdown.read_text())
    return md


def comparison_metadata(outcome: GateOutcome, results: BenchmarkResults,
                        comparison_format: str, test_set: str) -> dict[str, dg.MetadataValue]:
    """The comparison check's metadata: candidate score, production score (or none) and the
    margin left before the check fails (delta + tolerance), plus what the gate measured."""
    fmt = str(outcome.measured.get("format", comparison_format))
    cand = results.get(CANDIDATE, fmt, test_set)
    prod = results.get(PRODUCTION, fmt, test_set)
    md: dict[str, dg.MetadataValue] = {}
    if cand is not None:
        md["candidate_map50_95"] = dg.MetadataValue.float(cand.map50_95)
        md["candidate_map50"] = dg.MetadataValue.float(cand.map50)
    if prod is not None and cand is not None:
        tol = float(outcome.measured.get("tolerance_map50_95", 0.0))
        delta = cand.map50_95 - prod.map50_95
        md["production_map50_95"] = dg.MetadataValue.float(prod.map50_95)
        md["delta_map50_95"] = dg.MetadataValue.float(delta)
        md["margin_map50_95"] = dg.MetadataValue.float(delta + tol)
    for k, v in outcome.measured.items():
        md.setdefault(k, dg.MetadataValue.float(v) if isinstance(v, float) else
                      dg.MetadataValue.text(str(v)))
    return md


def histogram_markdown(hist: dict[str, list[float]], width: int = 20) -> str:
    """A markdown bar chart of a score histogram (``{"edges", "counts"}``), one row per bin."""
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    top = max(counts, default=0) or 1
    lines = ["| total score | frames | |", "|---|---:|---|"]
    for lo, hi, n in zip(edges, edges[1:], counts):
        bar = "█" * round(width * n / top)
        lines.append(f"| {lo:.2f}–{hi:.2f} | {int(n)} | {bar} |")
    return "\n".join(lines) + "\n"


def class_mix_table(mix: dict[str, float]) -> dg.TableMetadataValue:
    schema = dg.TableSchema(columns=[
        dg.TableColumn("class", "string"),
        dg.TableColumn("expected_objects", "float", description=EXPECTED_CLASS_MIX_HELP),
    ])
    return dg.MetadataValue.table(
        [dg.TableRecord({"class": c, "expected_objects": round(v, 2)}) for c, v in mix.items()],
        schema,
    )
