"""argparse value types for bounded numbers, so every command refuses an out-of-range value alike."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable

_INTEGER = re.compile(r"-?[0-9]+")


def positive_int(text: str) -> int:
    """A count of at least 1 (steps, vocabulary size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def integer_in(minimum: int, maximum: int) -> Callable[[str], int]:
    """An integer in [minimum, maximum], written in plain digits."""
    def parse(text: str) -> int:
        if not (_INTEGER.fullmatch(text) and minimum <= int(text) <= maximum):
            raise argparse.ArgumentTypeError(f"expected an integer in [{minimum}, {maximum:,}], got {text!r}")
        return int(text)
    return parse


def number_in(interval: str, what: str = "a number") -> Callable[[str], float]:
    """A finite number in ``interval``, written as it reads: "(0, 1]", "[0, 1)", "[1e-6, 1e6]"."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    open_low, open_high = interval[0] == "(", interval[-1] == ")"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}")
        return value
    return parse
