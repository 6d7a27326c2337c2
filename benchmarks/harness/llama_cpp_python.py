"""The reference binding, llama-cpp-python, at the version whose sdist supplies our llama.cpp, in a
virtualenv of its own made on demand (never a dependency of llava-kv).

``peer_python()`` returns the interpreter of that venv, building it the first time: it installs
the very sdist our build takes llama.cpp from (``scripts/fetch_llama_cpp.py`` fetches it by name,
checks its sha256 and caches it), so both sides run the same llama.cpp commit. Compiling it takes
several minutes on a small machine; the venv lives in the user's cache dir
(``~/.cache/llava-kv/peer-venv``, ``peer-venv-gpu`` for a GPU build; ``LLAVA_KV_PEER_VENV`` overrides
it), so later runs and CI on a fresh clone reuse it. ``run_peer(script, args)`` runs a script there
(one of benchmarks/peers/, ``PEER_SCRIPTS``) and returns the JSON object it prints last.

``PeerServer`` runs llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``)
from that venv, for the ``serve`` scenario; ``server_extra()`` first installs what its ``[server]``
extra requires (uvicorn, FastAPI, ...), read from the installed package's metadata.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from types import ModuleType
from typing import Any

from llava_kv.server.process import ChildServer, free_port

from benchmarks.harness.llama_server import LlamaServer
from benchmarks.harness.settings import PEER_CPU_VARIANT

PEER = "llama-cpp-python==0.3.36"
ROOT = Path(__file__).resolve().parents[2]
# The scripts run_peer runs in the peer venv (they import llama_cpp, the standard library and their folder).
PEER_SCRIPTS = ROOT / "benchmarks" / "peers"
CPU_CMAKE_ARGS = "-DGGML_NATIVE=OFF"  # as our own build: portable, no -march=native
GPU_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_CUDA=ON"
_STAMP = "llava-kv-peer.json"
# The prompt the peer's Llava15ChatHandler writes: llama.cpp's "vicuna" template with this system
# message. Our side of each comparison uses the same, so both decode the same tokens.
CHAT_TEMPLATE = "vicuna"
SYSTEM_MESSAGE = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions.")


class PeerError(RuntimeError):
    """The peer could not be built or one of its runs failed."""


def _fetcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", ROOT / "scripts" / "fetch_llama_cpp.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_venv(gpu: bool = False) -> Path:
    if os.environ.get("LLAVA_KV_PEER_VENV"):
        return Path(os.environ["LLAVA_KV_PEER_VENV"])
    return Path(_fetcher().default_cache_dir()) / ("peer-venv-gpu" if gpu else "peer-venv")


def _works(py: Path, gpu: bool) -> bool:
    check = "import llama_cpp; assert llama_cpp.__version__ == %r" % PEER.split("==")[1]
    if gpu:
        check += "; assert llama_cpp.llama_supports_gpu_offload()"
    return py.exists() and subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0


def peer_python(*, gpu: bool = False, build: bool = True) -> Path:
    """The peer venv's interpreter; builds the venv when it is missing or broken and ``build``."""
    env_dir = default_venv(gpu)
    py = env_dir / "bin" / "python"
    if _works(py, gpu):
        return py
    if not build:
        raise PeerError(f"no working {PEER} venv at {env_dir} (run without --no-peer-build to build it)")
    fetch = _fetcher()
    sdist = fetch.cached_sdist(Path(fetch.default_cache_dir()))  # sha256-checked
    cmake_args = os.environ.get("PEER_CMAKE_ARGS", GPU_CMAKE_ARGS if gpu else CPU_CMAKE_ARGS)
    print(f"benchmarks: building {PEER} from {sdist} in {env_dir} (CMAKE_ARGS={cmake_args!r}; compiles "
          "llama.cpp, takes minutes)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    env = dict(os.environ, CMAKE_ARGS=cmake_args)
    result = subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "pillow", str(sdist)], env=env)
    if result.returncode != 0 or not _works(py, gpu):
        raise PeerError(f"building {PEER} in {env_dir} failed (pip exit status {result.returncode})")
    server_extra(py)
    (env_dir / _STAMP).write_text(json.dumps({"peer": PEER, "sdist_sha256": fetch.SDIST_SHA256,
                                              "cmake_args": cmake_args}))
    return py


def peer_build_info(py: Path) -> dict:
    """Version and llama.cpp facts of the peer venv."""
    stamp = py.parent.parent / _STAMP
    info = json.loads(stamp.read_text()) if stamp.exists() else {"peer": PEER, "cmake_args": CPU_CMAKE_ARGS}
    out = subprocess.run([str(py), "-c", "import json, llama_cpp; print(json.dumps({'version': llama_cpp.__version__, "
                          "'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload())}))"],
                         capture_output=True, text=True)
    if out.returncode == 0:
        info.update(json.loads(out.stdout))
    info["venv"] = str(py.parent.parent)
    return info


