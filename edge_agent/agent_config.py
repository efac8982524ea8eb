"""What an edge agent is told and what it reports: ``AgentConfig`` (every setting the CLI
and a camera's operator can give), ``AgentSummary`` (a run's outcome, printed as JSON at exit),
the default model and where it is looked for, and the detector built from a config."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.inference import OnnxDetector
from edge_agent.samplers import SamplerConfig
from edge_agent.uploader import DEFAULT_BATCH_MAX

DEFAULT_MODEL_NAME = "atl_v2_yolo11n_gpu_320.onnx"
# Searched in this order when no --model is given: the gpu checkpoint's 320 px export, then
# the older CPU-trained one (kept for installations that have only that file).
DEFAULT_MODEL_NAMES = (DEFAULT_MODEL_NAME, "atl_v2_yolo11n_320.onnx")
# ORT's intra-op workers spin-wait for work by default. Measured with 2 threads on 2 shared
# cores (benchmarks/results/agent_speed*.md): at load ~2.5 spinning is 8-13 % faster, at load
# ~4 it is 40 % slower (the spinning workers fight the other processes and the agent's own
# decode thread); yielding is the robust choice, and idle cores stay free. One thread: no pool.
AGENT_SESSION_CONFIG: dict[str, str] = {"session.intra_op.allow_spinning": "0"}


def agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("roadloop")
    except PackageNotFoundError:
        return "0.1.0"


def find_default_model(name: str | None = None) -> Path | None:
    """``shared/models/<name>`` searched relative to ``$ROADLOOP_SHARED_DIR``, the working
    directory and this package (``../shared`` beside the repository), in that order. Without
    ``name``, the first folder holding any of :data:`DEFAULT_MODEL_NAMES` gives the first of
    them it holds."""
    folders = []
    if os.environ.get("ROADLOOP_SHARED_DIR"):
        folders.append(Path(os.environ["ROADLOOP_SHARED_DIR"]) / "models")
    here = Path(__file__).resolve().parent
    for base in (Path.cwd(), here.parent):
        folders += [base / ".." / "shared" / "models", base / "shared" / "models"]
    for folder in folders:
        for n in (name,) if name else DEFAULT_MODEL_NAMES:
            if (folder / n).is_file():
                return (folder / n).resolve()
    return None


@dataclass
class AgentConfig:
    gateway_url: str
    camera_id: str
    source: str
    model_path: Path
    state_dir: Path
    enroll_token: str | None = None
    max_frames: int | None = None
    heartbeat_interval_s: float = 30.0
    realtime: bool = True
    loop: bool = False
    # The clock of a folder of images (they carry no timestamps): tracking, speeds and every
    # time rule read it, so it must be the rate the images were taken at.
    image_fps: float = 5.0
    # At most this many frames measured a second, by the source's clock (``--max-fps``): the
    # rest are skipped before inference (``frames_skipped``). None: every frame the loop
    # keeps up with (a slow loop still drops stale frames: ``frames_dropped``).
    max_fps: float | None = None
    conf_threshold: float = 0.25
    iou_threshold: float = 0.7
    intra_op_threads: int | None = None
    # Frames measured at once (network, NMS, quality), each on its own thread with ONNX
    # Runtime on one intra-op thread unless ``intra_op_threads`` says otherwise; counting
    # and sampling stay in frame order (edge_agent.frame_workers). 1: all on the frame loop.
    inference_workers: int = 1
    # ONNX Runtime session config entries of every model the agent loads (the baseline and
    # each rollout's); ``--ort-config KEY=VALUE`` replaces them.
    session_config: dict[str, str] = field(default_factory=lambda: dict(AGENT_SESSION_CONFIG))
    capacity: float = 30.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    outbox_max_bytes: int = 512 * 1024 * 1024
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    # Frames per POST /v1/frames/batch when several are due (1: one POST /v1/frames each).
    upload_batch_max: int = DEFAULT_BATCH_MAX
    # Hold fresh frames up to this long so that several go in one request (0: at once);
    # a sampled frame is for training, so a minute's delay costs nothing (docs/capacity.md).
    upload_linger_s: float = 0.0
    drain_timeout_s: float = 10.0
    jpeg_quality: int = 90
    status_interval_s: float | None = None  # None: 1 s on a TTY, 10 s otherwise
    http_timeout_s: float = 10.0
    # model updates: key (base64, file or PEM; None: the one pinned at enrollment)
    model_public_key: str | None = None
    update_interval_s: float = 60.0  # 0 disables updates
    latency_budget_ms: float | None = None  # None: 3x the previous model's P95
    rollback_after: int = 3  # consecutive bad heartbeat windows
    max_error_rate: float = 0.01
    shadow_sample_rate: float = 0.2
    traffic: bool = True  # track and count when the camera's configuration has a geometry
    record_outbox_max: int = 50_000  # queued traffic records kept without the gateway
    # Privacy (edge_agent.redaction): face detector (centerface | none), plate detector
    # (auto | haar | none). The method per camera comes from its configuration (privacy.mode).
    redaction_faces: str = "centerface"
    redaction_plates: str = "auto"
    metrics_port: int | None = None  # Prometheus endpoint (edge_agent.metrics); None: off
    metrics_host: str = "127.0.0.1"


@dataclass
class AgentSummary:
    camera_id: str
    device_id: str
    model_version: str
    stopped_by: str  # max_frames | end_of_source | signal | source_error
    frames_processed: int = 0
    frames_dropped: int = 0
    frames_skipped: int = 0  # over --max-fps, skipped before inference
    frames_sampled: int = 0
    uploads_ok: int = 0
    duplicates_absorbed: int = 0
    upload_failures: int = 0
    rejected: int = 0
    errors: int = 0
    outbox_depth: int = 0
    outbox_evicted_total: int = 0
    heartbeats_sent: int = 0
    traffic_crossings: int = 0  # vehicles counted on lines
    traffic_events: int = 0
    traffic_records_queued: int = 0
    traffic_records_sent: int = 0  # acknowledged by the gateway (201, or 409: already stored)
    traffic_records_left: int = 0  # still queued at exit: sent on the next start
    frames_withheld: int = 0  # sampled but not queued: redaction unavailable or failed
    source_read_errors: int = 0  # unreadable images, a file that ended short of its length
    redaction_error: str | None = None
    final_model_version: str = ""  # sha256 of the model serving at the end
    update_status: str = "disabled"  # the updater's status at the end (disabled: no key)
    sampled_frame_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_detector(cfg: AgentConfig, path: Path) -> OnnxDetector:
    """The agent's detector for ``path``: thresholds, threads and session options of ``cfg``
    (the baseline model and every rollout's are built alike)."""
    return OnnxDetector(
        path,
        conf_threshold=cfg.conf_threshold,
        iou_threshold=cfg.iou_threshold,
        intra_op_threads=(cfg.intra_op_threads if cfg.intra_op_threads is not None
                          else 1 if cfg.inference_workers > 1 else None),
        session_config=cfg.session_config,
    )


__all__ = [
    "AGENT_SESSION_CONFIG",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_NAMES",
    "AgentConfig",
    "AgentSummary",
    "agent_version",
    "find_default_model",
    "make_detector",
]
