"""Typed access to a parsed GGUF header: a metadata value read as an integer, float, string or
per-layer list, or a tensor looked up, each refused with a :class:`~llava_kv.ModelLoadError` that
names the file, the key and the value when it is missing, of the wrong type or out of range. The
text-model and projector checks read every value through these, so their errors read alike.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reader import (
    _FLOAT_TYPES,
    _INT_TYPES,
    _TYPE_NAMES,
    T_ARRAY,
    T_STRING,
    GGUFFile,
    TensorInfo,
)


def _describe(value: Any) -> str:
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _get(g: GGUFFile, key: str, *, required: bool) -> Any:
    if key not in g.metadata:
        if required:
            raise g.fail(f"required key {key!r} is missing")
        return None
    return g.metadata[key]


def _int(g: GGUFFile, key: str, lo: int, hi: int, *, required: bool = True) -> int | None:
    value = _get(g, key, required=required)
    if value is None:
        return None
    vtype = g.types[key][0]
    if vtype not in _INT_TYPES:
        raise g.fail(f"{key} = {_describe(value)} must be an integer, not {_TYPE_NAMES[vtype]}")
    if not lo <= value <= hi:
        raise g.fail(f"{key} = {value} is outside [{lo}, {hi}]")
    return int(value)


def _float(g: GGUFFile, key: str, *, required: bool = True, positive: bool = True,
           hi: float = 3.4e38) -> float | None:
    value = _get(g, key, required=required)
    if value is None:
        return None
    vtype = g.types[key][0]
    if vtype not in _FLOAT_TYPES:
        raise g.fail(f"{key} = {_describe(value)} must be a float, not {_TYPE_NAMES[vtype]}")
    if not math.isfinite(value) or value > hi or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise g.fail(f"{key} = {value:g} must be finite and {bound}" + (f" and at most {hi:g}" if hi < 3e38 else ""))
    return float(value)


def _str(g: GGUFFile, key: str, *, required: bool = True) -> str | None:
    value = _get(g, key, required=required)
    if value is None:
        return None
    if g.types[key][0] != T_STRING:
        raise g.fail(f"{key} = {_describe(value)} must be a string, not {_TYPE_NAMES[g.types[key][0]]}")
    return str(value)


def _per_layer(g: GGUFFile, key: str, n_layer: int, lo: int, hi: int, *, required: bool) -> list[int] | None:
    """A hyperparameter given once or per layer (llama.cpp's get_key_or_arr)."""
    value = _get(g, key, required=required)
    if value is None:
        return None
    vtype, etype = g.types[key]
    if vtype == T_ARRAY:
        if etype not in _INT_TYPES:
            raise g.fail(f"{key} is an array of {_TYPE_NAMES.get(etype or 0, str(etype))}, not integers")
        if len(value) != n_layer:
            raise g.fail(f"{key} has {len(value)} entries but block_count is {n_layer}")
        values = [int(x) for x in value]
        for i, x in enumerate(values):
            if not lo <= x <= hi:
                raise g.fail(f"{key}[{i}] = {x} is outside [{lo}, {hi}]")
        return values
    single = _int(g, key, lo, hi)
    assert single is not None
    return [single] * n_layer


def _tensor(g: GGUFFile, name: str, *, required: bool = True) -> TensorInfo | None:
    t = g.tensors.get(name)
    if t is None and required:
        raise g.fail(f"required tensor {name!r} is missing")
    return t
