"""argparse types that refuse nonsense before any work starts: ``--epochs 0``, ``--lr nan``,
``--batch-size -5`` each become a one-line error naming the option and the bad value."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["at_least", "number", "setting"]


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


def setting(text: str) -> tuple[str, object]:
    """A ``NAME=VALUE`` option: the name (dashes read as underscores) and the value as an
    integer, a number, true/false/none, or else the text."""
    name, eq, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    value: object = {"true": True, "false": False, "none": None}.get(raw.strip().lower(), raw)
    if value is raw:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{name} must be finite, got {raw}")
    return name, value
