"""The ``llava-kv`` command line: run, chat, batch, serve, info, selfcheck, demo, make-test-model.

One module per command, each with ``add_parser(subparsers)`` and the function the command runs;
the chat loop is :mod:`.chat_repl`, and what the commands share (option groups, the model pair,
errors) is :mod:`.options`.

Replies go to stdout; notes, progress, summaries and errors go to stderr, so the output of ``run``
and ``batch --out -`` can be piped. Exit codes: 0 done, 1 a model or image error, 2 a usage
error (bad option, missing file, no image matched), 130 interrupted. ``selfcheck`` also exits 1
when one of its checks fails.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import batch, chat, demo, info, make_test_model, run, selfcheck, serve
from .batch import expand_paths
from .options import HelpFormatter, UsageError, describe, err

__all__ = ["build_parser", "expand_paths", "main"]

COMMANDS = (run, chat, batch, serve, info, selfcheck, demo, make_test_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-kv", formatter_class=HelpFormatter,
        description="Vision-language models (GGUF text model + mmproj projector) on llama.cpp, with one state "
        "for images, embeddings and KV cache: images can be added, replaced or removed anywhere in a "
        "conversation and only what the edit invalidated is recomputed.",
        epilog="examples:\n"
        "  llava-kv run --model m.gguf --mmproj p.gguf --image cat.jpg --prompt 'What is this?'\n"
        "  llava-kv chat --model m.gguf --mmproj p.gguf\n"
        "  llava-kv batch --model m.gguf --mmproj p.gguf --prompt 'Caption:' --out out.jsonl photos/\n"
        "  llava-kv selfcheck --model m.gguf --mmproj p.gguf   # are edits exact on this checkpoint?\n"
        "  llava-kv demo            # no model needed: uses a generated random-weight pair\n\n"
        "'llava-kv COMMAND --help' describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from llava_kv.errors import LlavaKVError

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    prefix = f"llava-kv {args.command}: error:"
    try:
        return int(args.func(args))
    except UsageError as e:
        err(f"{prefix} {e}")
        return 2
    except FileNotFoundError as e:
        err(f"{prefix} {describe(e)}")
        return 2
    except (LlavaKVError, OSError, ValueError, ImportError) as e:
        err(f"{prefix} {describe(e)}")
        return 1
    except KeyboardInterrupt:
        sys.stdout.flush()
        err("\ninterrupted")
        return 130
