"""The demo cameras' traffic geometry, one ``traffic`` section per shared video (by file name).

Placed by hand on frames of each video (the median of frames spread over the clip, so parked
cars stay and moving ones vanish), with a grid drawn over them: the counting point of a vehicle
is the bottom-centre of its box, so lines lie across the carriageway where the wheels pass and
zones cover the lanes' asphalt. Coordinates are pixels of the video's own frame size. Every
section is checked by ``edge_agent.traffic.parse_traffic_section`` (tests/test_demo_outcome.py).
"""

from __future__ import annotations

from typing import Any

# US highway seen from an overpass: the left (near) carriageway comes toward the camera on
# three lanes, the right (far) one goes away.
HIGHWAY_OVERPASS: dict[str, Any] = {
    "frame_size": [1280, 720],
    "lines": [
        # Across the three near lanes at y = 480, from the white edge line to the yellow line
        # (drawn left → right, so a vehicle moving down the image — toward us — is `in`).
        {"name": "toward", "start": [300, 480], "end": [810, 480],
         "in_label": "toward", "out_label": "away", "allowed": "in"},
        # Across the far carriageway where it leaves the frame on the right, from the grass
        # edge down to the cones (vehicles moving up-left, away from us, are `in`).
        {"name": "away", "start": [1162, 246], "end": [1136, 308],
         "in_label": "away", "out_label": "toward", "allowed": "in"},
    ],
    "zones": [
        # The near lanes between y = 330 and 700, bounded by the white edge line, the two
        # dashed lane lines and the yellow line (left to right); ~50 m of lane each.
        {"name": "lane_1", "polygon": [[445, 330], [528, 330], [440, 700], [162, 700]],
         "capacity": 8},
        {"name": "lane_2", "polygon": [[528, 330], [618, 330], [690, 700], [440, 700]],
         "capacity": 8},
        {"name": "lane_3", "polygon": [[618, 330], [700, 330], [955, 700], [690, 700]],
         "capacity": 8},
        # The far carriageway, between the grass and the cones, to the right edge.
        {"name": "far_carriageway",
         "polygon": [[960, 203], [1279, 268], [1279, 338], [1130, 302], [935, 226]],
         "capacity": 20},
    ],
    # From the two dashed lines around the middle near lane (3.7 m apart): the near and far end
    # of three consecutive dashes on each (3 m dashes, 9 m gaps: a 12 m period). World axes:
    # X across the road (left dashed line X = 0), Y along it, away from the camera.
    "homography": {
        "image_points": [[454, 569], [466, 538], [482, 470], [488, 449], [500, 408],
                         [504, 395],
                         [659, 574], [649, 542], [633, 470], [627, 452], [621, 408],
                         [618, 396]],
        "world_points": [[0, 0], [0, 3], [0, 12], [0, 15], [0, 24], [0, 27],
                         [3.7, 0], [3.7, 3], [3.7, 12], [3.7, 15], [3.7, 24], [3.7, 27]],
    },
    "interval_s": 60,
}

# A Chinese city boulevard from a pole: four lanes going away from the camera (the arrows
# point up) plus a bus lane at the stop; a separate road beyond the barrier on the left.
CCTV_STREET: dict[str, Any] = {
    "frame_size": [640, 360],
    "lines": [
        # Across the boulevard at y = 225, from the bus-stop kerb to the yellow edge line
        # (drawn right → left, so a vehicle moving up the image — away from us — is `in`).
        {"name": "boulevard", "start": [565, 225], "end": [112, 225],
         "in_label": "away", "out_label": "toward"},
        # Across the far road beyond the barrier, at y = 150.
        {"name": "side_road", "start": [2, 150], "end": [134, 150]},
    ],
    "zones": [
        # The boulevard's approach from the pole to the arrows: yellow edge line to the bus
        # lane's kerb, y 120 → 340.
        {"name": "approach", "polygon": [[181, 120], [415, 120], [565, 340], [37, 340]],
         "capacity": 14},
    ],
    "interval_s": 60,
}

# A residential street seen steeply from a window: parked cars along both kerbs, one moving
# lane between them running left ↔ right across the frame.
WINDOW_STREET: dict[str, Any] = {
    "frame_size": [640, 360],
    "lines": [
        # Across the moving lane at x ≈ 330, from the upper row of parked cars to just above
        # the lower row (their wheels stay clear of it); drawn top → bottom, so a vehicle
        # moving to the left of the image is `in`.
        {"name": "street", "start": [318, 98], "end": [338, 232],
         "in_label": "to_left", "out_label": "to_right"},
    ],
    "zones": [
        # The moving lane between the parked rows, the whole width of the frame.
        {"name": "street", "polygon": [[0, 160], [300, 130], [639, 95], [639, 175],
                                       [470, 215], [0, 225]],
         "capacity": 6},
    ],
    "interval_s": 60,
}

DEMO_TRAFFIC: dict[str, dict[str, Any]] = {
    "highway_overpass.mp4": HIGHWAY_OVERPASS,
    "cctv_street.mp4": CCTV_STREET,
    "window_street.mp4": WINDOW_STREET,
}


def traffic_section(video_name: str) -> dict[str, Any] | None:
    """The ``traffic`` section for a shared video (by file name), or None when it has none."""
    section = DEMO_TRAFFIC.get(video_name)
    return None if section is None else dict(section)
