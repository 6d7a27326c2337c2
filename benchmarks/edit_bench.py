"""Cost of image edits in a ~2k-token conversation, against a fresh prefill of the same timeline
and against the floor (decoding only the invalidated suffix), measured side by side in one run.

Usage: python benchmarks/edit_bench.py [--preset realistic] [--repeats 5] [--out result.json]

Scenarios (medians over --repeats):
- fresh_prefill: a new session fed the whole final timeline, embeddings already cached (decode only);
  fresh_prefill_with_encode adds encoding its images from an empty cache, as a binding without
  an embedding cache pays on every change.
- replace_last_image / replace_middle_image: replace_image() on an open conversation with an image
  whose embedding is cached; *_new_image: the same with a never-seen image (includes its encode).
- suffix_floor_*: decoding only the chunks from the edited image on, onto an already-decoded prefix.
- readd_image: remove the last image, then append the same pixels again: counts encodes (must be 0).
"""
from __future__ import annotations

import argparse
import json
import sys
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

import llava_kv as lk
from llava_kv.testing import TestModel, make_test_model, random_image

FILLER = ("The picture shows a small red house near a big green tree under a blue sky, and a man with "
          "a white dog walks along the road while the light changes over the land. ")


def _timeline(images: list[np.ndarray], filler_repeats: int) -> list[Any]:
    text = FILLER * filler_repeats
    return ["USER: Look at these pictures.\n", images[0], "\n" + text, images[1], "\n" + text, images[2],
            "\nWhich one has a dog? Describe it.\nASSISTANT:"]


def _feed(s: lk.Session, items: list[Any]) -> None:
    for x in items:
        s.append_text(x) if isinstance(x, str) else s.append_image(x)


