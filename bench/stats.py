"""
Medians, spreads and ratios of repeated measurements, and their text.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """Half the range of ``values`` as a fraction of their median: 0.1 reads ±10%."""
    middle = median(values)
    if len(values) < 2 or not middle:
        return 0.0
    return (max(values) - min(values)) / 2 / abs(middle)


def paired_ratio(values: Sequence[float], references: Sequence[float]) -> float:
    """Return the median of the round-by-round ratios ``values[i] / references[i]``."""
    ratios = [value / reference for value, reference in zip(values, references) if reference]
    return median(ratios)


def number(value: float) -> str:
    """Format a rate or a time with as many digits as the noise allows."""
    if math.isnan(value):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def with_spread(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    text = number(median(values))
    if len(values) > 1:
        text += f" ±{spread(values) * 100:.0f}%"
    return text


def ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
