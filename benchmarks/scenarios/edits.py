"""Cost of image edits in a ~2k-token conversation, against a fresh prefill of the same timeline
and against the floor (decoding only the invalidated suffix), measured side by side in one run.

Usage: python benchmarks/scenarios/edits.py [--preset realistic] [--repeats 5] [--out result.json]

Scenarios (medians over --repeats):
- fresh_prefill_last: a new session fed the whole final timeline, embeddings already cached (decode
  only); fresh_prefill_with_encode_last adds encoding its images from an empty cache, as a binding
  without an embedding cache pays on every change.
- replace_{first,middle,last}_image_new_image (the headline): replace_image() on an open conversation
  with a never-seen image (its encode included); replace_*_image: the same with an image whose
  embedding is cached (shown beside it).
- suffix_floor_*_new_image / suffix_floor_*: decoding only the chunks from the edited image on (the
  never-seen image's encode included / cached) onto an already-decoded prefix: the limit.
- readd_image: remove the last image, then append the same pixels again: counts encodes (must be 0).
- new_conversation: image A in a brand-new chat session whose text before it differs: encodes (0).
Every timed edit starts from a fork of one decoded conversation (or prefix), untimed.

``run_edits(ctx)`` makes the suite's ``replace_first_image``, ``replace_middle_image``,
``replace_last_image``, ``readd_image`` and ``new_conversation`` entries of it, beside
llama-cpp-python (peers/peer_edit.py) and llama-server (peers/openai_chat.py). llama-server's
repetitions of replacing the first and the last image alternate with ours (``measure(alternate=)``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness import settings  # noqa: E402
from benchmarks.harness.context import Context  # noqa: E402
from benchmarks.harness.llama_cpp_python import PEER_SCRIPTS, PeerError, run_peer  # noqa: E402
from benchmarks.harness.scenario import emit, entry, settle  # noqa: E402
from benchmarks.peers import openai_chat  # noqa: E402

FILLER = ("The picture shows a small red house near a big green tree under a blue sky, and a man with "
          "a white dog walks along the road while the light changes over the land. ")


def _timeline(images: list[np.ndarray], filler_repeats: int) -> list[Any]:
    text = FILLER * filler_repeats
    return ["USER: Look at these pictures.\n", images[0], "\n" + text, images[1], "\n" + text, images[2],
            "\nWhich one has a dog? Describe it.\nASSISTANT:"]


def filler_for(sentence_tokens: int, image_tokens: int, target_tokens: int) -> int:
    """Filler sentences per text block for a conversation of about ``target_tokens`` (at least one)."""
    return max(1, int((target_tokens - 3 * image_tokens - 40) / (2 * sentence_tokens)))


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


POSITIONS = {"first": (0, 1), "middle": (1, 3), "last": (2, 5)}  # image index, its index in the timeline
CRITIC_SYSTEM = "You are a careful photo critic. Answer briefly."
CRITIC_TEXT = "Rate this photo."


def critic_system(repetition: int) -> str:
    """The new conversation's system message, different in each repetition: no side's prompt cache may
    serve a repetition from the one before (the text before the image must be new every time)."""
    return f"{CRITIC_SYSTEM} Conversation {repetition + 1}."


def measure(pair: TestModel, *, repeats: int = 5, filler: int = 0, n_batch: int = 512, n_ctx: int = 4096,
            target_tokens: int = 2048, load_kwargs: dict[str, Any] | None = None,
            alternate: Callable[[int], Callable[[str], None]] | None = None) -> dict[str, Any]:
    """Run every edit scenario on ``pair``; returns the JSON-ready result (see the module doc).

    ``filler`` is the number of filler sentences per text block; 0 sizes the conversation to about
    ``target_tokens`` tokens. ``alternate``, given the filler once it is known, returns another side's
    repetition of an edit (called with "replace_first_image" or "replace_last_image"): each of our
    repetitions of those two edits with a never-seen image then follows one of the other side's, each
    side after a ``settle()``, so a change in the machine's speed hits both sides.
    """
    imgs = conversation_images(pair)
    size = (pair.preset.image_size, pair.preset.image_size)
    fresh_imgs = iter(random_image(1000 + i, size) for i in range(10_000))
    with lk.Model.load(pair.model_path, pair.mmproj_path, **(load_kwargs or {})) as model:
        def new_session() -> lk.Session:
            return model.session(n_ctx=n_ctx, n_batch=n_batch)

        with new_session() as probe:
            used = settings.ours(model, probe)
            if not filler:
                filler = filler_for(len(probe.tokenize(FILLER)), pair.preset.image_tokens, target_tokens)
            _feed(probe, _timeline(imgs, filler))  # warms the cache with A, B, C
            probe.append_image(imgs[3])  # and D
            n_tokens = probe.n_past - probe.timeline[-1].n_tokens
        base = _timeline(imgs, filler)
        other_side = alternate(filler) if alternate is not None else None

        def final(where: str, image: np.ndarray) -> list[Any]:
            k = POSITIONS[where][1]
            return base[:k] + [image] + base[k + 1:]

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

        measured: dict[str, tuple[float, list[float]]] = {}
        measured["fresh_prefill_last"] = _median_time(fresh(final("last", imgs[3])), lambda: None, repeats)
        measured["fresh_prefill_with_encode_last"] = _median_time(fresh_with_encode(final("last", imgs[3])),
                                                                  lambda: None, repeats)
        # warm the cache again after the clears
        with new_session() as s:
            _feed(s, final("last", imgs[3]) + [imgs[1], imgs[2]])

        # Every timed edit starts from a fork (a copy of the KV state) of one decoded conversation, or of
        # one decoded prefix for the floors: the same state as a conversation fed from scratch, without
        # re-prefilling it before each repetition.
        whole = new_session()
        _feed(whole, base)
        prefixes = {}
        for where, (_, k) in POSITIONS.items():
            prefixes[where] = new_session()
            _feed(prefixes[where], base[:k])

        def timed(start: lk.Session, image_fn: Callable[[], np.ndarray], run: Callable[[lk.Session, np.ndarray], None],
                  other: Callable[[], None] | None = None) -> tuple[float, list[float]]:
            times = []
            for _ in range(repeats):
                if other is not None:
                    settle()
                    other()
                    settle()
                s, image = start.fork(), image_fn()  # neither is timed
                t0 = time.perf_counter()
                run(s, image)
                times.append(time.perf_counter() - t0)
                s.close()
            return statistics.median(times), times

        for where, (index, k) in POSITIONS.items():
            def floor(s: lk.Session, image: np.ndarray, k: int = k) -> None:
                _feed(s, [image] + base[k + 1:])

            def edit(s: lk.Session, image: np.ndarray, index: int = index) -> None:
                s.replace_image(s.images[index], image)

            measured[f"suffix_floor_{where}_new_image"] = timed(prefixes[where], lambda: next(fresh_imgs), floor)
            key = f"replace_{where}_image"
            other = None if other_side is None or where == "middle" else functools.partial(other_side, key)
            measured[f"{key}_new_image"] = timed(whole, lambda: next(fresh_imgs), edit, other)
            measured[f"replace_{where}_image"] = timed(whole, lambda: imgs[3], edit)
            measured[f"suffix_floor_{where}"] = timed(prefixes[where], lambda: imgs[3], floor)
        for s in prefixes.values():
            s.close()

        # correctness in the same run: the edited conversations equal the fresh ones
        max_diff: dict[str, float] = {}
        for where in ("first", "last"):
            s = whole.fork()
            s.replace_image(s.images[POSITIONS[where][0]], imgs[3])
            with new_session() as f:
                _feed(f, final(where, imgs[3]))
                max_diff[where] = float(np.abs(s.logits() - f.logits()).max())
            if where == "first":
                s.close()
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
        whole.close()

        # the same image (A) in a brand-new conversation whose text before the image differs
        new_conv = []
        for i in range(repeats):
            with model.chat_session(n_ctx=n_ctx) as c:
                t0 = time.perf_counter()
                r = c.chat([{"role": "system", "content": critic_system(i)},
                            {"role": "user", "content": [{"type": "image", "image": imgs[0]},
                                                         {"type": "text", "text": CRITIC_TEXT}]}],
                           max_tokens=1, chat_template="vicuna")
                new_conv.append({"ms": round((time.perf_counter() - t0) * 1000, 3),
                                 "images_encoded": r["llava_kv"]["images_encoded"],
                                 "prompt_tokens": r["usage"]["prompt_tokens"]})

        def ms(key: str) -> float:
            return round(measured[key][0] * 1000, 3)

        results = {
            "benchmark": "edit_bench",
            "preset": pair.preset.name,
            "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                        "devices": [d.description for d in lk.build_info()["devices"]]},
            "settings": used,
            "conversation_tokens": n_tokens,
            "image_tokens": pair.preset.image_tokens,
            "repeats": repeats,
            "filler": filler,
            "median_ms": {k: ms(k) for k in measured},
            "all_ms": {k: [round(t * 1000, 3) for t in v[1]] for k, v in measured.items()},
            "ratios": {
                **{f"replace_{w}_new_image_vs_suffix_floor": round(ms(f"replace_{w}_image_new_image") /
                                                                   ms(f"suffix_floor_{w}_new_image"), 3)
                   for w in POSITIONS},
                "replace_last_speedup_vs_fresh_prefill": round(ms("fresh_prefill_last") / ms("replace_last_image"), 2),
                "replace_last_new_image_speedup_vs_fresh_with_encode": round(
                    ms("fresh_prefill_with_encode_last") / ms("replace_last_image_new_image"), 2),
            },
            "targets": {"replace_last_speedup_vs_fresh_prefill": ">= 5", "replace_*_vs_suffix_floor": "<= 1.2",
                        "readd_images_encoded": "== 0", "new_conversation_images_encoded": "== 0"},
            "readd_image": readd,
            "new_conversation": new_conv,
            "max_abs_logit_diff_vs_fresh": max(max_diff.values()),
            "max_abs_logit_diff_vs_fresh_by_edit": max_diff,
        }
    return results


def write_peer_spec(pair: TestModel, *, filler: int, repeats: int, folder: Path, n_ctx: int = 4096,
                    n_gpu_layers: int = 0) -> dict[str, Any]:
    """The conversation as OpenAI-style chat blocks for the peers: a system message, then three user
    messages of one image and one text block each (PNG files in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i, img in enumerate(conversation_images(pair)):
        pngs.append(str(folder / f"edit_{'ABCD'[i]}.png"))
        Image.fromarray(img).save(pngs[-1])
    text = "\n" + FILLER * filler
    return {"model": str(pair.model_path), "mmproj": str(pair.mmproj_path), "n_ctx": n_ctx,
            "n_gpu_layers": n_gpu_layers, "repeats": repeats, "system": "Look at these pictures.",
            "blocks": [[pngs[0], text], [pngs[1], text], [pngs[2], "\nWhich one has a dog? Describe it."]],
            "replacement": pngs[3], "critic_system": CRITIC_SYSTEM, "critic_text": CRITIC_TEXT}


def never_seen_pngs(pair: TestModel, folder: Path, first_seed: int = 50_000) -> Callable[[], Path]:
    """A function returning a new, never-seen PNG on each call (for the server's edits)."""
    size = (pair.preset.image_size, pair.preset.image_size)
    seeds = iter(range(first_seed, first_seed + 10_000))

    def next_png() -> Path:
        seed = next(seeds)
        path = folder / f"never_seen_{seed}.png"
        Image.fromarray(random_image(seed, size)).save(path)
        return path
    return next_png


def measure_peer(pair: TestModel, *, filler: int, repeats: int, folder: Path, python: Path | None = None,
                 n_ctx: int = 4096, n_gpu_layers: int = 0) -> dict[str, Any]:
    """The same edits done with llama-cpp-python (benchmarks/peers/peer_edit.py in the peer venv): a new
    chat call with the edited conversation, as its chat handler offers no edit."""
    spec = write_peer_spec(pair, filler=filler, repeats=repeats, folder=folder, n_ctx=n_ctx,
                           n_gpu_layers=n_gpu_layers)
    spec_path = folder / "peer_edit.json"
    spec_path.write_text(json.dumps(spec))
    try:
        return run_peer(str(PEER_SCRIPTS / "peer_edit.py"), [str(spec_path)], python=python)
    except PeerError as e:
        return {"peer_error": str(e)}


def fewest(result: dict[str, Any], key: str) -> int | None:
    """A side's image encodes in its best repetition (the one its caches helped most)."""
    per = (result.get("encodes_per_repetition") or {}).get(key)
    return min(per) if per else (result.get("encodes") or {}).get(key)


def run_edits(ctx: Context) -> dict[str, dict[str, Any]]:
    """Ours and llama-server (when there is one) alternate their repetitions of replacing the first and
    the last image with a never-seen one, the server up for the whole measure; llama-cpp-python runs
    its repetitions after, in its own venv."""
    server: dict[str, Any] = {}
    rounds: list[openai_chat.EditRounds] = []

    def server_side(srv: Any) -> Callable[[int], Callable[[str], None]]:
        def start(filler: int) -> Callable[[str], None]:
            spec = write_peer_spec(ctx.pair, filler=filler, repeats=ctx.repeat, folder=ctx.work)
            try:
                rounds.append(openai_chat.EditRounds(srv, spec, never_seen_pngs(ctx.pair, ctx.work)))
            except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
                server["server_error"] = f"{type(e).__name__}: {e}"
            return repetition

        def repetition(key: str) -> None:
            if "server_error" in server:
                return  # the server failed: our side goes on alone
            try:
                rounds[0].replace(key)
            except Exception as e:  # noqa: BLE001 - as above
                server["server_error"] = f"{type(e).__name__}: {e}"
        return start

    with contextlib.ExitStack() as stack:
        srv = None
        if ctx.server_bin is not None:
            try:
                srv = stack.enter_context(ctx.server(parallel=1, n_ctx=4096))
            except Exception as e:  # noqa: BLE001 - as above
                server["server_error"] = f"{type(e).__name__}: {e}"
        r = measure(ctx.pair, repeats=ctx.repeat, load_kwargs=ctx.load_kwargs, target_tokens=ctx.preset.edit_tokens,
                    alternate=server_side(srv) if srv is not None else None)
        if srv is not None and rounds and "server_error" not in server:
            try:
                for repetition in range(ctx.repeat):
                    rounds[0].new_conversation(critic_system(repetition), CRITIC_TEXT)
                server = {**rounds[0].result(), "settings": srv.settings_used()}
            except Exception as e:  # noqa: BLE001 - as above
                server["server_error"] = f"{type(e).__name__}: {e}"
    peer: dict[str, Any] = {}
    if ctx.peer:
        peer = measure_peer(ctx.pair, filler=r["filler"], repeats=ctx.repeat, folder=ctx.work,
                            python=ctx.peer_py, n_gpu_layers=ctx.n_gpu_layers)
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
        peer=fewest(peer, "new_conversation"), server=fewest(server, "new_conversation"), limit=0, settings=used,
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


def main() -> int:
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
