"""Markdown helpers shared by the reports the platform writes from agent-supplied text."""

from __future__ import annotations

from typing import Any


def md_cell(value: Any) -> str:
    """``value`` as the text of one markdown table cell: ``|`` escaped (``\\|``) and every
    line break (``\\n``, ``\\r``, ``\\r\\n`` and the other ``str.splitlines`` separators) made
    one space, so a reason, label or detail an agent sent cannot end a row or add a column."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")
