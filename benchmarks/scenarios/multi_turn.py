"""Multi-turn chat with one image: seconds per turn for llava-kv, its floor, and llama-cpp-python's
multimodal chat handler on the same generated model, in one run.

Usage: python benchmarks/scenarios/multi_turn.py [--preset realistic] [--turns 5] [--max-tokens 16]
       [--repeats 1] [--no-peer] [--out result.json]

The floor of a turn is what no runtime can avoid: decoding the new turn's tokens (nothing earlier)
and generating the answer; it is measured on a copy of the session state before the turn. The
llama-cpp-python peer re-encodes the image and re-prefills the whole chat every turn; llama-server
(the suite passes it in) reuses its slot's cached prefix. Each repetition is a conversation about a
never-seen image, after one warm-up conversation, so turn 1 (encode, prefill, answer) is the same
work on every side: the suite's control row. Both use the prompt of
LLaVA-1.5 (its system message, "USER: ... ASSISTANT:") and greedy decoding.

``run_multi_turn(ctx)`` makes the suite's ``control`` and ``multi_turn`` entries of it.
"""
from __future__ import annotations

import argparse
import contextlib
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness import settings  # noqa: E402
from benchmarks.harness.context import Context  # noqa: E402
from benchmarks.harness.llama_cpp_python import (CHAT_TEMPLATE, PEER, PEER_SCRIPTS, SYSTEM_MESSAGE,  # noqa: E402
                                                 PeerError, run_peer)
from benchmarks.harness.scenario import emit, entry, settle  # noqa: E402

# The control row: identical work on every side must agree within this factor, or the suite says which
# setting differs.
CONTROL_TOLERANCE = 1.10


def write_images(pair: TestModel, folder: Path, n: int) -> list[Path]:
    """A warm-up image, then one never-seen image per repetition: turn 1 is the same work (encode,
    prefill, answer) on every side in every repetition, with no cache of any side helping."""
    size = pair.preset.image_size
    paths = []
    for i in range(n):
        png = folder / f"multi_turn_{i}.png"
        Image.fromarray(random_image(7 + i, (size, size))).save(png)
        paths.append(png)
    return paths


