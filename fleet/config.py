"""Gateway settings: ``ROADLOOP_GATEWAY_*`` environment variables or explicit values.

Paths default to the platform settings (``roadloop.settings``): the database lives at
``<home>/fleet/fleet.db`` and frames go to the platform's frame store, so the Dagster
sensor that watches the frame store sees what the gateway writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.bounds import MAX_DEVICES, MAX_HOLD_S, MAX_LATENCY_MS, MAX_TOKEN_TTL_S
from roadloop.settings import get_settings

SCOPES: tuple[str, ...] = ("camera:read", "camera:write", "camera:admin")

# Physical bounds of one heartbeat (fleet.heartbeat_plausibility): a heartbeat outside them is
# refused (422), not stored. Generous on purpose: they catch lies and bugs, not slow devices.
# No camera stream runs faster than ~240 frames/s and no edge detector (a replayed file is
# bounded by the detector) sustains more than a few hundred inferences/s per device, so
# 1000 frames/s is a ceiling no honest window reaches.
HEARTBEAT_MAX_FPS = 1000.0
# Agents report every 30 s by default; a window longer than an hour is not a health sample.
# Also bounds latencies: a per-frame latency longer than the longest window is not a measurement.
HEARTBEAT_MAX_WINDOW_S = 3600.0


_URL_FIELDS = frozenset({"database_url", "frame_store_url"})


class GatewaySettings(BaseSettings):
    """Fleet gateway configuration. Override any field with ``ROADLOOP_GATEWAY_<FIELD>``."""

    # No setting is a number that inf or nan could mean: a timeout or rate of inf was taken,
    # then overflowed (or waited forever) where it was used.
    model_config = SettingsConfigDict(env_prefix="ROADLOOP_GATEWAY_", extra="ignore",
                                      allow_inf_nan=False)

    home: Path | None = Field(
        default=None, description="State root; default: the platform home (ROADLOOP_HOME)."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite:///<home>/fleet/fleet.db. "
        "postgresql+psycopg2://... works too.",
    )
    frame_store: Path | None = Field(
        default=None, description="Frame store root; default: the platform's frame store."
    )
    frame_store_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix: frames in S3-compatible object storage, shared by "
        "gateway replicas (frame_store is then a local image cache); default: the platform's "
        "ROADLOOP_FRAME_STORE_URL; unset there too: the folder frame_store.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of a non-AWS object store; default: the "
        "platform's ROADLOOP_S3_ENDPOINT_URL. Credentials: the standard AWS_* variables.",
    )
    # The object store client (roadloop.data.s3_client.S3Timeouts, same defaults and their
    # reasoning): a stalled store fails one request within s3_max_attempts * (connect + read)
    # + < 1 s of backoff (7 s; 5 s when it accepts connections and never answers), so the
    # upload gets its 503 well before the agent's 10 s HTTP timeout (AgentConfig.http_timeout_s)
    # gives up on it; botocore's own defaults (60 s + 60 s, up to 5 attempts) held it minutes.
    s3_connect_timeout_s: float = Field(
        default=1.0, gt=0, le=60, description="Object store: seconds to open a connection.")
    s3_read_timeout_s: float = Field(
        default=2.0, gt=0, le=60,
        description="Object store: seconds to wait for (each part of) an answer.")
    s3_max_attempts: int = Field(
        default=2, ge=1, le=10,
        description="Object store: attempts per request, the first included (standard retry "
        "mode: a timeout or 5xx is tried again once by default).")
    frame_cache_ttl_s: float = Field(
        default=3600.0, gt=0, le=30 * 86400,
        description="With an object store: a cached image unused this long is deleted from "
        "frame_store (swept every min(300 s, this)); bounds how long pixels erased through "
        "another replica stay on this one's disk (docs/storage.md).",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)

    # Request limits.
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Largest frame upload (whole body), bytes."
    )
    max_json_bytes: int = Field(
        default=1024 * 1024, gt=0, description="Largest body of every other route, bytes."
    )
    max_image_side: int = Field(default=4096, gt=0, description="Largest JPEG width/height, px.")
    max_metadata_bytes: int = Field(
        default=256 * 1024, gt=0,
        description="Largest `metadata` part of a frame upload, bytes (text field or file).",
    )

    max_batch_frames: int = Field(
        default=32, ge=1, le=1024,
        description="Most frames in one POST /v1/frames/batch (docs/fleet-api.md).",
    )
    max_batch_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0,
        description="Largest POST /v1/frames/batch body, bytes: a larger Content-Length gets "
        "413 before the body is read, a chunked body is cut off with 413 at the limit.",
    )
    frame_batch_enabled: bool = Field(
        default=True, description="Serve POST /v1/frames/batch (off: 404, agents fall back "
        "to POST /v1/frames per frame).",
    )

    # Cost of one frame upload (fleet/jpeg.py): checked from the JPEG header before decoding.
    max_image_pixels: int = Field(
        default=4096 * 2160, gt=0,
        description="Largest JPEG width x height, px. DCI 4K (4096x2160) holds every frame a "
        "traffic camera sends (1080p, 4K UHD); the per-side limit alone admits 4096x4096.",
    )
    max_jpeg_scans: int = Field(
        default=64, ge=1, le=1000,
        description="Most scans (SOS segments) in one JPEG; a progressive JPEG has ~10, each "
        "extra scan costs a pass over the whole image.",
    )
    max_jpeg_metadata_bytes: int = Field(
        default=128 * 1024, ge=0,
        description="Most bytes of APPn/COM segments (EXIF, ICC, XMP, comments) in one JPEG: "
        "bounds what other data can ride along in a stored frame.",
    )
    quality_decode_max_pixels: int = Field(
        default=1024 * 576, ge=64 * 64,
        description="The gateway decodes an upload at 1/1, 1/2, 1/4 or 1/8 scale, the largest "
        "that gives at most this many pixels (1080p and 4K decode at 1/2 and 1/4).",
    )
    jpeg_decode: Literal["reduced", "dc"] = Field(
        default="dc",
        description="Scale of the one strict decode when the agent sent its sharpness "
        "(fleet/jpeg.py quality_scale). dc: the smallest scale that still gives 72x40 px for "
        "the dhash (1/8 whenever the agent sent the dhash too) — 1/8, DC coefficients only, "
        "for 640x360 and up; every coefficient is still entropy-decoded, so corrupt image "
        "data is refused as before; 0.36 against 0.50 ms of CPU for a 640x360 frame. "
        "reduced: the largest scale within quality_decode_max_pixels (640x360 in full).",
    )
    max_concurrent_decodes: int | None = Field(
        default=None, ge=1, le=256,
        description="JPEG decodes running at once (each holds up to a few tens of MB); "
        "default min(4, CPU cores).",
    )
    decode_wait_s: float = Field(
        default=2.0, ge=0, le=60,
        description="How long an upload waits for a free decode slot before 503 + Retry-After.",
    )

    # Per-device token bucket over frames + heartbeats.
    rate_limit_per_s: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, gt=0)

    # Unattributed traffic (docs/fleet-api.md "Hostile traffic"), checked before
    # authentication: only requests no credential vouches for cost a token (refused,
    # unauthenticated, 404s; the Kubernetes probes GET /healthz and GET / have a per-address
    # bucket of their own, fleet.ratelimit.PROBE_ROUTES); an authenticated request is free
    # here (its device's bucket prices it), and one bearing a recently authenticated token is
    # not even checked, so a site of any size behind one NAT — even one shared with a flood —
    # posts on.
    address_rate_limit_per_s: float = Field(
        default=20.0, gt=0,
        description="Unattributed requests per second one client address may make.",
    )
    address_rate_limit_burst: int = Field(
        default=200, gt=0,
        description="Burst of unattributed requests per address (a site of cameras whose "
        "tokens all expired at once: one 401 each before they refresh).",
    )
    address_table_size: int = Field(
        default=65_536, ge=16, description="Addresses tracked (least recently seen dropped)."
    )
    unattributed_rate_limit_per_s: float = Field(
        default=50.0, gt=0,
        description="Unattributed requests per second the whole gateway answers past the "
        "per-address check: bounds what a flood from many addresses costs (a refused token "
        "costs ~2 ms of CPU). Honest traffic of this kind is refreshes and their 401s: "
        "~6/s for 10 000 devices on hourly tokens.",
    )
    unattributed_rate_limit_burst: int = Field(default=200, gt=0)
    known_tokens_size: int = Field(
        default=50_000, ge=16,
        description="Recently authenticated tokens (digests) exempt from the limits above.",
    )
    denial_audit_window_s: float = Field(
        default=60.0, gt=0,
        description="Denied requests are audited as one row per (client, reason, route) and "
        "window, with a count (written when the window ends and at shutdown).",
    )
    max_credential_json_bytes: int = Field(
        default=64 * 1024, gt=0,
        description="Largest body of /v1/enroll and /v1/token/refresh (read before any "
        "credential is known).",
    )

    # HTTP server bounds (fleet/server.py, fleet/ratelimit.py).
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, description="Largest request line + headers (431 above)."
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0,
        description="A request's headers must arrive within this, counted from the "
        "connection or from the request's first byte (408 and close otherwise).",
    )
    body_idle_timeout_s: float = Field(
        default=15.0, gt=0,
        description="Longest wait for the next chunk of a request body (408 and close); also "
        "how long an unread body may take to drain after its answer.",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0,
        description="A body must arrive within this plus its length / body_min_rate_bytes_s.",
    )
    body_min_rate_bytes_s: int = Field(
        default=128 * 1024, gt=0, description="Slowest body upload allowed for (1 Mbit/s)."
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="Idle keep-alive connections are closed after this."
    )
    limit_concurrency: int = Field(
        default=1024, ge=8,
        description="Connections + requests in progress per worker before uvicorn answers 503.",
    )

    # Token lifetimes, seconds.
    access_token_ttl_s: int = Field(default=3600, gt=0, le=MAX_TOKEN_TTL_S)
    refresh_token_ttl_s: int = Field(default=30 * 86400, gt=0, le=MAX_TOKEN_TTL_S)
    enrollment_token_ttl_s: int = Field(default=86400, gt=0, le=MAX_TOKEN_TTL_S)
    admin_token_ttl_s: int = Field(default=30 * 86400, gt=0, le=MAX_TOKEN_TTL_S)

    # Durability / concurrency.
    fsync_directories: bool = Field(
        default=True,
        description="fsync a frame's folder after its files are renamed in, so the 201 "
        "survives power loss, not only a process crash.",
    )
    frame_sync: Literal["group", "per_file"] = Field(
        default="group",
        description="How a frame's files are made durable before its 201. group: written "
        "without fsync, then one sync of the frame store (syncfs(2) on Linux) by the group "
        "committer before each database commit; per_file: each file fsynced before its rename "
        "and its folder after (fsync_directories). Either way nothing is acknowledged before "
        "its files and its row are durable.",
    )
    frame_read_back: bool = Field(
        default=False,
        description="Also read each new sidecar back from the frame store before its row is "
        "written (the in-memory check that it reads back as written always runs).",
    )
    principal_cache_s: float = Field(
        default=2.0, ge=0, le=60,
        description="Seconds a device's authenticated principal is reused for frames and "
        "heartbeats (0: a database read per request). A revocation or status change made "
        "through the API takes effect at once in the process that served it; in other "
        "replicas or worker processes, or after the CLI, within this bound.",
    )
    sqlite_synchronous: str = Field(default="FULL", pattern="^(FULL|NORMAL|EXTRA)$")
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    commit_batch_max: int = Field(
        default=256, ge=1, description="Most rows one group commit writes (see fleet.committer)."
    )
    worker_threads: int = Field(default=64, ge=1, description="Threads for blocking work.")
    gc_freeze_on_start: bool = Field(
        default=True,
        description="fleet serve: after start-up, move every object then alive out of the "
        "cyclic garbage collector's reach (gc.freeze): a full collection of a worker's "
        "~140,000 start-up objects held the GIL for 40-79 ms, stalling every upload in "
        "flight on it.",
    )
    reconcile_on_start: bool = True
    reconcile_orphan_grace_s: float = Field(
        default=3600.0, ge=0,
        description="Object-store frame store: a JPEG without its record, or a record "
        "without its row, is repaired at start-up only once older than this (younger ones "
        "may be an upload in flight on another replica). Keep it well above body_timeout_s.",
    )
    reconcile_max_objects: int = Field(
        default=200_000, ge=1,
        description="Object-store frame store: keys listed per start-up reconcile; a larger "
        "bucket is covered over several starts (the position is kept in the database).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="uvicorn worker processes (one per core lifts the one-process GIL limit). "
        "Each worker enforces 1/workers of the per-device rate limit (its burst never below one "
        "batch of max_batch_frames, up to rate_limit_burst) and keeps its own group "
        "committer; storage is prepared once before they start.",
    )
    worker_sockets: Literal["reuse_port", "shared"] = Field(
        default="reuse_port",
        description="With workers > 1: 'reuse_port' gives each worker its own SO_REUSEPORT "
        "listening socket, so the kernel spreads connections over the workers; 'shared' is "
        "uvicorn's one socket for all, where long-lived agent connections can all end up on "
        "one worker (fleet/workers.py).",
    )

    # Prometheus (docs/monitoring.md; fleet/metrics.py).
    metrics_enabled: bool = Field(
        default=True, description="Serve GET /metrics and count requests for it.")
    metrics_token: str | None = Field(
        default=None, min_length=16,
        description="Bearer secret a scraper must send to GET /metrics; unset: /metrics "
        "answers loopback clients only.",
    )

    # Model rollouts (docs/fleet-api.md "Model rollouts"; fleet/rollouts.py).
    model_public_key_file: Path | None = Field(
        default=None,
        description="Ed25519 public key (base64, one line) that signs model manifests; "
        "default <home>/keys/model-signing.pub (read when needed, so a key the platform "
        "creates after start-up is picked up).",
    )
    models_dir: Path | None = Field(
        default=None, description="Content-addressed model files; default <home>/fleet/models."
    )
    max_model_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="Largest model upload (whole body), bytes."
    )
    rollout_hold_seconds: float = Field(
        default=1800.0, ge=0, le=MAX_HOLD_S,
        description="Default time a stage must stay healthy to advance."
    )
    rollout_max_error_rate: float = Field(
        default=0.01, ge=0, le=1, description="Errors / frames on the new model, per stage."
    )
    rollout_p95_latency_budget_ms: float = Field(
        default=250.0, gt=0, le=MAX_LATENCY_MS,
        description="P95 detector latency the new model must stay within."
    )
    rollout_min_shadow_f1: float = Field(
        default=0.5, ge=0, le=1,
        description="Shadow agreement (matched-box F1 vs the serving model) floor.",
    )
    rollout_min_cohort_devices: int = Field(
        default=1, ge=0, le=MAX_DEVICES, description="Smallest cohort of a stage (tiny fleets)."
    )
    rollout_min_reporting_fraction: float = Field(
        default=0.8, gt=0, le=1,
        description="Share of a stage's cohort that must report on the new model to advance.",
    )
    rollout_min_frames: int = Field(
        default=20, ge=1, le=2**31 - 1,
        description="Frames on the new model a stage needs before it advances."
    )

    @field_validator("home", "frame_store", "models_dir", "model_public_key_file",
                     "database_url", "frame_store_url", "host", mode="before")
    @classmethod
    def _not_empty(cls, value: object, info: ValidationInfo) -> object:
        # Path("") is the current directory and "" no URL: ROADLOOP_GATEWAY_HOME= would put
        # the database in whatever folder the gateway was started from, and an empty URL
        # silently fell back to the platform's; an empty host binds every interface (ask for
        # that with 0.0.0.0). Unset (not empty) asks for the default.
        if isinstance(value, str) and not value.strip():
            kind = ("a URL" if info.field_name in _URL_FIELDS
                    else "an address (0.0.0.0: every interface)" if info.field_name == "host"
                    else "a path")
            raise ValueError(f"is empty: unset it for the default, or give {kind}")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _a_real_secret(cls, value: str | None) -> str | None:
        # 16 spaces passed min_length: a scraper's "Bearer" header cannot even carry it.
        if value is not None and (value != value.strip() or len(value.strip()) < 16
                                  or any(c.isspace() for c in value)):
            raise ValueError("must be at least 16 characters without spaces")
        return value

    @field_validator("s3_endpoint_url", mode="before")
    @classmethod
    def _aws_when_empty(cls, value: object) -> object:
        # Empty is how a manifest says "AWS S3 itself" (deploy/k8s): no endpoint URL.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _derive(self) -> GatewaySettings:
        platform = None
        if self.home is None:
            platform = get_settings()
            self.home = platform.home
        self.home = Path(self.home).expanduser().absolute()
        if self.frame_store is None:
            if platform is not None and platform.frame_store is not None:
                self.frame_store = Path(platform.frame_store)
            else:
                self.frame_store = self.home / "frames"
        self.frame_store = Path(self.frame_store).expanduser().absolute()
        if self.frame_store_url is None or self.s3_endpoint_url is None:
            platform = platform or get_settings()
            self.frame_store_url = self.frame_store_url or platform.frame_store_url
            self.s3_endpoint_url = self.s3_endpoint_url or platform.s3_endpoint_url
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'fleet' / 'fleet.db'}"
        if self.model_public_key_file is None:
            self.model_public_key_file = self.home / "keys" / "model-signing.pub"
        self.model_public_key_file = Path(self.model_public_key_file).expanduser().absolute()
        if self.models_dir is None:
            self.models_dir = self.home / "fleet" / "models"
        self.models_dir = Path(self.models_dir).expanduser().absolute()
        if self.max_concurrent_decodes is None:
            self.max_concurrent_decodes = min(4, os.cpu_count() or 1)
        return self

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")
