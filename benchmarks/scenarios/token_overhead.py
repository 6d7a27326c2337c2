"""Per-token cost of generation driven from Python, against the C++ generate loop, in one run.

Usage: python benchmarks/scenarios/token_overhead.py [--preset realistic] [--tokens 64] [--repeats 5] [--no-peer]

On one prompt (text, an image, text), greedy, medians over --repeats, each from the same state:
- ``stream``: ``session.generate(n, stream=True)`` consumed piece by piece (one native call per
  piece of text: ``Session.advance(until_text=True)``; stop strings and UTF-8 in the core): ours.
- ``text``: ``session.generate(n)``: the whole reply in one native call (``Session.advance``).
- ``native_step``: a bare Python loop over the binding's ``generate_step()``: the native step plus
  one binding call per token, no facade.
- ``cpp_loop``: ``llava_kv.batch.run`` with one image and ``parallel=1``: the C++ batch runner's own
  generate loop (its ``generate_ms`` / tokens), no Python per token.
  The limit (in the suite) is the cheaper of ``cpp_loop`` and ``native_step``.
  Its ``generate_ms`` runs from the first sampled token to the last, so it is divided by tokens - 1.
- peer (llama-cpp-python) and server (llama-server, driven with the openai client): a streaming chat
  completion on the same prompt, (time of the last chunk - time of the first) / (chunks - 1).
  llama-server's streams alternate with our repetitions (one each per round, after a ``settle()``);
  llama-cpp-python runs its repetitions after, in its own venv.

``run_token_overhead(ctx)`` makes the suite's ``token_overhead`` entry of it.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

import llava_kv as lk
from llava_kv import _core
from llava_kv.testing import TestModel, make_test_model, random_image

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.harness import settings  # noqa: E402
from benchmarks.harness.context import Context  # noqa: E402
from benchmarks.harness.llama_cpp_python import (CHAT_TEMPLATE, PEER_SCRIPTS, SYSTEM_MESSAGE, PeerError,  # noqa: E402
                                                 run_peer)
from benchmarks.harness.scenario import emit, entry, in_fresh_process, ms, settle  # noqa: E402
from benchmarks.peers import openai_chat  # noqa: E402
PROMPT = "Describe this picture in detail."


def cpp_loop(model: lk.Model, png: Path | str, n_tokens: int, repeats: int) -> dict[str, Any]:
    """Seconds per token of the batch runner's C++ loop (parallel=1), each repetition."""
    from llava_kv import batch

    batch.run(model, [str(png)], PROMPT, max_tokens=4, parallel=1, progress=False, n_ctx=2048,
              chat_template=CHAT_TEMPLATE, system=SYSTEM_MESSAGE)  # warm-up
    per, tokens = [], 0
    for _ in range(repeats):
        r = batch.run(model, [str(png)], PROMPT, max_tokens=n_tokens, parallel=1, progress=False,
                      n_ctx=2048, chat_template=CHAT_TEMPLATE, system=SYSTEM_MESSAGE)[0]
        if not r.ok:
            raise RuntimeError(f"batch.run failed: {r.error}")
        if r.tokens > 1:
            per.append(r.timings["generate_ms"] / 1000 / (r.tokens - 1))
            tokens = r.tokens
    return {"per_token_s": per, "tokens": tokens}


