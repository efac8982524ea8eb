"""The roadloop edge agent: runs an exported detector on camera frames.

Depends only on numpy, onnxruntime and OpenCV (``pip install roadloop[edge]``); never on
torch, ultralytics, dagster or roadloop.

The names below are imported on first use, not with the package: the platform imports
``edge_agent.manifest`` (the signed-manifest contract) and should not load ONNX Runtime, OpenCV
and the agent runtime for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "nms": "edge_agent.boxes",
    "EdgeAgentError": "edge_agent.errors",
    "InvalidModelError": "edge_agent.errors",
    "file_sha256": "edge_agent.fsutil",
    "Detection": "edge_agent.inference",
    "LetterboxMeta": "edge_agent.inference",
    "OnnxDetector": "edge_agent.inference",
    "StageTimings": "edge_agent.inference",
    "letterbox": "edge_agent.inference",
    # The agent runtime (sources, counting, samplers, outbox, heartbeats, gateway client).
    "AgentConfig": "edge_agent.agent",
    "AgentSummary": "edge_agent.agent",
    "EdgeAgent": "edge_agent.agent",
    "FramePipeline": "edge_agent.pipeline",
    "DeviceIdentity": "edge_agent.identity",
    "GatewayClient": "edge_agent.client",
    "DensityState": "edge_agent.counting",
    "DensityTracker": "edge_agent.counting",
    "count_per_class": "edge_agent.counting",
    "HEARTBEAT_SCHEMA_VERSION": "edge_agent.heartbeat",
    "Heartbeat": "edge_agent.heartbeat",
    "BackoffPolicy": "edge_agent.outbox",
    "Outbox": "edge_agent.outbox",
    "FrameSampler": "edge_agent.samplers",
    "SampleDecision": "edge_agent.samplers",
    "SamplerConfig": "edge_agent.samplers",
    "Frame": "edge_agent.sources",
    "LatestFrameReader": "edge_agent.sources",
    "open_source": "edge_agent.sources",
}

__all__ = [
    "HEARTBEAT_SCHEMA_VERSION",
    "AgentConfig",
    "AgentSummary",
    "BackoffPolicy",
    "DensityState",
    "DensityTracker",
    "Detection",
    "DeviceIdentity",
    "EdgeAgent",
    "EdgeAgentError",
    "Frame",
    "FramePipeline",
    "FrameSampler",
    "GatewayClient",
    "Heartbeat",
    "InvalidModelError",
    "LatestFrameReader",
    "LetterboxMeta",
    "OnnxDetector",
    "Outbox",
    "SampleDecision",
    "SamplerConfig",
    "StageTimings",
    "count_per_class",
    "file_sha256",
    "letterbox",
    "nms",
    "open_source",
]


def __getattr__(name: str) -> Any:
    """Import an exported name (or a submodule, as ``edge_agent.agent``) on first use."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent
    from edge_agent.boxes import nms
    from edge_agent.client import GatewayClient
    from edge_agent.counting import DensityState, DensityTracker, count_per_class
    from edge_agent.errors import EdgeAgentError, InvalidModelError
    from edge_agent.fsutil import file_sha256
    from edge_agent.heartbeat import HEARTBEAT_SCHEMA_VERSION, Heartbeat
    from edge_agent.identity import DeviceIdentity
    from edge_agent.inference import (
        Detection,
        LetterboxMeta,
        OnnxDetector,
        StageTimings,
        letterbox,
    )
    from edge_agent.outbox import BackoffPolicy, Outbox
    from edge_agent.pipeline import FramePipeline
    from edge_agent.samplers import FrameSampler, SampleDecision, SamplerConfig
    from edge_agent.sources import Frame, LatestFrameReader, open_source
