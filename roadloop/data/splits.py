"""Who may see which labelled frame.

Each labelled source's ``train`` split is divided, deterministically by frame name, into a
*seed* part (enters ``curated_dataset``) and a *replay* part (played as camera traffic into
the frame store, to come back later through active learning). ``val`` and ``test`` frames
are never replayed, so no model is evaluated on a frame it trained on, and no frame is
trained on twice.
"""

from __future__ import annotations

import hashlib

REPLAYABLE_SPLIT = "train"


def _unit_interval(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_replay_frame(source: str, split: str, frame_stem: str, replay_fraction: float) -> bool:
    """True when this labelled frame is reserved for camera replay (never for seed training)."""
    if split != REPLAYABLE_SPLIT:
        return False
    return _unit_interval(f"{source}/{frame_stem}") < replay_fraction


def is_seed_frame(source: str, split: str, frame_stem: str, replay_fraction: float) -> bool:
    """True when this labelled frame belongs to the seed dataset (any split)."""
    return not is_replay_frame(source, split, frame_stem, replay_fraction)