def cpp_loop_fresh(*, preset: str, seed: int, png: str, n_tokens: int, repeats: int,
                   load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`cpp_loop` in a process whose main thread never decoded (JSON in, JSON out)."""
    pair = make_test_model(preset=preset, seed=seed)
    with lk.Model.load(pair.model_path, pair.mmproj_path, **load_kwargs) as model:
        return cpp_loop(model, png, n_tokens, repeats)


def measure(pair: TestModel, *, n_tokens: int = 64, repeats: int = 5, peer: bool = True,
            peer_python: Path | None = None, workdir: Path | None = None,
            load_kwargs: dict[str, Any] | None = None, peer_gpu_layers: int = 0,
            server: Any = None) -> dict[str, Any]:
    folder = workdir or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "token_overhead.png"
    size = pair.preset.image_size
    Image.fromarray(random_image(11, (size, size))).save(png)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                     {"type": "text", "text": PROMPT}]}]
    per_token: dict[str, list[float]] = {"stream": [], "text": [], "native_step": [], "cpp_loop": [],
                                         "cpp_loop_same_process": []}
    tokens: dict[str, int] = {}
    reasons: dict[str, str] = {}
    server_per_token: list[float] = []
    server_tokens, server_error, server_own, server_settings = 0, None, {}, {}
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(lk.Model.load(pair.model_path, pair.mmproj_path, **(load_kwargs or {})))
        s = stack.enter_context(model.chat_session(n_ctx=2048))
        streamer = None
        if server is not None:
            try:
                srv = stack.enter_context(server(parallel=1, n_ctx=2048))
                server_settings = srv.settings_used()
                streamer = openai_chat.TokenStream(srv, png, system=SYSTEM_MESSAGE, prompt=PROMPT,
                                                   n_tokens=n_tokens)
                streamer.per_token()  # warm-up
            except Exception as e:  # ServerError, OSError or an openai.APIError: the reason goes in the JSON
                server_error, streamer = f"{type(e).__name__}: {e}", None
        s.chat(messages, max_tokens=0, chat_template=CHAT_TEMPLATE)  # the peer's prompt, decoded once
        base = len(s.timeline)
        used = {"ours": settings.ours(model, s)}

        def timed(key: str, fn: Callable[[], None]) -> None:
            before = s.stats["tokens_generated"]
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
            n = s.stats["tokens_generated"] - before
            s.truncate(base)
            if n:
                per_token[key].append(seconds / n)
                tokens[key] = n

        def stream() -> None:
            for _ in s.generate(n_tokens, stream=True):
                pass

        def native_step() -> None:
            core = s._core
            core.begin_generation(_core.SamplingParams(temperature=0.0, seed=0))
            for _ in range(n_tokens):
                if core.generate_step().end_of_generation:
                    break
            core.flush_generation()

        stream()  # warm-up
        s.truncate(base)
        for _ in range(repeats):  # alternating with llama-server's streams, each side after a settle()
            settle()
            timed("stream", stream)
            timed("text", lambda: s.generate(n_tokens))
            timed("native_step", native_step)
            if streamer is None:
                continue
            settle()
            try:
                seconds, server_tokens = streamer.per_token()
                if seconds is not None:
                    server_per_token.append(seconds)
            except Exception as e:  # noqa: BLE001 - as above
                server_error, streamer = f"{type(e).__name__}: {e}", None
        if streamer is not None:
            try:
                server_own = streamer.own_timings()
                used["server"] = server_settings
            except Exception as e:  # noqa: BLE001 - as above
                server_error = f"{type(e).__name__}: {e}"
        # The runner's context sized like the session's (n_ctx 2048, n_batch = n_ubatch = 512), so the
        # two loops differ only in who drives them. generate_ms runs from the first sampled token to the
        # last: tokens - 1 decode steps.
        # Here, in the process whose main thread has just decoded (sessions), and in a fresh process
        # (the limit): see scenario.in_fresh_process for why the two differ.
        per_token["cpp_loop_same_process"] = cpp_loop(model, png, n_tokens, repeats)["per_token_s"]
        fresh = in_fresh_process("token_overhead", "cpp_loop_fresh", dict(
            preset=pair.preset.name, seed=pair.seed, png=str(png), n_tokens=n_tokens, repeats=repeats,
            load_kwargs=load_kwargs or {}))
        per_token["cpp_loop"], tokens["cpp_loop"] = fresh["per_token_s"], fresh["tokens"]
        used["ours_cpp_loop"] = settings.ours(model, None, n_ctx=2048, n_batch=512, n_ubatch=512)
    result: dict[str, Any] = {
        "n_tokens": n_tokens, "repeats": repeats, "tokens_generated": tokens,
        "per_token_s": {k: statistics.median(v) if v else None for k, v in per_token.items()},
        "all_per_token_s": per_token, "reasons": reasons, "peer_per_token_s": None, "settings": used,
    }
    if per_token["cpp_loop"] and per_token["native_step"]:
        result["cpp_loop_vs_native_step"] = round(statistics.median(per_token["cpp_loop"]) /
                                                  statistics.median(per_token["native_step"]), 3)
    if peer:
        try:
            out = run_peer(str(PEER_SCRIPTS / "peer_token_overhead.py"),
                           [str(pair.model_path), str(pair.mmproj_path), str(png), PROMPT, str(n_tokens),
                            str(repeats), str(peer_gpu_layers)], python=peer_python)
            result.update(peer_per_token_s=out["per_token_s"], peer_all_per_token_s=out["all_per_token_s"],
                          peer_tokens_generated=out["tokens"])
            used["peer"] = out["settings"]
        except PeerError as e:
            result["peer_error"] = str(e)
    if server_error is not None:
        result["server_error"] = server_error
    elif server is not None:
        result.update(server_per_token_s=statistics.median(server_per_token) if server_per_token else None,
                      server_all_per_token_s=server_per_token, server_tokens_generated=server_tokens,
                      server_own_timings=server_own)
    return result


def run_token_overhead(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.preset
    repeats = max(ctx.repeat, 5)
    r = measure(ctx.pair, n_tokens=p.overhead_tokens, repeats=repeats, peer=ctx.peer,
                peer_python=ctx.peer_py, workdir=ctx.work, load_kwargs=ctx.load_kwargs,
                peer_gpu_layers=ctx.n_gpu_layers, server=ctx.server_factory)
    per = r["per_token_s"]
    reasons = ctx.peer_reasons(r)
    # The limit: generation with no facade Python per token. The C++ loop of llava_kv.batch is that by
    # construction; a bare loop over the native step adds only one binding call per token (~1 us). The
    # cheaper of the two is the best measured estimate of the native cost per token. Every repetition of
    # both is in details (a median hides nothing here: all are listed).
    candidates = {k: per[k] for k in ("cpp_loop", "native_step") if per.get(k) is not None}
    source = min(candidates, key=lambda k: candidates[k]) if candidates else None
    if source is None:
        reasons["limit"] = "neither the C++ loop nor the native step generated tokens"
    ours, limit = ms(per["stream"]), ms(per[source]) if source else None
    # Python's share: the stream against the bare native step, the two interleaved repetition by
    # repetition in one session (the C++ loop runs after them, in another context, so its distance
    # from the stream also holds whatever changed on the machine between the two).
    native = ms(per["native_step"])
    python_ms = None if ours is None or native is None else round(ours - native, 5)
    all_ms = {k: [round(x * 1000, 4) for x in v] for k, v in r["all_per_token_s"].items()}
    server_all = [round(x * 1000, 4) for x in r.get("server_all_per_token_s") or []]
    ours_all = all_ms.get("stream") or []
    server_note = None
    if python_ms is not None and server_all and ours_all:
        server_note = (f"the Python around our stream costs {python_ms:.3f} ms per token over the bare native step; "
                       f"the rest is the decode step itself (repetitions: ours {min(ours_all)}-{max(ours_all)}, "
                       f"llama-server {min(server_all)}-{max(server_all)} ms)")
    return {"token_overhead": entry(
        unit="ms per token", repetitions=repeats, ours=ours, peer=ms(r["peer_per_token_s"]),
        server=ms(r.get("server_per_token_s")), limit=limit, settings=r["settings"],
        limit_means="no Python per token: the cheaper of the C++ generate loop of llava_kv.batch "
                    "(parallel=1) and a bare loop over the native generation step",
        reasons=reasons, digits=5,
        notes={"server": server_note} if server_note else None,
        extra_ratios={"python_overhead_ms_per_token": python_ms},
        details={"what": f"{p.overhead_tokens}-token greedy answer to one image prompt; ours: "
                         "session.generate(stream=True) consumed piece by piece; llama-cpp-python and "
                         "llama-server: streaming chat completion (time between the first and the last chunk)",
                 "limit_source": source, "ms_per_token": {k: ms(v) for k, v in per.items()},
                 "all_ms_per_token": all_ms,
                 "peer_all_ms_per_token": [round(x * 1000, 4) for x in r.get("peer_all_per_token_s") or []],
                 "server_all_ms_per_token": server_all,
                 "cpp_loop_vs_native_step": r.get("cpp_loop_vs_native_step"),
                 "tokens_generated": r["tokens_generated"], "peer_tokens_generated": r.get("peer_tokens_generated"),
                 "notes": r["reasons"]})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    return emit(measure(make_test_model(preset=args.preset), n_tokens=args.tokens, repeats=args.repeats,
                     peer=not args.no_peer), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
