"""What constrained output costs: tokens per second of one session generating unconstrained, held to
a GBNF grammar, and held to a JSON schema, on the same prompt; and what the server's HTTP side adds
to a request.

Usage: python benchmarks/scenarios/structured.py [--presets tiny-llava,realistic] [--repeat 5]
       [--tokens 128] [--out result.json]

- ``per_token_ms``: each side generates ``--tokens`` tokens (temperature 1, the same seeds), sides
  alternating, ``--repeat`` rounds; medians with min and max. The JSON schema's strings are
  unbounded (free text inside the structure), so its replies run as long as the unconstrained ones;
  a reply that ends early is continued with the next seed until the side has its token count.
  ``grammar_cost_ms`` is constrained minus unconstrained: llama.cpp's grammar sampler over the whole
  vocabulary plus llava-kv's UTF-8 stage, per token.
- ``http_overhead_ms``: one chat request whose reply is empty (``max_tokens`` 0) and whose prompt the
  slot already holds (nothing decoded), over HTTP to ``llava-kv serve`` against the same call in
  process (``session.chat``): what HTTP, JSON, the request models and the engine's hand-off add.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.scenario import emit  # noqa: E402

import llava_kv as lk  # noqa: E402
from llava_kv.testing import make_test_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "count": {"type": "integer", "minimum": 0, "maximum": 1000},
    "tags": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"}},
    "required": ["title", "count", "tags", "note"], "additionalProperties": False}
GRAMMAR = 'root ::= sentence (" " sentence)*\nsentence ::= [A-Za-z ,]+ "."'


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def per_token(model: lk.Model, tokens: int, repeat: int) -> dict[str, Any]:
    sides: dict[str, dict[str, Any]] = {"unconstrained": {}, "grammar": {"grammar": GRAMMAR},
                                        "json_schema": {"json_schema": SCHEMA}}
    times: dict[str, list[float]] = {k: [] for k in sides}
    with model.session(n_ctx=tokens * 4 + 256) as s:
        s.append_text("Write about the picture of a house by a river.")
        base = len(s.timeline)
        s.generate(8)  # first-decode costs paid before timing
        s.truncate(base)
        for r in range(repeat):
            for side, kwargs in sides.items():
                done, elapsed, seed = 0, 0.0, 1000 * r
                while done < tokens:
                    before = s.stats["tokens_generated"]
                    t0 = time.perf_counter()
                    s.generate(tokens - done, temperature=1.0, seed=seed, **kwargs)
                    elapsed += time.perf_counter() - t0
                    done += s.stats["tokens_generated"] - before
                    seed += 1
                    s.truncate(base)
                times[side].append(1000 * elapsed / done)
    out: dict[str, Any] = {"per_token_ms": {k: _stats(v) for k, v in times.items()}}
    base_ms = statistics.median(times["unconstrained"])
    out["grammar_cost_ms"] = {k: round(statistics.median(times[k]) - base_ms, 4) for k in ("grammar", "json_schema")}
    out["slowdown"] = {k: round(statistics.median(times[k]) / base_ms, 3) for k in ("grammar", "json_schema")}
    return out


def http_overhead(pair: Any, repeat: int) -> dict[str, Any]:
    from llava_kv.server.process import ServerProcess

    messages = [{"role": "user", "content": "What is in the picture of a house by a river?"}]
    body = json.dumps({"messages": messages, "max_tokens": 0, "temperature": 0}).encode()
    rounds = 20 * repeat
    with ServerProcess(pair.model_path, pair.mmproj_path, args=["--slots", "1", "--n-ctx", "1024"]) as srv:
        def over_http() -> None:
            req = urllib.request.Request(srv.base + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as reply:
                reply.read()

        http = _timed(over_http, rounds)
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model, model.session(n_ctx=1024) as s:
        local = _timed(lambda: s.chat(messages, max_tokens=0, temperature=0), rounds)
    return {"http_ms": _stats(http), "in_process_ms": _stats(local),
            "http_overhead_ms": round(statistics.median(http) - statistics.median(local), 3), "requests": rounds}


def _timed(fn: Callable[[], Any], rounds: int) -> list[float]:
    fn()  # warm: the prompt is in the slot (or session) from here on
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny-llava,realistic")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"scenario": "structured", "repeat": args.repeat, "tokens": args.tokens,
                              "build": lk.build_info()["cpu_variant"], "presets": {}}
    for preset in args.presets.split(","):
        pair = make_test_model(preset=preset)
        with lk.Model.load(pair.model_path, pair.mmproj_path, n_threads=args.threads) as model:
            entry = per_token(model, args.tokens, args.repeat)
            entry["n_vocab"] = model.n_vocab
        entry.update(http_overhead(pair, args.repeat))
        result["presets"][preset] = entry
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
