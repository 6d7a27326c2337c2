"""What a result was measured on: absolute figures only mean something next to this."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

import llava_kv as lk

from benchmarks.peers.memory_probe import gpu_name

GPU_BACKENDS = ("CUDA", "HIP", "Vulkan", "Metal", "SYCL", "MUSA", "CANN", "OpenCL")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_build() -> bool:
    """Whether llava-kv was built with a GPU backend and sees a GPU device."""
    info = lk.build_info()
    return any(b in GPU_BACKENDS for b in info["backends"]) and any(
        d.type in ("gpu", "igpu") for d in info["devices"])


def describe() -> dict[str, Any]:
    info = lk.build_info()
    gpus = [d for d in info["devices"] if d.type in ("gpu", "igpu")]
    ram = _ram_bytes()
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "backends": info["backends"],
        "devices": [d.description for d in info["devices"]],
        "gpu": gpu_name() or (gpus[0].description if gpus else None),
        "gpu_memory_gib": round(gpus[0].total / 2**30, 1) if gpus else None,
    }


def label(machine: dict[str, Any]) -> str:
    """One line naming the machine, for tables and plot titles."""
    if machine.get("gpu"):
        return f"{machine['gpu']} ({machine['cpu']}, {machine['cores']} cores)"
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, CPU only"
