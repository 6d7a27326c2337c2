"""``llava-kv selfcheck``: the exactness checks on a user's own checkpoint, a report and an exit code."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import add_command, add_model_args, check_images, err, kv_type_of, model_paths, positive_int


def add_parser(sub: Any) -> None:
    p = add_command(
        sub, "selfcheck", help="check that edits, evaluation and device are exact on your own checkpoint",
        description="Check a model pair the way the test suite checks its random-weight models: every exact "
        "edit (append, insert at the start and in the middle, replace the first and the last, remove, clear) "
        "against a fresh session fed the same timeline (logits bitwise equal); our evaluation against mtmd's "
        "own on the joined prompt (same tokens and positions; logits bitwise equal where the batches are the "
        "same, else within twice the rounding this model shows when its own batches are cut otherwise, at "
        "least 1e-3); and, where a device holds part of the model, the device against a CPU-only copy (max "
        "|logit difference| within 0.1, or twice the CPU's re-batching noise where that is more; the same "
        "most likely token where it is clear). One line per check: PASS, FAIL or SKIP (with the reason), "
        "what was measured and its limit.\n\n"
        "Exit codes: 0 every check that ran passed, 1 a check failed or the model could not be loaded, "
        "2 a usage error (bad option, missing file).",
        examples=[
            "llava-kv selfcheck --model m.gguf --mmproj p.gguf",
            "llava-kv selfcheck --model m.gguf --mmproj p.gguf --image cat.jpg --image dog.jpg",
            "llava-kv selfcheck --model m.gguf --mmproj p.gguf --n-gpu-layers -1 --main-gpu CUDA0 --json",
        ])
    add_model_args(p, test_pair=False, required=True)
    g = p.add_argument_group("check")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image to show in the checked conversation (repeatable; the first three are used, "
                   "mirrored copies make up the rest; default: generated images, and generated audio clips "
                   "when the projector has an audio encoder)")
    g.add_argument("--n-ctx", type=positive_int, default=None, metavar="N",
                   help="context size in tokens (default: sized to the checked conversation)")
    g.add_argument("--n-batch", type=positive_int, default=None, metavar="N",
                   help="decode batch size (default: 512, more where the projector needs a whole image "
                   "in one batch)")
    g.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.set_defaults(func=selfcheck)


def selfcheck(args: argparse.Namespace) -> int:
    from llava_kv.selfcheck import run_selfcheck

    images = check_images(args.image)
    model_path, mmproj_path = model_paths(args)
    report = run_selfcheck(model_path, mmproj_path, images=images, n_gpu_layers=args.n_gpu_layers,
                           main_gpu=args.main_gpu, mmproj_use_gpu=args.mmproj_use_gpu, n_ctx=args.n_ctx,
                           n_batch=args.n_batch, n_threads=args.threads, flash_attn=args.flash_attn,
                           kv_type=kv_type_of(args), verbose=args.verbose,
                           progress=None if args.json else lambda message: err(f"... {message}"))
    sys.stdout.write((json.dumps(report.as_dict(), indent=1) if args.json else report.format_text()) + "\n")
    sys.stdout.flush()
    return 0 if report.ok else 1
