"""llava-kv: vision-language models on llama.cpp with one state for images, embeddings and KV."""
from __future__ import annotations

from typing import Any

from . import _core, batch
from ._core import Device, LedgerEntry, __version__
from .errors import (
    AudioError,
    CancelledError,
    ClosedError,
    ContextFullError,
    GrammarError,
    ImageError,
    ImageTooLargeError,
    LlavaKVError,
    MediaError,
    ModelLoadError,
)
from .model import Model
from .session import Session
from .timeline import Chunk, ImageList, ImageRef

__all__ = [
    "__version__",
    "build_info",
    "devices",
    "device_ledger",
    "Device",
    "LedgerEntry",
    "batch",
    "Model",
    "Session",
    "ImageRef",
    "ImageList",
    "Chunk",
    "LlavaKVError",
    "ModelLoadError",
    "MediaError",
    "ImageError",
    "ImageTooLargeError",
    "AudioError",
    "ContextFullError",
    "ClosedError",
    "CancelledError",
    "GrammarError",
]


def build_info() -> dict[str, Any]:
    """The llama.cpp commit built against, the compiled ggml backends, and the devices seen now
    (``"devices"``: :class:`Device` records, as :func:`devices` gives them)."""
    return _core.build_info().as_dict()


def devices() -> list[Device]:
    """Every backend device this build sees: ``name`` ("CPU", "Vulkan0", "CUDA0"), ``type`` ("cpu",
    "gpu", "igpu", "accel"), ``description``, ``free`` and ``total`` bytes as the driver reports them,
    and ``allocated``: the bytes this process's live ggml buffers hold there (the device ledger).
    ``Device.as_dict()`` gives the record as a dict."""
    return _core.devices()


def device_ledger() -> list[LedgerEntry]:
    """This process's live ggml buffers, per device and component ("weights", "projector", "kv",
    "compute"; "other" for a buffer made outside any model call), counted where the backends allocate
    and free them, so a buffer that outlives its model shows here whatever the model reports."""
    return _core.device_ledger()
