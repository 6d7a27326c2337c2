"""Checks of the numbers users pass to the public API, before they reach the native core.

The bindings take int32 / uint32 / float32; a value out of their range would come back as pybind's
"incompatible function arguments" dump, and a NaN temperature or an int32-overflowing token count
would go on to misbehave natively. Every facade function checks its numbers here and raises a
ValueError (out of range) or TypeError (not a number) that names the argument.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Literal, overload

__all__ = ["INT32_MAX", "UINT32_MAX", "check_int", "check_float", "check_sampling"]

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38


@overload
def check_int(name: str, value: Any, lo: int = ..., hi: int = ..., *, allow_none: Literal[False] = ...) -> int: ...


@overload
def check_int(name: str, value: Any, lo: int = ..., hi: int = ..., *, allow_none: bool) -> int | None: ...


def check_int(name: str, value: Any, lo: int = 1, hi: int = INT32_MAX, *, allow_none: bool = False) -> int | None:
    """``value`` as an int in ``[lo, hi]`` (None passes through when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not lo <= number <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {number}")
    return number


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``) that fits a float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}") from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number, got {number!r}")
    low_ok = lo is None or (number > lo if lo_open else number >= lo)
    if not low_ok or (hi is not None and number > hi):
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {left}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}], got {number!r}")
    return number


def check_sampling(*, temperature: Any, top_k: Any, top_p: Any, min_p: Any, repeat_penalty: Any,
                   seed: Any, max_tokens: Any, min_tokens: int = 0, seed_optional: bool = True) -> None:
    """The sampling arguments shared by generate, chat and the batch runner."""
    check_int("max_tokens", max_tokens, min_tokens, INT32_MAX - 1)
    check_float("temperature", temperature, 0.0)
    check_int("top_k", top_k, 0)
    check_float("top_p", top_p, 0.0, 1.0)
    check_float("min_p", min_p, 0.0, 1.0)
    check_float("repeat_penalty", repeat_penalty, 0.0, lo_open=True)
    check_int("seed", seed, 0, UINT32_MAX, allow_none=seed_optional)


def check_stops(stop: Any) -> list[str]:
    """``stop`` (None, a string or a sequence of strings) as a list of non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(x, str) or not x for x in stops):
        raise ValueError("stop strings must be non-empty str")
    return stops
