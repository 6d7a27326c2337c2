"""Checks of the numbers users pass to the public API, before they reach the native core.

The bindings take int32 / uint32 / float32; a value out of their range would come back as pybind's
"incompatible function arguments" dump, and a NaN temperature or an int32-overflowing token count
would go on to misbehave natively. Every facade function checks its numbers here and raises a
ValueError (out of range) or TypeError (not a number) that names the argument.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Literal, Mapping, overload

from . import _core

__all__ = ["INT32_MAX", "UINT32_MAX", "check_int", "check_float", "check_sampling", "check_logit_bias",
           "sampling_params"]

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


def check_logit_bias(logit_bias: Any) -> list[tuple[int, float]]:
    """``logit_bias`` (None, a mapping of token id (an int, or its decimal string as JSON sends it)
    to a bias in [-100, 100], OpenAI's range, or (token, bias) pairs) as (token, bias) pairs. The
    core checks the ids against the vocabulary."""
    if logit_bias is None:
        return []
    if isinstance(logit_bias, Mapping):
        items = list(logit_bias.items())
    elif isinstance(logit_bias, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                                       for p in logit_bias):
        items = [(p[0], p[1]) for p in logit_bias]
    else:
        raise TypeError(f"logit_bias must be a mapping of token id to bias, not {type(logit_bias).__name__}")
    pairs = []
    for key, value in items:
        try:
            token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
            token = check_int("logit_bias token id", token, 0, INT32_MAX)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: {key!r} is not a token id") from None
        pairs.append((token, check_float(f"logit_bias[{token}]", value, -100.0, 100.0)))
    return pairs


def sampling_params(*, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                    repeat_penalty: float = 1.0, seed: int = 0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, logit_bias: Any = None, grammar: str = "") -> _core.SamplingParams:
    """The core's sampling settings, the arguments checked first (ranges as OpenAI's for the
    penalties)."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                   seed=seed, max_tokens=0, seed_optional=False)
    check_float("presence_penalty", presence_penalty, -2.0, 2.0)
    check_float("frequency_penalty", frequency_penalty, -2.0, 2.0)
    return _core.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=check_logit_bias(logit_bias),
                                grammar=grammar, seed=seed)
