"""The settings each side of a comparison really runs with, recorded in every scenario's JSON, and the
check that they agree.

The figures compare designs, not configurations: both peers are started with llava-kv's settings
(flash attention on, one thread per core for generation and batches, n_batch = n_ubatch = 512, an f16
KV cache, the same n_ctx per conversation), in the same environment: every process the suite starts
inherits its ``OMP_WAIT_POLICY`` (recorded; unset means libgomp's default: spin briefly, then sleep),
and no two sides ever run at once.

``python -m benchmarks`` sets ``OMP_WAIT_POLICY=passive`` for every side (``--omp-wait-policy``
changes it). The machine the published figures come from has 2 cores shared with other jobs, and
llama.cpp's CPU backend waits at an OpenMP barrier after every graph op: with spinning barriers
(libgomp's default) a thread that loses its core to another process stalls all others, and a
tiny-preset run took 156 s instead of 25 s with 100x outliers. Passive makes every barrier a sleep and a
wake-up instead, which costs every side alike: a realistic-preset session token step measured 19.5 ms
with the default policy on an idle machine and 32-40 ms with passive."""
from __future__ import annotations

import os
from typing import Any, Optional

# Compared between the sides; anything else recorded (e.g. the llama.cpp build) is for the reader.
COMPARED = ("flash_attn", "n_threads", "n_threads_batch", "n_ctx", "n_batch", "n_ubatch", "kv_type",
            "omp_wait_policy", "cpu_variant")
# The CPU kernels of a llama.cpp built with GGML_NATIVE=OFF on x86-64 (the peers'): ggml's "haswell".
PEER_CPU_VARIANT = "haswell"
# llava-kv sets no KV type: llama.cpp's default, f16 for K and V.
KV_TYPE = "f16/f16"


def omp_wait_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY") or "unset"


def ours(model: Any, session: Any = None, **overrides: Any) -> dict[str, Any]:
    """llava-kv's settings as its native objects report them (a session's, or ``overrides`` for
    contexts that are not sessions, such as the batch runner's)."""
    threads = int(model._core.n_threads)
    out: dict[str, Any] = {"flash_attn": model.flash_attn, "n_threads": threads, "n_threads_batch": threads,
                           "kv_type": KV_TYPE, "omp_wait_policy": omp_wait_policy(),
                           "cpu_variant": _build_info()["cpu_variant"]}
    if session is not None:
        out.update(n_ctx=int(session.n_ctx), n_batch=int(session._core.n_batch),
                   n_ubatch=int(session._core.n_ubatch))
    out.update(overrides)
    return out


def _build_info() -> dict[str, Any]:
    import llava_kv

    return llava_kv.build_info()


def differences(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> list[str]:
    """The compared settings two sides do not share (``name: a vs b``)."""
    if not a or not b:
        return []
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in COMPARED if k in a and k in b and a[k] != b[k]]
