"""The roadloop edge agent: runs an exported detector on camera frames.

Depends only on numpy, onnxruntime and OpenCV (``pip install roadloop[edge]``); never on
torch, ultralytics, dagster or roadloop.
"""

from edge_agent.boxes import nms
from edge_agent.errors import EdgeAgentError, InvalidModelError
from edge_agent.fsutil import file_sha256
from edge_agent.inference import (
    Detection,
    LetterboxMeta,
    OnnxDetector,
    StageTimings,
    letterbox,
)

__all__ = [
    "Detection",
    "EdgeAgentError",
    "InvalidModelError",
    "LetterboxMeta",
    "OnnxDetector",
    "StageTimings",
    "file_sha256",
    "letterbox",
    "nms",
]

# The agent runtime (sources, counting, samplers, outbox, heartbeats, gateway client).
from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent, FramePipeline
from edge_agent.client import DeviceIdentity, GatewayClient
from edge_agent.counting import DensityState, DensityTracker, count_per_class
from edge_agent.heartbeat import HEARTBEAT_SCHEMA_VERSION, Heartbeat
from edge_agent.outbox import BackoffPolicy, Outbox
from edge_agent.samplers import FrameSampler, SampleDecision, SamplerConfig
from edge_agent.sources import Frame, LatestFrameReader, open_source

__all__ += [
    "HEARTBEAT_SCHEMA_VERSION",
    "AgentConfig",
    "AgentSummary",
    "BackoffPolicy",
    "DensityState",
    "DensityTracker",
    "DeviceIdentity",
    "EdgeAgent",
    "Frame",
    "FramePipeline",
    "FrameSampler",
    "GatewayClient",
    "Heartbeat",
    "LatestFrameReader",
    "Outbox",
    "SampleDecision",
    "SamplerConfig",
    "count_per_class",
    "open_source",
]
