"""Conversions between Flower records and the numpy arrays the platform trains with.

A model travels as ONE flat float32 vector (``WEIGHTS_KEY``) plus its layout (parameter
names and shapes, sent in the config). Flower 1.42 stores and ships every Array of a
message as separate objects (each its own request, plus 5 MB chunks), so YOLO11n's 418
state arrays cost ~840 requests per message per site; one vector costs three chunks. The
aggregators are coordinate-wise or whole-vector (FedAvg, trimmed mean, median, Krum,
Bulyan) and DP clipping takes the norm over everything, so packing changes no result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

# The MetricRecord key Flower's strategies weight by.
NUM_EXAMPLES = "num-examples"
WEIGHTS_KEY = "weights"
LAYOUT_KEYS, LAYOUT_NDIMS, LAYOUT_DIMS = "layout-keys", "layout-ndims", "layout-dims"


@dataclass(frozen=True)
class Layout:
    """Names and shapes of a model's state arrays, in packing order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        return cls(tuple(arrays), tuple(tuple(int(d) for d in v.shape) for v in arrays.values()))

    @property
    def size(self) -> int:
        return sum(prod(shape) for shape in self.shapes)

    def locate(self, index: int) -> str:
        """The array a flat vector's ``index`` falls in."""
        at = 0
        for key, shape in zip(self.keys, self.shapes, strict=True):
            at += prod(shape)
            if index < at:
                return key
        raise IndexError(index)

    def to_config(self) -> dict[str, list[str] | list[int]]:
        return {
            LAYOUT_KEYS: list(self.keys),
            LAYOUT_NDIMS: [len(s) for s in self.shapes],
            LAYOUT_DIMS: [d for s in self.shapes for d in s],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Layout:
        keys, ndims, dims = (list(config[k]) for k in (LAYOUT_KEYS, LAYOUT_NDIMS, LAYOUT_DIMS))
        if len(keys) != len(ndims) or sum(ndims) != len(dims) or min(dims, default=0) < 0:
            raise ValueError("inconsistent layout in the config")
        shapes, at = [], 0
        for n in ndims:
            shapes.append(tuple(int(d) for d in dims[at:at + n]))
            at += n
        return cls(tuple(str(k) for k in keys), tuple(shapes))


def pack(arrays: Mapping[str, np.ndarray], layout: Layout) -> ArrayRecord:
    """``arrays`` as one float32 vector in ``layout`` order."""
    parts = []
    for key, shape in zip(layout.keys, layout.shapes, strict=True):
        value = np.asarray(arrays[key])
        if tuple(value.shape) != shape:
            raise ValueError(f"{key}: shape {value.shape}, layout says {shape}")
        parts.append(value.astype(np.float32, copy=False).ravel())
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return ArrayRecord({WEIGHTS_KEY: Array(flat)})


def unpack(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """The named arrays of a (checked) flat vector."""
    if flat.shape != (layout.size,):
        raise ValueError(f"weights vector of shape {flat.shape}, expected ({layout.size},)")
    out, at = {}, 0
    for key, shape in zip(layout.keys, layout.shapes, strict=True):
        n = prod(shape)
        out[key] = flat[at:at + n].reshape(shape)
        at += n
    return out


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` as numpy; raises ValueError on an undecodable one."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        try:
            out[key] = array.numpy()
        except Exception as exc:  # a hostile Array: bytes that do not match dtype/shape
            raise ValueError(f"{key}: undecodable array ({exc})") from exc
    return out


def weights_of(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """Decode and unpack a packed record (raises ValueError when it is not one)."""
    arrays = from_array_record(record)
    if set(arrays) != {WEIGHTS_KEY}:
        raise ValueError(f"expected one array {WEIGHTS_KEY!r}, got {sorted(arrays)[:5]}")
    return unpack(arrays[WEIGHTS_KEY], layout)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Arrays one by one (no packing): for small records and tests."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record carries (what crosses the network, before framing)."""
    return int(sum(len(array.data) for array in record.values()))


def metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    return MetricRecord(dict(metrics))


__all__: Sequence[str] = (
    "NUM_EXAMPLES", "WEIGHTS_KEY", "Layout", "from_array_record", "metric_record", "pack",
    "payload_bytes", "to_array_record", "unpack", "weights_of",
)
