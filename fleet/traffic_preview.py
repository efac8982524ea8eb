"""``GET /v1/cameras/{camera_id}/preview.jpg``: the camera's geometry drawn on its latest frame.

What an operator looks at before trusting the counts: the latest stored frame of the camera
with its counting lines (an arrow across each line points to its ``in`` side: from the left
of ``start → end`` to its right, image axes), its zones with their names, the homography's
image points, and the last 15 minutes' counts per line and direction beside each line. The
geometry is the camera's current ``traffic`` section, parsed by the agent's own parser and
scaled from its ``frame_size`` to the stored frame's size (``TrafficConfig.scaled_to``).
"""

from __future__ import annotations

import io
import math
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import func, select

from edge_agent.traffic.geometry import TrafficConfig, parse_traffic_section
from fleet.auth import AdminPrincipal
from fleet.auth_first import AuthFirstRoute
from fleet.camera_config import CameraIdPath
from fleet.db import CameraConfigRow, FrameRow, TrafficLineCountRow
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut

RECENT = timedelta(minutes=15)
LINE_RGB = (255, 220, 0)
ARROW_RGB = (0, 255, 90)
ZONE_RGB = (0, 170, 255)
POINT_RGB = (255, 60, 200)
router = APIRouter(tags=["traffic"], route_class=AuthFirstRoute)


def recent_counts(gw: Gateway, camera_id: str) -> dict[tuple[str, str], int]:
    """Vehicles per (line, direction) in records whose interval started in the last 15 min."""
    t = TrafficLineCountRow
    q = (select(t.line, t.direction, func.sum(t.count))
         .where(t.camera_id == camera_id, t.interval_start >= gw.now() - RECENT)
         .group_by(t.line, t.direction))
    with gw.db.read() as session:
        return {(line, direction): int(n) for line, direction, n in session.execute(q)}


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has one fixed size
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any,
           fill: tuple[int, int, int]) -> None:
    box = draw.textbbox(xy, text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text(xy, text, font=font, fill=fill)


def draw_geometry(image: Image.Image, config: TrafficConfig,
                  counts: dict[tuple[str, str], int]) -> Image.Image:
    """A copy of ``image`` with ``config`` (already at the image's size) drawn on it."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(min(w, h) / 200))
    font = _font(max(10, round(min(w, h) / 40)))
    for zone in config.zones:
        pts = [tuple(p) for p in zone.polygon]
        draw.line([*pts, pts[0]], fill=ZONE_RGB, width=width)
        cx = sum(p[0] for p in pts) / len(pts)
        cy = sum(p[1] for p in pts) / len(pts)
        _label(draw, (cx, cy), zone.name, font, ZONE_RGB)
    for line in config.lines:
        (x0, y0), (x1, y1) = line.start, line.end
        draw.line([(x0, y0), (x1, y1)], fill=LINE_RGB, width=width)
        length = math.hypot(x1 - x0, y1 - y0)
        nx, ny = -(y1 - y0) / length, (x1 - x0) / length  # towards the line's right: "in"
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        arrow = max(12.0, min(w, h) / 10)
        tip = (mx + nx * arrow / 2, my + ny * arrow / 2)
        draw.line([(mx - nx * arrow / 2, my - ny * arrow / 2), tip], fill=ARROW_RGB, width=width)
        head = arrow / 4
        for side in (1, -1):  # the two barbs of the arrow head
            bx = tip[0] - nx * head + side * ny * head / 2
            by = tip[1] - ny * head - side * nx * head / 2
            draw.line([tip, (bx, by)], fill=ARROW_RGB, width=width)
        n_in = sum(counts.get((line.name, d), 0) for d in {line.in_label, "in"})
        n_out = sum(counts.get((line.name, d), 0) for d in {line.out_label, "out"})
        text = f"{line.name}  {line.in_label}: {n_in}  {line.out_label}: {n_out}  (15 min)"
        where = (min(max(0.0, mx - nx * arrow), w - 1.0), min(max(0.0, my - ny * arrow), h - 1.0))
        _label(draw, where, text, font, LINE_RGB)
    if config.homography is not None:
        r = width * 2
        for x, y in config.homography.image_points:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=POINT_RGB, width=width)
    return out


@router.get(
    "/v1/cameras/{camera_id}/preview.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "The annotated frame."},
               401: {"model": ErrorOut}, 403: {"model": ErrorOut},
               404: {"model": ErrorOut, "description": "No frame stored for the camera yet."},
               422: {"model": ErrorOut},
               503: {"model": ErrorOut, "description": "The frame store did not answer."}},
)
def camera_preview(camera_id: CameraIdPath, principal: AdminPrincipal,
                   gw: GatewayDep) -> Response:
    """The camera's latest stored frame with its traffic geometry and recent counts drawn."""
    with gw.db.read() as session:
        frame = session.scalar(select(FrameRow).where(FrameRow.camera_id == camera_id)
                               .order_by(FrameRow.captured_at.desc(), FrameRow.id.desc())
                               .limit(1))
        config_row = session.get(CameraConfigRow, camera_id)
    if frame is None:
        raise HTTPException(404, f"camera {camera_id} has no stored frame yet: the preview "
                            "draws on the latest frame its agent uploaded")
    gone = (f"camera {camera_id}'s latest frame {frame.frame_id} is no longer readable in "
            "the frame store")
    try:
        # The row's hash: a cached copy of an object store's image is used only when it is
        # these bytes (else the store is asked: an erased or replaced frame is not served).
        path = gw.store.image_path(frame.path, sha256=frame.sha256)
    except FileNotFoundError as exc:
        raise HTTPException(404, f"{gone} ({exc})") from exc
    except OSError as exc:  # the object store did not answer: not the frame's fault
        raise HTTPException(503, f"frame store unavailable for camera {camera_id}'s latest "
                            f"frame ({exc}); retry later") from exc
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except OSError as exc:
        raise HTTPException(404, f"{gone} ({exc})") from exc
    section = (config_row.document if config_row is not None else {}).get("traffic")
    if section is not None:
        config = parse_traffic_section(section).scaled_to(*image.size)
        image = draw_geometry(image, config, recent_counts(gw, camera_id))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return Response(content=buf.getvalue(), media_type="image/jpeg",
                    headers={"Cache-Control": "no-store"})


__all__ = ["draw_geometry", "recent_counts", "router"]

