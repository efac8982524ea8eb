"""Which serving-graph options the split says pay, as ``gpu_serving`` arguments.

``gpu_run.sh all`` runs the split (``benchmarks.gpu_graph_split``), then this, then the
serving benchmark end to end with what it picks, in the same device call. A candidate is
picked only when

- its check against what ships passed in every precision: pixels within one grey level for
  a preprocessing, the same detections (counts, classes, boxes within 1 px) for a
  postprocessing; and
- it was faster than what ships by at least ``--min-gain`` (default 3 %) in every precision,
  at the largest batch measured (the median of the timed runs, ``p50_ms``).

The preprocessing and the postprocessing are picked apart (they are separate models in the
split). Prints one line of arguments (empty when nothing pays) and writes the reasons to
``--why`` as JSON.

    python -m benchmarks.gpu_pick benchmarks/results/gpu_graph_split.json --why pick.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Candidate rows of the split and the gpu_serving arguments that build them into the graph.
PRE_CANDIDATES: dict[str, list[str]] = {"pre_separable": ["--resize", "separable"]}
POST_CANDIDATES: dict[str, list[str]] = {
    "post_cand_1024": ["--max-candidates", "1024"],
    "post_chunk_16": ["--nms-chunk", "16"],
    "post_chunk_32_cand_1024": ["--nms-chunk", "32", "--max-candidates", "1024"],
}
MAX_LEVELS = 1.0 + 1e-3  # rounding only
MAX_BOX_DIFF_PX = 1.0


def _check_passes(name: str, check: dict[str, Any] | None) -> bool:
    if check is None:
        return False
    if name.startswith("pre"):
        return check.get("max_levels", float("inf")) <= MAX_LEVELS
    return bool(check.get("counts_equal") and check.get("classes_equal")
                and check.get("max_box_diff_px", float("inf")) <= MAX_BOX_DIFF_PX)


def pick(split: dict[str, Any], *, min_gain: float = 0.03) -> tuple[list[str], dict[str, Any]]:
    """(gpu_serving arguments, the reasons) from a ``gpu_graph_split`` report."""
    rows = split["rows"]
    batch = max(r["batch"] for r in rows)
    precisions = sorted({r["precision"] for r in rows})
    p50 = {(r["engine"], r["precision"]): r["p50_ms"] for r in rows if r["batch"] == batch}
    why: dict[str, Any] = {"batch": batch, "precisions": precisions, "min_gain": min_gain,
                           "candidates": {}}
    args: list[str] = []
    for shipped, candidates in (("pre", PRE_CANDIDATES), ("post", POST_CANDIDATES)):
        best, best_ms = None, None
        for name in candidates:
            gains, passed = [], True
            for precision in precisions:
                base, mine = p50.get((shipped, precision)), p50.get((name, precision))
                check = split["checks"].get(f"{name} {precision} b{batch}")
                if base is None or mine is None or not _check_passes(name, check):
                    passed = False
                    break
                gains.append(1.0 - mine / base)
            total = sum(p50[(name, p)] for p in precisions) if passed else None
            pays = passed and min(gains) >= min_gain
            why["candidates"][name] = {"check_passed": passed, "gains": gains, "pays": pays}
            if pays and (best_ms is None or total < best_ms):
                best, best_ms = name, total
        why[shipped] = best or shipped
        if best is not None:
            args += candidates[best]
    return args, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", type=Path, help="gpu_graph_split.json")
    ap.add_argument("--min-gain", type=float, default=0.03)
    ap.add_argument("--why", type=Path, help="write the reasons here (JSON)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    args, why = pick(json.loads(a.split.read_text()), min_gain=a.min_gain)
    if a.why is not None:
        a.why.write_text(json.dumps({"args": args, **why}, indent=1))
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