def _median_time(fn: Callable[..., Any], setup: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        state = setup()
        t0 = time.perf_counter()
        fn(state) if state is not None else fn()  # type: ignore[call-arg]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def conversation_images(pair: TestModel) -> list[np.ndarray]:
    """The images A, B, C of the conversation and the replacement D."""
    size = (pair.preset.image_size, pair.preset.image_size)
    return [random_image(100 + i, size) for i in range(4)]


def measure(pair: TestModel, *, repeats: int = 5, filler: int = 0, n_batch: int = 512, n_ctx: int = 4096,
            target_tokens: int = 2048, load_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every edit scenario on ``pair``; returns the JSON-ready result (see the module doc).

    ``filler`` is the number of filler sentences per text block; 0 sizes the conversation to about
    ``target_tokens`` tokens.
    """
    imgs = conversation_images(pair)
    size = (pair.preset.image_size, pair.preset.image_size)
    fresh_imgs = iter(random_image(1000 + i, size) for i in range(10_000))
    with lk.Model.load(pair.model_path, pair.mmproj_path, **(load_kwargs or {})) as model:
        def new_session() -> lk.Session:
            return model.session(n_ctx=n_ctx, n_batch=n_batch)

        with new_session() as probe:
            if not filler:
                per = len(probe.tokenize(FILLER))
                img_tokens = pair.preset.image_tokens
                filler = max(1, int((target_tokens - 3 * img_tokens - 40) / (2 * per)))
            _feed(probe, _timeline(imgs, filler))  # warms the cache with A, B, C
            probe.append_image(imgs[3])  # and D
            n_tokens = probe.n_past - probe.timeline[-1].n_tokens
        base = _timeline(imgs, filler)

        def conversation() -> lk.Session:
            s = new_session()
            _feed(s, base)
            return s

        final_last = base[:5] + [imgs[3], base[6]]
        final_middle = base[:3] + [imgs[3]] + base[4:]

        def fresh(items: list[Any]) -> Callable[[], None]:
            def run() -> None:
                with new_session() as s:
                    _feed(s, items)
            return run

        def fresh_with_encode(items: list[Any]) -> Callable[[], None]:
            def run() -> None:
                model._core.clear_cache()
                with new_session() as s:
                    _feed(s, items)
            return run

        def prefix_session(k: int) -> Callable[[], lk.Session]:
            def setup() -> lk.Session:
                s = new_session()
                _feed(s, base[:k])
                return s
            return setup

        def suffix(items: list[Any]) -> Callable[[lk.Session], None]:
            def run(s: lk.Session) -> None:
                _feed(s, items)
                s.close()
            return run

        def replace(index: int, image_fn: Callable[[], np.ndarray]) -> Callable[[lk.Session], None]:
            def run(s: lk.Session) -> None:
                s.replace_image(s.images[index], image_fn())
            return run

        measured: dict[str, tuple[float, list[float]]] = {}
        measured["fresh_prefill_last"] = _median_time(fresh(final_last), lambda: None, repeats)
        measured["fresh_prefill_middle"] = _median_time(fresh(final_middle), lambda: None, repeats)
        measured["fresh_prefill_with_encode_last"] = _median_time(fresh_with_encode(final_last), lambda: None,
                                                                  repeats)
        # warm the cache again after the clears
        with new_session() as s:
            _feed(s, final_last + [imgs[1], imgs[2]])
        measured["suffix_floor_last"] = _median_time(suffix([imgs[3], base[6]]), prefix_session(5), repeats)
        measured["suffix_floor_middle"] = _median_time(suffix([imgs[3]] + base[4:]), prefix_session(3), repeats)

        sessions: list[lk.Session] = []

        def conv() -> lk.Session:
            s = conversation()
            sessions.append(s)
            return s

        measured["replace_last_image"] = _median_time(replace(2, lambda: imgs[3]), conv, repeats)
        measured["replace_middle_image"] = _median_time(replace(1, lambda: imgs[3]), conv, repeats)
        measured["replace_last_image_new_image"] = _median_time(replace(2, lambda: next(fresh_imgs)), conv,
                                                                repeats)
        # correctness in the same run: the edited conversation equals the fresh one
        s = conversation()
        s.replace_image(s.images[2], imgs[3])
        with new_session() as f:
            _feed(f, final_last)
            max_diff = float(np.abs(s.logits() - f.logits()).max())
        s.remove_image(s.images[2])
        before = s.stats
        t0 = time.perf_counter()
        s.insert_image(5, imgs[2])
        readd_ms = (time.perf_counter() - t0) * 1000
        after = s.stats
        readd = {"images_encoded": after["images_encoded"] - before["images_encoded"],
                 "embed_cache_hits": after["embed_cache_hits"] - before["embed_cache_hits"],
                 "ms": round(readd_ms, 3)}
        s.close()
        for x in sessions:
            x.close()

        def ms(key: str) -> float:
            return round(measured[key][0] * 1000, 3)

        results = {
            "benchmark": "edit_bench",
            "preset": pair.preset.name,
            "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                        "devices": [d["description"] for d in lk.build_info()["devices"]]},
            "conversation_tokens": n_tokens,
            "image_tokens": pair.preset.image_tokens,
            "repeats": repeats,
            "filler": filler,
            "median_ms": {k: ms(k) for k in measured},
            "all_ms": {k: [round(t * 1000, 3) for t in v[1]] for k, v in measured.items()},
            "ratios": {
                "replace_last_speedup_vs_fresh_prefill": round(ms("fresh_prefill_last") / ms("replace_last_image"), 2),
                "replace_last_vs_suffix_floor": round(ms("replace_last_image") / ms("suffix_floor_last"), 3),
                "replace_middle_speedup_vs_fresh_prefill": round(ms("fresh_prefill_middle") /
                                                                 ms("replace_middle_image"), 2),
                "replace_middle_vs_suffix_floor": round(ms("replace_middle_image") / ms("suffix_floor_middle"), 3),
                "replace_last_new_image_speedup_vs_fresh_with_encode": round(
                    ms("fresh_prefill_with_encode_last") / ms("replace_last_image_new_image"), 2),
            },
            "targets": {"replace_last_speedup_vs_fresh_prefill": ">= 5", "replace_last_vs_suffix_floor": "<= 1.2",
                        "readd_images_encoded": "== 0"},
            "readd_image": readd,
            "max_abs_logit_diff_vs_fresh": max_diff,
        }
    return results


def measure_peer(pair: TestModel, *, filler: int, repeats: int, folder: Path, python: Path | None = None,
                 n_ctx: int = 4096, n_gpu_layers: int = 0) -> dict[str, Any]:
    """The same edits done with llama-cpp-python (benchmarks/peer_edit.py in the peer venv): a new
    chat call with the edited conversation, as its chat handler offers no edit."""
    from benchmarks.peer import PeerError, run_peer

    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i, img in enumerate(conversation_images(pair)):
        pngs.append(str(folder / f"edit_{'ABCD'[i]}.png"))
        Image.fromarray(img).save(pngs[-1])
    text = "\n" + FILLER * filler
    spec = {"model": str(pair.model_path), "mmproj": str(pair.mmproj_path), "n_ctx": n_ctx,
            "n_gpu_layers": n_gpu_layers, "repeats": repeats, "system": "Look at these pictures.",
            "blocks": [[pngs[0], text], [pngs[1], text], [pngs[2], "\nWhich one has a dog? Describe it."]],
            "replacement": pngs[3]}
    spec_path = folder / "peer_edit.json"
    spec_path.write_text(json.dumps(spec))
    try:
        return run_peer(str(Path(__file__).resolve().parent / "peer_edit.py"), [str(spec_path)], python=python)
    except PeerError as e:
        return {"peer_error": str(e)}


def main() -> int:
    if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.scenario import emit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--filler", type=int, default=0, help="filler sentences per text block (0: aim at ~2k tokens)")
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    return emit(measure(make_test_model(preset=args.preset), repeats=args.repeats, filler=args.filler,
                      n_batch=args.n_batch), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
