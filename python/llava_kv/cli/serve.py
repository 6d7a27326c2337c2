"""``llava-kv serve``: the OpenAI-compatible server (see :mod:`llava_kv.server`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from ..server.media import MediaPolicy
from .options import (UsageError, add_command, add_model_args, err, kv_type_of, model_paths, non_negative_int,
                      positive_int)


def add_parser(sub: Any) -> None:
    p = add_command(
        sub, "serve", help="OpenAI-compatible HTTP server (chat completions, SSE streaming, metrics)",
        description="Serve the model over HTTP with OpenAI's chat completions API. A pool of --slots "
        "conversations shares one context: a request goes to the slot whose conversation shares the longest "
        "prefix with it and only what differs is decoded (images after an edit come from the embedding cache); "
        "requests on different slots generate together, one batched decode per step. Conversations that lose "
        "their slot are kept in host memory and, with --state-dir, on disk, and restored when they return. "
        "Needs the server extra: pip install 'llava-kv[server]'.",
        examples=[
            "llava-kv serve --model m.gguf --mmproj p.gguf --slots 4 --n-ctx 8192",
            "llava-kv serve --model m.gguf --mmproj p.gguf --api-key $KEY --state-dir ~/.cache/llava-kv/chats",
            "llava-kv serve --model m.gguf --mmproj p.gguf --allow-local-files ~/photos",
        ])
    add_model_args(p, test_pair=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server to the network (default: %(default)s)")
    g.add_argument("--port", type=non_negative_int, default=8000, help="TCP port, 0: any free one (default: %(default)s)")
    g.add_argument("--slots", type=positive_int, default=4, metavar="N",
                   help="conversations held in the context at once, generating together (default: %(default)s)")
    g.add_argument("--n-ctx", type=positive_int, default=4096, metavar="N",
                   help="KV cells per slot (default: %(default)s)")
    g.add_argument("--n-batch", type=positive_int, default=512, metavar="N", help="tokens per decode call (default: %(default)s)")
    g.add_argument("--chat-template", metavar="NAME", help="chat template instead of the model's own")
    g.add_argument("--alias", metavar="NAME", help="model id clients use (default: the model file's name)")
    g.add_argument("--state-dir", metavar="DIR",
                   help="also keep conversations on disk: evicted ones and every finished reply's, restored after "
                   "a restart")
    g.add_argument("--cache-ram", type=non_negative_int, default=2048, metavar="MIB",
                   help="host memory for conversations evicted from their slots (default: %(default)s MiB)")
    g.add_argument("--queue-size", type=positive_int, default=64, metavar="N",
                   help="requests that may wait for a slot; one more is answered 503 (default: %(default)s)")
    g.add_argument("--max-tokens", type=non_negative_int, default=512, metavar="N",
                   help="reply length when a request gives no max_tokens (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of slot 0 (slot i: seed + i) (default: %(default)s)")
    s = p.add_argument_group("safety")
    s.add_argument("--api-key", metavar="KEY", default=os.environ.get("LLAVA_KV_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                   "$LLAVA_KV_API_KEY, else none)")
    s.add_argument("--allow-local-files", metavar="DIR",
                   help="let clients name image files, only inside DIR (default: clients cannot make the server "
                   "read files)")
    s.add_argument("--max-image-bytes", type=positive_int, default=MediaPolicy.max_image_bytes, metavar="N",
                   help="largest encoded image or audio clip (default: %(default)s)")
    s.add_argument("--max-image-pixels", type=positive_int, default=MediaPolicy.max_image_pixels, metavar="N",
                   help="largest decoded image (default: %(default)s)")
    s.add_argument("--max-body-bytes", type=positive_int, default=64 * 1024 * 1024, metavar="N",
                   help="largest request body (default: %(default)s)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the server needs its extra: pip install 'llava-kv[server]'") from None
    from llava_kv.server import Engine, MediaPolicy, ServerConfig
    from llava_kv.server.app import create_app

    if args.allow_local_files is not None and not os.path.isdir(args.allow_local_files):
        raise UsageError(f"--allow-local-files: not a folder: {args.allow_local_files}")
    model, mmproj = model_paths(args)
    config = ServerConfig(
        model=model, mmproj=mmproj, slots=args.slots, n_ctx=args.n_ctx, n_batch=args.n_batch,
        n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
        main_gpu=args.main_gpu, mmproj_use_gpu=args.mmproj_use_gpu, kv_type=kv_type_of(args),
        chat_template=args.chat_template, model_alias=args.alias, state_dir=args.state_dir,
        cache_ram_mib=args.cache_ram, queue_size=args.queue_size, default_max_tokens=args.max_tokens,
        seed=args.seed, policy=MediaPolicy(args.allow_local_files, args.max_image_bytes, args.max_image_pixels))
    engine = Engine(config)
    try:
        app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               access_log=False, lifespan="off"))
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            err(f"llava-kv serve: listening on {args.host}: reachable from the network"
                + ("" if args.api_key else " WITHOUT an API key (--api-key)"))
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
        # The port actually bound is printed once the socket is listening (--port 0 picks one).
        original_startup = server.startup

        async def startup(sockets: Any = None) -> None:
            await original_startup(sockets)
            for s in server.servers:
                for sock in s.sockets:
                    host, port = sock.getsockname()[:2]
                    err(f"llava-kv serve: {engine.model_id} on http://{host}:{port}/v1 "
                        f"({config.slots} slots x {config.n_ctx} cells)")
                    sys.stderr.flush()

        server.startup = startup  # type: ignore[method-assign]
        server.run()
    finally:
        engine.close()
    return 0
