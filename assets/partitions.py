"""Partitions that appear at run time: one per camera, added by the new-camera sensor."""

import dagster as dg

camera_partitions = dg.DynamicPartitionsDefinition(name="cameras")
