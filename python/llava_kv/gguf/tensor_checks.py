"""Checks of a GGUF tensor table that text models and projectors share: no tensor of a type
llama.cpp does not run as a weight (and, where asked, norms and biases in a float type), and every
bias as long as its weight has outputs.
"""
from __future__ import annotations

import math

from .reader import GGML_TYPES, GGUFFile

_FLOAT_TENSOR_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16
_INTEGER_TENSOR_TYPES = frozenset({24, 25, 26, 27, 28})  # I8, I16, I32, I64, F64: not weights llama.cpp runs


def _check_tensor_types(g: GGUFFile, *, vectors_float: bool) -> None:
    for t in g.tensors.values():
        if t.ggml_type in _INTEGER_TENSOR_TYPES:
            raise g.fail(f"tensor {t.name!r} has type {GGML_TYPES[t.ggml_type][0]}; weights are float or quantized")
        if vectors_float and len(t.shape) <= 1 and t.ggml_type not in _FLOAT_TENSOR_TYPES:
            raise g.fail(f"tensor {t.name!r} (a vector) has type {GGML_TYPES[t.ggml_type][0]}; "
                         "norms and biases are F32, F16 or BF16")


def _check_biases(g: GGUFFile) -> None:
    """A bias has one value per output of its weight (linear: rows; conv: output channels; norm: width)."""
    for name, bias in g.tensors.items():
        if not name.endswith(".bias"):
            continue
        weight = g.tensors.get(name[:-5] + ".weight")
        if weight is None or not weight.shape:
            continue
        # ggml order: a conv kernel (conv1d [K, IC, OC], conv2d [KW, KH, IC, OC]) has its outputs last
        want = weight.shape[0] if len(weight.shape) == 1 else weight.shape[-1] if len(weight.shape) >= 3 \
            else weight.shape[1]
        if math.prod(bias.shape) != want:
            raise g.fail(f"tensor {name!r} has shape {list(bias.shape)} but its weight has shape "
                         f"{list(weight.shape)} ({want} outputs)")
