"""What the commands share: option groups, the model pair they name, and how they report.

Replies go to stdout; notes, progress, summaries and errors go to stderr (:func:`err`). A mistake
in the command line itself is a :class:`UsageError` (one line, exit code 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any, Iterable, Iterator, Sequence

KV_TYPES = ("f16", "q8_0", "q4_0")


class UsageError(Exception):
    """A mistake in the command line itself: reported in one line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps paragraphs with indented lines (example
    commands, command tables) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines[1:]):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def add_command(sub: Any, name: str, *, help: str, description: str,
                examples: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of one command, its ``examples`` (command lines) listed after the options."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, formatter_class=HelpFormatter, help=help, description=description,
        epilog="examples:\n" + "\n".join("  " + line for line in examples))
    return parser


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(e: BaseException) -> str:
    """An exception in one line a user can act on."""
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.strerror or 'not found'}: {e.filename}"
    if isinstance(e, KeyError):
        return f"not found: {e.args[0] if e.args else e}"
    return str(e) or type(e).__name__


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# -- option groups ------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser, *, test_pair: bool, required: bool = False) -> None:
    g = p.add_argument_group("model")
    if test_pair:
        g.add_argument("--model", metavar="GGUF",
                       help="text model GGUF (default: a generated random-weight test pair, see --preset)")
        g.add_argument("--mmproj", metavar="GGUF", help="projector (mmproj) GGUF that goes with --model; "
                       "without it the model reads text only")
        from llava_kv.testing import PRESETS

        g.add_argument("--preset", default="tiny-llava", choices=list(PRESETS),
                       help="test pair to generate when neither --model nor --mmproj is given; its weights "
                       "are random, so its text is gibberish (default: %(default)s)")
    else:
        g.add_argument("--model", metavar="GGUF", required=required, help="text model GGUF")
        g.add_argument("--mmproj", metavar="GGUF", required=required, help="projector (mmproj) GGUF for --model")
    g.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers to offload to the GPU; -1 offloads all (GPU builds; default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads (default: one per core)")
    g.add_argument("--main-gpu", default=None, metavar="DEVICE",
                   help="the device for the offloaded layers and the projector, e.g. Vulkan0 or CUDA1 "
                   "('llava-kv info' lists them; default: llama.cpp's choice)")
    g.add_argument("--no-mmproj-gpu", dest="mmproj_use_gpu", action="store_false",
                   help="keep the projector on the CPU in a GPU build")
    g.add_argument("--kv-type", choices=KV_TYPES, default="f16",
                   help="the KV cache's element type, K and V (a quantized V needs flash attention; default: "
                   "%(default)s)")
    g.add_argument("--cache-type-k", choices=KV_TYPES, default=None, metavar="TYPE",
                   help="the K cache's type alone, as llama-server names it (default: --kv-type)")
    g.add_argument("--cache-type-v", choices=KV_TYPES, default=None, metavar="TYPE",
                   help="the V cache's type alone (default: --kv-type)")
    g.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                   help="flash attention: llama.cpp's choice, or forced on/off (default: %(default)s)")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log on stderr")


def add_conversation_args(g: Any, *, image_help: str | None, n_ctx: int | None, n_ctx_help: str) -> None:
    """--image (unless ``image_help`` is None), --system, --chat-template and --n-ctx."""
    if image_help is not None:
        g.add_argument("--image", action="append", default=[], metavar="PATH", help=image_help)
    g.add_argument("--system", metavar="TEXT", help="system message")
    g.add_argument("--chat-template", metavar="NAME",
                   help="chat template to use instead of the model's own (e.g. chatml, llama3, gemma)")
    g.add_argument("--n-ctx", type=positive_int, default=n_ctx, metavar="N", help=n_ctx_help)


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=non_negative_int, default=max_tokens, metavar="N",
                   help="most tokens to generate per reply (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy, deterministic (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k sampling (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.05, metavar="P", help="min-p sampling (default: %(default)s)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X",
                   help="penalty for repeated tokens; 1 is none (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the reply contains TEXT, which is not printed (repeatable)")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options as keyword arguments of ``Session.chat`` and ``batch.iter_run``."""
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed, "stop": list(args.stop) or None}


# -- the model and the images -------------------------------------------------------------------


def model_paths(args: argparse.Namespace) -> tuple[str, str | None]:
    """The model pair to load; without --model and --mmproj, a generated test pair (said plainly)."""
    if args.model is None and args.mmproj is None and getattr(args, "preset", None):
        from llava_kv.testing import make_test_model

        pair = make_test_model(preset=args.preset)
        err(f"No --model given: using the generated test pair '{pair.preset.name}' ({pair.model_path}). "
            "Its weights are RANDOM: any text it writes is gibberish.")
        return str(pair.model_path), str(pair.mmproj_path)
    if args.model is None:
        raise UsageError("--mmproj needs --model")
    for path, what in ((args.model, "model"), (args.mmproj, "mmproj")):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{what} file not found: {path}")
    return args.model, args.mmproj


def load_model(args: argparse.Namespace, paths: tuple[str, str | None] | None = None) -> Any:
    import llava_kv as lk

    model_path, mmproj_path = paths or model_paths(args)
    return lk.Model.load(model_path, mmproj_path, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                         flash_attn=args.flash_attn, verbose=args.verbose, main_gpu=args.main_gpu,
                         mmproj_use_gpu=args.mmproj_use_gpu, kv_type=kv_type_of(args))


def kv_type_of(args: argparse.Namespace) -> str | tuple[str, str]:
    """``Model.load``'s kv_type from --kv-type and the --cache-type-k/-v that override it."""
    k, v = args.cache_type_k or args.kv_type, args.cache_type_v or args.kv_type
    return k if k == v else (k, v)


def check_images(paths: Sequence[str]) -> list[str]:
    out = []
    for p in paths:
        path = os.path.expanduser(p)
        if not os.path.isfile(path):
            raise UsageError(f"image file not found: {p}")
        out.append(path)
    return out


def images_and_model_paths(args: argparse.Namespace) -> tuple[list[str], tuple[str, str | None]]:
    """The --image files and the model pair, checked before anything is loaded."""
    images = check_images(args.image)
    paths = model_paths(args)
    if images and paths[1] is None:
        raise UsageError("--image needs a projector: pass --mmproj")
    return images, paths


def user_message(images: Sequence[str], text: str) -> dict[str, Any]:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images),
                                        {"type": "text", "text": text}]}


def reply_pieces(chunks: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The text pieces of a streamed ``chat.completion.chunk`` iterator, empty ones left out."""
    for chunk in chunks:
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            yield piece
