"""Runs inside the llama-cpp-python venv (imported by the peer_*.py scripts): the ``Llama()`` arguments
every peer script uses, set to what llava-kv uses, and the settings the context really got, for the
``settings`` block of each scenario.

llama-cpp-python 0.3.36's ``Llama()`` defaults to ``flash_attn=False`` (DISABLED), while llava-kv runs
with flash attention on; with ``flash_attn=True`` on both sides the logits are equal to the bit, so the
peer runs with it. Threads: one per core for generation and batches (its own default would be half the
cores for generation)."""
import os

THREADS = int(os.environ.get("LLAVA_KV_BENCH_THREADS") or os.cpu_count() or 1)
KV_TYPES = {0: "f32", 1: "f16", 8: "q8_0", 30: "bf16"}  # ggml_type values of the KV cache types


def llama_kwargs(n_ctx, n_gpu_layers=0, n_batch=512):
    return dict(n_ctx=int(n_ctx), n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=int(n_gpu_layers),
                n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, verbose=False, seed=0)


def settings(llm):
    """What the peer's context really uses (read back from llama.cpp where it can be)."""
    import llama_cpp

    cp = llm.context_params
    ctx = llm._ctx.ctx
    return {"flash_attn": {llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED: "on",
                           llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED: "off"}.get(cp.flash_attn_type, "auto"),
            "n_threads": cp.n_threads, "n_threads_batch": cp.n_threads_batch,
            "n_ctx": int(llama_cpp.llama_n_ctx(ctx)), "n_batch": int(llama_cpp.llama_n_batch(ctx)),
            "n_ubatch": int(llama_cpp.llama_n_ubatch(ctx)),
            "kv_type": KV_TYPES.get(int(cp.type_k), str(cp.type_k)) + "/" + KV_TYPES.get(int(cp.type_v), str(cp.type_v)),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset",
            "cpu_variant": "haswell"}  # built with GGML_NATIVE=OFF: ggml's haswell kernels (AVX2, FMA, F16C, BMI2)
