"""``llava-kv run``: one prompt about zero or more images, the reply streamed to stdout."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .options import (add_command, add_conversation_args, add_model_args, add_sampling_args, err,
                      images_and_model_paths, load_model, reply_pieces, sampling, user_message)


def add_parser(sub: Any) -> None:
    p = add_command(
        sub, "run", help="answer one prompt about zero or more images",
        description="Answer one prompt (with the model's chat template) about zero or more images, streaming "
        "the reply to stdout as it is generated.",
        examples=[
            "llava-kv run --model m.gguf --mmproj p.gguf --image cat.jpg --prompt 'What is this?'",
            "llava-kv run --model m.gguf --mmproj p.gguf --image a.png --image b.png \\",
            "    --prompt 'What changed?' --max-tokens 200 --json",
            "echo 'Describe it.' | llava-kv run --model m.gguf --mmproj p.gguf --image x.jpg --prompt -",
        ])
    add_model_args(p, test_pair=True)
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", required=True, help="the question or instruction; '-' reads it from stdin")
    add_conversation_args(g, image_help="image shown before the prompt (repeatable; in order)", n_ctx=4096,
                          n_ctx_help="context size in tokens (default: %(default)s)")
    add_sampling_args(p, max_tokens=256)
    g = p.add_argument_group("output")
    g.add_argument("--no-stream", action="store_true", help="print the reply once it is complete")
    g.add_argument("--json", action="store_true",
                   help="print the whole OpenAI-style chat.completion object (usage, finish_reason, llava_kv "
                   "counters) as JSON instead of the text")
    g.add_argument("--stats", action="store_true", help="print token counts and time to stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    images, paths = images_and_model_paths(args)
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(user_message(images, prompt))
    out = sys.stdout
    with load_model(args, paths) as model:
        with model.chat_session(n_ctx=args.n_ctx, seed=args.seed) as s:
            t0 = time.perf_counter()
            if args.json or args.no_stream:
                reply = s.chat(messages, chat_template=args.chat_template, **sampling(args))
                if args.json:
                    out.write(json.dumps(reply, indent=1) + "\n")
                else:
                    out.write(reply["choices"][0]["message"]["content"] + "\n")
                prompt_tokens = reply["usage"]["prompt_tokens"]
            else:
                chunks = s.chat(messages, chat_template=args.chat_template, stream=True, **sampling(args))
                prompt_tokens = s.n_past
                for piece in reply_pieces(chunks):
                    out.write(piece)
                    out.flush()
                out.write("\n")
            out.flush()
            if args.stats:
                seconds = time.perf_counter() - t0
                completion = s.n_past - prompt_tokens
                st = s.stats
                err(f"prompt {prompt_tokens} tokens ({st['images_encoded']} image(s) encoded), "
                    f"reply {completion} tokens ({s.last_finish_reason}), {seconds:.2f} s total")
    return 0
