"""Wheel build time from a clean build folder: llava-kv, llama-cpp-python (the same llama.cpp
commit, from the same sdist), and the limit: building only the llama.cpp libraries llava-kv links
(llama, ggml, mtmd; static, PIC), which no binding of llama.cpp avoids. llava-kv's figure is its
default wheel, with every CPU variant of ggml's CPU backend (14 on x86-64); ``details`` add the
development build (``LLAVA_KV_CPU_VARIANTS=host``: one CPU backend) and a warm rebuild of the
default wheel after one of our C++ files changed (the same build folder, ccache off).

Usage: python benchmarks/scenarios/build_time.py [--jobs N] [--no-peer] [--out result.json]

Three native builds one after the other (minutes each on a small machine). Each starts from an
empty build folder with ccache disabled, so nothing is reused from earlier builds; the pinned
llama.cpp source is already in third_party/ (its fetch is not timed). Our wheel and the peer's are
built with ``pip wheel --no-build-isolation`` (scikit-build-core, pybind11 and cmake from this
environment), all three with the same CMAKE_ARGS (``GGML_NATIVE=OFF``, plus ``GGML_CUDA=ON`` on a
GPU build) and the same parallelism.

``run_build_time(ctx)`` makes the suite's ``build_time`` entry of it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.context import Context  # noqa: E402
from benchmarks.harness.llama_cpp_python import CPU_CMAKE_ARGS, GPU_CMAKE_ARGS, _fetcher  # noqa: E402
from benchmarks.harness.scenario import emit, entry, skipped  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# The llama.cpp part of our CMakeLists.txt, alone: the same options, the same targets.
_LIMIT_CMAKELISTS = """cmake_minimum_required(VERSION 3.21)
project(llama_cpp_only C CXX)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
set(BUILD_SHARED_LIBS OFF CACHE BOOL "" FORCE)
foreach(opt LLAMA_BUILD_COMMON LLAMA_BUILD_TESTS LLAMA_BUILD_TOOLS LLAMA_BUILD_EXAMPLES
            LLAMA_BUILD_SERVER LLAMA_BUILD_APP LLAMA_BUILD_UI LLAMA_OPENSSL LLAMA_CURL
            LLAMA_SUBPROCESS MTMD_VIDEO LLAMA_ALL_WARNINGS)
  set(${opt} OFF CACHE BOOL "" FORCE)
endforeach()
add_subdirectory("@LLAMA@" llama.cpp EXCLUDE_FROM_ALL)
add_subdirectory("@LLAMA@/tools/mtmd" mtmd EXCLUDE_FROM_ALL)
"""


def _run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return seconds


def measure(*, gpu: bool = False, peer: bool = True, jobs: int | None = None) -> dict[str, Any]:
    jobs = jobs or os.cpu_count() or 1
    llama = ROOT / "third_party" / "llama.cpp"
    if not (llama / "CMakeLists.txt").exists():
        raise RuntimeError(f"{llama} is empty: build llava-kv once first (it fetches the pinned source)")
    cmake_args = GPU_CMAKE_ARGS if gpu else CPU_CMAKE_ARGS
    env = dict(os.environ, CCACHE_DISABLE="1", CMAKE_BUILD_PARALLEL_LEVEL=str(jobs), CMAKE_ARGS=cmake_args)
    out: dict[str, Any] = {"jobs": jobs, "cmake_args": cmake_args, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="llava-kv-build-time-") as tmp:
        work = Path(tmp)
        out["seconds"]["ours"] = _run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-q",
             "-w", str(work / "wheels"), "-C", f"build-dir={work / 'ours-build'}"], env)
        wheel = next((work / "wheels").glob("llava_kv-*.whl"))
        out["ours_wheel_mb"] = round(wheel.stat().st_size / 2**20, 1)
        (ROOT / "cpp" / "session.cpp").touch()  # one of our files changed: what an edit-build loop pays
        out["seconds"]["ours_warm_rebuild"] = _run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-q",
             "-w", str(work / "wheels-warm"), "-C", f"build-dir={work / 'ours-build'}"], env)
        out["seconds"]["ours_host_variant"] = _run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-q",
             "-w", str(work / "wheels-host"), "-C", f"build-dir={work / 'ours-host-build'}",
             "-C", "cmake.define.LLAVA_KV_CPU_VARIANTS=host"], env)

        limit_src = work / "limit-src"
        limit_src.mkdir()
        (limit_src / "CMakeLists.txt").write_text(_LIMIT_CMAKELISTS.replace("@LLAMA@", llama.as_posix()))
        build = work / "limit-build"
        cmake = shutil.which("cmake") or "cmake"
        limit = _run([cmake, "-S", str(limit_src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                      *cmake_args.split()], env)
        limit += _run([cmake, "--build", str(build), "--target", "mtmd", "llama", "--parallel", str(jobs)], env)
        out["seconds"]["limit"] = limit

        if peer:
            fetch = _fetcher()
            sdist = fetch.cached_sdist(Path(fetch.default_cache_dir()))
            out["seconds"]["peer"] = _run(
                [sys.executable, "-m", "pip", "wheel", str(sdist), "--no-build-isolation", "--no-deps", "-q",
                 "-w", str(work / "peer-wheels")], env)
    return out


def run_build_time(ctx: Context) -> dict[str, dict[str, Any]]:
    enabled = ctx.args.build_time if ctx.args.build_time is not None else ctx.preset.build_time
    limit_means = "building only the llama.cpp libraries we link (llama, ggml, mtmd), which every binding builds"
    server_build = (ctx.server_info or {}).get("build_seconds")
    server_details = {"llama_server_build_s": server_build,
                      "llama_server_build": "only the llama-server target, CPU, GGML_NATIVE=OFF, ccache off, "
                                            f"{(ctx.server_info or {}).get('jobs')} jobs (benchmarks/harness/llama_server.py)"}
    if not enabled:
        return {"build_time": skipped(unit="s", limit_means=limit_means, details=server_details,
                                      reason="skipped in this run (three native builds; use --build-time)")}
    r = measure(gpu=ctx.gpu, peer=ctx.peer)
    sec = r["seconds"]
    reasons = ctx.peer_reasons(r)
    if server_build is None:
        reasons.setdefault("server", "llama-server was not built in this run's cache")
    return {"build_time": entry(
        unit="s", repetitions=1, ours=sec["ours"], peer=sec.get("peer"), server=server_build, limit=sec["limit"],
        limit_means=limit_means, reasons=reasons, digits=1,
        details={"what": "wheel from a clean build folder, ccache off, pip wheel --no-build-isolation; llama-server: "
                         "its one target from a clean build folder", **r, **server_details})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--gpu", action="store_true", help="build with -DGGML_CUDA=ON")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    return emit(measure(gpu=args.gpu, peer=not args.no_peer, jobs=args.jobs), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
