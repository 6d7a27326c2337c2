"""GGUF files as llava-kv reads them: what a text model or mmproj projector says it is, and whether
llama.cpp and mtmd can load it safely.

llama.cpp trusts what it loads: a block count of zero, a head count that does not divide the width,
a NaN epsilon, a duplicated vocabulary entry or a metadata value of an unexpected type ends in an
assert (the whole process aborts) or in silent garbage. So every file is read here first, by a
parser of our own that bounds every count and length by the file's size, and the hyperparameters
the loaders use are checked against the ranges they can live with. Anything wrong is a
:class:`~llava_kv.ModelLoadError` that names the file, the key and the value.

One concept per module: :mod:`.reader` (the bounded parser and the format's constants),
:mod:`.facts` (what the pinned llama.cpp and mtmd can load), :mod:`.typed_access` (values read with
errors that name the key), :mod:`.tensor_checks` (tensor checks both kinds of file share),
:mod:`.text_checks`, :mod:`.projector_checks`, :mod:`.model_files` (both, as ``Model.load`` runs
them) and :mod:`.metadata` (architecture and projector type, cached per file). Names with a leading
underscore are shared between these modules only.
"""
from __future__ import annotations

from .facts import PROJECTOR_TYPES, TEXT_ARCHITECTURES
from .metadata import architecture, projector_type
from .model_files import check_model_files
from .projector_checks import check_projector
from .reader import (
    T_ARRAY,
    T_BOOL,
    T_F32,
    T_F64,
    T_I8,
    T_I16,
    T_I32,
    T_I64,
    T_STRING,
    T_U8,
    T_U16,
    T_U32,
    T_U64,
    GGUFFile,
    TensorInfo,
    read_gguf,
)
from .text_checks import check_text_model

__all__ = [
    # checks, as Model.load runs them
    "check_model_files",
    "check_text_model",
    "check_projector",
    # the bounded reader and the GGUF value type ids its `types` holds
    "read_gguf",
    "GGUFFile",
    "TensorInfo",
    "T_U8", "T_I8", "T_U16", "T_I16", "T_U32", "T_I32", "T_U64", "T_I64", "T_F32", "T_F64",
    "T_BOOL", "T_STRING", "T_ARRAY",
    # what llama.cpp and mtmd load
    "TEXT_ARCHITECTURES",
    "PROJECTOR_TYPES",
    # what a file says it is
    "architecture",
    "projector_type",
]