def _messages(png: Path | str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM_MESSAGE},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def _conversation(model: lk.Model, png: Path, *, turns: int, max_tokens: int, n_ctx: int,
                  floors: bool = True) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"ours": [], "floor": [], "reused": [], "encoded": [], "prompt_tokens": []}
    with model.chat_session(n_ctx=n_ctx) as s:
        out["settings"] = [settings.ours(model, s)]
        messages = _messages(png)
        for turn in range(turns):
            floor = None
            if turn > 0 and floors:
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
            out["ours"].append(time.perf_counter() - t0)
            out["floor"].append(floor)
            out["reused"].append(r["llava_kv"]["reused_tokens"])
            out["encoded"].append(r["llava_kv"]["images_encoded"])
            out["prompt_tokens"].append(r["usage"]["prompt_tokens"])
            messages += [r["choices"][0]["message"],
                         {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]
    return out


def _medians(runs: list[list[float]]) -> list[float]:
    return [round(statistics.median(r[t] for r in runs), 6) for t in range(len(runs[0]))]


def _later_median(per_turn: list[float]) -> float:
    return round(statistics.median(per_turn[1:]), 6)


def measure(pair: TestModel, *, turns: int = 5, max_tokens: int = 16, n_ctx: int = 4096, repeats: int = 1,
            peer: bool = True, peer_python: Path | None = None, workdir: Path | None = None,
            load_kwargs: dict[str, Any] | None = None, peer_gpu_layers: int = 0,
            server: Any = None) -> dict[str, Any]:
    """Seconds per turn (medians over ``repeats`` whole conversations, each about a never-seen image)
    for llava-kv, its floor and, with ``peer``, llama-cpp-python, and with ``server`` (a
    ``llama_server.LlamaServer`` factory taking ``parallel`` and ``n_ctx``) llama-server; returns the
    JSON-ready result. Turn 1 of each side is the control: the same work everywhere.

    Ours and llama-server alternate, one conversation each per round (both warm), so a change in the
    machine's speed hits both sides; llama-cpp-python runs its conversations after, in its own venv."""
    from benchmarks.peers import openai_chat

    folder = workdir or Path(tempfile.mkdtemp())
    pngs = write_images(pair, folder, repeats + 1)
    warm, images = pngs[0], pngs[1:]
    runs, server_outs = [], []
    server_error = server_settings = None
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(lk.Model.load(pair.model_path, pair.mmproj_path, **(load_kwargs or {})))
        srv = None
        if server is not None:
            try:
                # --cache-ram 0: no saved prompt may give turn 1 a head start (its slot's own cache still
                # serves turns 2..N, which is what this scenario measures)
                srv = stack.enter_context(server(parallel=1, n_ctx=n_ctx, cache_ram_mib=0))
                openai_chat.multi_turn(srv, warm, system=SYSTEM_MESSAGE, turns=2, max_tokens=max_tokens, repeats=1)
                server_settings = srv.settings_used()
            except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
                server_error, srv = f"{type(e).__name__}: {e}", None
        _conversation(model, warm, turns=2, max_tokens=max_tokens, n_ctx=n_ctx, floors=False)  # warm-up
        for png in images:
            settle()
            runs.append(_conversation(model, png, turns=turns, max_tokens=max_tokens, n_ctx=n_ctx))
            if srv is None:
                continue
            try:
                settle()
                server_outs.append(openai_chat.multi_turn(srv, png, system=SYSTEM_MESSAGE, turns=turns,
                                                          max_tokens=max_tokens, repeats=1))
            except Exception as e:  # noqa: BLE001 - as above
                server_error, srv = f"{type(e).__name__}: {e}", None
    ours = _medians([r["ours"] for r in runs])
    # turn 1 has no floor
    floors: list[float | None] = [None, *_medians([r["floor"][1:] for r in runs])]  # type: ignore[misc]
    later = range(1, turns)
    later_floors = [f for f in floors[1:] if f is not None]
    result: dict[str, Any] = {
        "benchmark": "multi_turn",
        "preset": pair.preset.name,
        "machine": {"host": platform.node(), "devices": [d.description for d in lk.build_info()["devices"]]},
        "turns": turns, "max_tokens": max_tokens, "repeats": repeats,
        "ours_s": ours,
        "floor_s": floors,
        "all_ours_s": [[round(x, 6) for x in r["ours"]] for r in runs],
        "all_turn1_s": {"ours": [round(r["ours"][0], 6) for r in runs]},
        "reused_tokens": runs[0]["reused"], "images_encoded": runs[0]["encoded"],
        "prompt_tokens": {"ours": runs[0]["prompt_tokens"]},
        "settings": {"ours": runs[0]["settings"][0]},
        "median_later_turns_s": {"ours": _later_median(ours), "floor": round(statistics.median(later_floors), 6)},
        "turn1_s": {"ours": ours[0]},
        "ratios": {"ours_vs_floor_per_turn": [round(ours[i] / f, 3) for i, f in zip(later, later_floors)]},
        "target": "every later turn within 1.1x of its floor",
        "peer_s": None, "server_s": None,
    }
    if peer:
        try:
            out = run_peer(str(PEER_SCRIPTS / "peer_multi_turn.py"),
                           [str(pair.model_path), str(pair.mmproj_path), str(turns), str(max_tokens), str(n_ctx),
                            str(peer_gpu_layers), *map(str, pngs)], python=peer_python)
            peer_s = _medians(out["runs"])
            result.update(peer=PEER, peer_s=peer_s)
            result["settings"]["peer"] = out["settings"]
            result["all_turn1_s"]["peer"] = [round(r[0], 6) for r in out["runs"]]
            result["median_later_turns_s"]["peer"] = _later_median(peer_s)
            result["turn1_s"]["peer"] = peer_s[0]
            result["ratios"]["peer_vs_ours_per_turn"] = [round(peer_s[i] / ours[i], 2) for i in later]
        except PeerError as e:
            result["peer_error"] = str(e)
    if server_error is not None:
        result["server_error"] = server_error
    elif server is not None:
        runs_s, calls = [o["runs"][0] for o in server_outs], [o["calls"] for o in server_outs]
        server_s = _medians(runs_s)
        result["settings"]["server"] = server_settings
        result.update(server_s=server_s, server_calls=calls[0],
                      server_images_encoded=[c["encodes"] for c in calls[0]])
        result["all_turn1_s"]["server"] = [round(r[0], 6) for r in runs_s]
        result["all_server_s"] = [[round(x, 6) for x in r] for r in runs_s]
        result["median_later_turns_s"]["server"] = _later_median(server_s)
        result["turn1_s"]["server"] = server_s[0]
        result["ratios"]["server_vs_ours_per_turn"] = [round(server_s[i] / ours[i], 2) for i in later]
    return result


def _control_verdict(ours: float | None, other: float | None, ours_settings: dict[str, Any] | None,
                     other_settings: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Whether identical work agrees within CONTROL_TOLERANCE, and if not, which setting differs."""
    if ours is None or other is None:
        return {"agree": None, "says": f"{name} not measured"}
    ratio = other / ours
    differs = settings.differences(ours_settings, other_settings)
    agree = 1 / CONTROL_TOLERANCE <= ratio <= CONTROL_TOLERANCE
    if agree:
        says = f"{name} {ratio:.2f}x of llava-kv: within {CONTROL_TOLERANCE - 1:.0%}"
    elif differs:
        says = f"{name} {ratio:.2f}x of llava-kv, outside {CONTROL_TOLERANCE - 1:.0%}; settings that differ: " + \
               "; ".join(differs)
    else:
        says = (f"{name} {ratio:.2f}x of llava-kv, outside {CONTROL_TOLERANCE - 1:.0%}, with every recorded "
                "setting equal: the gap is the runtime's own work, not a setting")
    return {"agree": agree, "ratio": round(ratio, 3), "settings_that_differ": differs, "says": says}


def run_multi_turn(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    r = measure(ctx.pair, turns=p.turns, max_tokens=p.answer_tokens, repeats=ctx.repeat,
                peer=ctx.peer, peer_python=ctx.peer_py, workdir=ctx.work,
                load_kwargs=ctx.load_kwargs, peer_gpu_layers=ctx.n_gpu_layers,
                server=ctx.server_factory)
    med = r["median_later_turns_s"]
    reasons = ctx.peer_reasons(r)
    used = r["settings"]
    first = r["turn1_s"]
    verdicts = {"peer": _control_verdict(first["ours"], first.get("peer"), used["ours"], used.get("peer"),
                                         "llama-cpp-python"),
                "server": _control_verdict(first["ours"], first.get("server"), used["ours"], used.get("server"),
                                           "llama-server")}
    control = entry(
        unit="s (turn 1)", repetitions=ctx.repeat, ours=first["ours"], peer=first.get("peer"),
        server=first.get("server"), limit=None, settings=used,
        limit_means="none: a control row, the same work on every side",
        reasons={**reasons, "limit": "a control row has no limit: it checks that like-for-like settings give "
                                     "like-for-like times"}, digits=6,
        details={"what": "turn 1 of the multi-turn chat: encode a never-seen image, prefill the prompt, "
                         f"{p.answer_tokens}-token greedy answer; identical work on every side (medians over "
                         f"{ctx.repeat} conversations, each about a new image)",
                 "tolerance": CONTROL_TOLERANCE, "all_s": r["all_turn1_s"], "verdict": verdicts,
                 "prompt_tokens": {"ours": r["prompt_tokens"]["ours"][0],
                                   "server": (r.get("server_calls") or [{}])[0].get("prompt_tokens")}})
    multi = entry(
        unit="s per turn", repetitions=ctx.repeat, ours=med["ours"], peer=med.get("peer"), server=med.get("server"),
        limit=med["floor"], settings=used,
        limit_means="decode only the new turn's tokens, then generate the answer (measured on a copy of the state)",
        reasons=reasons, digits=6,
        notes={"server": "llama-server reuses its slot's cached prefix (image included) like us; per turn it "
                         "also pays HTTP, JSON and re-rendering the whole chat"},
        details={"what": f"chat with one image, turns 2..{p.turns} (median over turns of per-turn medians), "
                         f"{p.answer_tokens}-token greedy answers",
                 "turns": p.turns, "ours_s": r["ours_s"], "limit_s": r["floor_s"], "peer_s": r["peer_s"],
                 "server_s": r["server_s"], "all_ours_s": r["all_ours_s"],
                 "all_server_s": r.get("all_server_s"),
                 "reused_tokens": r["reused_tokens"], "images_encoded": r["images_encoded"],
                 "server_calls": r.get("server_calls"), "server_images_encoded": r.get("server_images_encoded"),
                 "per_turn_ratios": r["ratios"]})
    return {"control": control, "multi_turn": multi}


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
