"""The benchmark suite: ``python -m benchmarks --preset tiny|realistic --out DIR`` (from the repo root).

Runs every scenario on one generated model, llava-kv and llama-cpp-python side by side, each
figure beside its limit, and writes DIR/results.json and DIR/*.png. With ``--readme`` it also copies
them to benchmarks/results/<preset>-<cpu|gpu>/ and regenerates the results block of README.md from
every results.json committed there. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import llava_kv as lk
from llava_kv.testing import PRESETS, TestModel, make_test_model

from benchmarks import batch_bench, build_time, edit_bench, load_close, machine, multi_turn_bench, report, \
    token_overhead
from benchmarks.peer import PEER, PeerError, peer_build_info, peer_python, threads
from benchmarks.scenario import entry, skipped

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

SCENARIOS = ("multi_turn", "replace_last_image", "replace_middle_image", "readd_image", "batch", "token_overhead",
             "load_close", "build_time")


@dataclass(frozen=True)
class SuitePreset:
    model: str  # a llava_kv.testing preset
    gpu_model: str  # the one used when llava-kv is a GPU build
    repeat: int
    turns: int
    answer_tokens: int  # multi_turn answers
    batch_images: int
    batch_tokens: int
    parallel: int
    overhead_tokens: int
    cycles: int
    build_time: bool
    purpose: str


SUITE_PRESETS = {
    "tiny": SuitePreset(model="tiny-llava", gpu_model="tiny-llava", repeat=3, turns=4, answer_tokens=16,
                        batch_images=8, batch_tokens=32, parallel=4, overhead_tokens=32, cycles=100,
                        build_time=False, purpose="CI smoke run: every code path in seconds; timings mean little"),
    "realistic": SuitePreset(model="realistic", gpu_model="llava-7b", repeat=3, turns=5, answer_tokens=16,
                             batch_images=8, batch_tokens=32, parallel=8, overhead_tokens=64, cycles=100,
                             build_time=True,
                             purpose="realistic shapes: SmolVLM-256M-like on CPU, LLaVA-1.5-7B-like on a GPU"),
}


class Context:
    """What every scenario needs: the model pair, where to write, the peer (or why there is none)."""

    def __init__(self, args: argparse.Namespace, preset: SuitePreset, pair: TestModel, gpu: bool) -> None:
        self.args = args
        self.preset = preset
        self.pair = pair
        self.gpu = gpu
        self.repeat = args.repeat or preset.repeat
        self.work = Path(tempfile.mkdtemp(prefix="llava-kv-bench-"))
        self.n_gpu_layers = -1 if gpu else 0
        self.load_kwargs: dict[str, Any] = {"n_gpu_layers": self.n_gpu_layers, "n_threads": threads()}
        self.peer_py: Path | None = None
        self.peer_reason: str | None = None
        self.peer_info: dict[str, Any] | None = None
        if args.no_peer:
            self.peer_reason = "skipped: --no-peer"
        else:
            try:
                self.peer_py = peer_python(gpu=gpu, build=not args.no_peer_build)
                self.peer_info = peer_build_info(self.peer_py)
            except (PeerError, OSError, SystemExit) as e:  # SystemExit: the sdist fetch failed
                lines = str(e).strip().splitlines()
                self.peer_reason = f"peer unavailable: {lines[-1] if lines else repr(e)}"

    @property
    def peer(self) -> bool:
        return self.peer_py is not None

    def peer_reasons(self, result: dict[str, Any]) -> dict[str, str]:
        if self.peer_reason:
            return {"peer": self.peer_reason}
        if result.get("peer_error"):
            return {"peer": "peer run failed: " + result["peer_error"].strip().splitlines()[-1][:300]}
        return {}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


# --- scenarios -------------------------------------------------------------------------------


def run_multi_turn(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    r = multi_turn_bench.measure(ctx.pair, turns=p.turns, max_tokens=p.answer_tokens, repeats=ctx.repeat,
                                 peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                                 load_kwargs=ctx.load_kwargs, peer_gpu_layers=ctx.n_gpu_layers)
    med = r["median_later_turns_s"]
    return {"multi_turn": entry(
        unit="s per turn", repetitions=ctx.repeat, ours=med["ours"], peer=med.get("peer"), limit=med["floor"],
        limit_means="decode only the new turn's tokens, then generate the answer (measured on a copy of the state)",
        reasons=ctx.peer_reasons(r), digits=6,
        details={"what": f"chat with one image, turns 2..{p.turns} (median over turns of per-turn medians), "
                         f"{p.answer_tokens}-token greedy answers",
                 "turns": p.turns, "ours_s": r["ours_s"], "limit_s": r["floor_s"], "peer_s": r["peer_s"],
                 "reused_tokens": r["reused_tokens"], "images_encoded": r["images_encoded"],
                 "per_turn_ratios": r["ratios"]})}


def run_edits(ctx: Context) -> dict[str, dict[str, Any]]:
    r = edit_bench.measure(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs)
    peer: dict[str, Any] = {}
    if ctx.peer:
        peer = edit_bench.measure_peer(ctx.pair, filler=r["filler"], repeats=ctx.repeat, folder=ctx.work,
                                       python=ctx.peer_py, n_gpu_layers=ctx.n_gpu_layers)
    reasons = ctx.peer_reasons(peer)
    med = r["median_ms"]

    def peer_ms(key: str) -> float | None:
        return statistics.median(peer[key]) * 1000 if peer.get(key) else None

    common = {"conversation_tokens": r["conversation_tokens"], "image_tokens": r["image_tokens"],
              "max_abs_logit_diff_vs_fresh": r["max_abs_logit_diff_vs_fresh"],
              "peer_prompt_tokens": (peer.get("prompt_tokens") or {}),
              "peer_does": "a new chat call (max_tokens=1) with the edited conversation: re-encodes every image, "
                           "re-prefills everything; ours and the limit decode up to the new logits"}
    out = {}
    for where in ("last", "middle"):
        key = f"replace_{where}_image"
        out[key] = entry(
            unit="ms", repetitions=ctx.repeat, ours=med[key], peer=peer_ms(key), limit=med[f"suffix_floor_{where}"],
            limit_means="decode only the invalidated suffix (from the replaced image on) onto the kept prefix",
            reasons=reasons, digits=3,
            extra_ratios={"fresh_prefill_vs_ours": round(med[f"fresh_prefill_{where}"] / med[key], 3)},
            details={"what": f"replace the {where} of 3 images in a {r['conversation_tokens']}-token conversation "
                             "(replacement's embedding cached)",
                     "fresh_prefill_ms": med[f"fresh_prefill_{where}"],
                     **({"fresh_prefill_with_encode_ms": med["fresh_prefill_with_encode_last"],
                         "replace_with_new_image_ms": med["replace_last_image_new_image"]} if where == "last" else {}),
                     "ours_all_ms": r["all_ms"][key], "limit_all_ms": r["all_ms"][f"suffix_floor_{where}"],
                     "peer_all_ms": [x * 1000 for x in peer.get(key, [])],
                     "peer_encodes": (peer.get("encodes") or {}).get(key), **common})
    readd = r["readd_image"]
    out["readd_image"] = entry(
        unit="image encodes", repetitions=1, ours=readd["images_encoded"],
        peer=(peer.get("encodes") or {}).get("readd_image"), limit=0,
        limit_means="zero encodes: the image was seen before", reasons=reasons,
        details={"what": "remove the last image of the conversation, then add the same pixels again",
                 "ours_ms": readd["ms"], "ours_embed_cache_hits": readd["embed_cache_hits"],
                 "peer_ms": peer_ms("readd_image"), **common})
    return out


def run_batch(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    r = batch_bench.measure(ctx.pair, n_images=p.batch_images, max_tokens=p.batch_tokens, parallel=p.parallel,
                            repeats=ctx.repeat, peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                            load_kwargs=ctx.load_kwargs, peer_gpu_layers=ctx.n_gpu_layers)
    # The same with long answers, where generation (batched by us, one token at a time by the peer)
    # dominates; the GPU targets name both lengths.
    long_answers = batch_bench.measure(ctx.pair, n_images=p.batch_images, max_tokens=4 * p.batch_tokens,
                                       parallel=p.parallel, repeats=ctx.repeat, peer=ctx.peer,
                                       peer_python=ctx.peer_py, workdir=ctx.work, load_kwargs=ctx.load_kwargs,
                                       peer_gpu_layers=ctx.n_gpu_layers)
    return {"batch": entry(
        unit="images/s", better="higher", repetitions=ctx.repeat, ours=r["ours_images_per_s"],
        peer=r["peer_images_per_s"], limit=r["limit"]["images_per_s"],
        limit_means="estimate: per image, encode + decode its image and prompt tokens + its answer at the "
                    f"per-sequence cost of a {p.parallel}-wide batched step (measured here, no overlap assumed)",
        reasons=ctx.peer_reasons(r),
        details={"what": f"caption {p.batch_images} distinct images, {p.batch_tokens}-token greedy answers; ours: "
                         f"llava_kv.batch.run(parallel={p.parallel}), peer: a loop over Llava15ChatHandler",
                 **{k: v for k, v in r.items() if k not in ("ours_images_per_s", "peer_images_per_s")},
                 f"answers_{4 * p.batch_tokens}_tokens": long_answers})}


def run_token_overhead(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    r = token_overhead.measure(ctx.pair, n_tokens=p.overhead_tokens, repeats=max(ctx.repeat, 5), peer=ctx.peer,
                               peer_python=ctx.peer_py, workdir=ctx.work, load_kwargs=ctx.load_kwargs,
                               peer_gpu_layers=ctx.n_gpu_layers)
    per = r["per_token_s"]
    reasons = ctx.peer_reasons(r)
    # The limit: generation with no facade Python per token. The C++ loop of llava_kv.batch is that by
    # construction; a bare loop over the native step adds only one binding call per token (~1 us). The
    # cheaper of the two is the best measured estimate of the native cost per token.
    candidates = {k: per[k] for k in ("cpp_loop", "native_step") if per.get(k) is not None}
    source = min(candidates, key=lambda k: candidates[k]) if candidates else None
    if source is None:
        reasons["limit"] = "neither the C++ loop nor the native step generated tokens"
    ours, limit = _ms(per["stream"]), _ms(per[source]) if source else None
    return {"token_overhead": entry(
        unit="ms per token", repetitions=max(ctx.repeat, 5), ours=ours, peer=_ms(r["peer_per_token_s"]),
        limit=limit, limit_means="no Python per token: the cheaper of the C++ generate loop of llava_kv.batch "
                                 "(parallel=1) and a bare loop over the native generation step",
        reasons=reasons, digits=5,
        extra_ratios={"python_overhead_ms_per_token":
                      None if limit is None or ours is None else round(ours - limit, 5)},
        details={"what": f"{p.overhead_tokens}-token greedy answer to one image prompt; ours: "
                         "session.generate(stream=True) consumed piece by piece; peer: streaming chat completion",
                 "limit_source": source, "ms_per_token": {k: _ms(v) for k, v in per.items()},
                 "tokens_generated": r["tokens_generated"], "peer_tokens_generated": r.get("peer_tokens_generated"),
                 "notes": r["reasons"]})}


def run_load_close(ctx: Context) -> dict[str, dict[str, Any]]:
    cycles = ctx.args.cycles or ctx.preset.cycles
    r = load_close.measure(ctx.pair, cycles=cycles, peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                           n_gpu_layers=ctx.n_gpu_layers)
    peer = r.get("peer") or {}
    return {"load_close": entry(
        unit=f"MiB RSS drift (cycle {load_close.SETTLE} to {cycles})", repetitions=1,
        ours=r["ours"]["rss_drift_mib"], peer=peer.get("rss_drift_mib"), limit=0,
        limit_means="0: every load/close cycle gives back everything it took", reasons=ctx.peer_reasons(r),
        digits=3,
        details={"what": f"{cycles} cycles of load model + projector, one image prompt, close; RSS after "
                         "malloc_trim(0) after each close, each runtime in a fresh process",
                 "gpu_drift_mib": {"ours": r["ours"]["gpu_drift_mib"], "peer": peer.get("gpu_drift_mib")},
                 "ours": r["ours"], "peer": peer or None})}


def run_build_time(ctx: Context) -> dict[str, dict[str, Any]]:
    enabled = ctx.args.build_time if ctx.args.build_time is not None else ctx.preset.build_time
    limit_means = "building only the llama.cpp libraries we link (llama, ggml, mtmd), which every binding builds"
    if not enabled:
        return {"build_time": skipped(unit="s", limit_means=limit_means,
                                      reason="skipped in this run (three native builds; use --build-time)")}
    r = build_time.measure(gpu=ctx.gpu, peer=ctx.peer)
    sec = r["seconds"]
    return {"build_time": entry(
        unit="s", repetitions=1, ours=sec["ours"], peer=sec.get("peer"), limit=sec["limit"], limit_means=limit_means,
        reasons=ctx.peer_reasons(r), digits=1,
        details={"what": "wheel from a clean build folder, ccache off, pip wheel --no-build-isolation", **r})}


RUNNERS: list[tuple[tuple[str, ...], Callable[[Context], dict[str, dict[str, Any]]]]] = [
    (("multi_turn",), run_multi_turn),
    (("replace_last_image", "replace_middle_image", "readd_image"), run_edits),
    (("batch",), run_batch),
    (("token_overhead",), run_token_overhead),
    (("load_close",), run_load_close),
    (("build_time",), run_build_time),
]


# --- driver ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(SUITE_PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="folder for results.json and the plots")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per figure (default: the preset's)")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (the others are recorded as skipped)")
    parser.add_argument("--cycles", type=int, default=None, help="load/close cycles (default: 100)")
    parser.add_argument("--no-peer", action="store_true", help="leave llama-cpp-python out (its figures are null)")
    parser.add_argument("--no-peer-build", action="store_true",
                        help="use the peer venv only if it is already built; never compile it")
    parser.add_argument("--build-time", dest="build_time", action="store_true", default=None,
                        help="measure wheel build times (three native builds; on by default for realistic)")
    parser.add_argument("--no-build-time", dest="build_time", action="store_false")
    parser.add_argument("--readme", action="store_true",
                        help="copy the results to benchmarks/results/ and regenerate README.md's results block")
    args = parser.parse_args(argv)
    if args.scenarios:
        wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(SCENARIOS))
        if unknown:
            parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
        args.scenarios = wanted
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = SUITE_PRESETS[args.preset]
    gpu = machine.gpu_build()
    model_preset = preset.gpu_model if gpu else preset.model
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"benchmarks: preset {args.preset} ({model_preset}{', GPU' if gpu else ', CPU'}), writing {out}",
          file=sys.stderr)
    pair = make_test_model(preset=model_preset)
    ctx = Context(args, preset, pair, gpu)
    if ctx.peer_reason:
        print(f"benchmarks: {ctx.peer_reason}", file=sys.stderr)

    scenarios: dict[str, dict[str, Any]] = {}
    errors = 0
    for keys, runner in RUNNERS:
        selected = args.scenarios is None or any(k in args.scenarios for k in keys)
        if not selected:
            for k in keys:
                scenarios[k] = skipped(unit="", reason="skipped: not in --scenarios", limit_means="")
            continue
        t0 = time.perf_counter()
        print(f"benchmarks: {', '.join(keys)}...", file=sys.stderr)
        try:
            scenarios.update(runner(ctx))
        except Exception as e:  # one failed scenario must not lose the others; the entry says what happened
            errors += 1
            traceback.print_exc()
            for k in keys:
                scenarios[k] = skipped(unit="", reason=f"error: {type(e).__name__}: {e}"[:500], limit_means="")
        for k in keys:
            scenarios[k]["seconds_to_run"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(ctx.work, ignore_errors=True)

    info = lk.build_info()
    p = PRESETS[model_preset]
    results = {
        "suite": "llava-kv benchmarks",
        "format": 1,
        "preset": args.preset,
        "preset_purpose": preset.purpose,
        "model": {"preset": model_preset, "description": p.description, "dtype": p.dtype, "n_embd": p.n_embd,
                  "n_layer": p.n_layer, "n_vocab": p.n_vocab, "image_tokens": p.image_tokens,
                  "weights": "random (generated by llava_kv.testing; same files for both runtimes)"},
        "device": "gpu" if gpu else "cpu",
        "n_gpu_layers": ctx.n_gpu_layers,
        "threads": threads(),
        "timestamp": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine.describe(),
        "llava_kv_version": info["version"],
        "llama_cpp_commit": info["llama_cpp_commit"],
        "peer_version": PEER if ctx.peer else None,
        "peer": ctx.peer_info if ctx.peer else {"reason": ctx.peer_reason},
        "seconds": round(time.perf_counter() - started, 1),
        "scenarios": {k: scenarios[k] for k in SCENARIOS},
    }
    results["plots"] = report.plot_all(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report.table(results), file=sys.stderr)
    print(f"benchmarks: wrote {out / 'results.json'} and {len(results['plots'])} plots in {results['seconds']} s",
          file=sys.stderr)
    if args.readme:
        target = RESULTS / f"{args.preset}-{results['device']}"
        if target.resolve() != out:
            target.mkdir(parents=True, exist_ok=True)
            for name in ["results.json", *results["plots"]]:
                shutil.copy2(out / name, target / name)
        report.update_readme(ROOT / "README.md", RESULTS, ROOT)
        print(f"benchmarks: README.md results block regenerated from {RESULTS}", file=sys.stderr)
    return 1 if errors else 0
