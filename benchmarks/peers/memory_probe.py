"""Process and GPU memory readings that work the same in our interpreter and in the peer's venv
(standard library only: the peer's scripts import this file too). GPU memory comes from NVML
through ctypes, so no pynvml is needed."""
from __future__ import annotations

import ctypes
import os
from typing import Optional


def rss_bytes() -> int:
    """Resident memory of this process after handing freed heap back to the OS with malloc_trim(0)
    (glibc keeps it otherwise, which would hide whether native memory came back). Linux only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


_lib: Optional[ctypes.CDLL] = None
_failed = False


def _nvml() -> Optional[ctypes.CDLL]:
    global _lib, _failed
    if _lib is None and not _failed:
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                raise OSError("nvmlInit_v2 failed")
            _lib = lib
        except (OSError, AttributeError):
            _failed = True
    return _lib


def gpu_name(index: int = 0) -> Optional[str]:
    lib = _nvml()
    if lib is None:
        return None
    handle = ctypes.c_void_p()
    name = ctypes.create_string_buffer(96)
    if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    if lib.nvmlDeviceGetName(handle, name, len(name)) != 0:
        return None
    return name.value.decode(errors="replace")


def gpu_used_bytes(index: int = 0) -> Optional[int]:
    """Device memory in use on GPU ``index`` (all processes), or None without NVML or a GPU."""
    lib = _nvml()
    if lib is None:
        return None
    handle = ctypes.c_void_p()
    memory = _Memory()
    if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
        return None
    return int(memory.used)
