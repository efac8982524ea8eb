"""Watching the fleet: drift of each camera's windows against its reference, and the
operational health of its heartbeats. Framework-free; Dagster assets and sensors call it."""
