"""The ``llava-kv`` command line: demo, make-test-model, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import llava_kv as lk
    from llava_kv.testing import make_test_model, random_image

    if args.model:
        model_path, mmproj_path = args.model, args.mmproj
        images: list = list(args.image) or [random_image(1), random_image(2)]
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
            print(f"  image: {ref.path} -> {ref.n_tokens} tokens at positions [{ref.pos0}, {ref.pos1})")
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


def _info(args: argparse.Namespace) -> int:
    import llava_kv as lk

    out: dict = {"build": lk.build_info()}
    if args.model:
        with lk.Model.load(args.model, args.mmproj) as model:
            out["model"] = {"path": model.path, "mmproj": model.mmproj_path, "n_embd": model.n_embd,
                            "n_vocab": model.n_vocab, "n_ctx_train": model.n_ctx_train,
                            "has_vision": model.has_vision, "memory": model.memory()}
    print(json.dumps(out, indent=1, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-kv", description="Vision-language models on llama.cpp with "
                                     "one state for images, embeddings and KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="evaluate a prompt with an image, edit the image, report memory",
                          description="Runs end to end on a generated random-weight pair when no --model is "
                          "given.")
    demo.add_argument("--model", help="text model GGUF (default: a generated test pair)")
    demo.add_argument("--mmproj", help="projector GGUF")
    demo.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    demo.add_argument("--preset", default="tiny-llava", help="test pair to generate without --model")
    demo.add_argument("--n-ctx", type=int, default=2048)
    demo.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="build information (llama.cpp commit, backends, devices), model metadata")
    info.add_argument("--model")
    info.add_argument("--mmproj")
    info.set_defaults(func=_info)

    sub.add_parser("make-test-model", help="write a random-weight GGUF pair (see --help)", add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-test-model":
        from llava_kv.testing import main as make_main

        return make_main(argv[1:])
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
