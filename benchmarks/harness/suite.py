"""The benchmark suite: ``python -m benchmarks --preset tiny|realistic --out DIR`` (from the repo root).

Runs every scenario on one generated model, llava-kv and llama-cpp-python side by side, each
figure beside its limit, and writes DIR/results.json and DIR/*.png. With ``--readme`` it also copies
them to benchmarks/results/<preset>-<cpu|gpu>/ and regenerates the results block of README.md from
every results.json committed there. See benchmarks/README.md.

The scenarios are in benchmarks/scenarios/, each module with its ``run_*(ctx)`` (``RUNNERS`` below
lists them in order); this module holds the presets and the options, runs the runners one after the
other and assembles results.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import llava_kv as lk
from llava_kv.testing import PRESETS, make_test_model

from benchmarks.harness import llama_server, machine, report, settings
from benchmarks.harness.context import Context
from benchmarks.harness.llama_cpp_python import PEER, threads
from benchmarks.harness.scenario import skipped
from benchmarks.scenarios import batch, blend, build_time, edits, load_close, multi_turn, serve, token_overhead
from benchmarks.scenarios.serve import SERVE_SCENARIOS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

# Each scenario module's runner and the results.json keys it fills, in the order they run (and appear).
RUNNERS: list[tuple[tuple[str, ...], Callable[[Context], dict[str, dict[str, Any]]]]] = [
    (("control", "multi_turn"), multi_turn.run_multi_turn),
    (("replace_first_image", "replace_middle_image", "replace_last_image", "readd_image", "new_conversation"),
     edits.run_edits),
    (("batch",), batch.run_batch),
    (("token_overhead",), token_overhead.run_token_overhead),
    (("load_close",), load_close.run_load_close),
    (("build_time",), build_time.run_build_time),
    (SERVE_SCENARIOS, serve.run_serve),
    (("blend",), blend.run_blend),
]
SCENARIOS = tuple(key for keys, _ in RUNNERS for key in keys)


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
    scenarios: tuple[str, ...] = SCENARIOS  # the others are recorded as skipped, with this preset's reason
    edit_tokens: int = 2048  # length of the edit conversation


SUITE_PRESETS = {
    "tiny": SuitePreset(model="tiny-llava", gpu_model="tiny-llava", repeat=3, turns=4, answer_tokens=16,
                        batch_images=8, batch_tokens=32, parallel=4, overhead_tokens=32, cycles=100,
                        build_time=False, purpose="CI smoke run: every code path in seconds; timings mean little"),
    "realistic": SuitePreset(model="realistic", gpu_model="llava-7b", repeat=3, turns=5, answer_tokens=16,
                             batch_images=8, batch_tokens=32, parallel=8, overhead_tokens=64, cycles=100,
                             build_time=True,
                             purpose="realistic shapes: SmolVLM-256M-like on CPU, LLaVA-1.5-7B-like on a GPU"),
    # The M-RoPE path (qwen2vl text, Qwen2.5-VL projector) beside the llama one: the chat and edit scenarios.
    "realistic-qwen25vl": SuitePreset(model="realistic-qwen25vl", gpu_model="realistic-qwen25vl", repeat=2, turns=4,
                                      answer_tokens=16, batch_images=8, batch_tokens=32, parallel=4,
                                      overhead_tokens=32, cycles=100, build_time=False,
                                      edit_tokens=1024,
                                      purpose="Qwen2.5-VL-3B widths (M-RoPE), fewer layers: chat and edits",
                                      scenarios=("control", "multi_turn", "replace_first_image",
                                                 "replace_middle_image", "replace_last_image", "readd_image",
                                                 "new_conversation", *SERVE_SCENARIOS[:3])),
}


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
    parser.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "unset"],
                        help="OMP_WAIT_POLICY of every side (read by benchmarks/__main__.py before llama.cpp loads; "
                             "default passive: on a shared machine a spinning OpenMP barrier loses its core to "
                             "other processes and stalls; 'unset' leaves libgomp's default)")
    parser.add_argument("--cpu-variant", default=settings.PEER_CPU_VARIANT,
                        help="llava-kv's CPU backend variant (read by benchmarks/__main__.py before llama.cpp loads; "
                             f"default {settings.PEER_CPU_VARIANT}, the peers' kernels, so like meets like; 'best' "
                             "lets llava-kv choose, as it does for users)")
    parser.add_argument("--no-server", action="store_true", help="leave llama-server out (its figures are null)")
    parser.add_argument("--no-peer-build", action="store_true",
                        help="use the peer venv and llama-server only if already built; never compile them")
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


def _carry_unrun(results: dict[str, Any], previous: Path, ran: list[str]) -> None:
    """A ``--scenarios`` run with ``--readme`` keeps the published entries of the scenarios it did not
    run, each marked with the run it comes from, so the published table stays whole."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    for key, e in (old.get("scenarios") or {}).items():
        if key in ran or key not in results["scenarios"] or key == "build_time":
            continue
        carried = dict(e)
        carried["details"] = {**(e.get("details") or {}), "carried_from": f"the published run of {old.get('timestamp')} "
                              f"(this run: --scenarios {','.join(ran)})"}
        results["scenarios"][key] = carried


