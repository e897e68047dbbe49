"""Argument checks shared by every module of dp_attn (imports nothing, so that the torch-free
parts, dp_attn.accounting and the CLI, may use it too).

Errors follow docs/design.md §7: TypeError for a value of the wrong type, ValueError for a
value out of range, each naming the argument.
"""

from __future__ import annotations

import math
from typing import TypeGuard


def is_int(value: object) -> TypeGuard[int]:
    """A Python int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[int | float]:
    """A Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int) -> int:
    """`value` as an int >= minimum, else ValueError."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_real(name: str, value: object, *, positive: bool) -> float:
    """`value` as a finite float, > 0 if `positive`, else >= 0."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        want = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {want}, got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
