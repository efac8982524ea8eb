"""Request and response bodies of the gateway API (``docs/fleet-api.md``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.bounds import (
    FLOAT_MAX,
    INT32_MAX,
    MAX_SCOPES,
    ClassId,
    ClassName,
    Coord,
    EventTime,
    Fraction,
    JsonObject,
    Name,
    Pixels,
    SchemaVersion,
    Scope,
    TokenTtl,
    check_json_value,
)
from fleet.db import DeviceStatus
from fleet.heartbeat_plausibility import heartbeat_problems
from roadloop.data.frame_records import Detection, FrameId

MAX_DETECTIONS = 2000
MAX_REASONS = 32


class ErrorOut(BaseModel):
    """Every error body: one message a client can act on."""

    detail: str


class Health(BaseModel):
    status: str = "ok"


# --------------------------------------------------------------------------- enrollment
class EnrollRequest(BaseModel):
    enrollment_token: str = Field(min_length=1, max_length=200)
    camera_id: FrameId
    agent_version: str = Field(min_length=1, max_length=100)
    hardware: JsonObject | None = None


class EnrollResponse(BaseModel):
    device_id: str
    access_token: str
    refresh_token: str
    expires_in: int
    scopes: list[str]
    gateway_public_key: str | None = None
    model_public_key: str | None = Field(
        default=None, description="Ed25519 key (base64) that signs model manifests; pin it."
    )


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=200)


class TokenResponse(BaseModel):
    access_token: str
    refresh_token: str
    expires_in: int


class EnrollmentTokenCreate(BaseModel):
    """Admin: mint a one-time enrollment token (same as ``roadloop fleet token create``).
    Unknown keys are a 422 (a typo must not mint a token with defaults); ``ttl_s`` and
    ``require_verification`` must be a JSON number and a JSON boolean."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Scope] = Field(
        default_factory=lambda: ["camera:write"], min_length=1, max_length=MAX_SCOPES,
        description="At least one; absent means camera:write.",
    )
    ttl_s: TokenTtl | None = Field(default=None, strict=True,
                                   description="Default: the gateway setting.")
    camera_id: FrameId | None = Field(
        default=None, description="Bind the token to this camera; other cameras get 403."
    )
    require_verification: bool = Field(
        default=False, strict=True, description="Devices start pending_verification until an admin acts."
    )
    label: Name | None = None


class EnrollmentTokenOut(BaseModel):
    enrollment_token: str
    expires_at: datetime
    scopes: list[str]
    camera_id: str | None
    require_verification: bool


# --------------------------------------------------------------------------- devices / audit
class DeviceOut(BaseModel):
    device_id: str
    camera_id: str
    status: DeviceStatus
    scopes: list[str]
    agent_version: str
    hardware: dict[str, Any] | None
    enrolled_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    revoked_at: datetime | None
    status_reason: str | None


class DeviceStatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: DeviceStatus
    reason: str | None = Field(default=None, max_length=500)


class AuditEventOut(BaseModel):
    id: int
    at: datetime
    action: str
    outcome: str
    actor: str | None
    device_id: str | None
    token_id: int | None
    client: str | None
    detail: dict[str, Any] | None


# --------------------------------------------------------------------------- frames
class QualityIn(BaseModel):
    """Edge-computed ``roadloop.data.frame_quality.FrameQuality`` values of an upload; the
    gateway keeps what the agent sent and computes only what is missing."""

    model_config = ConfigDict(allow_inf_nan=False)

    brightness: float | None = Field(default=None, ge=0.0, le=255.0,
                                     description="Mean luma (grey level), 0-255.")
    sharpness: float | None = Field(default=None, ge=0.0, le=1020.0**2,  # Laplacian in ±4·255
                                    description="Variance of the Laplacian of the grey image.")
    dhash: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$",
                              description="64-bit difference hash, hex.")


class RedactionIn(BaseModel):
    """What the agent removed from the pixels before the frame left it
    (``edge_agent.redaction``): regions per kind, the method and the redactor's version."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["blur", "mask", "off"]
    version: str = Field(default="", max_length=300)
    counts: dict[Annotated[str, Field(min_length=1, max_length=32)],
                 Annotated[int, Field(ge=0, le=100_000)]] = Field(
        default_factory=dict, max_length=8, description="Regions redacted per kind.")
    area_share: float = Field(default=0.0, ge=0.0, le=1.0,
                              description="Share of the image area redacted.")


class DetectionIn(Detection):
    """``roadloop.data.frame_records.Detection`` as an upload may state it: bounded."""

    class_id: ClassId
    class_name: ClassName
    confidence: Fraction
    xyxy: tuple[Coord, Coord, Coord, Coord]


class FrameMetadata(BaseModel):
    """The ``metadata`` form field of ``POST /v1/frames``. Unknown keys are ignored; NaN and
    Infinity are refused everywhere (a sidecar cannot hold them: JSON has no such numbers)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    frame_id: FrameId
    camera_id: FrameId
    captured_at: EventTime
    reasons: list[str] = Field(default_factory=list, max_length=MAX_REASONS)
    importance: float = Field(default=1.0, ge=0.0, le=1e6)
    model_version: Name | None
    detections: list[DetectionIn] = Field(default_factory=list, max_length=MAX_DETECTIONS)
    width: Pixels
    height: Pixels
    quality: QualityIn | None = Field(
        default=None,
        description="Edge-computed quality, stored as sent; the gateway computes the values "
        "that are absent.",
    )
    source_ref: str | None = Field(
        default=None, max_length=500, description="Origin of the pixels, for leakage checks."
    )
    redaction: RedactionIn | None = Field(
        default=None, description="What the agent redacted (people, faces, plates) and how.")

    @field_validator("reasons")
    @classmethod
    def _short_reasons(cls, v: list[str]) -> list[str]:
        for r in v:
            if not r or len(r) > 64:
                raise ValueError("each reason must be 1-64 characters")
        return v


