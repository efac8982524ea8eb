from .ingestion import ReplayConfig, replay_ingestion_job, replay_shared_cameras

__all__ = ["ReplayConfig", "replay_ingestion_job", "replay_shared_cameras"]
