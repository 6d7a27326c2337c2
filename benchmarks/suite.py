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
import os
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

from benchmarks import batch_bench, blend_bench, build_time, edit_bench, load_close, machine, multi_turn_bench, \
    report, serve_bench, server_bench, server_peer, settings, token_overhead
from benchmarks.peer import (PEER, SYSTEM_MESSAGE, PeerError, PeerServer, peer_build_info, peer_python, server_extra,
                             threads)
from benchmarks.scenario import entry, skipped

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

SCENARIOS = ("control", "multi_turn", "replace_first_image", "replace_middle_image", "replace_last_image",
             "readd_image", "new_conversation", "batch", "token_overhead", "load_close", "build_time",
             "serve_multi_turn", "serve_replace_first_image", "serve_new_conversation", "serve_concurrency",
             "serve_http_overhead", "serve_restore", "blend")
SERVE_SCENARIOS = SCENARIOS[11:17]
# The control row: identical work on every side must agree within this factor, or the suite says which
# setting differs.
CONTROL_TOLERANCE = 1.10


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


class Context:
    """What every scenario needs: the model pair, where to write, the peers (or why there are none)."""

    def __init__(self, args: argparse.Namespace, preset: SuitePreset, pair: TestModel, gpu: bool) -> None:
        self.args = args
        self.preset = preset
        self.pair = pair
        self.gpu = gpu
        self.repeat = args.repeat or preset.repeat
        self.work = Path(tempfile.mkdtemp(prefix="llava-kv-bench-"))
        self.n_gpu_layers = -1 if gpu else 0
        # flash attention on, stated rather than left to "auto", as both peers are started with it
        self.load_kwargs: dict[str, Any] = {"n_gpu_layers": self.n_gpu_layers, "n_threads": threads(),
                                            "flash_attn": "on"}
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
        self.server_bin: Path | None = None
        self.server_reason: str | None = None
        self.server_info: dict[str, Any] | None = None
        if args.no_server:
            self.server_reason = "skipped: --no-server"
        elif gpu:
            self.server_reason = "skipped: the llama-server peer is built for CPU only"
        else:
            try:
                import openai  # noqa: F401  # the client the server is driven with (the bench extra)

                self.server_bin = server_peer.server_binary(build=not args.no_peer_build)
                self.server_info = server_peer.build_info()
            except ImportError:
                self.server_reason = "llama-server unavailable: the openai client is not installed (pip install openai)"
            except (server_peer.ServerError, OSError) as e:
                self.server_reason = f"llama-server unavailable: {e}"

    @property
    def peer(self) -> bool:
        return self.peer_py is not None

    def server(self, *, parallel: int, n_ctx: int, **kwargs: Any) -> server_peer.LlamaServer:
        """A llama-server on the same model pair with our settings (start it with ``with``)."""
        assert self.server_bin is not None
        return server_peer.LlamaServer(self.server_bin, self.pair.model_path, self.pair.mmproj_path,
                                       threads=threads(), parallel=parallel, n_ctx=n_ctx,
                                       log=self.work / f"llama-server-{time.monotonic_ns()}.log", **kwargs)

    @property
    def server_factory(self) -> Callable[..., server_peer.LlamaServer] | None:
        return self.server if self.server_bin is not None else None

    def peer_reasons(self, result: dict[str, Any]) -> dict[str, str]:
        reasons = {}
        if self.peer_reason:
            reasons["peer"] = self.peer_reason
        elif result.get("peer_error"):
            reasons["peer"] = "peer run failed: " + result["peer_error"].strip().splitlines()[-1][:300]
        if self.server_reason:
            reasons["server"] = self.server_reason
        elif result.get("server_error"):
            reasons["server"] = "llama-server run failed: " + result["server_error"].strip().splitlines()[-1][:300]
        return reasons


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


# --- scenarios -------------------------------------------------------------------------------


