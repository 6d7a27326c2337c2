"""llama-server built from llava-kv's pinned llama.cpp against llama-server b11434 (the suite's peer),
side by side in alternating rounds: how much of a gap to llama-server is the llama.cpp version and
how much is our code (issue 23, item 4: measure this before moving the pin).

Usage: python benchmarks/scenarios/server_versions.py [--preset tiny-llava] [--rounds 5] [--serve]
       [--out result.json]

Both servers are built by ``benchmarks.harness.llama_server`` with the same CMake arguments (CPU,
``GGML_NATIVE=OFF``) and run with the same command line (2 threads, flash attention, f16 KV, vicuna
template, ``--cache-ram 0``), both up for the whole run. Each round, on each side in turn:

- ``per_token_ms``: a 128-token answer to a text prompt (``ignore_eos``), the server's own
  ``timings.predicted_per_token_ms`` (no HTTP in it);
- ``image_prompt_ms``: a never-seen image in a new conversation, one token: the server's
  ``timings.prompt_ms`` (the image's encode and the prompt's prefill);
- ``later_turn_s``: a 3-turn chat with one image, 16-token answers, wall seconds of turns 2 and 3
  (the slot's cache serves the prefix), median;
- with ``--serve``, ``requests_per_s``: 16 two-turn conversations, a never-seen image each, into
  4 slots (the suite's serve_concurrency call).

Reports each side's median with min and max and every round's figure, and pinned / b11434 ratios of
the medians (for times above 1 means the pinned build is slower; for requests/s, faster).
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
from benchmarks.harness import llama_server  # noqa: E402
from benchmarks.harness.llama_cpp_python import SYSTEM_MESSAGE  # noqa: E402
from benchmarks.harness.scenario import emit  # noqa: E402
from benchmarks.peers import openai_chat  # noqa: E402
from benchmarks.scenarios.edits import never_seen_pngs  # noqa: E402
from benchmarks.scenarios.serve import concurrency  # noqa: E402

from llava_kv.testing import make_test_model  # noqa: E402

SIDES = ("pinned", "b11434")
PER_TOKEN_TOKENS = 128


def _timings(srv: llama_server.LlamaServer, messages: list[dict[str, Any]], max_tokens: int,
             **extra: Any) -> dict[str, Any]:
    r = srv.client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0.0,
                                           seed=0, extra_body={"repeat_penalty": 1.0, "cache_prompt": True, **extra})
    timings = dict(getattr(r, "timings", None) or {})
    if not timings:
        raise llama_server.ServerError("the reply carries no timings")
    return timings


def per_token_ms(srv: llama_server.LlamaServer) -> float:
    t = _timings(srv, [{"role": "user", "content": "Count from one to a thousand in words."}], PER_TOKEN_TOKENS,
                 ignore_eos=True)
    if t.get("predicted_n") != PER_TOKEN_TOKENS:
        raise llama_server.ServerError(f"asked for {PER_TOKEN_TOKENS} tokens, got {t.get('predicted_n')}")
    return float(t["predicted_per_token_ms"])


def image_prompt_ms(srv: llama_server.LlamaServer, png: Path, repetition: int) -> float:
    # a system message new in every call, so no cached prefix reaches the image
    t = _timings(srv, [{"role": "system", "content": f"{SYSTEM_MESSAGE} (call {repetition})"},
                       openai_chat._user(openai_chat.data_uri(png), "What is in this picture?")], 1)
    return float(t["prompt_ms"])


def later_turn_s(srv: llama_server.LlamaServer, png: Path) -> float:
    out = openai_chat.multi_turn(srv, png, system=SYSTEM_MESSAGE, turns=3, max_tokens=16, repeats=1)
    return statistics.median(out["runs"][0][1:])


def _summary(values: list[float], digits: int) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "all": [round(v, digits) for v in values]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llava")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help="also 16 conversations into 4 slots")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    pair = make_test_model(preset=args.preset)
    pngs = never_seen_pngs(pair, Path(tempfile.mkdtemp(prefix="server-versions-")))
    sources = {name: llama_server.source(name) for name in SIDES}
    binaries = {name: llama_server.server_binary(src=src) for name, src in sources.items()}
    metrics = ["per_token_ms", "image_prompt_ms", "later_turn_s"] + (["requests_per_s"] if args.serve else [])
    figures: dict[str, dict[str, list[float]]] = {m: {name: [] for name in SIDES} for m in metrics}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(llama_server.LlamaServer(
            binaries[name], pair.model_path, pair.mmproj_path, threads=2, parallel=4 if args.serve else 1,
            cache_ram_mib=0)) for name in SIDES}
        for srv in servers.values():  # one warm-up of every call
            per_token_ms(srv)
            image_prompt_ms(srv, pngs(), -1)
            later_turn_s(srv, pngs())
        for repetition in range(args.rounds):
            for name, srv in servers.items():
                figures["per_token_ms"][name].append(per_token_ms(srv))
                figures["image_prompt_ms"][name].append(image_prompt_ms(srv, pngs(), repetition))
                figures["later_turn_s"][name].append(later_turn_s(srv, pngs()))
                if args.serve:
                    out = concurrency(srv, [pngs() for _ in range(16)], system=SYSTEM_MESSAGE, max_tokens=16)
                    figures["requests_per_s"][name].append(out["requests_per_s"])
        settings = {name: srv.settings_used() for name, srv in servers.items()}
    result: dict[str, Any] = {
        "scenario": "server_versions", "preset": args.preset, "rounds": args.rounds,
        "servers": {name: llama_server.build_info(src=src) for name, src in sources.items()},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset",
        "settings_differ": [k for k in settings["pinned"] if k != "command" and
                            settings["pinned"][k] != settings["b11434"][k]],
        "command": settings["pinned"]["command"],
        "figures": {m: {name: _summary(v, 4 if m == "later_turn_s" else 3) for name, v in per_side.items()}
                    for m, per_side in figures.items()},
        "pinned_vs_b11434": {m: round(statistics.median(v["pinned"]) / statistics.median(v["b11434"]), 3)
                             for m, v in figures.items()},
    }
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
