"""Scale-out on Ray Data: one model per actor, the batch runner inside each.

Install with ``pip install "llava-kv[ray]"``. ``ImagePrompter`` is a callable class for
``ray.data.Dataset.map_batches``; Ray starts ``concurrency`` actors, each loads the model once and
runs every batch it receives through one :class:`llava_kv.batch.Runner` (its context and the
prompt's shared prefix are made once per actor, not once per batch)::

    import ray
    from llava_kv.ray import ImagePrompter

    ds = ray.data.from_items([{"image": p} for p in paths])
    out = ds.map_batches(ImagePrompter, batch_size=32, concurrency=4, num_cpus=8,
                         fn_constructor_kwargs=dict(model_path="model.gguf", mmproj_path="mmproj.gguf",
                                                    prompt="Describe this image.", max_tokens=64))
    out.write_json("captions/")

On a cluster, call ``ray.init(address="auto")`` (or set ``RAY_ADDRESS``) on the head node before
building the dataset; the model files must be readable at the same path on every worker (shared
storage), and ``num_cpus`` / ``num_gpus`` per actor tell Ray how to place the actors.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .batch import Runner
from .model import Model

__all__ = ["ImagePrompter", "prompt_dataset"]

OUTPUT_COLUMNS = ("text", "tokens", "finish_reason", "cached", "error", "total_ms")


class ImagePrompter:
    """Runs one prompt over the images of each batch; one model per instance (per Ray actor).

    The batch's ``image_column`` holds paths, encoded bytes or HxWx3 uint8 arrays. Every input column
    is passed through; ``text``, ``tokens``, ``finish_reason``, ``cached``, ``error`` and ``total_ms``
    are added (``text`` is None and ``error`` says why for an image that failed).
    """

    def __init__(self, model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str], prompt: str, *,
                 max_tokens: int = 64, parallel: int = 4, image_column: str = "image", n_gpu_layers: int = 0,
                 n_threads: int | None = None, **batch_kwargs: Any) -> None:
        self.model = Model.load(model_path, mmproj_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads)
        self.image_column = image_column
        try:
            self.runner = Runner(self.model, prompt, max_tokens=max_tokens, parallel=parallel, **batch_kwargs)
        except BaseException:
            self.model.close()
            raise

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.image_column not in batch:
            raise KeyError(f"the batch has no column {self.image_column!r} (columns: {sorted(batch)})")
        images = list(batch[self.image_column])
        records = self.runner.run(images, progress=False)
        out = dict(batch)
        out["text"] = np.array([r.text for r in records], dtype=object)
        out["tokens"] = np.array([r.tokens for r in records], dtype=np.int64)
        out["finish_reason"] = np.array([r.finish_reason for r in records], dtype=object)
        out["cached"] = np.array([r.cached for r in records], dtype=bool)
        out["error"] = np.array([r.error for r in records], dtype=object)
        out["total_ms"] = np.array([r.timings.get("total_ms", 0.0) for r in records], dtype=np.float64)
        return out

    def close(self) -> None:
        if hasattr(self, "runner"):
            self.runner.close()
        self.model.close()

    def __del__(self) -> None:
        if hasattr(self, "model"):  # __init__ may have failed before loading
            self.close()


def prompt_dataset(dataset: Any, model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str],
                   prompt: str, *, concurrency: int = 1, batch_size: int = 16, num_cpus: float | None = None,
                   num_gpus: float | None = None, **kwargs: Any) -> Any:
    """``dataset.map_batches(ImagePrompter, ...)`` with an actor pool of ``concurrency`` models."""
    resources: dict[str, Any] = {}
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    if num_gpus is not None:
        resources["num_gpus"] = num_gpus
    return dataset.map_batches(
        ImagePrompter, batch_size=batch_size, concurrency=concurrency, batch_format="numpy",
        fn_constructor_kwargs=dict(model_path=os.fspath(model_path), mmproj_path=os.fspath(mmproj_path),
                                   prompt=prompt, **kwargs), **resources)
