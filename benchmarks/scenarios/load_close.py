"""Memory drift over load/close cycles, for llava-kv and for llama-cpp-python, each in a fresh
process: load model + projector, one image prompt, close; RSS (and GPU memory with NVML) after every
close. The drift is the figure after the last cycle minus the one after cycle 5 (the first cycles
settle allocator pools and lazily loaded libraries); the limit is 0.

Usage: python benchmarks/scenarios/load_close.py [--preset tiny-llava] [--cycles 100] [--no-peer] [--out result.json]

Our side runs load_close_ours.py (beside this file), llama-cpp-python's peers/peer_load_close.py;
``run_load_close(ctx)`` makes the suite's ``load_close`` entry of them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from llava_kv.testing import TestModel, make_test_model, random_image

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.context import Context  # noqa: E402
from benchmarks.harness.llama_cpp_python import PEER_SCRIPTS, PeerError, run_peer, threads  # noqa: E402
from benchmarks.harness.scenario import entry  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTLE = 5  # drift is measured from the figure after this cycle


def drift_mib(series: list[int] | None) -> float | None:
    if not series:
        return None
    start = series[min(SETTLE, len(series)) - 1]
    return round((series[-1] - start) / 2**20, 3)


def noise_mib(series: list[int] | None) -> float | None:
    """The band (max - min) the figure moves in after the settling cycles."""
    if not series or len(series) <= SETTLE:
        return None
    settled = series[SETTLE - 1:]
    return round((max(settled) - min(settled)) / 2**20, 3)


def _ours(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, LLAVA_KV_BENCH_THREADS=str(threads()))
    result = subprocess.run([sys.executable, str(HERE / "load_close_ours.py"), *args], capture_output=True,
                            text=True, timeout=3600, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"load_close_ours.py failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(pair: TestModel, *, cycles: int = 100, peer: bool = True, peer_python: Path | None = None,
            workdir: Path | None = None, n_gpu_layers: int = 0) -> dict[str, Any]:
    folder = workdir or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "load_close.png"
    size = pair.preset.image_size
    Image.fromarray(random_image(3, (size, size))).save(png)
    args = [str(pair.model_path), str(pair.mmproj_path), str(png), str(cycles), str(n_gpu_layers)]
    runs = {"ours": _ours(args)}
    result: dict[str, Any] = {"cycles": cycles, "settle_cycles": SETTLE}
    if peer:
        try:
            runs["peer"] = run_peer(str(PEER_SCRIPTS / "peer_load_close.py"), args, python=peer_python)
        except PeerError as e:
            result["peer_error"] = str(e)
    for who, run in runs.items():
        result[who] = {
            "rss_drift_mib": drift_mib(run["rss_bytes"]),
            "rss_noise_mib": noise_mib(run["rss_bytes"]),
            "settings": run.get("settings"),
            "gpu_drift_mib": drift_mib(run["gpu_bytes"]),
            "rss_mib": [round(x / 2**20, 3) for x in run["rss_bytes"]],
            "gpu_mib": [round(x / 2**20, 3) for x in run["gpu_bytes"]] if run["gpu_bytes"] else None,
            "baseline_rss_mib": round(run["baseline"]["rss"] / 2**20, 3),
            "median_cycle_s": sorted(run["seconds"])[len(run["seconds"]) // 2],
        }
        if "native_objects" in run:  # live C++ objects after the cycles, after a gc.collect()
            result[who]["native_objects_after"] = run["native_objects"]
            result[who]["native_objects_before_gc"] = run["native_objects_before_gc"]
    return result


def run_load_close(ctx: Context) -> dict[str, dict[str, Any]]:
    cycles = ctx.args.cycles or ctx.preset.cycles
    r = measure(ctx.pair, cycles=cycles, peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                n_gpu_layers=ctx.n_gpu_layers)
    peer = r.get("peer") or {}
    reasons = ctx.peer_reasons(r)
    reasons["server"] = reasons.get("server") or ("not applicable: llama-server is a process, its memory goes "
                                                  "back when it exits")
    e = entry(
        unit=f"MiB RSS drift (cycle {SETTLE} to {cycles})", repetitions=1,
        ours=r["ours"]["rss_drift_mib"], peer=peer.get("rss_drift_mib"), limit=0,
        settings={"ours": r["ours"].get("settings"), "peer": peer.get("settings")},
        limit_means="0: every load/close cycle gives back everything it took", reasons=reasons,
        digits=3,
        # Drifts of a few hundred KiB are at the noise of the allocator: no ratio of two of them is shown
        # (ours_minus_limit is the absolute MiB), and details give each side's noise.
        details={"what": f"{cycles} cycles of load model + projector, one image prompt, close; RSS after "
                         "malloc_trim(0) after each close, each runtime in a fresh process",
                 "noise_mib": {"ours": r["ours"].get("rss_noise_mib"), "peer": peer.get("rss_noise_mib")},
                 "noise_means": "the band (max - min) RSS moves in after cycle "
                                f"{SETTLE}: a drift inside it is not a leak",
                 "gpu_drift_mib": {"ours": r["ours"]["gpu_drift_mib"], "peer": peer.get("gpu_drift_mib")},
                 "ours": r["ours"], "peer": peer or None})
    e["ratios"]["peer_vs_ours"] = None
    e["ratios"]["no_peer_ratio"] = "two drifts at allocator noise have no meaningful ratio: compare the absolute MiB"
    return {"load_close": e}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llava")
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = measure(make_test_model(preset=args.preset), cycles=args.cycles, peer=not args.no_peer,
                     n_gpu_layers=args.n_gpu_layers)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: {"rss_drift_mib": v["rss_drift_mib"], "gpu_drift_mib": v["gpu_drift_mib"]}
                      for k, v in result.items() if k in ("ours", "peer")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
