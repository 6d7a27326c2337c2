"""Batch captioning throughput: images/s of ``llava_kv.batch.run`` (C++ batch runner, several
sequences decoded together), of a sequential loop over llama-cpp-python's ``Llava15ChatHandler`` on
the same generated model, and an estimate of the limit, in one run.

Usage: python benchmarks/scenarios/batch.py [--preset realistic] [--images 16] [--max-tokens 32]
       [--parallel 4] [--repeats 3] [--no-peer] [--server] [--out result.json]

``--server`` adds llama-server (b11434, built and cached as the suite does) with ``--parallel`` slots,
in the same alternating rounds: the suite runs this scenario at its preset's parallelism only. Set
``LLAVA_KV_CPU_VARIANT=haswell`` for our side to run the server's kernels, as the suite does.

Every image is distinct and the embedding cache is cleared before each repetition, so every image is
encoded every time, as the peer does. The limit estimate adds, per image, what no runtime can
avoid, measured here with single-session calls: encoding it (append of a new image minus append of
the same image cached), decoding its image tokens and the prompt text after it, and generating its
answer at the cost per sequence of one batched step (a ``parallel``-token decode / ``parallel``),
as many steps as our answers had tokens. The shared prompt prefix is decoded once per batch and
left out. It assumes no overlap between encoding and decoding, so a runtime that overlaps them
could exceed it.

``run_batch(ctx)`` makes the suite's ``batch`` entry of it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

import llava_kv as lk
from llava_kv.testing import TestModel, make_test_model, random_image

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness.context import Context  # noqa: E402
from benchmarks.harness.llama_cpp_python import (CHAT_TEMPLATE, PEER_SCRIPTS, SYSTEM_MESSAGE, PeerError,  # noqa: E402
                                                 run_peer, threads)
from benchmarks.harness.scenario import emit, entry  # noqa: E402
PROMPT = "Describe this picture in one sentence."
_never_seen = itertools.count(90_000)  # seeds of images no call has encoded yet


def write_images(pair: TestModel, folder: Path, n: int, first_seed: int = 5000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    size = (pair.preset.image_size, pair.preset.image_size)
    paths = []
    for i in range(n):
        path = folder / f"batch_{first_seed + i}.png"
        if not path.exists():
            Image.fromarray(random_image(first_seed + i, size)).save(path)
        paths.append(path)
    return paths


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def estimate_limit(model: lk.Model, pair: TestModel, images: list[Path], *, parallel: int,
                   tokens_per_image: float, repeats: int) -> dict[str, Any]:
    """Seconds per image that no runtime avoids (see the module doc), from single-session calls."""
    size = (pair.preset.image_size, pair.preset.image_size)
    encode, image_decode, text_decode, step = [], [], [], []
    with model.chat_session(n_ctx=4096) as s:
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_MESSAGE},
                    {"role": "user", "content": [{"type": "image", "image": str(images[0])},
                                                 {"type": "text", "text": PROMPT}]}]
        items = lk.chat.render_messages(model, messages, chat_template=CHAT_TEMPLATE)
        k = next(i for i, x in enumerate(items) if not isinstance(x, str))
        prefix, after = items[:k], items[k + 1:]
        suffix = "".join(x for x in after if isinstance(x, str))
        for x in prefix:
            assert isinstance(x, str)
            s.append_text(x)
        base = len(s.timeline)
        for _ in range(repeats):
            img = random_image(next(_never_seen), size)
            with_encode = _timed(lambda: s.append_image(img))
            s.truncate(base)
            cached = _timed(lambda: s.append_image(img))
            text = _timed(lambda: s.append_text(suffix))
            # one batched generation step of `parallel` sequences ~ one `parallel`-token decode
            step.append(_timed(lambda: s.append_text(" the" * parallel)))
            s.truncate(base)
            encode.append(max(0.0, with_encode - cached))
            image_decode.append(cached)
            text_decode.append(text)
    parts = {"encode_s": statistics.median(encode), "image_decode_s": statistics.median(image_decode),
             "prompt_text_decode_s": statistics.median(text_decode),
             "batched_step_s": statistics.median(step), "parallel": parallel,
             "tokens_per_image": tokens_per_image}
    per_image = (parts["encode_s"] + parts["image_decode_s"] + parts["prompt_text_decode_s"]
                 + tokens_per_image * parts["batched_step_s"] / parallel)
    parts["seconds_per_image"] = per_image
    parts["images_per_s"] = 1.0 / per_image
    return parts


def measure(pair: TestModel, *, n_images: int = 16, max_tokens: int = 32, parallel: int = 4, repeats: int = 3,
            peer: bool = True, peer_python: Path | None = None, workdir: Path | None = None,
            load_kwargs: dict[str, Any] | None = None, peer_gpu_layers: int = 0, server: Any = None,
            n_ctx: int = 1024) -> dict[str, Any]:
    """``server``: a ``llama_server.LlamaServer`` factory (taking ``parallel`` and ``n_ctx``) to caption
    the same number of images with llama-server's ``--parallel`` slots too. ``n_ctx`` is the context
    of one image's sequence on both sides (prompt, image, answer).

    Ours (in this process) and llama-server run in alternating rounds, both warm (one warm-up batch
    each first, the model loaded and the server started once), each round on images neither side has
    seen, so both encode every image. Ours is one ``batch.Runner`` kept across rounds (its context and
    the shared prompt made once, as a running server's slots are); a fresh ``batch.run`` per round
    (which makes both each call) takes its turn in the same rounds as a second figure.
    llama-cpp-python's loop runs after, in its own venv."""
    from llava_kv import batch

    from benchmarks.harness import settings
    from benchmarks.peers import openai_chat

    folder = workdir or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    images = write_images(pair, folder, n_images)
    warm = write_images(pair, folder, 2, first_seed=4000)

    def round_images(side: int, r: int) -> list[Path]:
        return write_images(pair, folder, n_images, first_seed=20_000 + 10_000 * side + 1000 * r + max_tokens)

    result: dict[str, Any] = {"images": n_images, "max_tokens": max_tokens, "parallel": parallel, "repeats": repeats,
                              "peer_images_per_s": None, "server_images_per_s": None, "settings": {}}
    walls, server_walls, fresh_walls, records = [], [], [], []
    same_prompt = {"chat_template": CHAT_TEMPLATE, "system": SYSTEM_MESSAGE, "n_ctx": n_ctx, "n_batch": 512}
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(lk.Model.load(pair.model_path, pair.mmproj_path, **(load_kwargs or {})))
        srv = None
        if server is not None:
            try:
                srv = stack.enter_context(server(parallel=parallel, n_ctx=n_ctx))
                openai_chat.batch(srv, [warm], [], system=SYSTEM_MESSAGE, prompt=PROMPT, max_tokens=4,
                                  parallel=parallel)
            except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
                result["server_error"] = f"{type(e).__name__}: {e}"
                srv = None
        runner = stack.enter_context(batch.Runner(model, PROMPT, max_tokens=max_tokens, parallel=parallel,
                                                  **same_prompt))
        runner.run([str(p) for p in warm], progress=False)
        batch.run(model, [str(p) for p in warm], PROMPT, max_tokens=4, parallel=parallel, progress=False,
                  **same_prompt)
        server_tokens: float = 0.0
        for r in range(repeats):
            model._core.clear_cache()  # every image encoded every time, as the server does
            ours_images = round_images(0, r)
            t0 = time.perf_counter()
            records = runner.run([str(p) for p in ours_images], progress=False)
            walls.append(time.perf_counter() - t0)
            model._core.clear_cache()
            t0 = time.perf_counter()
            fresh = batch.run(model, [str(p) for p in round_images(2, r)], PROMPT, max_tokens=max_tokens,
                              parallel=parallel, progress=False, **same_prompt)
            fresh_walls.append(time.perf_counter() - t0)
            records += fresh
            if srv is not None:
                try:
                    out = openai_chat.batch(srv, [round_images(1, r)], [], system=SYSTEM_MESSAGE, prompt=PROMPT,
                                            max_tokens=max_tokens, parallel=parallel)
                except Exception as e:  # noqa: BLE001 - as above
                    result["server_error"] = f"{type(e).__name__}: {e}"
                    srv = None
                else:
                    server_walls += out["wall_s"]
                    server_tokens = out["tokens_per_image"]
                    result["server_metrics"] = out["metrics"]
        failed = [r.error for r in records if not r.ok]
        if failed:
            raise RuntimeError(f"batch.run failed on {len(failed)} images: {failed[0]}")
        tokens = statistics.mean(r.tokens for r in records)
        result["settings"]["ours"] = settings.ours(model, None, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                                   parallel=parallel)
        if srv is not None:
            result["settings"]["server"] = srv.settings_used()
        limit = estimate_limit(model, pair, images, parallel=parallel, tokens_per_image=tokens, repeats=repeats)
    result.update({
        "ours_wall_s": walls, "ours_images_per_s": n_images / statistics.median(walls), "ours_tokens_per_image": tokens,
        "ours_stage_ms": {k: statistics.median(r.timings[k] for r in records) for k in records[0].timings},
        "ours_process": "this process, warm, in rounds alternating with llama-server's: one batch.Runner "
                        "kept across rounds",
        "ours_fresh_call_wall_s": fresh_walls,
        "ours_fresh_call_images_per_s": n_images / statistics.median(fresh_walls),
        "limit": limit})
    if server_walls:
        result.update(server_wall_s=server_walls, server_images_per_s=n_images / statistics.median(server_walls),
                      server_tokens_per_image=server_tokens)
    if peer:
        try:
            out = run_peer(str(PEER_SCRIPTS / "peer_batch.py"),
                           [str(pair.model_path), str(pair.mmproj_path), PROMPT, str(max_tokens), str(repeats),
                            str(peer_gpu_layers), *map(str, images)], python=peer_python)
            result.update(peer_wall_s=out["wall_s"], peer_images_per_s=n_images / statistics.median(out["wall_s"]),
                          peer_tokens_per_image=out["tokens_per_image"])
            result["settings"]["peer"] = out["settings"]
        except PeerError as e:
            result["peer_error"] = str(e)
    return result


def run_batch(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    kwargs = dict(n_images=p.batch_images, parallel=p.parallel, repeats=ctx.repeat, peer=ctx.peer,
                  peer_python=ctx.peer_py, workdir=ctx.work, load_kwargs=ctx.load_kwargs,
                  peer_gpu_layers=ctx.n_gpu_layers, server=ctx.server_factory)
    r = measure(ctx.pair, max_tokens=p.batch_tokens, **kwargs)  # type: ignore[arg-type]
    # The same with long answers, where generation (batched by us and llama-server, one token at a time
    # by llama-cpp-python) dominates.
    long_answers = measure(ctx.pair, max_tokens=4 * p.batch_tokens, **kwargs)  # type: ignore[arg-type]
    return {"batch": entry(
        unit="images/s", better="higher", repetitions=ctx.repeat, ours=r["ours_images_per_s"],
        peer=r["peer_images_per_s"], server=r["server_images_per_s"], limit=r["limit"]["images_per_s"],
        settings=r["settings"],
        limit_means="estimate: per image, encode + decode its image and prompt tokens + its answer at the "
                    f"per-sequence cost of a {p.parallel}-wide batched step (measured here, no overlap assumed)",
        reasons=ctx.peer_reasons(r),
        details={"what": f"caption {p.batch_images} distinct images, {p.batch_tokens}-token greedy answers; ours: "
                         f"one llava_kv.batch.Runner(parallel={p.parallel}) kept across rounds (a fresh "
                         "batch.run per round: ours_fresh_call_images_per_s); llama-server: "
                         f"--parallel {p.parallel} with "
                         f"continuous batching, {p.parallel} concurrent requests; llama-cpp-python: a loop over "
                         "Llava15ChatHandler",
                 **{k: v for k, v in r.items() if k not in ("ours_images_per_s", "peer_images_per_s",
                                                            "server_images_per_s", "settings")},
                 f"answers_{4 * p.batch_tokens}_tokens": long_answers})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--server", action="store_true", help="llama-server as a side (--parallel slots)")
    parser.add_argument("--out")
    args = parser.parse_args()
    pair = make_test_model(preset=args.preset)
    server = None
    if args.server:
        from benchmarks.harness.llama_server import LlamaServer, server_binary

        server = functools.partial(LlamaServer, server_binary(), pair.model_path, pair.mmproj_path, threads=threads(),
                                   log=Path(tempfile.mkdtemp()) / "llama-server.log")
    # the suite's settings for our side: one thread per core, flash attention stated as the servers get it
    load_kwargs = {"n_threads": threads(), "flash_attn": "on"}
    return emit(measure(pair, n_images=args.images, max_tokens=args.max_tokens, parallel=args.parallel,
                        repeats=args.repeats, peer=not args.no_peer, server=server, load_kwargs=load_kwargs), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
