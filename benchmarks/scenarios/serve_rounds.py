"""16 conversations of 2 turns into 4 slots, ``llava-kv serve`` against llama.cpp's ``llama-server``,
in rounds that alternate between the two (the suite's ``serve_concurrency`` is one round per side):
each round sends 16 never-seen images, so every round encodes and prefills on both sides.

Usage: python benchmarks/scenarios/serve_rounds.py [--preset tiny-llava] [--rounds 5] [--tokens 16]
       [--out result.json]

Both servers stay up for the whole run (same settings as the suite: 2 threads, 4 slots, 4096 cells
per slot, flash attention, vicuna template), one warm-up round each first. The peers' OpenMP wait
policy is the environment's (recorded); llava-kv has no OpenMP (ggml's thread pool per context).
Reports the median requests/s per side with min and max, and every round's figure.

``--baseline-python PATH`` adds a third side: ``llava-kv serve`` run by another interpreter (a venv
with an earlier llava-kv installed), in the same rounds, so a change to the server is measured
against what it replaced on the same machine at the same time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.llama_cpp_python import SYSTEM_MESSAGE  # noqa: E402
from benchmarks.harness.llama_server import LlamaServer, server_binary  # noqa: E402
from benchmarks.harness.scenario import emit  # noqa: E402
from benchmarks.scenarios.edits import never_seen_pngs  # noqa: E402
from benchmarks.scenarios.serve import OursServer, concurrency  # noqa: E402

from llava_kv.testing import make_test_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llava")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out")
    parser.add_argument("--baseline-python", help="an interpreter with an earlier llava-kv: a third side")
    args = parser.parse_args(argv)
    pair = make_test_model(preset=args.preset)
    pngs = never_seen_pngs(pair, Path(tempfile.mkdtemp(prefix="serve-rounds-")))
    rps: dict[str, list[float]] = {"llava-kv": [], "llama-server": []}
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(OursServer(pair.model_path, pair.mmproj_path, threads=2, parallel=4))
        peer = stack.enter_context(LlamaServer(server_binary(), pair.model_path, pair.mmproj_path, threads=2,
                                               parallel=4))
        sides: dict[str, Any] = {"llava-kv": ours, "llama-server": peer}
        if args.baseline_python:
            baseline = OursServer(pair.model_path, pair.mmproj_path, threads=2, parallel=4)
            baseline.proc.cmd[0] = args.baseline_python
            sides["llava-kv baseline"] = stack.enter_context(baseline)
            rps["llava-kv baseline"] = []
        for srv in sides.values():
            concurrency(srv, [pngs() for _ in range(16)], system=SYSTEM_MESSAGE, max_tokens=args.tokens)
        for _ in range(args.rounds):
            for name, srv in sides.items():
                out = concurrency(srv, [pngs() for _ in range(16)], system=SYSTEM_MESSAGE, max_tokens=args.tokens)
                rps[name].append(out["requests_per_s"])
    result = {"scenario": "serve_rounds", "preset": args.preset, "rounds": args.rounds, "answer_tokens": args.tokens,
              "omp_wait_policy_of_peers": os.environ.get("OMP_WAIT_POLICY") or "unset",
              "requests_per_s": {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                                     "max": round(max(v), 1), "all": [round(x, 1) for x in v]}
                                 for k, v in rps.items()}}
    result["ours_vs_llama_server"] = round(statistics.median(rps["llava-kv"]) / statistics.median(rps["llama-server"]), 2)
    if args.baseline_python:
        result["baseline_python"] = args.baseline_python
        result["ours_vs_baseline"] = round(statistics.median(rps["llava-kv"]) /
                                           statistics.median(rps["llava-kv baseline"]), 2)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
