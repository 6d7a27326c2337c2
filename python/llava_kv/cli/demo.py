"""``llava-kv demo``: a prompt with an image, an image edit and what it cost, memory; no model needed."""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from .options import add_command, positive_int


def add_parser(sub: Any) -> None:
    from llava_kv.testing import PRESETS

    p = add_command(
        sub, "demo", help="evaluate a prompt with an image, edit the image, report memory",
        description="Evaluate a prompt with an image, replace the image (showing how few tokens are "
        "re-decoded and that the embedding cache is used), clear the images and report memory. Runs end "
        "to end on a generated random-weight pair when no --model is given.",
        examples=[
            "llava-kv demo",
            "llava-kv demo --model m.gguf --mmproj p.gguf --image a.jpg --image b.jpg",
        ])
    p.add_argument("--model", metavar="GGUF", help="text model GGUF (default: a generated test pair)")
    p.add_argument("--mmproj", metavar="GGUF", help="projector GGUF for --model")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file (repeatable; the first two are used; default: generated images)")
    p.add_argument("--preset", default="tiny-llava", choices=list(PRESETS),
                   help="test pair to generate without --model (default: %(default)s)")
    p.add_argument("--n-ctx", type=positive_int, default=2048, metavar="N",
                   help="context size in tokens (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    import llava_kv as lk
    from llava_kv.testing import make_test_model, random_image

    if args.model:
        model_path, mmproj_path = args.model, args.mmproj
        images: list[Any] = list(args.image) or [random_image(1), random_image(2)]
    else:
        pair = make_test_model(preset=args.preset)
        model_path, mmproj_path = str(pair.model_path), str(pair.mmproj_path)
        images = [random_image(1), random_image(2), random_image(3)]
        print(f"No --model given: using the generated test pair '{pair.preset.name}' ({model_path}).")
        print("Its weights are RANDOM: the numbers below are real, any text it would write is gibberish.\n")
    if len(images) < 2:
        images.append(images[0])

    with lk.Model.load(model_path, mmproj_path, verbose=args.verbose) as model:
        print(repr(model))
        with model.session(n_ctx=args.n_ctx) as s:
            t0 = time.perf_counter()
            s.append_text("USER: ")
            ref = s.append_image(images[0])
            s.append_text(" What is in this picture?\nASSISTANT:")
            t1 = time.perf_counter()
            top = np.argsort(s.logits())[::-1][:5]
            print(f"prompt: {len(s.timeline)} chunks, n_past={s.n_past}, {1000 * (t1 - t0):.1f} ms; "
                  f"top next tokens: {top.tolist()}")
            print(f"  image: {ref.source} -> {ref.n_tokens} tokens at positions [{ref.pos0}, {ref.pos1})")
            before = s.stats
            t0 = time.perf_counter()
            s.replace_image(ref, images[1])
            t1 = time.perf_counter()
            after = s.stats
            print(f"replace_image: {1000 * (t1 - t0):.1f} ms, re-decoded "
                  f"{after['tokens_decoded'] - before['tokens_decoded']} of {s.n_past} tokens, "
                  f"encoded {after['images_encoded'] - before['images_encoded']} image(s)")
            s.replace_image(s.images[0], images[0])
            print(f"replace back: embed cache hits {s.stats['embed_cache_hits']} "
                  f"(the first image's embedding was reused, not re-encoded)")
            s.images.clear()
            print(f"images.clear(): {len(s.images)} images, n_past={s.n_past}")
            mem = model.memory()
            print("memory (bytes): " + json.dumps({k: mem[k] for k in ("weights", "projector", "total")}))
    print(f"closed: model.closed={model.closed}")
    return 0
