"""Flower's ``key=value`` config strings (``--run-config``, ``--node-config``), built safely.

Each value is parsed by Flower as TOML; a value that could smuggle a second key (a quote,
a newline) is refused rather than escaped into something Flower would read differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from roadloop.errors import RoadloopError

ConfigValue = str | int | float | bool

_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class InvalidConfigError(RoadloopError, ValueError):
    """A config value Flower cannot carry, or a deployment asked for that cannot exist."""


def format_config_value(value: ConfigValue) -> str:
    """One value in Flower's ``key=value`` syntax (each value is parsed as TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidConfigError(f"config value {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if _CONTROL_CHARS.search(value):
            raise InvalidConfigError(f"config value {value!r} holds a newline or control char")
        # Flower splits on the first closing quote, so a value may not contain its own
        # quote character: literal strings ('...', no escapes) unless the value holds a
        # single quote, then a basic string ("...", backslashes escaped).
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value:
            return '"' + value.replace("\\", "\\\\") + '"'
        raise InvalidConfigError(f"config value {value!r} holds both quote characters")
    raise InvalidConfigError(f"config value {value!r} is not a str, int, float or bool")


def format_run_config(config: Mapping[str, ConfigValue]) -> str:
    """Flower's run/node-config string: ``k1=v1 k2="v 2"``, every value TOML-quoted."""
    parts = []
    for key, value in config.items():
        if not _CONFIG_KEY.match(key):
            raise InvalidConfigError(f"config key {key!r} is not a bare TOML key")
        parts.append(f"{key}={format_config_value(value)}")
    return " ".join(parts)


__all__ = ["ConfigValue", "InvalidConfigError", "format_config_value", "format_run_config"]
