"""The code location loads, and its graph, checks, jobs, schedules and sensors are present."""

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
    for name in ("candidate_not_worse_than_production", "int8_accuracy_drop", "p95_latency_within_budget"):
        assert name in checks
        assert checks[name].asset_key == dg.AssetKey("benchmark_report")
    blocking = {key.name for key in graph.asset_check_keys if graph.get_check_spec(key).blocking}
    assert {"candidate_not_worse_than_production", "int8_accuracy_drop", "p95_latency_within_budget"} <= blocking

    assert defs.resolve_job_def("learning_loop") is not None
    assert defs.resolve_job_def("model_rollout_job") is not None
    assert defs.resolve_job_def("review_import") is not None
    assert defs.resolve_sensor_def("reviews_finished_sensor") is not None
    assert {"frame_embeddings", "active_learning_queue", "reviewed_labels", "label_quality"} <= keys
    assert "reviewed_labels" in parents["curated_dataset"]
    assert defs.resolve_sensor_def("rollout_health_sensor") is not None
    assert parents["model_rollout"] >= {"production_model"}
    assert defs.resolve_job_def("replay_ingestion_job") is not None
    schedule = defs.resolve_schedule_def("nightly_benchmark_schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    assert defs.resolve_sensor_def("new_camera_sensor") is not None

    partitions = graph.get(dg.AssetKey("sampled_edge_frames")).partitions_def
    assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "cameras"
