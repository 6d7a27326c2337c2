"""Runs in a fresh interpreter (so nothing else the suite did sits in its heap): CYCLES times load
the model and projector, open a session, evaluate one image prompt, close everything; after each
close, the process RSS (after malloc_trim(0)) and, with NVML, the GPU memory in use. Prints JSON.

Usage: load_close_ours.py MODEL MMPROJ IMAGE.png CYCLES N_GPU_LAYERS (load_close.py runs it)"""
import gc
import json
import os
import sys
import time

import llava_kv as lk

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.harness import settings  # noqa: E402
from benchmarks.peers.memory_probe import gpu_used_bytes, rss_bytes  # noqa: E402

model, mmproj, image, cycles, n_gpu_layers = sys.argv[1:6]
threads = int(os.environ.get("LLAVA_KV_BENCH_THREADS") or 0) or None  # None: one per core
baseline = {"rss": rss_bytes(), "gpu": gpu_used_bytes()}
rss, gpu, seconds = [], [], []
for _ in range(int(cycles)):
    t0 = time.perf_counter()
    with lk.Model.load(model, mmproj, n_gpu_layers=int(n_gpu_layers), n_threads=threads, flash_attn="on") as m, \
            m.session(n_ctx=1024) as s:
        used = settings.ours(m, s)
        s.append_text("USER: ")
        s.append_image(image)
        s.append_text("\nWhat is in this picture?\nASSISTANT:")
        s.logits()
    seconds.append(time.perf_counter() - t0)
    rss.append(rss_bytes())
    gpu.append(gpu_used_bytes())
before_gc = lk._core.native_objects().as_dict()  # closed shells kept by reference cycles hold no native memory
del m, s
gc.collect()
print(json.dumps({"baseline": baseline, "rss_bytes": rss, "gpu_bytes": gpu if gpu[0] is not None else None,
                  "seconds": seconds, "native_objects": lk._core.native_objects().as_dict(),
                  "native_objects_before_gc": before_gc, "settings": used}))
