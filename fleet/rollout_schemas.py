"""Request and response bodies of the rollout routes (``docs/fleet-api.md``, "Model rollouts").

The policy's own types (``Stage``, ``Budgets``, ``StageHealth``) live in
``fleet.rollout_policy``; these models wrap them for the API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from fleet.bounds import (
    MAX_STAGES,
    DeviceCount,
    Fraction,
    HoldSeconds,
    Ms,
    Name,
    PositiveCount,
    PositiveFraction,
    Reason,
)
from fleet.rollout_policy import Budgets, Decision, Mode, Stage, StageHealth

# Operator bodies refuse unknown keys (a typo such as ``hold`` or ``max_error_rat`` would
# otherwise start a rollout on the defaults) and take numbers as JSON numbers only
# (``strict``: ``true`` or ``"0.5"`` is a 422, never coerced to 1 or 0.5).
OPERATOR_BODY = ConfigDict(extra="forbid")


class BudgetsIn(BaseModel):
    """Per-rollout overrides of the gateway's default ``Budgets`` (absent = default)."""

    model_config = OPERATOR_BODY

    max_error_rate: Fraction | None = Field(default=None, strict=True)
    p95_latency_budget_ms: Ms | None = Field(default=None, strict=True)
    min_shadow_f1: Fraction | None = Field(default=None, strict=True)
    min_reporting_fraction: PositiveFraction | None = Field(default=None, strict=True)
    min_frames: PositiveCount | None = Field(default=None, strict=True)
    min_cohort_devices: DeviceCount | None = Field(default=None, strict=True)


class ModelPublished(BaseModel):
    manifest_sha256: str
    sha256: str
    size: int
    model_version: str
    rollout_id: str
    key_id: str
    created: bool


class RolloutCreate(BaseModel):
    model_config = OPERATOR_BODY

    manifest_sha256: str | None = Field(default=None, min_length=64, max_length=64)
    model_version: Name | None = None
    stages: list[Stage] | None = Field(default=None, min_length=1, max_length=MAX_STAGES)
    hold_seconds: HoldSeconds | None = Field(default=None, strict=True)
    budgets: BudgetsIn | None = None


class RollbackRequest(BaseModel):
    model_config = OPERATOR_BODY

    reason: Reason = "manual rollback"


class RolloutOut(BaseModel):
    rollout_id: str
    status: str
    model_version: str
    manifest_sha256: str
    sha256: str
    stage: str
    stage_index: int
    percent: float
    mode: str
    stages: list[Stage]
    cohort_size: int
    devices: int
    hold_seconds: float
    stage_started_at: datetime
    hold_remaining_s: float
    budgets: Budgets
    previous_model_version: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    reason: str | None
    history: list[dict[str, Any]]
    health: dict[str, Any]


class EvaluateOut(BaseModel):
    rollout_id: str
    decision: Decision
    status: str
    stage: str
    percent: float
    health: StageHealth | None
    rollout: RolloutOut


class Assignment(BaseModel):
    mode: Mode
    rollout_id: str | None = None
    stage: str | None = None
    percent: float | None = None
    status: str | None = None
    input_shape: list[int] | None = Field(
        default=None,
        description="[h, w] of the manifest variant that fits this camera's frames (absent: "
        "the manifest's own file).",
    )

    @model_serializer(mode="wrap")
    def _omit_no_shape(self, handler: Any) -> dict[str, Any]:
        """No ``input_shape`` key when there is none: the body stays what older agents saw."""
        data = handler(self)
        if data.get("input_shape") is None:
            data.pop("input_shape", None)
        return data


class ManifestOut(BaseModel):
    assignment: Assignment
    manifest: dict[str, Any] | None = None
    previous_model_version: str | None = None
    baseline: dict[str, Any] | None = Field(
        default=None,
        description="Manifest of the newest other rollout that is complete (not rolled back "
        "since): the fleet's known-good model. A device serving a model of any rollout that is "
        "neither this assignment's nor this one returns to it (also when it has no previous "
        "model); null: no rollout completed, the model each agent was started with is the "
        "known-good one.",
    )
