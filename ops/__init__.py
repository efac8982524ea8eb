from .ingestion import ReplayConfig, replay_shared_cameras

__all__ = ["ReplayConfig", "replay_shared_cameras"]
