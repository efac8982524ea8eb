"""The code location loads, and its graph, checks, jobs, schedules and sensors are present."""

from datetime import UTC, datetime

import dagster as dg


def test_definitions_load_and_graph() -> None:
    from definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "seed_datasets",
        "sampled_edge_frames",
        "curated_dataset",
        "trained_model",
        "onnx_model",
        "quantized_model",
        "benchmark_report",
        "production_model",
    } <= keys

    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert parents["trained_model"] == {"curated_dataset"}
    assert parents["quantized_model"] == {"onnx_model", "curated_dataset"}
    assert {"trained_model", "onnx_model", "quantized_model"} <= parents["benchmark_report"]
    assert "benchmark_report" in parents["production_model"]

    checks = {c.name: c for c in graph.asset_check_keys}
    gates = ("candidate_not_worse_than_production", "int8_accuracy_drop",
             "p95_latency_within_budget", "model_meets_quality_floor")
    for name in gates:
        assert name in checks
        assert checks[name].asset_key == dg.AssetKey("benchmark_report")
    blocking = {key.name for key in graph.asset_check_keys if graph.get_check_spec(key).blocking}
    assert set(gates) <= blocking

    assert defs.resolve_job_def("learning_loop") is not None
    assert defs.resolve_job_def("model_rollout_job") is not None
    assert defs.resolve_job_def("review_import") is not None
    assert defs.resolve_sensor_def("reviews_finished_sensor") is not None
    assert {"frame_embeddings", "active_learning_queue", "reviewed_labels", "label_quality"} <= keys
    assert "reviewed_labels" in parents["curated_dataset"]
    # The loop in the lineage view: a promotion feeds the next review queue's embeddings.
    assert "production_model" in parents["frame_embeddings"]
    assert parents["active_learning_queue"] == {"frame_embeddings"}
    assert defs.resolve_sensor_def("rollout_health_sensor") is not None
    assert parents["model_rollout"] >= {"production_model"}
    assert defs.resolve_job_def("replay_ingestion_job") is not None
    schedule = defs.resolve_schedule_def("nightly_benchmark_schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    assert defs.resolve_sensor_def("new_camera_sensor") is not None

    partitions = graph.get(dg.AssetKey("sampled_edge_frames")).partitions_def
    assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "cameras"

    # Measured accuracy per camera, on the reviews and the promoted model, with its check.
    assert graph.get(dg.AssetKey("camera_accuracy")).partitions_def is partitions
    assert parents["camera_accuracy"] == {"reviewed_labels", "production_model"}
    assert checks["camera_accuracy_within_benchmark"].asset_key == dg.AssetKey("camera_accuracy")
    assert defs.resolve_job_def("camera_accuracy_job").partitions_def is partitions

    # The daily traffic report: one partition per UTC day, its schedule off by default.
    days = graph.get(dg.AssetKey("traffic_counts")).partitions_def
    assert isinstance(days, dg.TimeWindowPartitionsDefinition) and days.cron_schedule == "0 0 * * *"
    traffic = defs.resolve_schedule_def("traffic_counts_schedule")
    assert traffic.default_status == dg.DefaultScheduleStatus.STOPPED
    # Today is a partition (the day so far); the schedule reports the day before at 01:00 UTC.
    today = datetime.now(UTC).date()
    assert days.has_partition_key(today.isoformat())
    tick = traffic.evaluate_tick(dg.build_schedule_context(
        repository_def=defs.get_repository_def(),
        scheduled_execution_time=datetime(2026, 11, 27, 1, 0, tzinfo=UTC)))
    assert [r.partition_key for r in tick.run_requests] == ["2026-11-26"]


def test_every_job_comes_from_the_jobs_module_and_is_registered() -> None:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

    import jobs
    from definitions import defs

    names = {job.name for job in jobs.ALL_JOBS}
    assert len(names) == len(jobs.ALL_JOBS)
    # Every job object the module defines is listed in ALL_JOBS.
    defined = {
        value.name
        for value in vars(jobs).values()
        if isinstance(value, (dg.JobDefinition, UnresolvedAssetJobDefinition))
    }
    assert defined == names
    assert {job.name for job in defs.jobs} == names
    for name in names:
        assert defs.resolve_job_def(name) is not None
    assert defs.resolve_job_def("review_queue").asset_layer.selected_asset_keys == {
        dg.AssetKey("frame_embeddings"),
        dg.AssetKey("active_learning_queue"),
    }

    # Schedules and sensors launch jobs of the jobs module (the same objects).
    targets = [(s.name, s.target) for s in defs.schedules]
    targets += [(s.name, t) for s in defs.sensors for t in s.targets]
    targeted: dict[str, set[str]] = {}
    for name, target in targets:
        targeted.setdefault(name, set()).add(target.job_name)
        assert any(target.job_def is job for job in jobs.ALL_JOBS), name
    assert targeted == {
        "nightly_benchmark_schedule": {"nightly_benchmark_job"},
        "federated_rounds_schedule": {"federated_learning_loop"},
        "replay_ingestion_schedule": {"replay_ingestion_job"},
        "new_camera_sensor": {"sampled_edge_frames_job"},
        "reviews_finished_sensor": {"review_import"},
        "drift_window_sensor": {"camera_drift_job"},
        "drift_sensor": {"review_queue", "learning_loop"},
        "camera_accuracy_sensor": {"camera_accuracy_job"},
        "traffic_counts_schedule": {"traffic_counts_job"},
        "retention_schedule": {"retention_job"},
    }
    # Retention runs daily once turned on; off by default (replayed demo frames are old).
    retention = defs.resolve_schedule_def("retention_schedule")
    assert retention.default_status == dg.DefaultScheduleStatus.STOPPED
    assert retention.cron_schedule == "0 2 * * *"
    # rollout_health_sensor launches nothing: it records observations of model_rollout.
    assert not defs.resolve_sensor_def("rollout_health_sensor").targets


def test_every_asset_is_in_a_lifecycle_stage_group() -> None:
    from assets.groups import LIFECYCLE_GROUPS
    from definitions import defs

    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert "default" not in set(groups.values())
    assert set(groups.values()) == set(LIFECYCLE_GROUPS)  # every stage has assets, no others
    assert groups == {
        "sampled_edge_frames": "ingestion",
        "seed_datasets": "datasets",
        "curated_dataset": "datasets",
        "trained_model": "models",
        "onnx_model": "models",
        "quantized_model": "models",
        "benchmark_report": "evaluation",
        "production_model": "evaluation",
        "frame_embeddings": "active_learning",
        "active_learning_queue": "active_learning",
        "reviewed_labels": "active_learning",
        "label_quality": "active_learning",
        "model_rollout": "deployment",
        "camera_drift": "monitoring",
        "camera_accuracy": "monitoring",
        "traffic_counts": "traffic",
    }
