"""``llava-kv chat``: an interactive conversation on stdin, with image commands (see chat_repl)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .chat_repl import CHAT_HELP, ChatRepl, input_lines
from .options import (add_command, add_conversation_args, add_model_args, add_sampling_args, err,
                      images_and_model_paths, load_model)


def add_parser(sub: Any) -> None:
    p = add_command(
        sub, "chat", help="interactive conversation with image commands",
        description="Interactive conversation on stdin (a terminal or a pipe). Each line is a message; the "
        "reply streams back. Image commands edit the conversation in place: only what an edit "
        "invalidated is recomputed, and each edit prints what it cost.\n\n" + CHAT_HELP,
        examples=[
            "llava-kv chat --model m.gguf --mmproj p.gguf --image cat.jpg",
            "printf '/image a.png\\nWhat is this?\\n/replace 0 b.png\\nAnd now?\\n' | \\",
            "    llava-kv chat --model m.gguf --mmproj p.gguf",
        ])
    add_model_args(p, test_pair=True)
    g = p.add_argument_group("conversation")
    add_conversation_args(g, image_help="image attached to the first message (repeatable)", n_ctx=4096,
                          n_ctx_help="context size in tokens for the whole conversation (default: %(default)s)")
    add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=chat)


def chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    images, paths = images_and_model_paths(args)
    with load_model(args, paths) as model, model.chat_session(n_ctx=args.n_ctx, seed=args.seed) as s:
        repl = ChatRepl(model, s, args, sys.stdout)
        for path in images:
            repl.handle(f"/image {path}")
        err(f"llava-kv chat with {model!r}. Type a message; /help lists the commands; /quit or Ctrl-D leaves.")
        for line in input_lines(interactive):
            if not repl.handle(line):
                break
    return 0
