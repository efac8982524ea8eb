"""One settings object for the whole platform.

Everything lives under ``home`` (default ``.roadloop/`` in the working directory) unless a
``ROADLOOP_*`` environment variable moves it: ``ROADLOOP_HOME``, ``ROADLOOP_MLFLOW_TRACKING_URI``,
``ROADLOOP_DVC_REMOTE_URL`` (any DVC remote, e.g. ``s3://bucket/roadloop``), and so on.
Paths left unset are derived from ``home`` so moving ``home`` moves them all.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from roadloop.models.shape_specs import read_shape_spec

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
DEFAULT_TAXONOMY_FILE = PACKAGE_DIR / "config" / "taxonomy.yaml"

# What an explicitly empty path or URL setting is told (Settings._not_empty).
_EMPTY_PATH = "unset it for the default, or give a path"
_EMPTY_ADVICE = {
    **{f: "unset it for the default, or give a URL" for f in (
        "mlflow_tracking_uri", "dvc_remote_url", "frame_store_url", "mlflow_artifact_uri",
        "gateway_url")},
    # An empty name reached Ultralytics / MLflow as "" and failed deep inside a run.
    **dict.fromkeys(("train_model", "registered_model_name", "mlflow_experiment"),
                    "unset it for the default, or give a name"),
}

class Settings(BaseSettings):
    """Paths, service URLs and defaults. Override any field with ``ROADLOOP_<FIELD>``."""

    # No setting is a number that inf or nan could mean (see GatewaySettings).
    model_config = SettingsConfigDict(env_prefix="ROADLOOP_", extra="ignore",
                                      allow_inf_nan=False)

    home: Path = Field(default=Path(".roadloop"), description="Root of all local state.")
    shared_dir: Path = Field(
        default=PROJECT_ROOT.parent / "shared",
        description="Read-only real data: datasets/, videos/, models/.",
    )

    # Storage locations (derived from home when unset).
    dagster_home: Path | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_artifact_root: Path | None = None
    dvc_repo: Path | None = None
    dvc_remote_url: str | None = None
    frame_store: Path | None = None
    # Object storage shared by gateway replicas and the platform (docs/storage.md): frames at
    # s3://bucket/prefix (``frame_store`` is then the local image cache), MLflow artifacts at
    # an s3:// URI; the endpoint of a non-AWS server (MinIO, Ceph); credentials from the
    # standard AWS_* variables.
    frame_store_url: str | None = Field(
        default=None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://bucket/prefix: frames in S3-compatible object storage.",
    )
    s3_endpoint_url: str | None = None
    mlflow_artifact_uri: str | None = Field(
        default=None, description="e.g. s3://bucket/mlflow: overrides mlflow_artifact_root.",
    )
    artifacts_dir: Path | None = None
    privacy_dir: Path | None = None  # erasure journals, exclusions, audit (roadloop.retention)

    # Service ports / URLs on loopback.
    dagster_port: int = Field(default=3000, ge=1, le=65535)
    mlflow_port: int = Field(default=5000, ge=1, le=65535)
    fiftyone_port: int = Field(default=5151, ge=1, le=65535)
    gateway_port: int = Field(default=8700, ge=1, le=65535)
    gateway_url: str | None = None

    # Which resource values Definitions gets (resources/__init__.py): refused when the
    # settings load if it is none of these (a demo with a bad profile wrote its folders first).
    profile: Literal["default", "demo", "test"] = "default"
    # Start weights: the real pretrained name; falls back to ../shared/models, then the YAML.
    train_model: str = "yolo11n.pt"
    demo_epochs: int = Field(default=5, ge=1)

    # INT8 promotion gate (roadloop.evaluation.gates.GateConfig; why these values:
    # benchmarks/results/int8_drop.md): mAP50-95 lost against fp32, in points (0.01) and per
    # cent, overall and per class with at least int8_class_min_instances ground-truth boxes.
    int8_max_drop_points: float = Field(default=1.5, ge=0)
    int8_max_drop_pct: float = Field(default=15.0, ge=0)
    int8_class_max_drop_points: float = Field(default=3.0, ge=0)
    int8_class_max_drop_pct: float = Field(default=25.0, ge=0)
    int8_class_min_instances: int = Field(default=50, ge=1)

    # Input shapes every model is exported, quantized, gated and rolled out at
    # (roadloop.models.shapes; docs/fleet-api.md "Rectangular models"): "square" (imgsz x imgsz),
    # an aspect "W:H" (long side imgsz, short side rounded up to a multiple of 32: 16:9 at 320
    # is 192x320) or an explicit "HxW". The gateway serves each camera the one fitting its frames.
    # From the environment: comma-separated (ROADLOOP_EXPORT_SHAPES=square: no rectangles).
    export_shapes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["square", "16:9"], min_length=1
    )

    # Model registry.
    registered_model_name: str = "roadloop-detector"
    mlflow_experiment: str = "roadloop"

    # Class taxonomy shared by every source (see roadloop/config/taxonomy.yaml).
    taxonomy_file: Path = DEFAULT_TAXONOMY_FILE

    # The FiftyOne review queue (docs/review.md has the measurements behind the defaults):
    # ground_truth drafts keep boxes at or above review_draft_conf, one per object
    # (class-agnostic NMS at review_draft_nms_iou; roadloop.labeling.drafts), and frames with
    # more isolated impulse pixels than review_max_impulse_share (salt-and-pepper augmented
    # dataset frames; roadloop.labeling.frame_noise) are not queued (1.0 queues every frame).
    review_draft_conf: float = Field(default=0.40, ge=0.0, le=1.0)
    review_draft_nms_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    review_max_impulse_share: float = Field(default=0.001, ge=0.0, le=1.0)

    # Label QA (roadloop.labeling.label_quality, the label_quality asset). cleanlab assumes
    # calibrated probabilities: its overlooked/swap checks see only predictions above 0.95,
    # which YOLO confidences never reach. Measured on atl_v2 val+test with the gpu checkpoint
    # (benchmarks/results/label_qa.md, roadloop.labeling.label_qa_calibration):
    # label_qa_high_probability is the confidence at which predictions are 95 % precise; with
    # label_qa_flag_by="score" an image is flagged when its label quality score is below
    # label_qa_max_quality (which flags 10 % of those images with their original labels).
    # 0.95 and "boxes" are cleanlab's own behaviour (images flagged by its per-box checks).
    # Measured values do not carry across datasets or models (docs/review.md): re-measure.
    label_qa_high_probability: float = Field(default=0.716, gt=0.0, le=1.0)
    label_qa_flag_by: Literal["score", "boxes"] = "score"
    label_qa_max_quality: float = Field(default=0.309, ge=0.0, le=1.0)

    # Near-duplicate sampled frames (roadloop.data.curation.DedupePolicy): dhash bits, how far back
    # a kept frame counts, and per-camera bit thresholds, e.g.
    # ROADLOOP_DEDUPE_PER_CAMERA_MAX_HAMMING='{"window_street": 0}'.
    dedupe_max_hamming: int = Field(default=4, ge=0, le=64)
    dedupe_max_age_s: float | None = Field(
        default=600.0, gt=0,
        description="Seconds back a kept frame still counts (finite; None: any time).")
    dedupe_per_camera_max_hamming: dict[str, Annotated[int, Field(ge=0, le=64)]] = Field(
        default_factory=dict)

    # Share of each labelled source's *train* split replayed as camera traffic instead of
    # entering the seed training set (val/test splits are never replayed).
    replay_fraction: float = Field(default=0.3, ge=0.0, le=1.0)

    # Drift monitoring (roadloop.monitoring; docs/drift.md). Windows are this many minutes
    # (a divisor of 60 or a multiple of 60); scores >= minor raise the camera's sampling for
    # drift_boost_minutes, >= significant also queue reviews and a learning_loop run, at most
    # once per camera per drift_cooldown_minutes.
    drift_window_minutes: int = Field(default=15, ge=1, le=1440)
    drift_start: date = Field(default=date(2026, 11, 1), description="First drift window (UTC).")
    drift_minor: float = Field(default=0.1, gt=0, le=1)
    drift_significant: float = Field(default=0.2, gt=0, le=1)
    drift_reference_windows: int = Field(default=4, ge=2, le=96)
    drift_boost_factor: float = Field(default=4.0, ge=1, le=20)
    # The three durations become timedeltas added to "now" on every drift sensor tick: finite
    # and bounded, since inf or 1e12 s raised OverflowError there on each tick.
    drift_boost_minutes: float = Field(
        default=120.0, gt=0, le=30 * 1440,
        description="How long a drifting camera samples more. At most 43200 (30 days): the "
        "gateway refuses a longer boost (fleet.camera_config_schemas.MAX_BOOST_S).")
    drift_cooldown_minutes: float = Field(
        default=360.0, ge=0, le=366 * 1440,
        description="At most one drift response per camera this often. At most 527040 "
        "(366 days): a longer cooldown is a camera that never gets a response.")
    drift_grace_s: float = Field(
        default=90.0, ge=0, le=86400,
        description="Wait after a window closes. At most 86400 (a day, the longest window): "
        "a longer wait only holds every drift score back.")

    # Traffic analytics (roadloop.traffic; docs/traffic.md): the first day of the daily
    # traffic_counts partitions (UTC).
    traffic_start: date = Field(default=date(2026, 11, 1), description="First traffic day (UTC).")

    # Minimum quality of any promoted model (roadloop.evaluation.gates.QualityFloor, where the
    # defaults are reasoned; docs/architecture.md, "Promotion gates"): overall mAP50, and AP50
    # per class with at least min_class_support labelled boxes in the test set. The demo
    # profile promotes under the relaxed demo_* floors and says so.
    min_map50: float = Field(default=0.10, ge=0, le=1)
    min_class_ap50: float = Field(default=0.01, ge=0, le=1)
    min_class_support: int = Field(default=10, ge=1)
    demo_min_map50: float = Field(default=0.02, ge=0, le=1)
    demo_min_class_ap50: float = Field(default=0.0, ge=0, le=1)

    # Retention (roadloop.retention.policy; docs/retention.md): days each kind is kept.
    retention_raw_frames_days: float = Field(default=30.0, gt=0, le=36500)
    retention_heartbeats_days: float = Field(default=30.0, gt=0, le=36500)
    retention_traffic_days: float = Field(default=90.0, gt=0, le=36500)

    @field_validator("home", "shared_dir", "dagster_home", "mlflow_artifact_root", "dvc_repo",
                     "frame_store", "artifacts_dir", "privacy_dir", "taxonomy_file",
                     "mlflow_tracking_uri", "dvc_remote_url", "frame_store_url",
                     "mlflow_artifact_uri", "gateway_url", "train_model", "registered_model_name",
                     "mlflow_experiment", mode="before")
    @classmethod
    def _not_empty(cls, value: object, info: ValidationInfo) -> object:
        # Path("") is the current directory and "" no URL at all: ROADLOOP_HOME= would make
        # every command (clean included) work in whatever folder it was started from. Unset
        # (not empty) is how a variable asks for the default.
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"is empty: {_EMPTY_ADVICE.get(str(info.field_name), _EMPTY_PATH)}")
        return value

    @field_validator("s3_endpoint_url", mode="before")
    @classmethod
    def _aws_when_empty(cls, value: object) -> object:
        # Empty is how a manifest says "AWS S3 itself" (deploy/k8s/configmap.yaml): no endpoint.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("export_shapes", mode="before")
    @classmethod
    def _split_shapes(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [p.strip() for p in text.split(",") if p.strip()]
        return v

    @field_validator("export_shapes")
    @classmethod
    def _shapes_parse(cls, v: list[str]) -> list[str]:
        # The grammar only (a leaf module): what a spec becomes is roadloop.models.shapes'.
        problems = []
        for spec in v:
            try:
                read_shape_spec(spec)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError(f"{'; '.join(problems)} (ROADLOOP_EXPORT_SHAPES, comma-separated)")
        return v

    @field_validator("drift_window_minutes")
    @classmethod
    def _window_tiles_the_day(cls, v: int) -> int:
        from roadloop.monitoring.windows import check_window_minutes

        return check_window_minutes(v)

    @model_validator(mode="after")
    def _drift_lines_in_order(self) -> Settings:
        if self.drift_minor >= self.drift_significant:
            raise ValueError(f"drift_minor ({self.drift_minor:g}, ROADLOOP_DRIFT_MINOR) must be "
                             f"below drift_significant ({self.drift_significant:g}, "
                             "ROADLOOP_DRIFT_SIGNIFICANT)")
        return self

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        self.shared_dir = self.shared_dir.expanduser().absolute()
        h = self.home
        if self.dagster_home is None:
            self.dagster_home = h / "dagster"
        if self.mlflow_artifact_root is None:
            self.mlflow_artifact_root = h / "mlflow" / "artifacts"
        if self.mlflow_tracking_uri is None:
            self.mlflow_tracking_uri = f"sqlite:///{h / 'mlflow' / 'mlflow.db'}"
        if self.dvc_repo is None:
            self.dvc_repo = h / "dvc"
        if self.dvc_remote_url is None:
            self.dvc_remote_url = str(h / "dvc-remote")
        if self.frame_store is None:
            self.frame_store = h / "frames"
        if self.artifacts_dir is None:
            self.artifacts_dir = h / "artifacts"
        if self.privacy_dir is None:
            self.privacy_dir = h / "privacy"
        if self.gateway_url is None:
            self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        return self

    @property
    def datasets_dir(self) -> Path:
        return self.shared_dir / "datasets"

    @property
    def videos_dir(self) -> Path:
        return self.shared_dir / "videos"

    @property
    def models_dir(self) -> Path:
        return self.shared_dir / "models"

    def ensure_dirs(self) -> None:
        """Create the local state folders (idempotent)."""
        for p in (
            self.home,
            self.dagster_home,
            self.mlflow_artifact_root,
            self.frame_store,
            self.artifacts_dir,
        ):
            assert p is not None
            Path(p).mkdir(parents=True, exist_ok=True)
        if self.mlflow_tracking_uri and self.mlflow_tracking_uri.startswith("sqlite:///"):
            Path(self.mlflow_tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
