"""Multi-turn chat with one image: seconds per turn for llava-kv, its floor, and llama-cpp-python's
multimodal chat handler on the same generated model, in one run.

Usage: python benchmarks/multi_turn_bench.py [--preset realistic] [--turns 5] [--max-tokens 16]
       [--no-peer] [--out result.json]

The floor of a turn is what no runtime can avoid: decoding the new turn's tokens (nothing earlier)
and generating the answer; it is measured on a copy of the session state before the turn. The
peer re-encodes the image and re-prefills the whole chat every turn. Both use the Vicuna-style
prompt of LLaVA-1.5 ("USER: ... ASSISTANT:") and greedy decoding.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

import llava_kv as lk
from llava_kv.testing import make_test_model, random_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import PEER, run_peer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()

    pair = make_test_model(preset=args.preset)
    size = pair.preset.image_size
    image = random_image(7, (size, size))
    tmp = Path(tempfile.mkdtemp())
    png = tmp / "image.png"
    Image.fromarray(image).save(png)

    ours, floors, reused, encoded = [], [], [], []
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model, model.chat_session(n_ctx=args.n_ctx) as s:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                                 {"type": "text", "text": "What is in this picture?"}]}]
        for turn in range(args.turns):
            floor = None
            if turn > 0:
                # the floor: on a copy of the state, decode only the new turn's text, then answer
                items = lk.chat.render_messages(model, messages, chat_template="vicuna")
                start, rest = lk.chat.plan_edit(s.timeline, items)
                assert start == len(s.timeline) and all(isinstance(x, str) for x in rest)
                with s.fork() as f:
                    t0 = time.perf_counter()
                    for x in rest:
                        f.append_text(x)
                    f.generate(args.max_tokens)
                    floor = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = s.chat(messages, max_tokens=args.max_tokens, chat_template="vicuna")
            ours.append(time.perf_counter() - t0)
            floors.append(floor)
            reused.append(r["llava_kv"]["reused_tokens"])
            encoded.append(r["llava_kv"]["images_encoded"])
            messages += [r["choices"][0]["message"], {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]

    peer = None
    if not args.no_peer:
        peer = run_peer(str(Path(__file__).resolve().parent / "peer_multi_turn.py"),
                        [str(pair.model_path), str(pair.mmproj_path), str(png), str(args.turns),
                         str(args.max_tokens), str(args.n_ctx)])["turn_seconds"]

    later = range(1, args.turns)
    result = {
        "benchmark": "multi_turn",
        "preset": pair.preset.name,
        "machine": {"host": platform.node(), "devices": [d["description"] for d in lk.build_info()["devices"]]},
        "turns": args.turns, "max_tokens": args.max_tokens, "peer": PEER if peer else None,
        "ours_s": [round(x, 4) for x in ours],
        "floor_s": [round(x, 4) if x is not None else None for x in floors],
        "peer_s": [round(x, 4) for x in peer] if peer else None,
        "reused_tokens": reused, "images_encoded": encoded,
        "median_later_turns_s": {"ours": round(statistics.median(ours[i] for i in later), 4),
                                 "floor": round(statistics.median(floors[i] for i in later), 4)},
        "ratios": {"ours_vs_floor_per_turn": [round(ours[i] / floors[i], 3) for i in later]},
        "target": "every later turn within 1.1x of its floor",
    }
    if peer:
        result["median_later_turns_s"]["peer"] = round(statistics.median(peer[i] for i in later), 4)
        result["ratios"]["peer_vs_ours_per_turn"] = [round(peer[i] / ours[i], 2) for i in later]
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
