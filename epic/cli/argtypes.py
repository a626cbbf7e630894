"""argparse types that refuse nonsense before any work starts: ``--epochs 0``, ``--lr nan``,
``--batch-size -5`` each become a one-line error naming the option and the bad value."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["at_least", "number"]


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer option that must be ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False
           ) -> Callable[[str], float]:
    """A finite float option in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < low or (low_open and value == low) or value > high:
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}], got {value:g}")
        return value

    parse.__name__ = "number"
    return parse
