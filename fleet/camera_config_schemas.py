"""A camera's configuration document and the bodies of ``/v1/cameras/{camera_id}/config``.

``CameraConfig`` is the whole run-time configuration of one camera, one section per concern.
Sections: ``sampling`` (the agent's base rate, hourly budget and a temporary boost),
``traffic`` (counting lines, zones, the homography to metres, PCU weights: the geometry of
traffic analytics) and ``notes``. Later sections are added as new optional fields; an agent
that does not know a section ignores it (``edge_agent.camera_config``), so a newer document
never breaks an older agent.

``traffic`` is checked by ``edge_agent.traffic.geometry.parse_traffic_section``, the parser
the agent itself runs: the gateway and the agent must agree on what a valid geometry is, so
they share one validator (its ``ValueError`` is a 422 naming the field) and the document is
stored as given. The gateway refuses unknown keys (``extra="forbid"``): a typo
is a 422, never a setting silently dropped. Numbers are JSON numbers (``strict``): ``true`` or
``"0.5"`` is a 422, never coerced (``base_rate: true`` would read as 1.0, every frame).

Canonical form (what is stored, hashed and handed to agents): ``model_dump(mode="json",
exclude_none=True)`` — only the settings given, times in UTC — serialised like a manifest
(``sort_keys``, no spaces, UTF-8). Its SHA-256 identifies a version; writing the same
document again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from edge_agent.traffic.geometry import parse_traffic_section
from fleet.bounds import INT32_MAX, Fraction, Reason, Timestamp, check_json_value, gateway_now

MAX_BOOST_S = 30 * 86400  # a boost is temporary: at most 30 days past the gateway's clock
MAX_HOURLY_BUDGET = 100_000.0


def _boost_end(value: datetime) -> datetime:
    """UTC, and no later than ``MAX_BOOST_S`` after the gateway's clock (the later of the
    request's clock and the wall clock, as for ``EventTime``)."""
    now = datetime.now(UTC)
    reference = gateway_now.get()
    if reference is not None and reference > now:
        now = reference
    if value > now + timedelta(seconds=MAX_BOOST_S):
        raise ValueError(f"a boost lasts at most {MAX_BOOST_S // 86400} days: until "
                         f"{value.isoformat()} is later than that after the gateway's clock "
                         f"({now.isoformat(timespec='seconds')})")
    return value.astimezone(UTC)


BoostEnd = Annotated[Timestamp, AfterValidator(_boost_end)]


class SamplingBoost(BaseModel):
    """Multiply the base rate (capped at 1) and the hourly budget by ``factor`` until
    ``until`` (the agent's clock); then the configured rates apply again by themselves."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    factor: float = Field(ge=1.0, le=20.0, strict=True)
    until: BoostEnd
    reason: str = Field(min_length=1, max_length=200)


class SamplingConfig(BaseModel):
    """The agent's sampler (``edge_agent.samplers``); an absent value keeps the agent's own
    (its command line / defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_rate: Fraction | None = Field(
        default=None, strict=True, description="Share of all frames sampled at random, 0-1.")
    hourly_budget: float | None = Field(
        default=None, gt=0.0, le=MAX_HOURLY_BUDGET, strict=True,
        description="Frames per hour the camera may upload (token bucket).")
    boost: SamplingBoost | None = None


def _traffic_section(section: dict[str, Any]) -> dict[str, Any]:
    """The section unchanged when the agent's parser accepts it (plain, bounded JSON too)."""
    check_json_value(section)
    try:
        parse_traffic_section(section)
    except ValueError:
        raise
    except Exception as exc:  # whatever the parser trips on is the input's fault
        raise ValueError(f"traffic section is invalid ({type(exc).__name__}: {exc})"
                         [:500]) from exc
    return section


TrafficSection = Annotated[
    dict[str, Any],
    AfterValidator(_traffic_section),
    Field(description="Counting lines, zones, homography, PCU weights (docs/traffic.md); "
          "checked by edge_agent.traffic.geometry.parse_traffic_section."),
]


class PrivacyConfig(BaseModel):
    """How the camera's agent redacts people, faces and licence plates before a frame is
    queued (docs/privacy.md): blurred (default), masked, or not at all."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["blur", "mask", "off"] = Field(
        default="blur", description="blur (default), mask (solid fill) or off.")


class CameraConfig(BaseModel):
    """One camera's configuration document (every section optional; a new concern is a new
    section beside ``sampling`` and ``traffic``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sampling: SamplingConfig | None = None
    traffic: TrafficSection | None = None
    privacy: PrivacyConfig | None = None
    notes: str | None = Field(default=None, max_length=1000)

    def canonical(self) -> dict[str, Any]:
        """The stored form: only what is set, JSON types, times in UTC."""
        return self.model_dump(mode="json", exclude_none=True)


def canonical_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def document_sha256(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(document)).hexdigest()


def config_etag(version: int, sha256: str) -> str:
    """Strong ETag of a camera's current config: the version, and a prefix of its hash so a
    re-created database cannot answer an agent's stale version with a 304."""
    return f'"{version}-{sha256[:16]}"'


class CameraConfigPut(BaseModel):
    """``PUT /v1/cameras/{camera_id}/config``."""

    model_config = ConfigDict(extra="forbid")

    config: CameraConfig
    expected_version: int | None = Field(
        ge=0, le=INT32_MAX, strict=True,
        description="The version this change is based on (0: the camera has none yet); a "
        "stale one is a 409. null writes whatever the current version is.")
    reason: Reason


class CameraConfigOut(BaseModel):
    """A camera's current configuration (version 0, an empty document: none set yet)."""

    camera_id: str
    version: int
    sha256: str
    config: dict[str, Any]
    updated_at: datetime | None
    updated_by: str | None
    changed: bool | None = Field(
        default=None, description="PUT only: false when the document was already current.")


class CameraConfigVersionOut(BaseModel):
    """One entry of a camera's configuration history."""

    camera_id: str
    version: int
    sha256: str
    config: dict[str, Any]
    created_at: datetime
    created_by: str | None
    reason: str | None
