"""Cells of the Markdown tables the reports write (a study's report.md, the pipeline
run's summary): one formatter, so a missing value and a number read the same in both."""

from __future__ import annotations

from typing import Any


def cell(value: Any, digits: int = 4) -> str:
    """``-`` for a missing value, a float to ``digits`` decimals, anything else as is
    (integers stay integers: 32 epochs, not 32.0000)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


__all__ = ["cell"]
