"""16 conversations of 2 turns into 4 slots, ``llava-kv serve`` against llama.cpp's ``llama-server``,
in rounds that alternate between the two (the suite's ``serve_concurrency`` is one round per side):
each round sends 16 never-seen images, so every round encodes and prefills on both sides.

Usage: python benchmarks/scenarios/serve_rounds.py [--preset tiny-llava] [--rounds 5] [--tokens 16]
       [--out result.json]

Both servers stay up for the whole run (same settings as the suite: 2 threads, 4 slots, 4096 cells
per slot, flash attention, vicuna template), one warm-up round each first. The peers' OpenMP wait
policy is the environment's (recorded); llava-kv has no OpenMP (ggml's thread pool per context).
Reports the median requests/s per side with min and max, and every round's figure.

``--in-process`` adds a side with no HTTP and no client threads: the same conversations through a
4-slot ``SessionPool`` in this process, four at a time (prefill each, then generate the four
together), timing the prefills and the generation steps. Beside it, the ``llava-kv serve`` side
reports its engine thread's prefill and generation seconds per round (its /metrics): what serving
adds to each.

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
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.llama_cpp_python import SYSTEM_MESSAGE  # noqa: E402
from benchmarks.harness.llama_server import LlamaServer, server_binary  # noqa: E402
from benchmarks.harness.scenario import emit  # noqa: E402
from benchmarks.scenarios.edits import never_seen_pngs  # noqa: E402
from benchmarks.scenarios.serve import CONCURRENT_TURNS, OursServer, concurrency, conversations, next_turn  # noqa: E402

import llava_kv as lk  # noqa: E402
from llava_kv.chat import render_conversation  # noqa: E402
from llava_kv.pool import Generation  # noqa: E402
from llava_kv.testing import make_test_model  # noqa: E402


class InProcess:
    """The round's work without a server: 16 conversations of CONCURRENT_TURNS turns on a 4-slot pool
    in this process, four conversations at a time."""

    def __init__(self, pair: Any, slots: int = 4) -> None:
        self.model = lk.Model.load(pair.model_path, pair.mmproj_path, n_threads=2, flash_attn="on")
        self.pool = self.model.session_pool(slots, n_ctx=4096, n_batch=512)

    def close(self) -> None:
        self.model.close()

    def round(self, pngs: list[Path], max_tokens: int) -> dict[str, float]:
        convs = conversations(pngs, SYSTEM_MESSAGE)
        n = len(self.pool)
        prefill = generation = 0.0
        t0 = time.perf_counter()
        for turn in range(CONCURRENT_TURNS):
            for first in range(0, len(convs), n):
                group = convs[first:first + n]
                gens = []
                for slot, messages in zip(self.pool, group):
                    items, template = render_conversation(self.model, messages, chat_template="vicuna")
                    t = time.perf_counter()
                    slot.prefill_chat(items, template)
                    prefill += time.perf_counter() - t
                    gens.append(Generation(slot, max_tokens))
                t = time.perf_counter()
                while not all(g.done for g in gens):
                    self.pool.run(gens, 256)
                generation += time.perf_counter() - t
                for messages, g in zip(group, gens):
                    messages += next_turn(g.text, turn)
        wall = time.perf_counter() - t0
        return {"requests_per_s": len(convs) * CONCURRENT_TURNS / wall, "prefill_s": prefill,
                "generation_s": generation}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llava")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out")
    parser.add_argument("--baseline-python", help="an interpreter with an earlier llava-kv: a third side")
    parser.add_argument("--in-process", action="store_true", help="a side with no HTTP (a SessionPool here)")
    parser.add_argument("--server-cache-ram", type=int, help="llama-server's --cache-ram in MiB (the suite: 0)")
    args = parser.parse_args(argv)
    pair = make_test_model(preset=args.preset)
    pngs = never_seen_pngs(pair, Path(tempfile.mkdtemp(prefix="serve-rounds-")))
    rps: dict[str, list[float]] = {"llava-kv": [], "llama-server": []}
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(OursServer(pair.model_path, pair.mmproj_path, threads=2, parallel=4))
        peer = stack.enter_context(LlamaServer(server_binary(), pair.model_path, pair.mmproj_path, threads=2,
                                               parallel=4, cache_ram_mib=args.server_cache_ram))
        sides: dict[str, Any] = {"llava-kv": ours, "llama-server": peer}
        if args.baseline_python:
            baseline = OursServer(pair.model_path, pair.mmproj_path, threads=2, parallel=4)
            baseline.proc.cmd[0] = args.baseline_python
            sides["llava-kv baseline"] = stack.enter_context(baseline)
            rps["llava-kv baseline"] = []
        inproc = None
        if args.in_process:
            inproc = InProcess(pair)
            stack.callback(inproc.close)
            rps["llava-kv in process"] = []
        # Per side that reports it: the engine's prefill and generation seconds of each round.
        engine: dict[str, dict[str, list[float]]] = {}

        def one_round(srv: Any) -> dict[str, Any]:
            images = [pngs() for _ in range(16)]
            if srv is None:
                assert inproc is not None
                return inproc.round(images, args.tokens)
            out = concurrency(srv, images, system=SYSTEM_MESSAGE, max_tokens=args.tokens)
            return {"requests_per_s": out["requests_per_s"], "prefill_s": out.get("engine_prefill_s"),
                    "generation_s": out.get("engine_generation_s")}

        everyone: dict[str, Any] = {**sides, **({"llava-kv in process": None} if inproc else {})}
        for srv in everyone.values():
            one_round(srv)  # warm-up
        for _ in range(args.rounds):
            for name, srv in everyone.items():
                out = one_round(srv)
                rps[name].append(out["requests_per_s"])
                if out["prefill_s"] is not None:
                    for part in ("prefill_s", "generation_s"):
                        engine.setdefault(name, {}).setdefault(part, []).append(round(out[part], 4))
    result = {"scenario": "serve_rounds", "preset": args.preset, "rounds": args.rounds, "answer_tokens": args.tokens,
              "omp_wait_policy_of_peers": os.environ.get("OMP_WAIT_POLICY") or "unset",
              "requests_per_s": {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                                     "max": round(max(v), 1), "all": [round(x, 1) for x in v]}
                                 for k, v in rps.items()}}
    result["engine_seconds_per_round"] = {
        name: {part: {"median": round(statistics.median(v), 4), "all": v} for part, v in parts.items()}
        for name, parts in engine.items()}
    result["server_cache_ram_mib"] = "default" if args.server_cache_ram is None else args.server_cache_ram
    result["ours_vs_llama_server"] = round(statistics.median(rps["llava-kv"]) / statistics.median(rps["llama-server"]), 2)
    if args.baseline_python:
        result["baseline_python"] = args.baseline_python
        result["ours_vs_baseline"] = round(statistics.median(rps["llava-kv"]) /
                                           statistics.median(rps["llava-kv baseline"]), 2)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
