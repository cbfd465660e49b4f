"""How every report, table and log line writes a number, so the same value reads the same in
report.md, ablation.md, the sweep summary and the console tables."""

from __future__ import annotations

import math

MISSING = "—"  # a value that is absent (None) or undefined (NaN)


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_number(
    value: float | None, digits: int = 4, *, signed: bool = False, missing: str = MISSING
) -> str:
    """``value`` with ``digits`` decimals (``+`` on positives when ``signed``), or ``missing``."""
    if _missing(value):
        return missing
    return f"{value:{'+' if signed else ''}.{digits}f}"


def fmt_interval(
    low: float | None,
    high: float | None,
    digits: int = 4,
    *,
    signed: bool = False,
    missing: str = MISSING,
) -> str:
    """``[low, high]``, or ``missing`` when either end is absent or undefined."""
    if _missing(low) or _missing(high):
        return missing
    return f"[{fmt_number(low, digits, signed=signed)}, {fmt_number(high, digits, signed=signed)}]"