def _control_verdict(ours: float | None, other: float | None, ours_settings: dict[str, Any] | None,
                     other_settings: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Whether identical work agrees within CONTROL_TOLERANCE, and if not, which setting differs."""
    if ours is None or other is None:
        return {"agree": None, "says": f"{name} not measured"}
    ratio = other / ours
    differs = settings.differences(ours_settings, other_settings)
    agree = 1 / CONTROL_TOLERANCE <= ratio <= CONTROL_TOLERANCE
    if agree:
        says = f"{name} {ratio:.2f}x of llava-kv: within {CONTROL_TOLERANCE - 1:.0%}"
    elif differs:
        says = f"{name} {ratio:.2f}x of llava-kv, outside {CONTROL_TOLERANCE - 1:.0%}; settings that differ: " + \
               "; ".join(differs)
    else:
        says = (f"{name} {ratio:.2f}x of llava-kv, outside {CONTROL_TOLERANCE - 1:.0%}, with every recorded "
                "setting equal: the gap is the runtime's own work, not a setting")
    return {"agree": agree, "ratio": round(ratio, 3), "settings_that_differ": differs, "says": says}


def run_multi_turn(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    r = multi_turn_bench.measure(ctx.pair, turns=p.turns, max_tokens=p.answer_tokens, repeats=ctx.repeat,
                                 peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                                 load_kwargs=ctx.load_kwargs, peer_gpu_layers=ctx.n_gpu_layers,
                                 server=ctx.server_factory)
    med = r["median_later_turns_s"]
    reasons = ctx.peer_reasons(r)
    used = r["settings"]
    first = r["turn1_s"]
    verdicts = {"peer": _control_verdict(first["ours"], first.get("peer"), used["ours"], used.get("peer"),
                                         "llama-cpp-python"),
                "server": _control_verdict(first["ours"], first.get("server"), used["ours"], used.get("server"),
                                           "llama-server")}
    control = entry(
        unit="s (turn 1)", repetitions=ctx.repeat, ours=first["ours"], peer=first.get("peer"),
        server=first.get("server"), limit=None, settings=used,
        limit_means="none: a control row, the same work on every side",
        reasons={**reasons, "limit": "a control row has no limit: it checks that like-for-like settings give "
                                     "like-for-like times"}, digits=6,
        details={"what": "turn 1 of the multi-turn chat: encode a never-seen image, prefill the prompt, "
                         f"{p.answer_tokens}-token greedy answer; identical work on every side (medians over "
                         f"{ctx.repeat} conversations, each about a new image)",
                 "tolerance": CONTROL_TOLERANCE, "all_s": r["all_turn1_s"], "verdict": verdicts,
                 "prompt_tokens": {"ours": r["prompt_tokens"]["ours"][0],
                                   "server": (r.get("server_calls") or [{}])[0].get("prompt_tokens")}})
    multi = entry(
        unit="s per turn", repetitions=ctx.repeat, ours=med["ours"], peer=med.get("peer"), server=med.get("server"),
        limit=med["floor"], settings=used,
        limit_means="decode only the new turn's tokens, then generate the answer (measured on a copy of the state)",
        reasons=reasons, digits=6,
        notes={"server": "llama-server reuses its slot's cached prefix (image included) like us; per turn it "
                         "also pays HTTP, JSON and re-rendering the whole chat"},
        details={"what": f"chat with one image, turns 2..{p.turns} (median over turns of per-turn medians), "
                         f"{p.answer_tokens}-token greedy answers",
                 "turns": p.turns, "ours_s": r["ours_s"], "limit_s": r["floor_s"], "peer_s": r["peer_s"],
                 "server_s": r["server_s"], "all_ours_s": r["all_ours_s"],
                 "reused_tokens": r["reused_tokens"], "images_encoded": r["images_encoded"],
                 "server_calls": r.get("server_calls"), "server_images_encoded": r.get("server_images_encoded"),
                 "per_turn_ratios": r["ratios"]})
    return {"control": control, "multi_turn": multi}


def _fewest(result: dict[str, Any], key: str) -> int | None:
    """A side's image encodes in its best repetition (the one its caches helped most)."""
    per = (result.get("encodes_per_repetition") or {}).get(key)
    return min(per) if per else (result.get("encodes") or {}).get(key)


def run_edits(ctx: Context) -> dict[str, dict[str, Any]]:
    r = edit_bench.measure(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs,
                           target_tokens=ctx.preset.edit_tokens)
    peer: dict[str, Any] = {}
    if ctx.peer:
        peer = edit_bench.measure_peer(ctx.pair, filler=r["filler"], repeats=ctx.repeat, folder=ctx.work,
                                       python=ctx.peer_py, n_gpu_layers=ctx.n_gpu_layers)
    server: dict[str, Any] = {}
    if ctx.server_bin is not None:
        spec = edit_bench.write_peer_spec(ctx.pair, filler=r["filler"], repeats=ctx.repeat, folder=ctx.work)
        try:
            with ctx.server(parallel=1, n_ctx=4096) as srv:
                server = server_bench.edits(srv, spec, edit_bench.never_seen_pngs(ctx.pair, ctx.work),
                                            critic_system=edit_bench.critic_system,
                                            critic_text=edit_bench.CRITIC_TEXT, repeats=ctx.repeat)
                server["settings"] = srv.settings_used()
        except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
            server = {"server_error": f"{type(e).__name__}: {e}"}
    reasons = ctx.peer_reasons({**peer, **server})
    used = {"ours": r["settings"], "peer": peer.get("settings"), "server": server.get("settings")}
    med = r["median_ms"]

    def side_ms(result: dict[str, Any], key: str) -> float | None:
        return statistics.median(result[key]) * 1000 if result.get(key) else None

    common = {"conversation_tokens": r["conversation_tokens"], "image_tokens": r["image_tokens"],
              "max_abs_logit_diff_vs_fresh": r["max_abs_logit_diff_vs_fresh"],
              "max_abs_logit_diff_vs_fresh_by_edit": r["max_abs_logit_diff_vs_fresh_by_edit"],
              "peer_prompt_tokens": (peer.get("prompt_tokens") or {}),
              "server_calls": server.get("calls"),
              "peer_does": "a new chat call (max_tokens=1) with the edited conversation: re-encodes every image, "
                           "re-prefills everything; ours and the limit decode up to the new logits",
              "server_does": "a new chat call (max_tokens=1) with the edited conversation: reuses its cached "
                             "prefix up to the changed image, then encodes that image and every later one again "
                             "(no embedding cache) and prefills the rest"}
    out = {}
    for where in ("first", "middle", "last"):
        key = f"replace_{where}_image"
        server_reasons = dict(reasons)
        if where == "middle" and "server" not in server_reasons:
            server_reasons["server"] = "not run against llama-server: the first and the last image bracket it"
        out[key] = entry(
            unit="ms", repetitions=ctx.repeat, ours=med[f"{key}_new_image"], peer=side_ms(peer, key),
            server=side_ms(server, key) if where != "middle" else None,
            limit=med[f"suffix_floor_{where}_new_image"], settings=used,
            limit_means="encode the never-seen image and decode only the invalidated suffix (from the replaced "
                        "image on) onto the kept prefix",
            reasons=server_reasons, digits=3,
            extra_ratios={"fresh_prefill_vs_ours": round(med["fresh_prefill_last"] / med[f"{key}_new_image"], 3),
                          "cached_replacement_vs_its_limit": round(med[key] / med[f"suffix_floor_{where}"], 3)},
            details={"what": f"replace the {where} of 3 images in a {r['conversation_tokens']}-token conversation "
                             "with a never-seen image (its encode included); beside it, the same edit with an "
                             "image whose embedding is cached",
                     "cached_replacement_ms": med[key], "cached_replacement_limit_ms": med[f"suffix_floor_{where}"],
                     "fresh_prefill_ms": med["fresh_prefill_last"],
                     "fresh_prefill_with_encode_ms": med["fresh_prefill_with_encode_last"],
                     "ours_all_ms": r["all_ms"][f"{key}_new_image"],
                     "cached_replacement_all_ms": r["all_ms"][key],
                     "limit_all_ms": r["all_ms"][f"suffix_floor_{where}_new_image"],
                     "peer_all_ms": [x * 1000 for x in peer.get(key, [])],
                     "server_all_ms": [x * 1000 for x in server.get(key, [])],
                     "images_encoded": {"ours": 1, "peer": (peer.get("encodes") or {}).get(key),
                                        "server": (server.get("encodes") or {}).get(key)},
                     **common})
    readd = r["readd_image"]
    out["readd_image"] = entry(
        unit="image encodes", repetitions=1, ours=readd["images_encoded"],
        peer=(peer.get("encodes") or {}).get("readd_image"), server=None, limit=0, settings=used,
        limit_means="zero encodes: the image was seen before",
        reasons={**reasons, **({} if "server" in reasons else {"server": "not run against llama-server: "
                                                               "new_conversation is its case of a seen image"})},
        details={"what": "remove the last image of the conversation, then add the same pixels again",
                 "ours_ms": readd["ms"], "ours_embed_cache_hits": readd["embed_cache_hits"],
                 "peer_ms": side_ms(peer, "readd_image"), **common})
    nc = r["new_conversation"]
    out["new_conversation"] = entry(
        unit="image encodes", repetitions=ctx.repeat, ours=max(x["images_encoded"] for x in nc),  # ours: the worst
        peer=_fewest(peer, "new_conversation"), server=_fewest(server, "new_conversation"), limit=0, settings=used,
        limit_means="zero encodes: the image was seen before (in another conversation)", reasons=reasons,
        notes={"server": "llama-server's prompt cache is keyed by the token prefix: a seen image after different "
                         "text is encoded again"},
        details={"what": "image A of the edit conversation, in a brand-new conversation whose text before the image "
                         "differs (another system message), 1-token answer; encodes counted per call",
                 "ours_ms": statistics.median(x["ms"] for x in nc), "ours_calls": nc,
                 "peer_ms": side_ms(peer, "new_conversation"), "server_ms": side_ms(server, "new_conversation"),
                 "server_call": (server.get("calls") or {}).get("new_conversation"),
                 "encodes_per_repetition": {
                     "ours": [x["images_encoded"] for x in nc],
                     "peer": (peer.get("encodes_per_repetition") or {}).get("new_conversation"),
                     "server": (server.get("encodes_per_repetition") or {}).get("new_conversation")},
                 "peer_prompt_tokens": (peer.get("prompt_tokens") or {}).get("new_conversation")})
    return out


def run_batch(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    kwargs = dict(n_images=p.batch_images, parallel=p.parallel, repeats=ctx.repeat, peer=ctx.peer,
                  peer_python=ctx.peer_py, workdir=ctx.work, load_kwargs=ctx.load_kwargs,
                  peer_gpu_layers=ctx.n_gpu_layers, server=ctx.server_factory)
    r = batch_bench.measure(ctx.pair, max_tokens=p.batch_tokens, **kwargs)  # type: ignore[arg-type]
    # The same with long answers, where generation (batched by us and llama-server, one token at a time
    # by llama-cpp-python) dominates.
    long_answers = batch_bench.measure(ctx.pair, max_tokens=4 * p.batch_tokens, **kwargs)  # type: ignore[arg-type]
    return {"batch": entry(
        unit="images/s", better="higher", repetitions=ctx.repeat, ours=r["ours_images_per_s"],
        peer=r["peer_images_per_s"], server=r["server_images_per_s"], limit=r["limit"]["images_per_s"],
        settings=r["settings"],
        limit_means="estimate: per image, encode + decode its image and prompt tokens + its answer at the "
                    f"per-sequence cost of a {p.parallel}-wide batched step (measured here, no overlap assumed)",
        reasons=ctx.peer_reasons(r),
        details={"what": f"caption {p.batch_images} distinct images, {p.batch_tokens}-token greedy answers; ours: "
                         f"llava_kv.batch.run(parallel={p.parallel}); llama-server: --parallel {p.parallel} with "
                         f"continuous batching, {p.parallel} concurrent requests; llama-cpp-python: a loop over "
                         "Llava15ChatHandler",
                 **{k: v for k, v in r.items() if k not in ("ours_images_per_s", "peer_images_per_s",
                                                            "server_images_per_s", "settings")},
                 f"answers_{4 * p.batch_tokens}_tokens": long_answers})}


def run_token_overhead(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    repeats = max(ctx.repeat, 5)
    r = token_overhead.measure(ctx.pair, n_tokens=p.overhead_tokens, repeats=repeats, peer=ctx.peer,
                               peer_python=ctx.peer_py, workdir=ctx.work, load_kwargs=ctx.load_kwargs,
                               peer_gpu_layers=ctx.n_gpu_layers, server=ctx.server_factory)
    per = r["per_token_s"]
    reasons = ctx.peer_reasons(r)
    # The limit: generation with no facade Python per token. The C++ loop of llava_kv.batch is that by
    # construction; a bare loop over the native step adds only one binding call per token (~1 us). The
    # cheaper of the two is the best measured estimate of the native cost per token. Every repetition of
    # both is in details (a median hides nothing here: all are listed).
    candidates = {k: per[k] for k in ("cpp_loop", "native_step") if per.get(k) is not None}
    source = min(candidates, key=lambda k: candidates[k]) if candidates else None
    if source is None:
        reasons["limit"] = "neither the C++ loop nor the native step generated tokens"
    ours, limit = _ms(per["stream"]), _ms(per[source]) if source else None
    return {"token_overhead": entry(
        unit="ms per token", repetitions=repeats, ours=ours, peer=_ms(r["peer_per_token_s"]),
        server=_ms(r.get("server_per_token_s")), limit=limit, settings=r["settings"],
        limit_means="no Python per token: the cheaper of the C++ generate loop of llava_kv.batch "
                    "(parallel=1) and a bare loop over the native generation step",
        reasons=reasons, digits=5,
        notes={"server": "llama-server's token loop is all C++; ours runs one Python iteration per token "
                         "(UTF-8 and stop strings): the gap is that Python"},
        extra_ratios={"python_overhead_ms_per_token":
                      None if limit is None or ours is None else round(ours - limit, 5)},
        details={"what": f"{p.overhead_tokens}-token greedy answer to one image prompt; ours: "
                         "session.generate(stream=True) consumed piece by piece; llama-cpp-python and "
                         "llama-server: streaming chat completion (time between the first and the last chunk)",
                 "limit_source": source, "ms_per_token": {k: _ms(v) for k, v in per.items()},
                 "all_ms_per_token": {k: [round(x * 1000, 4) for x in v] for k, v in r["all_per_token_s"].items()},
                 "peer_all_ms_per_token": [round(x * 1000, 4) for x in r.get("peer_all_per_token_s") or []],
                 "server_all_ms_per_token": [round(x * 1000, 4) for x in r.get("server_all_per_token_s") or []],
                 "cpp_loop_vs_native_step": r.get("cpp_loop_vs_native_step"),
                 "tokens_generated": r["tokens_generated"], "peer_tokens_generated": r.get("peer_tokens_generated"),
                 "notes": r["reasons"]})}


def run_load_close(ctx: Context) -> dict[str, dict[str, Any]]:
    cycles = ctx.args.cycles or ctx.preset.cycles
    r = load_close.measure(ctx.pair, cycles=cycles, peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                           n_gpu_layers=ctx.n_gpu_layers)
    peer = r.get("peer") or {}
    reasons = ctx.peer_reasons(r)
    reasons["server"] = reasons.get("server") or ("not applicable: llama-server is a process, its memory goes "
                                                  "back when it exits")
    e = entry(
        unit=f"MiB RSS drift (cycle {load_close.SETTLE} to {cycles})", repetitions=1,
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
                                f"{load_close.SETTLE}: a drift inside it is not a leak",
                 "gpu_drift_mib": {"ours": r["ours"]["gpu_drift_mib"], "peer": peer.get("gpu_drift_mib")},
                 "ours": r["ours"], "peer": peer or None})
    e["ratios"]["peer_vs_ours"] = None
    e["ratios"]["no_peer_ratio"] = "two drifts at allocator noise have no meaningful ratio: compare the absolute MiB"
    return {"load_close": e}


def run_build_time(ctx: Context) -> dict[str, dict[str, Any]]:
    enabled = ctx.args.build_time if ctx.args.build_time is not None else ctx.preset.build_time
    limit_means = "building only the llama.cpp libraries we link (llama, ggml, mtmd), which every binding builds"
    server_build = (ctx.server_info or {}).get("build_seconds")
    server_details = {"llama_server_build_s": server_build,
                      "llama_server_build": "only the llama-server target, CPU, GGML_NATIVE=OFF, ccache off, "
                                            f"{(ctx.server_info or {}).get('jobs')} jobs (benchmarks/server_peer.py)"}
    if not enabled:
        return {"build_time": skipped(unit="s", limit_means=limit_means, details=server_details,
                                      reason="skipped in this run (three native builds; use --build-time)")}
    r = build_time.measure(gpu=ctx.gpu, peer=ctx.peer)
    sec = r["seconds"]
    reasons = ctx.peer_reasons(r)
    if server_build is None:
        reasons.setdefault("server", "llama-server was not built in this run's cache")
    return {"build_time": entry(
        unit="s", repetitions=1, ours=sec["ours"], peer=sec.get("peer"), server=server_build, limit=sec["limit"],
        limit_means=limit_means, reasons=reasons, digits=1,
        details={"what": "wheel from a clean build folder, ccache off, pip wheel --no-build-isolation; llama-server: "
                         "its one target from a clean build folder", **r, **server_details})}


def run_serve(ctx: Context) -> dict[str, dict[str, Any]]:
    """The chat workloads over HTTP: ``llava-kv serve`` vs llama-cpp-python's server (the peer) and
    llama-server (serve_bench.py)."""
    p = ctx.preset
    (ctx.work / "serve").mkdir(parents=True, exist_ok=True)
    pngs = edit_bench.never_seen_pngs(ctx.pair, ctx.work / "serve")
    spec = edit_bench.write_peer_spec(ctx.pair, filler=0, repeats=ctx.repeat, folder=ctx.work / "serve-edit",
                                      n_ctx=4096)
    workloads: dict[str, Callable[[Any], Any]] = {
        "multi_turn": lambda srv: server_bench.multi_turn(srv, pngs(), system=SYSTEM_MESSAGE, turns=p.turns,
                                                          max_tokens=p.answer_tokens, repeats=ctx.repeat),
        "edits": lambda srv: server_bench.edits(srv, spec, pngs, critic_system=edit_bench.critic_system,
                                                critic_text=edit_bench.CRITIC_TEXT, repeats=ctx.repeat),
    }
    wanted = [k for k in SERVE_SCENARIOS if k in p.scenarios]
    concurrent_pngs = [pngs() for _ in range(serve_bench.CONCURRENT_CONVERSATIONS)]
    sides: dict[str, dict[str, Any]] = {"ours": {}, "peer": {}, "server": {}}
    peer_reason = ctx.peer_reason
    if ctx.peer_py is not None:
        try:
            server_extra(ctx.peer_py, build=not ctx.args.no_peer_build)
        except PeerError as e:
            peer_reason = f"llama-cpp-python's server unavailable: {e}"
    for side in ("ours", "peer", "server"):
        if (side == "server" and ctx.server_bin is None) or (side == "peer" and peer_reason):
            continue
        for name, n_slots in (("single", 1), ("pool", serve_bench.SLOTS)):
            needs = (("serve_multi_turn", "serve_replace_first_image", "serve_new_conversation", "serve_restore")
                     if name == "single" else
                     ("serve_concurrency", "serve_http_overhead") if side == "ours" else ("serve_concurrency",))
            if not any(k in wanted for k in needs):
                continue
            try:
                if side == "ours":
                    srv = serve_bench.OursServer(ctx.pair.model_path, ctx.pair.mmproj_path, threads=threads(),
                                                 parallel=n_slots, n_ctx=4096)
                elif side == "peer":  # one Llama, one request at a time: the same server for both
                    assert ctx.peer_py is not None
                    srv = PeerServer(ctx.peer_py, ctx.pair.model_path, ctx.pair.mmproj_path, threads=threads(),
                                     n_ctx=4096, n_gpu_layers=ctx.n_gpu_layers)
                else:
                    srv = ctx.server(parallel=n_slots, n_ctx=4096, cache_ram_mib=0)
                with srv:
                    out = sides[side]
                    out.setdefault("settings", srv.settings_used())
                    if name == "single":
                        if "serve_multi_turn" in wanted:
                            out["multi_turn"] = workloads["multi_turn"](srv)
                        if any(k in wanted for k in ("serve_replace_first_image", "serve_new_conversation")):
                            out["edits"] = workloads["edits"](srv)
                        if side == "ours" and "serve_restore" in wanted:
                            out["restore"] = serve_bench.restore_vs_prefill(
                                srv, [pngs(), pngs()], system=SYSTEM_MESSAGE, turns=p.turns,
                                max_tokens=p.answer_tokens, repeats=ctx.repeat)
                    elif "serve_concurrency" in wanted:
                        out["concurrency"] = serve_bench.concurrency(srv, concurrent_pngs, system=SYSTEM_MESSAGE,
                                                                     max_tokens=p.answer_tokens)
                    if name == "pool" and side == "ours" and "serve_http_overhead" in wanted:
                        with lk.Model.load(ctx.pair.model_path, ctx.pair.mmproj_path, **ctx.load_kwargs) as m:
                            out["http_overhead"] = serve_bench.http_overhead(srv, m, pngs(), system=SYSTEM_MESSAGE,
                                                                             repeats=ctx.repeat)
            except Exception as e:  # one side failing must not lose the others; the reason goes in the JSON
                sides[side][f"{name}_error"] = f"{type(e).__name__}: {e}"
                if side == "ours":
                    raise
    ours = sides["ours"]

    def each(value: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """``value`` of every side's results, by side."""
        return {name: value(side) for name, side in sides.items()}

    reasons = {}
    for name, unavailable, who in (("peer", peer_reason, "llama-cpp-python server"),
                                   ("server", ctx.server_reason, "llama-server")):
        errors = "; ".join(v for k, v in sides[name].items() if k.endswith("_error"))
        if unavailable or errors:
            reasons[name] = unavailable or f"{who} run failed: " + errors[:300]
    used = each(lambda side: side.get("settings"))

    def med(side: dict[str, Any], *path: str) -> float | None:
        x: Any = side
        for key in path:
            x = (x or {}).get(key)
        return statistics.median(x) if x else None

    def later_turns(side: dict[str, Any]) -> float | None:
        runs = (side.get("multi_turn") or {}).get("runs")
        return statistics.median(statistics.median(r[1:]) for r in runs) if runs else None

    out: dict[str, dict[str, Any]] = {}
    out["serve_multi_turn"] = entry(
        unit="s per turn", repetitions=ctx.repeat, **each(later_turns),
        limit=None, settings=used, reasons={**reasons, "limit": "no in-process floor here: see multi_turn"}, digits=4,
        limit_means="none over HTTP (multi_turn has the in-process floor)",
        details={"what": f"one-image chat over HTTP, turns 2..{p.turns}, {p.answer_tokens}-token greedy answers",
                 **each(lambda side: side.get("multi_turn"))})
    edits = each(lambda side: side.get("edits") or {})
    out["serve_replace_first_image"] = entry(
        unit="ms", repetitions=ctx.repeat, **{name: _ms(med(e, "replace_first_image")) for name, e in edits.items()},
        limit=None, settings=used,
        reasons={**reasons, "limit": "see replace_first_image for the in-process floor"}, digits=3,
        limit_means="none over HTTP (replace_first_image has the in-process floor)",
        details={"what": "the 3-image conversation with its first image replaced by a never-seen one, over HTTP "
                         "(max_tokens=1)",
                 "encodes": {name: (e.get("encodes") or {}).get("replace_first_image") for name, e in edits.items()},
                 **{f"{name}_calls": e.get("calls") for name, e in edits.items()}})
    out["serve_new_conversation"] = entry(
        unit="image encodes", repetitions=ctx.repeat,
        **{name: _fewest(e, "new_conversation") for name, e in edits.items()}, limit=0, settings=used, reasons=reasons, digits=0,
        limit_means="0: the image's embedding was computed before",
        details={"what": "an image seen before in a brand-new conversation (other system message), over HTTP",
                 "ms": {name: _ms(med(e, "new_conversation")) for name, e in edits.items()}})
    conc = each(lambda side: side.get("concurrency") or {})
    out["serve_concurrency"] = entry(
        unit="requests/s", better="higher", repetitions=1,
        **{name: c.get("requests_per_s") for name, c in conc.items()}, limit=None, settings=used,
        reasons={**reasons, "limit": "none: a throughput figure"}, digits=4,
        limit_means="none: a throughput figure",
        details={"what": f"{serve_bench.CONCURRENT_CONVERSATIONS} one-image conversations x "
                         f"{serve_bench.CONCURRENT_TURNS} turns from as many client threads into "
                         f"{serve_bench.SLOTS} slots, {p.answer_tokens}-token answers",
                 "p50_s": {name: c.get("p50_s") for name, c in conc.items()},
                 "p95_s": {name: c.get("p95_s") for name, c in conc.items()}, **conc})
    ho = ours.get("http_overhead") or {}
    out["serve_http_overhead"] = entry(
        unit="ms per request", repetitions=ctx.repeat * 20, ours=ho.get("overhead_ms"), peer=None, server=None,
        limit=5.0, settings=used, limit_means="the issue's target: under 5 ms over the in-process call",
        reasons={**reasons, "peer": "not applicable: measures our HTTP layer against our in-process call",
                 "server": "not applicable: llama-server has no in-process call to compare with"},
        digits=3, details={"what": "a request with max_tokens 0 on a conversation already in its slot (nothing "
                                   "decoded on either side): an HTTP POST on a kept-alive connection (the JSON body "
                                   "prepared) minus Session.chat in-process (same messages, image as a data: URI on "
                                   "both); on a new connection per request in overhead_new_connection_ms, with the "
                                   "openai client (its request building and response models) in "
                                   "overhead_with_openai_client_ms; the same for a one-token request in "
                                   "one_token_overhead_ms (its decode's spread, one_token_in_process_iqr_ms, is "
                                   "larger than the HTTP layer's cost)", **ho})
    rs = ours.get("restore") or {}
    out["serve_restore"] = entry(
        unit="ms", repetitions=ctx.repeat, ours=_ms(rs.get("restore_s")), peer=None, server=None,
        limit=_ms(rs.get("prefill_s")), settings=used,
        limit_means="the same request prefilled from nothing (every token decoded, images from the embedding "
                    "cache): a restore must beat it",
        reasons={**reasons, "peer": "not applicable: llama-cpp-python's server saves no conversation out of its "
                                    "context (every request evaluates the whole prompt)",
                 "server": "not measured: llama-server runs these scenarios with --cache-ram 0 (its "
                           "host-memory prompt cache off)"},
        digits=3, details={"what": f"one slot; a {p.turns}-turn conversation moved out by another, then its next "
                                   "turn (restored from host memory) vs the same turn under another system message",
                           **rs})
    return {k: v for k, v in out.items() if k in wanted} | {
        k: skipped(unit="", reason="skipped: not in this preset's scenarios", limit_means="")
        for k in SERVE_SCENARIOS if k not in wanted}


def run_blend(ctx: Context) -> dict[str, dict[str, Any]]:
    """Replace the first of three images: mode="blend" (per k) against the exact edit and llama-server,
    with each blend's drift from the exact edit; on the realistic preset also on real Gemma 3 weights."""
    # The conversation: three images with a sentence of text after each (~900 tokens on the
    # realistic preset, ~880 of them decoded again by the exact edit); beside it edit_bench's ~2k-token
    # one, where text is most of what follows the first image.
    r = blend_bench.measure_pair(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs, target_tokens=0)
    long_text = blend_bench.measure_pair(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs,
                                         target_tokens=ctx.preset.edit_tokens)
    server: dict[str, Any] = {}
    server_long: dict[str, Any] = {}
    if ctx.server_bin is not None:
        try:
            with ctx.server(parallel=1, n_ctx=4096) as srv:
                runs = ((server, r["filler"], 80_000), (server_long, long_text["filler"], 90_000))
                for result, filler, seed in runs:
                    spec = edit_bench.write_peer_spec(ctx.pair, filler=filler, repeats=ctx.repeat, folder=ctx.work)
                    result.update(server_bench.edits(srv, spec, edit_bench.never_seen_pngs(ctx.pair, ctx.work, seed),
                                                     critic_system=edit_bench.critic_system,
                                                     critic_text=edit_bench.CRITIC_TEXT, repeats=ctx.repeat))
                server["settings"] = srv.settings_used()
        except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
            server = {"server_error": f"{type(e).__name__}: {e}"}
    reasons = ctx.peer_reasons(server)
    reasons["peer"] = "not run: llama-cpp-python has no edit that keeps later KV (it re-prefills the chat)"
    real: dict[str, Any]
    if ctx.args.preset == "realistic" and not ctx.gpu:
        try:
            real = blend_bench.measure_real_gemma(repeats=ctx.repeat, load_kwargs=ctx.load_kwargs,
                                                  target_tokens=ctx.preset.edit_tokens)
        except ImportError as e:
            real = {"reason": f"not run: {e}"}
    else:
        real = {"reason": "not run: the realistic CPU preset runs it"}
    default = str(lk.session.DEFAULT_BLEND_K)
    server_ms = _median_ms(server.get("replace_first_image"))
    blend_ms = r["blend"][default]["ms"]
    return {"blend": entry(
        unit="ms", repetitions=ctx.repeat, ours=blend_ms, peer=None, server=server_ms, limit=r["exact_ms"],
        settings={"ours": {"mode": "blend", "k": int(default), **ctx.load_kwargs}, "server": server.get("settings")},
        limit_means="the exact edit of the same image (replace_image's default): decodes the whole suffix",
        reasons=reasons, digits=3,
        extra_ratios={f"exact_vs_blend_k{k}": round(r["exact_ms"] / v["ms"], 3) for k, v in r["blend"].items()},
        details={"what": f"replace the first of 3 images in a {r['conversation_tokens']}-token conversation with a "
                         f"never-seen image (its encode included on every side); ours with mode='blend' and "
                         f"k={default} (the headline), other k beside it, and the exact edit as the limit; drift "
                         f"of each blend against the exact edit of the same image",
                 "server_does": "a new chat call (max_tokens=1) with the edited conversation: reuses its cached "
                                "prefix before the image, encodes all three images and prefills the rest",
                 "server_all_ms": [x * 1000 for x in server.get("replace_first_image", [])],
                 **r, "long_text": {**long_text, "server_ms": _median_ms(server_long.get("replace_first_image")),
                                    "server_all_ms": [x * 1000 for x in server_long.get("replace_first_image", [])]},
                 "real_gemma": real})}


def _median_ms(seconds: list[float] | None) -> float | None:
    return statistics.median(seconds) * 1000 if seconds else None


RUNNERS: list[tuple[tuple[str, ...], Callable[[Context], dict[str, dict[str, Any]]]]] = [
    (("control", "multi_turn"), run_multi_turn),
    (("replace_first_image", "replace_middle_image", "replace_last_image", "readd_image", "new_conversation"),
     run_edits),
    (("batch",), run_batch),
    (("token_overhead",), run_token_overhead),
    (("load_close",), run_load_close),
    (("build_time",), run_build_time),
    (SERVE_SCENARIOS, run_serve),
    (("blend",), run_blend),
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
    parser.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "unset"],
                        help="OMP_WAIT_POLICY of every side (read by benchmarks/__main__.py before llama.cpp loads; "
                             "default passive: on a shared machine a spinning OpenMP barrier loses its core to "
                             "other processes and stalls; 'unset' leaves libgomp's default)")
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
        "server_version": server_peer.SERVER if ctx.server_bin else None,
        "server": ctx.server_info if ctx.server_bin else {"reason": ctx.server_reason},
        "settings": {"flash_attn": "on", "threads": threads(), "n_batch": 512, "n_ubatch": 512,
                     "kv_type": settings.KV_TYPE, "omp_wait_policy": settings.omp_wait_policy(),
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
