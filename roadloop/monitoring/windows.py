"""Fixed drift windows in UTC: ``[start, start + length)``, aligned to the epoch.

A heartbeat belongs to the window holding its ``window_end`` (the agent's clock when its
statistics closed), else its ``sent_at``; one with neither, or an unparseable time, belongs
to none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

DRIFT_WINDOW_FORMAT = "%Y-%m-%d-%H:%M"
"""Partition keys of drift windows (UTC start), e.g. ``2026-11-27-05:15``."""


def check_window_minutes(minutes: int) -> int:
    """Window lengths that tile hours and days evenly (so they map onto cron partitions)."""
    if minutes <= 0 or (minutes < 60 and 60 % minutes) or (minutes >= 60 and (
            minutes % 60 or 24 % (minutes // 60))):
        raise ValueError(
            f"drift window of {minutes} min: use a divisor of 60 (1, 5, 15, 30 …) or a whole "
            "number of hours dividing 24"
        )
    return minutes


def window_cron(minutes: int) -> str:
    """Cron schedule whose ticks are the window starts."""
    check_window_minutes(minutes)
    if minutes < 60:
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    hours = minutes // 60
    return "0 * * * *" if hours == 1 else f"0 */{hours} * * *"


def window_start(ts: datetime, minutes: int) -> datetime:
    """Start of the window holding ``ts`` (aware; naive times are taken as UTC)."""
    ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    step = timedelta(minutes=minutes)
    return epoch + ((ts.astimezone(UTC) - epoch) // step) * step


def heartbeat_time(payload: Mapping[str, Any]) -> datetime | None:
    for key in ("window_end", "sent_at"):
        raw = payload.get(key)
        if isinstance(raw, str) and len(raw) <= 64:
            try:
                ts = datetime.fromisoformat(raw)
            except ValueError:
                continue
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return None


def group_by_window(payloads: Iterable[Any], minutes: int) -> dict[datetime, list[dict[str, Any]]]:
    """Heartbeat payloads by window start, each list in time order."""
    out: dict[datetime, list[tuple[datetime, dict[str, Any]]]] = {}
    for p in payloads:
        if not isinstance(p, Mapping):
            continue
        ts = heartbeat_time(p)
        if ts is None:
            continue
        out.setdefault(window_start(ts, minutes), []).append((ts, dict(p)))
    return {k: [p for _, p in sorted(v, key=lambda x: x[0])] for k, v in sorted(out.items())}


def parse_window_key(key: str) -> datetime:
    """A drift window partition key back to its (aware, UTC) start."""
    return datetime.strptime(key, DRIFT_WINDOW_FORMAT).replace(tzinfo=UTC)
