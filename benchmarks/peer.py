"""The reference binding, llama-cpp-python, at the version whose sdist supplies our llama.cpp, in a
virtualenv of its own made on demand (never a dependency of llava-kv).

``peer_python()`` returns the interpreter of that venv, building it the first time (the sdist
compiles llama.cpp: several minutes on a small machine). ``run_peer(script, args)`` runs a script
there and returns its JSON output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

PEER = "llama-cpp-python==0.3.36"
VENV = Path(os.environ.get("LLAVA_KV_PEER_VENV", Path(__file__).resolve().parent / ".peer-venv"))


def peer_python() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    print(f"benchmarks: building {PEER} in {VENV} (compiles llama.cpp; takes minutes)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("PEER_CMAKE_ARGS", "-DGGML_NATIVE=OFF"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "pillow", PEER], check=True, env=env)
    return py


def run_peer(script: str, args: list[str], timeout: float = 3600) -> dict:
    result = subprocess.run([str(peer_python()), script, *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"peer run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
