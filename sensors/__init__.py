from .new_camera import new_camera_sensor, sampled_edge_frames_job
from .reviews import review_import_job, reviews_finished_sensor
from .rollout_health import rollout_health_sensor

__all__ = [
    "new_camera_sensor",
    "review_import_job",
    "reviews_finished_sensor",
    "rollout_health_sensor",
    "sampled_edge_frames_job",
]
