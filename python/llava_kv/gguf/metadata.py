"""What a GGUF file says it is: the text model's architecture, the projector's type.

Read with the header parser of :mod:`.reader` (bounded by the file's size, errors as
ModelLoadError) and remembered per file (path, size, mtime), so asking on every chat turn costs
nothing after the first (the header of a model with a 262k-token vocabulary takes about 0.4 s).
"""
from __future__ import annotations

import functools
import os

from .reader import read_gguf

__all__ = ["architecture", "projector_type"]

_KEYS = ("general.architecture", "clip.projector_type", "clip.vision.projector_type", "clip.audio.projector_type")


@functools.lru_cache(maxsize=64)
def _identity(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    metadata = read_gguf(path).metadata
    return {k: metadata[k] for k in _KEYS if isinstance(metadata.get(k), str)}


def _strings(path: str | os.PathLike[str]) -> dict[str, str]:
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    return _identity(path, st.st_size, st.st_mtime_ns)


def architecture(path: str | os.PathLike[str]) -> str | None:
    """``general.architecture`` of a GGUF file (e.g. "gemma3", "qwen2vl"; "clip" for a projector)."""
    return _strings(path).get("general.architecture")


def projector_type(path: str | os.PathLike[str]) -> str | None:
    """The projector type of an mmproj GGUF as mtmd reads it (e.g. "mlp", "gemma3", "idefics3").

    ``clip.projector_type``; a projector of both modalities may name one per modality instead,
    given here as "VISION+AUDIO" (e.g. "qwen2.5vl_merger+qwen2a"). None when the file names none.
    """
    found = _strings(path)
    if "clip.projector_type" in found:
        return found["clip.projector_type"]
    mixed = [found[k] for k in _KEYS[2:] if k in found]
    return "+".join(mixed) or None
