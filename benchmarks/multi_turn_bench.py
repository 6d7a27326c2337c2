"""Multi-turn chat with one image: seconds per turn for llava-kv, its floor, and llama-cpp-python's
multimodal chat handler on the same generated model, in one run.

Usage: python benchmarks/multi_turn_bench.py [--preset realistic] [--turns 5] [--max-tokens 16]
       [--repeats 1] [--no-peer] [--out result.json]

The floor of a turn is what no runtime can avoid: decoding the new turn's tokens (nothing earlier)
and generating the answer; it is measured on a copy of the session state before the turn. The
peer re-encodes the image and re-prefills the whole chat every turn. Both use the prompt of
LLaVA-1.5 (its system message, "USER: ... ASSISTANT:") and greedy decoding.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

import llava_kv as lk
from llava_kv.testing import TestModel, make_test_model, random_image

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.peer import CHAT_TEMPLATE, PEER, SYSTEM_MESSAGE, PeerError, run_peer  # noqa: E402
from benchmarks.scenario import emit  # noqa: E402

HERE = Path(__file__).resolve().parent


def write_image(pair: TestModel, folder: Path) -> Path:
    png = folder / "multi_turn.png"
    size = pair.preset.image_size
    Image.fromarray(random_image(7, (size, size))).save(png)
    return png


def _conversation(model: lk.Model, png: Path, *, turns: int, max_tokens: int,
                  n_ctx: int) -> tuple[list[float], list[float | None], list[int], list[int]]:
    ours: list[float] = []
    floors: list[float | None] = []
    reused: list[int] = []
    encoded: list[int] = []
    with model.chat_session(n_ctx=n_ctx) as s:
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_MESSAGE},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                                 {"type": "text", "text": "What is in this picture?"}]}]
        for turn in range(turns):
            floor = None
            if turn > 0:
                # the floor: on a copy of the state, decode only the new turn's text, then answer
                items = lk.chat.render_messages(model, messages, chat_template=CHAT_TEMPLATE)
                start, rest = lk.chat.plan_edit(s.timeline, items)
                assert start == len(s.timeline) and all(isinstance(x, str) for x in rest)
                with s.fork() as f:
                    t0 = time.perf_counter()
                    for x in rest:
                        f.append_text(x)  # type: ignore[arg-type]  # text only, asserted above
                    f.generate(max_tokens)
                    floor = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = s.chat(messages, max_tokens=max_tokens, chat_template=CHAT_TEMPLATE)
            ours.append(time.perf_counter() - t0)
            floors.append(floor)
            reused.append(r["llava_kv"]["reused_tokens"])
            encoded.append(r["llava_kv"]["images_encoded"])
            messages += [r["choices"][0]["message"],
                         {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]
    return ours, floors, reused, encoded


def _medians(runs: list[list[float]]) -> list[float]:
    return [round(statistics.median(r[t] for r in runs), 6) for t in range(len(runs[0]))]


def measure(pair: TestModel, *, turns: int = 5, max_tokens: int = 16, n_ctx: int = 4096, repeats: int = 1,
            peer: bool = True, peer_python: Path | None = None, workdir: Path | None = None,
            load_kwargs: dict[str, Any] | None = None, peer_gpu_layers: int = 0) -> dict[str, Any]:
    """Seconds per turn (medians over ``repeats`` whole conversations) for llava-kv, its floor and,
    with ``peer``, llama-cpp-python; returns the JSON-ready result."""
    png = write_image(pair, workdir or Path(tempfile.mkdtemp()))
    runs = []
    with lk.Model.load(pair.model_path, pair.mmproj_path, **(load_kwargs or {})) as model:
        for _ in range(repeats):
            runs.append(_conversation(model, png, turns=turns, max_tokens=max_tokens, n_ctx=n_ctx))
    ours = _medians([r[0] for r in runs])
    # turn 1 has no floor
    floors: list[float | None] = [None, *_medians([r[1][1:] for r in runs])]  # type: ignore[misc]
    reused, encoded = runs[0][2], runs[0][3]

    peer_s, peer_error = None, None
    if peer:
        try:
            out = run_peer(str(HERE / "peer_multi_turn.py"),
                           [str(pair.model_path), str(pair.mmproj_path), str(png), str(turns), str(max_tokens),
                            str(n_ctx), str(repeats), str(peer_gpu_layers)], python=peer_python)
            peer_s = _medians(out["runs"])
        except PeerError as e:
            peer_error = str(e)

    later = range(1, turns)
    later_floors = [f for f in floors[1:] if f is not None]
    result: dict[str, Any] = {
        "benchmark": "multi_turn",
        "preset": pair.preset.name,
        "machine": {"host": platform.node(), "devices": [d["description"] for d in lk.build_info()["devices"]]},
        "turns": turns, "max_tokens": max_tokens, "repeats": repeats, "peer": PEER if peer_s else None,
        "ours_s": ours,
        "floor_s": floors,
        "peer_s": peer_s,
        "all_ours_s": [[round(x, 6) for x in r[0]] for r in runs],
        "reused_tokens": reused, "images_encoded": encoded,
        "median_later_turns_s": {"ours": round(statistics.median(ours[i] for i in later), 6),
                                 "floor": round(statistics.median(later_floors), 6)},
        "ratios": {"ours_vs_floor_per_turn": [round(ours[i] / f, 3) for i, f in zip(later, later_floors)]},
        "target": "every later turn within 1.1x of its floor",
    }
    if peer_error:
        result["peer_error"] = peer_error
    if peer_s:
        result["median_later_turns_s"]["peer"] = round(statistics.median(peer_s[i] for i in later), 6)
        result["ratios"]["peer_vs_ours_per_turn"] = [round(peer_s[i] / ours[i], 2) for i in later]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()

    return emit(measure(make_test_model(preset=args.preset), turns=args.turns, max_tokens=args.max_tokens,
                     n_ctx=args.n_ctx, repeats=args.repeats, peer=not args.no_peer), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