class FrameStored(BaseModel):
    frame_id: str
    stored: bool = True


# --------------------------------------------------------------------------- heartbeats
# Indexed column -> (payload keys tried in order, type); nested keys are "a.b". The values are
# copied into the heartbeats table (fleet.heartbeats), so HeartbeatIn bounds them to fit
# (INTEGER is 32-bit on PostgreSQL).
HEARTBEAT_COLUMNS: dict[str, tuple[tuple[str, ...], type]] = {
    "fps": (("fps", "frames_per_s"), float),
    "latency_p50_ms": (("latency_p50_ms", "latency_ms.p50"), float),
    "latency_p95_ms": (("latency_p95_ms", "latency_ms.p95"), float),
    "errors": (("errors", "error_count"), int),
    "dropped_frames": (("dropped_frames",), int),
    "outbox_depth": (("outbox_depth",), int),
}


def dotted(payload: dict[str, Any], key: str) -> Any:
    """``payload["a"]["b"]`` for ``"a.b"``; None where a level is missing or not an object."""
    cur: Any = payload
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class HeartbeatIn(BaseModel):
    """Gateway-side view of ``edge_agent.heartbeat.Heartbeat``: required keys checked, the
    rest kept as-is (the agent owns the full, versioned schema) once the numbers health is
    computed from are plausible (``fleet.heartbeat_plausibility``; else 422 naming them)."""

    model_config = ConfigDict(extra="allow")

    schema_version: SchemaVersion
    camera_id: FrameId
    sent_at: EventTime
    model_version: Name | None
    # the camera's frame size (optional: older agents do not send it; fleet.rollout_shapes)
    frame_width: Pixels | None = None
    frame_height: Pixels | None = None
    # the traffic record outbox (optional: older agents do not send them; docs/traffic.md)
    record_outbox_depth: int | None = Field(
        default=None, ge=0, description="Traffic interval records queued on the agent.")
    record_outbox_evicted_total: int | None = Field(
        default=None, ge=0, description="Traffic records dropped from the agent's full record "
        "outbox since it was created (counts lost for good).")
    # privacy (optional: older agents do not send them; docs/privacy.md). Free strings, not
    # a closed list: a newer agent's mode or kind must not get its heartbeat refused.
    privacy_mode: str | None = Field(default=None, min_length=1, max_length=32,
                                     description="Redaction method in force: blur|mask|off.")
    redaction_gaps: list[Annotated[str, Field(min_length=1, max_length=32)]] | None = Field(
        default=None, max_length=8,
        description="Kinds the camera's redaction cannot remove (person, face, plate): "
        "uploaded frames show them unredacted (fleet.metrics: camera problem redaction_gap).")

    @model_validator(mode="before")
    @classmethod
    def _bounded_payload(cls, data: Any) -> Any:
        """The whole payload is kept as JSON: bounded like any free-form JSON, and the numbers
        copied into the indexed columns (``HEARTBEAT_COLUMNS``) must fit them."""
        if isinstance(data, dict):
            check_json_value(data)
            for keys, typ in HEARTBEAT_COLUMNS.values():
                limit = INT32_MAX if typ is int else FLOAT_MAX
                for key in keys:
                    value = dotted(data, key)
                    if (isinstance(value, (int, float)) and not isinstance(value, bool)
                            and abs(value) > limit):
                        raise ValueError(f"{key} = {value!r} is out of range (at most "
                                         f"{limit:.0f} in magnitude)")
        return data

    @model_validator(mode="after")
    def _plausible(self) -> HeartbeatIn:
        problems = heartbeat_problems(self.model_extra or {})
        if problems:
            raise ValueError("implausible heartbeat: " + "; ".join(problems[:8]))
        return self


class HeartbeatAccepted(BaseModel):
    heartbeat_id: int
    stored: bool = True
    duplicate: bool = False


class HeartbeatOut(BaseModel):
    id: int
    camera_id: str
    device_id: str
    sent_at: datetime
    received_at: datetime
    schema_version: int
    model_version: str | None
    fps: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    errors: int | None
    dropped_frames: int | None
    outbox_depth: int | None
    payload: dict[str, Any]