def threads() -> int:
    """Threads both sides use for decoding and encoding: one per core, llava-kv's default
    (llama-cpp-python's own default would be half the cores for generation)."""
    return int(os.environ.get("LLAVA_KV_BENCH_THREADS") or os.cpu_count() or 1)


def run_peer(script: str, args: list[str], timeout: float = 3600, *, python: Path | None = None) -> dict:
    """Run ``script`` (a file in benchmarks/peers/) in the peer venv and return the JSON it prints last."""
    py = python or peer_python()
    env = dict(os.environ, LLAVA_KV_BENCH_THREADS=str(threads()))
    result = subprocess.run([str(py), script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise PeerError(f"peer run {Path(script).name} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def server_extra(py: Path, *, build: bool = True) -> None:
    """Make ``llama_cpp.server`` importable in the peer venv: pip installs the requirements of the
    package's ``[server]`` extra, as its metadata lists them (pure-Python packages, seconds)."""
    check = [str(py), "-c", "import llama_cpp.server.app"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return
    if not build:
        raise PeerError(f"llama-cpp-python's server is not installed in {py.parent.parent} (its [server] extra; "
                        "run without --no-peer-build)")
    listing = subprocess.run([str(py), "-c", "import importlib.metadata as m; print('\\n'.join(r.split(';')[0].strip() "
                              "for r in m.requires('llama_cpp_python') or [] if 'extra == \"server\"' in r))"],
                             capture_output=True, text=True)
    wanted = listing.stdout.split()
    if listing.returncode != 0 or not wanted:
        raise PeerError(f"could not read the [server] extra of {PEER}: {listing.stderr.strip()[-300:]}")
    result = subprocess.run([str(py), "-m", "pip", "install", "-q", *wanted], capture_output=True, text=True)
    if result.returncode != 0 or subprocess.run(check, capture_output=True).returncode != 0:
        raise PeerError(f"installing {PEER}'s [server] extra failed: {result.stderr.strip()[-300:]}")


class PeerServer(ChildServer):
    """llama-cpp-python's server on 127.0.0.1 with the settings of the other peer runs (flash attention
    on, one thread per core, the llava-1-5 chat handler: the "vicuna" prompt). It has one ``Llama``
    and answers one request at a time; every request resets the context and evaluates the whole
    prompt again, images included. It runs with ``--verbose true``, so that mtmd logs each image it
    encodes (its API has no counter)."""

    name = "llama-cpp-python server"
    error = PeerError
    stop_timeout = 10.0
    health_path = "/v1/models"  # it has no /health

    def __init__(self, py: Path, model: Path, mmproj: Path, *, threads: int, n_ctx: int = 4096, n_batch: int = 512,
                 n_gpu_layers: int = 0, start_timeout: float = 300) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.settings = {"threads": threads, "n_ctx": n_ctx, "n_batch": n_batch}
        self.cmd = [str(py), "-m", "llama_cpp.server", "--model", str(model), "--clip_model_path", str(mmproj),
                    "--chat_format", "llava-1-5", "--host", "127.0.0.1", "--port", str(self.port),
                    "--n_ctx", str(n_ctx), "--n_batch", str(n_batch), "--n_ubatch", str(n_batch),
                    "--n_threads", str(threads), "--n_threads_batch", str(threads), "--flash_attn", "true",
                    "--n_gpu_layers", str(n_gpu_layers), "--seed", "0", "--verbose", "true"]
        self.env = dict(os.environ, LLAVA_KV_BENCH_THREADS=str(threads))
        self.log = Path(tempfile.mkstemp(prefix="llama-cpp-python-server-", suffix=".log")[1])
        self.start_timeout = start_timeout

    client = LlamaServer.client  # the same openai client (no retries, long timeout)

    def image_encodes(self) -> int:
        """Image encodes so far: mtmd's helper logs "encoding image slice..." before each one."""
        return self.log.read_text(errors="replace").count("encoding image slice...")

    def settings_used(self) -> dict[str, Any]:
        """The compared settings (benchmarks/harness/settings.py), read back from the context's load log
        where it prints them (n_ctx, n_batch, n_ubatch, flash_attn), else from the command line."""
        text = self.log.read_text(errors="replace")

        def logged(key: str) -> str | None:
            m = re.search(rf"^llama_context: {key} += (\S+)", text, re.M)
            return m.group(1) if m else None

        flash = logged("flash_attn") or "not in its log"
        return {"flash_attn": {"enabled": "on", "disabled": "off"}.get(flash, flash),
                "n_threads": self.settings["threads"], "n_threads_batch": self.settings["threads"],
                "n_ctx": int(logged("n_ctx") or self.settings["n_ctx"]),
                "n_batch": int(logged("n_batch") or self.settings["n_batch"]),
                "n_ubatch": int(logged("n_ubatch") or self.settings["n_batch"]), "kv_type": "f16/f16",
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset", "cpu_variant": PEER_CPU_VARIANT,
                "parallel": 1,
                "cont_batching": False, "cache_prompt": False, "command": " ".join(self.cmd[1:])}
