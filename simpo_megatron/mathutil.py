"""Integer arithmetic shared by the config, the data path and the training loop."""

from __future__ import annotations


def ceil_div(n: int, d: int) -> int:
    """``ceil(n / d)`` for integers, exactly (no float rounding for large ``n``)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return ceil_div(n, multiple) * multiple
