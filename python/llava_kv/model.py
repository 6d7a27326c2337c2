"""Model: a text model plus its optional projector, loaded once and shared by sessions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import _core
from .native import NativeObject
from .images import file_fingerprint
from .session import Session

__all__ = ["Model"]


def _check_file(path: str | os.PathLike[str], what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(2, f"No such {what} file", str(path))
    return str(p)


class Model(NativeObject):
    """A loaded vision-language model. Use :meth:`load`; close with :meth:`close` or ``with``.

    ``close()`` closes every session made from the model, then frees the projector, then the
    weights; it is idempotent, and any later use raises :class:`llava_kv.ClosedError`.
    """

    def __init__(self, core: _core.Model, projector_id: str) -> None:
        self._core = core
        self._projector_id = projector_id
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None = None, *,
             n_gpu_layers: int = 0, mmproj_use_gpu: bool = True, n_threads: int | None = None,
             verbose: bool = False, embed_cache_bytes: int = 1 << 30) -> "Model":
        """Load a GGUF text model and, optionally, its mmproj projector.

        ``n_gpu_layers=-1`` offloads every layer (GPU builds). Raises FileNotFoundError for a
        missing file and :class:`llava_kv.ModelLoadError` for a corrupt or incompatible one.
        """
        model = _check_file(model_path, "model")
        mmproj = _check_file(mmproj_path, "mmproj") if mmproj_path is not None else ""
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1 (or None for one per core), got {n_threads}")
        if embed_cache_bytes < 0:
            raise ValueError("embed_cache_bytes must be >= 0")
        core = _core.Model.load(model, mmproj, n_gpu_layers=n_gpu_layers, mmproj_use_gpu=mmproj_use_gpu,
                                n_threads=n_threads or 0, verbose=verbose, embed_cache_bytes=embed_cache_bytes)
        return cls(core, file_fingerprint(mmproj) if mmproj else "")

    # -- lifetime ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        if self.closed:
            return f"<llava_kv.Model {Path(self._core.path).name!r} closed>"
        proj = Path(self._core.mmproj_path).name if self._core.mmproj_path else None
        return (f"<llava_kv.Model {Path(self._core.path).name!r} mmproj={proj!r} n_embd={self.n_embd} "
                f"n_vocab={self.n_vocab} sessions={self._core.n_open_sessions()}>")

    # -- properties -------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._core.path

    @property
    def mmproj_path(self) -> str | None:
        return self._core.mmproj_path or None

    @property
    def n_embd(self) -> int:
        return self._core.n_embd

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self._core.n_ctx_train

    @property
    def has_vision(self) -> bool:
        return self._core.has_vision

    @property
    def projector_id(self) -> str:
        """Content fingerprint of the mmproj file; part of every image digest."""
        return self._projector_id

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the text model file (saved sessions only load into the same model)."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self._core.path)
        return self._fingerprint

    # -- sessions and reports ---------------------------------------------------------------

    def session(self, *, n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int | None = None, seed: int = 0,
                n_threads: int | None = None) -> Session:
        """Open a conversation with its own KV cache of ``n_ctx`` cells."""
        if n_ctx < 1 or n_batch < 1:
            raise ValueError(f"n_ctx and n_batch must be >= 1, got n_ctx={n_ctx}, n_batch={n_batch}")
        core = self._core.session(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or 0, seed=seed,
                                  n_threads=n_threads or 0)
        return Session(self, core)

    def chat_session(self, *, n_ctx: int = 4096, n_batch: int = 512, seed: int = 0,
                     n_threads: int | None = None) -> Session:
        """A session for :meth:`Session.chat` (the same object: chat keeps its conversation in the timeline)."""
        return self.session(n_ctx=n_ctx, n_batch=n_batch, seed=seed, n_threads=n_threads)

    @property
    def chat_template(self) -> str | None:
        return self._core.chat_template or None

    def memory(self) -> dict[str, Any]:
        """Bytes held, per component and device, plus each device's free/total memory.

        ``{"weights": {dev: n}, "projector": {dev: n}, "embedding_cache": {dev: n},
        "sessions": {id: {"kv": {dev: n}, "compute": {dev: n}}}, "total": {dev: n},
        "devices": {dev: {"type", "free", "total"}}}``
        """
        entries, devices = self._core.memory()
        report: dict[str, Any] = {"weights": {}, "projector": {}, "embedding_cache": {}, "sessions": {},
                                  "total": {}}
        for component, device, nbytes in entries:
            if component.startswith("session:"):
                _, sid, part = component.split(":")
                slot = report["sessions"].setdefault(int(sid), {"kv": {}, "compute": {}})[part]
            else:
                slot = report[component]
            slot[device] = slot.get(device, 0) + nbytes
            report["total"][device] = report["total"].get(device, 0) + nbytes
        report["devices"] = {name: {"type": kind, "free": free, "total": total}
                             for name, kind, free, total in devices}
        return report

    def embedding_cache_stats(self) -> dict[str, int]:
        """Hits, misses, evictions, entries and bytes of the shared embedding cache."""
        return dict(self._core.cache_stats())
