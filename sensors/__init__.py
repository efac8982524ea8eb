from .camera_accuracy import camera_accuracy_sensor
from .drift import drift_sensor, drift_window_sensor
from .new_camera import new_camera_sensor
from .reviews import reviews_finished_sensor
from .rollout_health import rollout_health_sensor

ALL_SENSORS = [
    new_camera_sensor, reviews_finished_sensor, rollout_health_sensor, drift_window_sensor,
    drift_sensor, camera_accuracy_sensor,
]

__all__ = ["ALL_SENSORS", "camera_accuracy_sensor", "drift_sensor", "drift_window_sensor", "new_camera_sensor", "reviews_finished_sensor", "rollout_health_sensor"]
