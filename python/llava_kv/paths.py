"""Where llava-kv keeps what it fetches or makes: the pinned llama.cpp source, test models, the
benchmark peers. Standard library only: scripts/fetch_llama_cpp.py loads this file by path during
the build, before llava_kv is installed."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$LLAVA_KV_CACHE_DIR``, else ``$XDG_CACHE_HOME/llava-kv``, else ``~/.cache/llava-kv``."""
    if os.environ.get("LLAVA_KV_CACHE_DIR"):
        return Path(os.environ["LLAVA_KV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llava-kv"
