"""Dagster resources, built from the one settings object.

Environments differ by the values given here (``ROADLOOP_*`` variables and the profile),
never by branches inside assets. Profiles:

- ``default``: the full protocol (10 warm-up + 100 timed latency runs, all slices).
- ``demo``: the whole loop in about 15 minutes on 2 CPU cores.
- ``test``: tiny subsets, tiny image sizes, 1 epoch — for the test suite.
"""

import dagster as dg

from roadloop.settings import Settings, get_settings

from .benchmark import BenchmarkResource, int8_gate_settings
from .data_sources import LabelledSourcesResource
from .dvc_store import DvcResource
from .federation import FederationResource
from .fiftyone_resource import FiftyOneResource
from .fleet_resource import FleetResource
from .mlflow_tracking import MlflowResource
from .storage import ArtifactStoreResource, FrameStoreResource
from .trainer import TrainerResource

__all__ = [
    "ArtifactStoreResource",
    "BenchmarkResource",
    "DvcResource",
    "FederationResource",
    "FiftyOneResource",
    "FleetResource",
    "FrameStoreResource",
    "LabelledSourcesResource",
    "MlflowResource",
    "TrainerResource",
    "build_resources",
]

PROFILES = ("default", "demo", "test")
# The demo's and the tests' counting scene: 10 s at 10 fps, 320x192 (100 small frames).
TINY_COUNTING = {"counting_duration_s": 10.0, "counting_fps": 10.0, "counting_width": 320,
                 "counting_height": 192}


def _mlflow_ui_url(settings: Settings) -> str:
    """A tracking server is its own UI; a sqlite store is served by `roadloop serve`."""
    uri = str(settings.mlflow_tracking_uri)
    return uri if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{settings.mlflow_port}"


def build_resources(settings: Settings | None = None, profile: str | None = None) -> dict:
    settings = settings or get_settings()
    profile = profile or settings.profile
    if profile not in PROFILES:
        raise ValueError(f"unknown ROADLOOP_PROFILE {profile!r}; choose one of {PROFILES}")
    settings.ensure_dirs()

    shapes = list(settings.export_shapes)
    trainer = TrainerResource(model=settings.train_model, export_shapes=shapes)
    federation = FederationResource(rounds=5)
    road = settings.shared_dir / "videos" / "cctv_street.mp4"  # the counting scene's road
    # The quality floor every candidate must reach; the demo and test profiles relax it (a
    # 5-epoch 320 px demo run, a 1-epoch 96 px test run) and the gate says so.
    floor = {"min_map50": settings.min_map50, "min_class_ap50": settings.min_class_ap50,
             "min_class_support": settings.min_class_support,
             "standard_min_map50": settings.min_map50,
             "standard_min_class_ap50": settings.min_class_ap50}
    gate = int8_gate_settings(settings)
    benchmark = BenchmarkResource(counting_background_video=str(road) if road.is_file() else None,
                                  **floor, **gate)
    max_frames = None
    if profile == "demo":
        trainer = TrainerResource(model=settings.train_model, imgsz=320, epochs=settings.demo_epochs,
                                  export_shapes=shapes)
        federation = FederationResource(rounds=2, imgsz=320)
        benchmark = BenchmarkResource(
            warmup=10, runs=100, **TINY_COUNTING,
            **{**floor, "min_map50": settings.demo_min_map50,
               "min_class_ap50": settings.demo_min_class_ap50, "relaxed_floor_reason": "demo"},
            **gate,
        )
    elif profile == "test":
        # imgsz 96: the square 96x96 and, with the default shapes, one 64x96 rectangle.
        trainer = TrainerResource(model=settings.train_model, imgsz=96, epochs=1, batch=4,
                                  export_shapes=shapes)
        federation = FederationResource(rounds=1, imgsz=64, batch=4)
        # One epoch at 96 px scores mAP50-95 near 0, where a per cent of it is noise: the test
        # profile checks the gate's wiring (absolute limit as configured, relative and per-class
        # limits wide open); tests/test_int8_gate.py checks the limits themselves.
        benchmark = BenchmarkResource(
            warmup=1, runs=3, batch_sizes=[1, 2], slices=["low_light", "blur"],
            calibration_frames=4, p95_latency_budget_ms=60_000.0, **TINY_COUNTING,
            **{**floor, "min_map50": 0.0, "min_class_ap50": 0.0, "relaxed_floor_reason": "test"},
            **{**gate, "max_int8_drop_pct": 100.0, "int8_class_max_drop_pct": 100.0,
               "int8_class_max_drop_points": 100.0},
        )
        max_frames = 6
    trainer.shapes(trainer.imgsz)  # a misspelt ROADLOOP_EXPORT_SHAPES fails here, not at export

    return {
        "io_manager": dg.FilesystemIOManager(base_dir=str(settings.dagster_home / "storage")),
        "frame_store": FrameStoreResource(
            root=str(settings.frame_store),
            url=settings.frame_store_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            dedupe_max_hamming=settings.dedupe_max_hamming,
            dedupe_max_age_s=settings.dedupe_max_age_s,
            dedupe_per_camera_max_hamming=settings.dedupe_per_camera_max_hamming,
        ),
        "artifacts": ArtifactStoreResource(root=str(settings.artifacts_dir)),
        "labelled_sources": LabelledSourcesResource(
            shared_dir=str(settings.shared_dir),
            taxonomy_file=str(settings.taxonomy_file),
            replay_fraction=settings.replay_fraction,
            synthetic_dir=str(settings.home / "synthetic"),
            max_frames_per_split=max_frames,
        ),
        "dvc": DvcResource(repo_dir=str(settings.dvc_repo), remote_url=str(settings.dvc_remote_url),
                           s3_endpoint_url=settings.s3_endpoint_url),
        "mlflow": MlflowResource(
            tracking_uri=str(settings.mlflow_tracking_uri),
            experiment=settings.mlflow_experiment,
            artifact_root=settings.mlflow_artifact_uri or str(settings.mlflow_artifact_root),
            s3_endpoint_url=settings.s3_endpoint_url,
            registered_model_name=settings.registered_model_name,
            ui_url=_mlflow_ui_url(settings),
        ),
        "fleet": FleetResource(
            gateway_url=str(settings.gateway_url),
            hold_seconds=5.0 if profile in ("demo", "test") else None,
        ),
        "fiftyone": FiftyOneResource(
            database_dir=str(settings.home / "fiftyone"),
            app_port=settings.fiftyone_port,
            taxonomy_file=str(settings.taxonomy_file),
        ),
        "trainer": trainer,
        "federation": federation,
        "benchmark": benchmark,
    }
