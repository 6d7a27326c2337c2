"""Load/close cycles with everything on the GPU, recording device memory after each close.

Usage: python benchmarks/vram_release.py [--preset tiny-llava] [--cycles 50] --out result.json

Device memory is read with NVML (pynvml) when present, else from ggml's device report. On a build
without a GPU backend it measures process RSS instead and says so in the JSON ("memory": "rss").
The drift is the largest after-close figure minus the first one, in MiB: 0 means memory came back.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import llava_kv as lk
from llava_kv.testing import make_test_model, random_image, rss_bytes


def _gpu_used_bytes() -> tuple[str, int] | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return "nvml", int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        pass
    gpus = [d for d in lk.build_info()["devices"] if d["type"] in ("gpu", "igpu")]
    if gpus:
        return "ggml", gpus[0]["memory_total"] - gpus[0]["memory_free"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llava")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    pair = make_test_model(preset=args.preset)
    image = random_image(0, (pair.preset.image_size, pair.preset.image_size))
    probe = _gpu_used_bytes()
    gpu = probe is not None

    def measure() -> int:
        got = _gpu_used_bytes() if gpu else None
        return got[1] if got is not None else rss_bytes()

    baseline = measure()
    cycles: list[dict[str, Any]] = []
    for i in range(args.cycles):
        t0 = time.perf_counter()
        with lk.Model.load(pair.model_path, pair.mmproj_path, n_gpu_layers=-1, mmproj_use_gpu=True) as model:
            with model.session(n_ctx=2048) as s:
                s.append_text("USER: ")
                s.append_image(image)
                s.append_text(" describe\nASSISTANT:")
                s.logits()
                loaded = measure()
                mem = model.memory()
        closed = measure()
        cycles.append({"cycle": i + 1, "loaded_bytes": loaded, "after_close_bytes": closed,
                       "seconds": round(time.perf_counter() - t0, 4),
                       "model_memory": {k: mem[k] for k in ("weights", "projector", "total")}})
    after = [int(c["after_close_bytes"]) for c in cycles]
    report = {
        "benchmark": "vram_release",
        "memory": probe[0] if probe is not None else "rss",
        "device": ([d for d in lk.build_info()["devices"] if d["type"] in ("gpu", "igpu")] or [None])[0],
        "host": platform.node(),
        "build": lk.build_info(),
        "preset": args.preset,
        "cycles": cycles,
        "baseline_bytes": baseline,
        "drift_mib": round((max(after) - after[0]) / 2**20),
        "drift_bytes": max(after) - after[0],
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("memory", "preset", "drift_mib", "drift_bytes")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
