"""Several frames measured at once, finished in capture order.

A frame's network, NMS and quality measures (``FramePipeline.measure``) depend on nothing but
the frame, while counting, tracking and sampling (``FramePipeline.finish``) carry state from
frame to frame. With ``workers`` threads, each running ONNX Runtime on one intra-op thread,
``workers`` frames are measured side by side and finished one by one, in the order they were
taken. On 2 cores this keeps both busy where one session with 2 intra-op threads leaves them
waiting on each other inside every small layer (``benchmarks/results/agent_speed.md``).

ONNX Runtime allows concurrent ``run`` calls on one session, so the workers share the serving
model; a model swap lands between two frames, as on one thread.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from edge_agent.sources import Frame

M = TypeVar("M")
# Each frame in flight holds its decoded image (2.7 MB at 1280x720); more workers than cores
# only queue, so a number far past any box's core count is a mistake, not a setting.
MAX_WORKERS = 64


@dataclass
class Measured(Generic[M]):
    """A frame and its measurement, or the error that measuring it raised."""

    frame: Frame
    measurement: M | None
    error: BaseException | None


class FrameWorkers(Generic[M]):
    """Runs ``measure`` on up to ``workers`` frames at once; hands them back oldest first."""

    def __init__(self, measure: Callable[[Frame], M], workers: int) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be at least 1 and at most {MAX_WORKERS}, got {workers}")
        self.workers = workers
        self._measure = measure
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="frame-worker")
        self._in_flight: collections.deque[tuple[Frame, Future]] = collections.deque()

    def __len__(self) -> int:
        return len(self._in_flight)

    @property
    def full(self) -> bool:
        return len(self._in_flight) >= self.workers

    def submit(self, frame: Frame) -> None:
        """Start measuring ``frame``; call only when not ``full``."""
        if self.full:
            raise RuntimeError("all frame workers are busy: take the oldest frame first")
        self._in_flight.append((frame, self._pool.submit(self._measure, frame)))

    def oldest_done(self) -> bool:
        return bool(self._in_flight) and self._in_flight[0][1].done()

    def pop(self) -> Measured[M]:
        """The oldest frame in flight, once measured (waits for it)."""
        frame, future = self._in_flight.popleft()
        try:
            return Measured(frame, future.result(), None)
        except Exception as exc:  # noqa: BLE001 - handed to the caller with its frame
            return Measured(frame, None, exc)

    def close(self) -> None:
        """Wait for the frames in flight (their results are dropped) and stop the threads."""
        self._in_flight.clear()
        self._pool.shutdown(wait=True)
