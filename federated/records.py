"""Conversions between Flower records and the numpy arrays the platform trains with."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

# The MetricRecord key Flower's strategies weight by.
NUM_EXAMPLES = "num-examples"


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` as numpy; raises ValueError on an undecodable one."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        try:
            out[key] = array.numpy()
        except Exception as exc:  # a hostile Array: bytes that do not match dtype/shape
            raise ValueError(f"{key}: undecodable array ({exc})") from exc
    return out


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record carries (what crosses the network, before framing)."""
    return int(sum(len(array.data) for array in record.values()))


def metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    return MetricRecord({k: v for k, v in metrics.items()})
