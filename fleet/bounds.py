"""Bounds of every value the gateway accepts, named once and used by every schema.

A value outside these bounds is a 422 at validation, never a 500 later: each bound is chosen
so that what the gateway does with an accepted value cannot fail.

* Datetimes are timezone-aware and lie in ``[EARLIEST, LATEST)`` (query parameters) or, for
  the time an agent says something happened (``captured_at``, ``sent_at``), in
  ``[EARLIEST, now + CLOCK_SKEW]``. Python datetimes overflow converting ``0001-01-01+01:00``
  or ``9999-12-31-01:00`` to UTC (the database stores UTC), so both ends matter.
* Integers fit the column they land in: ``INTEGER`` is 32-bit on PostgreSQL, 64-bit on
  SQLite; nothing beyond 64-bit signed is accepted anywhere.
* Floats are finite (JSON has no NaN/Infinity; ``1e400`` parses to ``inf``).
* Durations that become ``timedelta``s added to "now" (token lifetimes, stage holds) are capped
  far below the overflow: ``now + MAX_TOKEN_TTL_S`` stays before year 9999 for any clock before
  year 9998, and ``timedelta(seconds=MAX_HOLD_S)`` is nowhere near its 999999999-day limit.
* Strings hold no NUL and no lone surrogate (``text_problem``: PostgreSQL cannot store the
  first, UTF-8 cannot encode the second); request bodies are checked as they are parsed
  (``fleet.bodies.loads``), typed strings and free-form JSON again at validation.
* Strings and lists have a maximum length; free-form JSON (device ``hardware``, the heartbeat
  payload) a maximum depth, node count and string length (``check_json_value``). Request
  bodies are refused for nesting before they are parsed (``fleet.bodies``).
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, Field

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
# How far ahead of the gateway's clock an agent's timestamp may be: a device clock set to
# local time but labelled UTC is off by at most 14 h.
CLOCK_SKEW = timedelta(days=1)
# The gateway's own clock during a request (``fleet.bodies.BoundedJSONRoute`` sets it; tests
# move it by hand). "Now" for ``EventTime`` is the later of it and the wall clock.
gateway_now: ContextVar[datetime | None] = ContextVar("gateway_now", default=None)

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
FLOAT_MAX = 1e15  # magnitude of any float the gateway stores (finite; exact up to 2**53)

MAX_TOKEN_TTL_S = 366 * 86400
MAX_HOLD_S = 30 * 86400
MAX_LATENCY_MS = 3_600_000.0
MAX_DEVICES = 1_000_000
MAX_STAGES = 20
MAX_SCOPES = 8
MAX_CLASS_ID = 9_999
MAX_PIXELS_SIDE = 65_535  # the largest a JPEG header can state
MAX_COORD = 1e6  # box coordinates, pixels (boxes may run a little outside the frame)

MAX_JSON_DEPTH = 32
MAX_JSON_VALUES = 50_000  # a whole request body (2000 detections of frame metadata: ~20000)
MAX_JSON_NODES = 20_000
MAX_JSON_STRING = 4_096
MAX_JSON_KEY = 256


# --------------------------------------------------------------------------- datetimes
# Aware comparisons subtract offsets without building a datetime, so they cannot overflow.
def _timestamp(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"{value.isoformat()} is out of range: give a time from "
                         f"{EARLIEST.date().isoformat()} to before {LATEST.date().isoformat()}")
    return value


def clock_now() -> datetime:
    """"Now" for the time bounds: the later of the wall clock and the gateway's clock during
    this request (``gateway_now``; tests move it)."""
    now = datetime.now(UTC)
    reference = gateway_now.get()
    if reference is not None and reference > now:
        now = reference
    return now


def _not_ahead(hint: str) -> Any:
    def check(value: datetime) -> datetime:
        if value < EARLIEST:
            raise ValueError(f"{value.isoformat()} is before {EARLIEST.date().isoformat()}: "
                             f"{hint}")
        now = clock_now()
        if value > now + CLOCK_SKEW:
            raise ValueError(f"{value.isoformat()} is more than {CLOCK_SKEW.days} day ahead of "
                             f"the gateway's clock ({now.isoformat(timespec='seconds')}): {hint}")
        return value

    return check


_event_time = _not_ahead("check the device clock")


Timestamp = Annotated[
    AwareDatetime,
    AfterValidator(_timestamp),
    Field(description="ISO 8601 with a time zone, 2000-01-01 <= t < 2100-01-01."),
]
EventTime = Annotated[
    AwareDatetime,
    AfterValidator(_event_time),
    Field(description="ISO 8601 with a time zone, from 2000-01-01 to one day after now."),
]
# The same bound for a time the platform reports (a drift window): nothing it says happened
# lies more than a day past the gateway's clock.
ReportedTime = Annotated[
    AwareDatetime,
    AfterValidator(_not_ahead("check the reporting host's clock")),
    Field(description="ISO 8601 with a time zone, from 2000-01-01 to one day after now."),
]

# --------------------------------------------------------------------------- numbers
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
DeviceCount = Annotated[int, Field(ge=0, le=MAX_DEVICES)]
Int32 = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Finite = Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
PositiveFraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Ms = Annotated[float, Field(gt=0.0, le=MAX_LATENCY_MS, allow_inf_nan=False)]
TokenTtl = Annotated[int, Field(gt=0, le=MAX_TOKEN_TTL_S, description="Seconds, at most 366 days.")]
HoldSeconds = Annotated[
    float, Field(ge=0.0, le=MAX_HOLD_S, allow_inf_nan=False, description="At most 30 days.")
]
Pixels = Annotated[int, Field(gt=0, le=MAX_PIXELS_SIDE)]
ClassId = Annotated[int, Field(ge=0, le=MAX_CLASS_ID)]
Coord = Annotated[float, Field(ge=-MAX_COORD, le=MAX_COORD, allow_inf_nan=False)]
SchemaVersion = Annotated[int, Field(ge=1, le=1000)]

# --------------------------------------------------------------------------- strings
def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None. PostgreSQL refuses NUL in a text value (and
    ``\\u0000`` in JSONB), and a lone surrogate (``\\ud800``, legal as a JSON escape) has no
    UTF-8 encoding: once stored, every answer that includes it fails to serialize."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone UTF-16 surrogate (a \\ud800-\\udfff escape not in a pair)"
    return None


def _plain_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


PlainText = AfterValidator(_plain_text)
Id = Annotated[str, Field(min_length=1, max_length=64), PlainText]  # device, camera, frame ids
RolloutId = Annotated[str, Field(min_length=1, max_length=100), PlainText]
Name = Annotated[str, Field(max_length=200), PlainText]  # model versions, labels
ClassName = Annotated[str, Field(min_length=1, max_length=100), PlainText]
Scope = Annotated[str, Field(min_length=1, max_length=32), PlainText]
Reason = Annotated[str, Field(min_length=1, max_length=1000), PlainText]
Action = Annotated[str, Field(min_length=1, max_length=64), PlainText]


# --------------------------------------------------------------------------- free-form JSON
_Path = tuple[Any, str | int] | None  # (parent path, key): rendered only for an error


def _where(path: _Path) -> str:
    parts: list[str] = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "$" + "".join(reversed(parts))


def check_json_value(value: Any) -> Any:
    """``value`` unchanged if it is plain JSON within the bounds above; else ``ValueError``.

    Iterative (no recursion, whatever the depth): at most ``MAX_JSON_DEPTH`` nested
    arrays/objects (the outermost is level 1) and
    ``MAX_JSON_NODES`` values, strings up to ``MAX_JSON_STRING`` characters, object keys up
    to ``MAX_JSON_KEY``, integers within 64-bit signed, floats finite.
    """
    stack: list[tuple[Any, int, _Path]] = [(value, 1, None)]
    nodes = 1
    while stack:
        v, depth, path = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise ValueError(f"integer at {_where(path)} does not fit 64 bits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"number at {_where(path)} is not finite")
        elif isinstance(v, str):
            if len(v) > MAX_JSON_STRING:
                raise ValueError(f"string at {_where(path)} is longer than {MAX_JSON_STRING} "
                                 "characters")
            problem = text_problem(v)
            if problem is not None:
                raise ValueError(f"string at {_where(path)} {problem}")
        elif isinstance(v, (dict, list, tuple)):
            nodes += len(v)
            if nodes > MAX_JSON_NODES:
                raise ValueError(f"more than {MAX_JSON_NODES} JSON values")
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels at {_where(path)}")
            if isinstance(v, dict):
                for k, item in v.items():
                    if not isinstance(k, str) or len(k) > MAX_JSON_KEY:
                        raise ValueError(f"object key at {_where(path)} is not a string of at "
                                         f"most {MAX_JSON_KEY} characters")
                    problem = text_problem(k)
                    if problem is not None:
                        raise ValueError(f"object key at {_where(path)} {problem}")
                    stack.append((item, depth + 1, (path, k)))
            else:
                stack.extend((item, depth + 1, (path, i)) for i, item in enumerate(v))
        else:
            # ValueError, not TypeError: pydantic turns only the former into a 422.
            kind = type(v).__name__
            raise ValueError(f"value at {_where(path)} is not JSON ({kind})")  # noqa: TRY004
    return value


def unstorable_string(value: Any) -> str | None:
    """The first string or object key in the parsed JSON ``value`` that ``text_problem``
    refuses, as a message naming where it is; None when there is none. Iterative."""
    stack: list[tuple[Any, _Path]] = [(value, None)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem is not None:
                return f"the string at {_where(path)} {problem}"
        elif isinstance(v, dict):
            for k, item in v.items():
                problem = text_problem(k) if isinstance(k, str) else None
                if problem is not None:
                    return f"an object key at {_where(path)} {problem}"
                stack.append((item, (path, k)))
        elif isinstance(v, list):
            stack.extend((item, (path, i)) for i, item in enumerate(v))
    return None


JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_value)]
