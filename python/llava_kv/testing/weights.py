"""Random weights for the test GGUFs: ``_Weights`` draws every tensor of one file from one seeded
generator, in the order the writer asks, so a preset and seed always give the same bytes; ``_finish``
writes a filled ``gguf.GGUFWriter`` out and closes it, the last step of both writers.
"""
from __future__ import annotations

import numpy as np


class _Weights:
    def __init__(self, seed: int, dtype: str) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.float16 if dtype == "f16" else np.float32

    def linear(self, n_out: int, n_in: int) -> np.ndarray:
        w: np.ndarray = self.rng.standard_normal((n_out, n_in), dtype=np.float32) / np.sqrt(n_in)
        return w.astype(self.dtype)

    def embedding(self, n: int, dim: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal((n, dim), dtype=np.float32) * scale).astype(self.dtype)

    def norm(self, n: int, center: float = 1.0) -> np.ndarray:
        # Norm weights stay f32 (llama.cpp keeps 1-D tensors in f32).
        return (center + 0.1 * self.rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (0.02 * self.rng.standard_normal(n, dtype=np.float32)).astype(np.float32)


def _finish(writer: "object") -> None:
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]
