"""The ``llava-kv make-test-model`` command (also ``python -m llava_kv.testing``): make or reuse a
preset's pair and print its paths and token counts as JSON.
"""
from __future__ import annotations

import argparse
import json

from .models import default_cache_dir, make_test_model
from .presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-kv make-test-model",
                                     description="Write a random-weight GGUF pair (text model + mmproj).")
    parser.add_argument("--preset", default="tiny-llava", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"output folder (default: {default_cache_dir()})")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    tm = make_test_model(args.out, args.preset, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({"model": str(tm.model_path), "mmproj": str(tm.mmproj_path), "preset": tm.preset.name,
                      "seed": tm.seed, "image_tokens": tm.preset.image_tokens,
                      **({"audio_tokens": tm.preset.audio_tokens} if tm.preset.audio_tokens else {}),
                      "note": "random weights: output text is gibberish"}, indent=1))
    return 0