def _carry_build_time(results: dict[str, Any], previous: Path) -> None:
    """A run without --build-time keeps the build times of the published run it replaces (they need
    three native builds), marked with that run's date, and adds this run's llama-server build time."""
    try:
        old = json.loads(previous.read_text())["scenarios"]["build_time"]
        when = json.loads(previous.read_text())["timestamp"]
    except (OSError, KeyError, ValueError):
        return
    if old.get("ours") is None:
        return
    new = results["scenarios"]["build_time"]
    server_s = new["details"].get("llama_server_build_s")
    carried = dict(old)
    carried["server"] = server_s
    carried["ratios"] = dict(old.get("ratios") or {})
    carried["ratios"]["server_vs_ours"] = round(server_s / old["ours"], 3) if server_s else None
    carried["reasons"] = {k: v for k, v in (old.get("reasons") or {}).items() if k != "server"}
    if server_s is None:
        carried["reasons"]["server"] = "llama-server was not built in this run's cache"
    carried["settings"] = old.get("settings") or {}
    carried["notes"] = {"server": "llama-server's figure builds one target of a newer llama.cpp, not a wheel"}
    carried["details"] = {**old.get("details", {}), **new["details"],
                          "carried_from": f"the published run of {when} (this run did not build: no --build-time)"}
    results["scenarios"]["build_time"] = carried


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
        if not any(k in preset.scenarios for k in keys):
            for k in keys:
                scenarios[k] = skipped(unit="", limit_means="",
                                       reason=f"skipped: not part of the {args.preset} preset ({preset.purpose})")
            continue
        t0 = time.perf_counter()
        load_before = round(os.getloadavg()[0], 2)  # other jobs on the machine, for the reader
        print(f"benchmarks: {', '.join(keys)}... (load average {load_before})", file=sys.stderr)
        try:
            scenarios.update(runner(ctx))
        except Exception as e:  # one failed scenario must not lose the others; the entry says what happened
            errors += 1
            traceback.print_exc()
            for k in keys:
                scenarios[k] = skipped(unit="", reason=f"error: {type(e).__name__}: {e}"[:500], limit_means="")
        for k in keys:
            scenarios[k]["seconds_to_run"] = round(time.perf_counter() - t0, 1)
            scenarios[k]["load_average"] = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
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
        "server_version": llama_server.SERVER if ctx.server_bin else None,
        "server": ctx.server_info if ctx.server_bin else {"reason": ctx.server_reason},
        "settings": {"flash_attn": "on", "threads": threads(), "n_batch": 512, "n_ubatch": 512,
                     "kv_type": settings.KV_TYPE, "omp_wait_policy": settings.omp_wait_policy(),
                     "cpu_variant": info["cpu_variant"],
                     "same_on_every_side": True, "recorded_per_scenario": "scenarios.*.settings"},
        "seconds": round(time.perf_counter() - started, 1),
        "scenarios": {k: scenarios[k] for k in SCENARIOS},
    }
    if args.readme and args.scenarios:
        _carry_unrun(results, RESULTS / f"{args.preset}-{results['device']}" / "results.json", args.scenarios)
    if args.readme and results["scenarios"]["build_time"]["ours"] is None:
        _carry_build_time(results, RESULTS / f"{args.preset}-{results['device']}" / "results.json")
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
