"""The asset groups of the Dagster UI: one per lifecycle stage, in the order frames flow.

Every asset names one of these as its ``group_name`` (none is left in ``default``).
"""

INGESTION = "ingestion"  # camera frames: sampled_edge_frames
DATASETS = "datasets"  # seed datasets, curated_dataset
MODELS = "models"  # trained_model, onnx_model, quantized_model
EVALUATION = "evaluation"  # benchmark_report, production_model (the gated promotion)
ACTIVE_LEARNING = "active_learning"  # labeling: embeddings, review queue, reviews, label quality
DEPLOYMENT = "deployment"  # model_rollout to the fleet
MONITORING = "monitoring"  # camera_drift (each camera window vs its reference), camera_accuracy
TRAFFIC = "traffic"  # traffic_counts: the operator's daily traffic report from the fleet

LIFECYCLE_GROUPS = (INGESTION, DATASETS, MODELS, EVALUATION, ACTIVE_LEARNING, DEPLOYMENT, MONITORING,
                    TRAFFIC)
