"""Memory measurement for leak tests: ``rss_bytes``, this process's resident memory once freed heap is
handed back to the OS.
"""
from __future__ import annotations

import os


def rss_bytes() -> int:
    """This process's resident memory, after handing freed heap back to the OS (glibc keeps it
    otherwise, which would hide whether native memory really came back). Linux only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
