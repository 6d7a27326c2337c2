"""Load/close cycles with everything on the GPU, recording device memory while loaded and after each close.

Usage: python benchmarks/scenarios/vram_release.py [--preset tiny-llava] [--cycles 50] [--device Vulkan0] --out result.json

Three measures, each said in the JSON:
- the device ledger (llava_kv.device_ledger): the bytes of every live ggml buffer, per device, counted
  where the backends allocate and free them. It must read 0 after every close.
- the memory the process holds: NVML's used memory of the GPU where an NVIDIA GPU and pynvml are there
  ("memory": "nvml"); otherwise the process's RSS ("memory": "rss"). On Mesa's lavapipe the device's
  memory is this process's own memory, so RSS is the honest figure there; its driver "free" figure
  moves with every process on the machine and is recorded for reference only.
- the drift: the after-close figure of the last cycle minus that of cycle 2 for RSS (cycle 1 warms
  allocator and pipeline caches), of cycle 1 for NVML.
On a build without a GPU device it runs the same cycles on the CPU and says so ("device": null).
Lavapipe figures are path checks (every buffer on the device path comes back), not speed claims.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import llava_kv as lk
from llava_kv.testing import make_test_model, random_image, rss_bytes


def _nvml_used() -> Callable[[], int] | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - no NVIDIA GPU, driver or pynvml: fall back to RSS
        return None


def _ledger_by_device() -> dict[str, int]:
    """Bytes of live ggml buffers per device that holds any (the device ledger, as Device.allocated)."""
    return {d.name: d.allocated for d in lk.devices() if d.allocated}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llava")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--device", default=None, help="main_gpu (default: the first GPU device)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    pair = make_test_model(preset=args.preset)
    image = random_image(0, (pair.preset.image_size, pair.preset.image_size))
    gpus = [d for d in lk.devices() if d.type in ("gpu", "igpu")]
    device = next((d for d in gpus if d.name == args.device), None) if args.device else (gpus or [None])[0]
    if args.device and device is None:
        parser.error(f"no GPU device named {args.device!r}; this build sees {[d.name for d in lk.devices()]}")
    nvml = _nvml_used() if device is not None and device.name.startswith("CUDA") else None
    measure = nvml or rss_bytes
    load: dict[str, Any] = ({"n_gpu_layers": -1, "mmproj_use_gpu": True, "main_gpu": device.name} if device else
                            {"n_gpu_layers": 0, "mmproj_use_gpu": False})

    baseline = measure()
    cycles: list[dict[str, Any]] = []
    for i in range(args.cycles):
        t0 = time.perf_counter()
        with lk.Model.load(pair.model_path, pair.mmproj_path, **load) as model:
            with model.session(n_ctx=args.n_ctx) as s:
                s.append_text("USER: ")
                s.append_image(image)
                s.append_text(" describe\nASSISTANT:")
                s.logits()
                loaded = measure()
                ledger_loaded = _ledger_by_device()
                mem = model.memory()
        closed = measure()
        driver_free = {d.name: d.free for d in lk.devices()}
        cycles.append({"cycle": i + 1, "loaded_bytes": loaded, "after_close_bytes": closed,
                       "ledger_loaded_bytes": ledger_loaded, "ledger_after_close_bytes": sum(_ledger_by_device().values()),
                       "driver_free_bytes": driver_free, "seconds": round(time.perf_counter() - t0, 4),
                       "model_memory": {k: mem[k] for k in ("weights", "projector", "total")}})
    after = [int(c["after_close_bytes"]) for c in cycles]
    ref_index = 0 if nvml is not None or len(after) < 2 else 1
    reference = after[ref_index]
    build = lk.build_info()
    report = {
        "benchmark": "vram_release",
        "memory": "nvml" if nvml is not None else "rss",
        "device": device.as_dict() if device is not None else None,
        "note": ("lavapipe: a path check (device memory is this process's memory: RSS and the ledger are the "
                 "measures), not a speed claim" if device is not None and "llvmpipe" in device.description else ""),
        "host": platform.node(),
        "build": {**build, "devices": [d.as_dict() for d in build["devices"]]},
        "preset": args.preset,
        "cycles": cycles,
        "baseline_bytes": baseline,
        "ledger_after_close_bytes": [c["ledger_after_close_bytes"] for c in cycles],
        "drift_reference_cycle": ref_index + 1,
        "drift_bytes": after[-1] - reference,
        "drift_mib": round((after[-1] - reference) / 2**20, 3),
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("memory", "preset", "drift_mib", "drift_bytes")} |
                     {"device": device.name if device else None,
                      "ledger_after_close_max": max(report["ledger_after_close_bytes"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
