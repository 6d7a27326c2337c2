"""llava-kv: vision-language models on llama.cpp with one state for images, embeddings and KV."""
from __future__ import annotations

from typing import Any

from . import _core, batch
from ._core import __version__
from .errors import (
    CancelledError,
    ClosedError,
    ContextFullError,
    ImageError,
    LlavaKVError,
    ModelLoadError,
)
from .model import Model
from .session import Chunk, ImageList, ImageRef, Session

__all__ = [
    "__version__",
    "build_info",
    "batch",
    "Model",
    "Session",
    "ImageRef",
    "ImageList",
    "Chunk",
    "LlavaKVError",
    "ModelLoadError",
    "ImageError",
    "ContextFullError",
    "ClosedError",
    "CancelledError",
]


def build_info() -> dict[str, Any]:
    """The llama.cpp commit built against, the compiled ggml backends, and the devices seen now."""
    return dict(_core.build_info())
