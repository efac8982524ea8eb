"""What the benchmark report says around its numbers: how the candidate was trained (and
whether that was a smoke run), the context rows, and the promotion gates with their values.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from roadloop.evaluation.gates import GateOutcome
from roadloop.evaluation.results import BenchmarkResults

_DASH = "–"


#: Resource profiles whose training is a smoke run of the loop, not a real training run.
SMOKE_PROFILES = ("demo", "test")


class TrainingProfile(BaseModel):
    """How the candidate was trained, as the report states it (from its MLflow run params)."""

    profile: str  # the resource profile: default | demo | test
    source: str = "central"  # central | federated
    epochs: int | None = None
    imgsz: int | None = None
    start_weights: str | None = None
    rounds: int | None = None  # federated
    local_epochs: int | None = None  # federated

    @classmethod
    def from_params(
        cls, profile: str, params: dict[str, str], source: str = "central"
    ) -> TrainingProfile:
        def num(key: str) -> int | None:
            try:
                return int(float(params[key]))
            except (KeyError, ValueError):
                return None

        return cls(
            profile=profile,
            source=source,
            epochs=num("epochs"),
            imgsz=num("imgsz"),
            start_weights=params.get("model") or params.get("start"),
            rounds=num("rounds"),
            local_epochs=num("local_epochs"),
        )

    def summary(self) -> str:
        """``5 epochs at 320 px from yolo11n.pt (profile demo)``, with what is known."""
        if self.source == "federated":
            parts = ["federated"]
            if self.rounds is not None:
                parts.append(f"{self.rounds} rounds")
            if self.local_epochs is not None:
                parts.append(f"{self.local_epochs} local epoch(s) per round")
            what = ", ".join(parts)
        else:
            what = f"{self.epochs} epochs" if self.epochs is not None else "epochs unknown"
        if self.imgsz is not None:
            what += f" at {self.imgsz} px"
        if self.start_weights:
            what += f" from {self.start_weights}"
        return f"{what} (profile {self.profile})"

    def smoke_note(self) -> str | None:
        """The warning a reader needs when the candidate comes from a smoke-run profile."""
        if self.profile not in SMOKE_PROFILES:
            return None
        return (
            f"{self.profile.capitalize()} profile: the candidate was trained for "
            f"{self.summary().removesuffix(f' (profile {self.profile})')}. This is a short run "
            "that shows the loop working end to end, not a real training run: the accuracy "
            "below says nothing about what the detector reaches with a full schedule and "
            "image size, and gates that pass here only show that the machinery works."
        )


def context_rows(
    results: BenchmarkResults,
    context: dict[str, str] | None = None,
    training: TrainingProfile | None = None,
) -> list[list[str]]:
    """The report's context, one row per fact: model versions (from the results, so a
    ``candidate``/``production`` key in ``context`` does not add a second row), training, then
    the caller's rows."""
    rows = [[f"{m} version", ms.version] for m, ms in results.models.items()]
    if "production" not in results.models:
        rows.append(["production version", "none yet (first candidate)"])
    if training is not None:
        rows.append(["training", training.summary()])
    taken = {k for k, _ in rows} | {m for m in results.models} | {"production"}
    seen = set(taken)
    for k, v in (context or {}).items():
        if k not in seen:
            rows.append([k, str(v)])
            seen.add(k)
    return rows


def gate_rows(gates: Sequence[GateOutcome]) -> tuple[list[str], list[list[str]]]:
    """One row per promotion gate: verdict, what it measured (values and thresholds), why."""
    header = ["Gate", "Result", "Measured", "Explanation"]
    rows = [
        [
            g.name,
            "pass" if g.passed else "FAIL",
            "; ".join(f"{k} {_value(v)}" for k, v in g.measured.items()) or _DASH,
            g.description,
        ]
        for g in gates
    ]
    return header, rows


def _value(v: float | str) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
