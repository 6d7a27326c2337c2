"""``llava-kv make-test-model``: write a small random-weight GGUF pair (``llava_kv.testing``)."""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_command


def add_parser(sub: Any) -> None:
    from llava_kv.testing import PRESETS, default_cache_dir

    p = add_command(
        sub, "make-test-model", help="write a small random-weight GGUF pair",
        description="Write a random-weight GGUF pair (text model + mmproj) for tests, demos and benchmarks, "
        "and print its paths as JSON. Random weights give gibberish text but real shapes, real code paths "
        "and deterministic logits. Files are reused when they already exist.\n\npresets:\n"
        + "\n".join(f"  {preset.name:<12} {preset.description}" for preset in PRESETS.values()),
        examples=[
            "llava-kv make-test-model",
            "llava-kv make-test-model --preset tiny-gemma3 --out models/",
        ])
    p.add_argument("--preset", default="tiny-llava", choices=list(PRESETS),
                   help="shape of the pair (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", default=None, help=f"output folder (default: {default_cache_dir()})")
    p.add_argument("--overwrite", action="store_true", help="write the files again even if they exist")
    p.set_defaults(func=make_test_model)


def make_test_model(args: argparse.Namespace) -> int:
    from llava_kv.testing import main as make_main

    argv = ["--preset", args.preset, "--seed", str(args.seed)]
    if args.out is not None:
        argv += ["--out", args.out]
    if args.overwrite:
        argv.append("--overwrite")
    return make_main(argv)
