from .new_camera import new_camera_sensor, sampled_edge_frames_job

__all__ = ["new_camera_sensor", "sampled_edge_frames_job"]
