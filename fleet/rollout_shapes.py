"""Which input shape of a rollout's model each camera gets (``docs/fleet-api.md``,
"Rectangular models").

A manifest may carry the model at several input shapes (``variants``). On each manifest poll
the gateway finds the camera's frame size — its configuration's ``traffic.frame_size``, else
the ``frame_width``/``frame_height`` of the newest heartbeat that has them among the last
``HEARTBEAT_SIZE_WINDOW`` it received (agents that send them; a heartbeat without a size —
an agent that has not read a frame yet since it started — does not make the gateway forget
the size), else the size of the newest frame it uploaded — and names the shape that fits
(``roadloop.models.shapes.pick_input_shape``) in ``assignment.input_shape``. A camera whose
frame size is unknown gets the manifest's own (square) file. Frame sizes are cached per
manifest snapshot (``fleet.caches.ManifestCache``), so a poll costs at most one lookup a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db import CameraConfigRow, FrameRow, HeartbeatRow
from roadloop.models.shapes import pick_input_shape

# How many of a camera's newest heartbeats are searched for a frame size: 20 is 10 minutes at
# the agent's default 30 s interval (a restarted agent sends sizeless heartbeats only until its
# first frame). Bounded on purpose: the heartbeats table is large, and an unbounded "newest
# with a size" would walk all of an older agent's heartbeats (which never carry one) on every
# lookup. One range scan of ``ix_heartbeats_camera_received`` (no new index), reading only the
# two JSON fields of at most this many rows.
HEARTBEAT_SIZE_WINDOW = 20


def manifest_shapes(manifest: Mapping[str, Any] | None) -> list[tuple[int, int]]:
    """The input shapes a signed manifest offers, its own file's first; [] without variants."""
    if not isinstance(manifest, Mapping) or not manifest.get("variants"):
        return []
    size = int(manifest.get("input_size") or 0)
    own = manifest.get("input_shape") or [size, size]
    shapes = [(int(own[0]), int(own[1]))]
    for v in manifest["variants"]:
        hw = (int(v["input_shape"][0]), int(v["input_shape"][1]))
        if hw not in shapes:
            shapes.append(hw)
    return shapes


def _configured_size(document: Any) -> tuple[int, int] | None:
    traffic = document.get("traffic") if isinstance(document, Mapping) else None
    size = traffic.get("frame_size") if isinstance(traffic, Mapping) else None
    if (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return int(size[0]), int(size[1])
    return None


def _heartbeat_size(payload: Any) -> tuple[int, int] | None:
    if not isinstance(payload, Mapping):
        return None
    w, h = payload.get("frame_width"), payload.get("frame_height")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return int(w), int(h)
    return None


def _recent_heartbeat_size(session: Session, camera_id: str) -> tuple[int, int] | None:
    """The frame size of the newest of the camera's last ``HEARTBEAT_SIZE_WINDOW`` heartbeats
    that carries one, newest as received (``fleet.metrics.latest_heartbeat``'s order: not by
    the agent's clock); None when none of them does."""
    rows = session.execute(
        select(HeartbeatRow.payload["frame_width"], HeartbeatRow.payload["frame_height"])
        .where(HeartbeatRow.camera_id == camera_id)
        .order_by(HeartbeatRow.received_at.desc(), HeartbeatRow.id.desc())
        .limit(HEARTBEAT_SIZE_WINDOW)).all()
    for w, h in rows:
        if (size := _heartbeat_size({"frame_width": w, "frame_height": h})) is not None:
            return size
    return None


def camera_frame_size(session: Session, camera_id: str) -> tuple[int, int] | None:
    """(width, height) of a camera's frames, or None when the gateway does not know it."""
    doc = session.scalar(select(CameraConfigRow.document).where(
        CameraConfigRow.camera_id == camera_id))
    if (size := _configured_size(doc)) is not None:
        return size
    if (size := _recent_heartbeat_size(session, camera_id)) is not None:
        return size
    row = session.execute(
        select(FrameRow.width, FrameRow.height).where(FrameRow.camera_id == camera_id)
        .order_by(FrameRow.captured_at.desc()).limit(1)).first()
    return (int(row[0]), int(row[1])) if row and row[0] > 0 and row[1] > 0 else None


def shape_for_camera(
    frame_wh: tuple[int, int] | None, shapes: list[tuple[int, int]]
) -> list[int] | None:
    """``[h, w]`` to name in the assignment; None when the manifest has one shape only or the
    camera gets the manifest's own file."""
    if len(shapes) < 2:
        return None
    hw = pick_input_shape(frame_wh, shapes)
    return None if hw == shapes[0] else [hw[0], hw[1]]
