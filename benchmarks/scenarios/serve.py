"""The ``serve`` scenarios: the same chat workloads over HTTP against ``llava-kv serve`` and llama.cpp's
``llama-server``, both started on 127.0.0.1 with the same model pair, threads, flash attention, KV
cells per slot, batch size and chat template (vicuna), both driven by the official ``openai`` client.

- ``serve_multi_turn``: a chat with one image, turns 2..N (each server reuses its slot's prefix).
- ``serve_replace_first_image``: the 3-image conversation of edits.py with its FIRST image
  replaced by a never-seen one (llama-server re-encodes the two later images; we take them from
  the embedding cache).
- ``serve_new_conversation``: a seen image in a brand-new conversation (encodes counted).
- ``serve_concurrency``: 16 conversations of 2 turns from 16 client threads into 4 slots
  (requests/s, p50/p95 latency of a request).
- ``serve_http_overhead``: the same request through HTTP and as the in-process call
  (``Session.chat``) on a conversation already in the slot: the difference is what the HTTP layer
  (JSON, base64, the event loop, the engine thread) costs per request. Headline: ``max_tokens: 0``
  (no decode on either side); a one-token request beside it.

The workloads are peers/openai_chat.py's: ``OursServer`` gives our server the interface they drive
llama-server through (a client, image encodes read from /metrics). ``run_serve(ctx)`` makes the
suite's ``serve_*`` entries of them: every side's server is up at once (one slot for the first four
workloads, then four slots for ``serve_concurrency``), and the sides alternate, one repetition each
per round after a ``settle()``, so a change in the machine's speed hits every side.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import llava_kv as lk
from llava_kv.server.process import ServerProcess

from benchmarks.harness.context import Context
from benchmarks.harness.llama_cpp_python import SYSTEM_MESSAGE, PeerError, PeerServer, server_extra, threads
from benchmarks.harness.scenario import entry, ms, settle, skipped
from benchmarks.peers import openai_chat
from benchmarks.scenarios.edits import CRITIC_TEXT, critic_system, fewest, never_seen_pngs, write_peer_spec

SERVE_SCENARIOS = ("serve_multi_turn", "serve_replace_first_image", "serve_new_conversation", "serve_concurrency",
                   "serve_http_overhead", "serve_restore")

CONCURRENT_CONVERSATIONS = 16
CONCURRENT_TURNS = 2
SLOTS = 4


class OursServer:
    """``llava-kv serve`` with the llama-server peer's settings, shaped like llama_server.LlamaServer."""

    def __init__(self, model: Path, mmproj: Path, *, threads: int, parallel: int = 1, n_ctx: int = 4096,
                 n_batch: int = 512, extra: Optional[list[str]] = None) -> None:
        self.settings = {"threads": threads, "parallel": parallel, "n_ctx_per_slot": n_ctx, "n_batch": n_batch,
                         "n_ubatch": n_batch, "flash_attn": "on", "kv_type": "f16", "cont_batching": True,
                         "chat_template": "vicuna", "transport": "HTTP/1.1, uvicorn + Starlette"}
        self.proc = ServerProcess(model, mmproj, args=[
            "--slots", str(parallel), "--n-ctx", str(n_ctx), "--n-batch", str(n_batch), "--threads", str(threads),
            "--flash-attn", "on", "--chat-template", "vicuna", "--alias", "m", "--queue-size", "256"] + (extra or []))

    def __enter__(self) -> "OursServer":
        self.proc.start()
        self.client = self.proc.client(timeout=600)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.stop()

    def metrics(self) -> dict[str, float]:
        return self.proc.metrics()

    def image_encodes(self) -> int:
        return int(self.metrics()["llava_kv_images_encoded_total"])

    def settings_used(self) -> dict[str, Any]:
        return dict(self.settings)


def conversations(pngs: list[Path], system: str) -> list[list[dict[str, Any]]]:
    """The concurrency workload's first turns: one conversation per image."""
    return [[{"role": "system", "content": system}, openai_chat._user(openai_chat.data_uri(p), "Describe it.")]
            for p in pngs]


def next_turn(reply: str, turn: int) -> list[dict[str, Any]]:
    """What a concurrency conversation adds after the reply to its turn ``turn`` (from 0)."""
    return [{"role": "assistant", "content": reply}, {"role": "user", "content": f"And what about detail {turn + 1}?"}]


def _latencies(call: Callable[[list[dict[str, Any]], int], dict[str, Any]], convs: list[list[dict[str, Any]]],
               max_tokens: int) -> dict[str, Any]:
    """CONCURRENT_TURNS turns of every conversation, one client thread per conversation."""

    def converse(messages: list[dict[str, Any]]) -> list[float]:
        history = list(messages)
        seconds = []
        for turn in range(CONCURRENT_TURNS):
            r = call(history, max_tokens)
            seconds.append(r["seconds"])
            history += next_turn(r["text"], turn)
        return seconds

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(convs)) as ex:
        per_conv = list(ex.map(converse, convs))
    wall = time.perf_counter() - t0
    flat = sorted(s for conv in per_conv for s in conv)
    return {"wall_s": wall, "requests": len(flat), "requests_per_s": len(flat) / wall, **_percentiles(flat),
            "all_s": flat}


def _percentiles(flat: list[float]) -> dict[str, float]:
    """p50 and p95 of the sorted latencies ``flat``."""
    return {"p50_s": statistics.median(flat), "p95_s": flat[min(len(flat) - 1, int(round(0.95 * (len(flat) - 1))))]}


def concurrency(srv: Any, pngs: list[Path], *, system: str, max_tokens: int) -> dict[str, Any]:
    call = openai_chat._Caller(srv)
    convs = conversations(pngs, system)
    call(convs[0], 1)  # warm-up (its image is encoded once on each side)
    before = srv.metrics() if isinstance(srv, OursServer) else {}
    out = _latencies(call, convs, max_tokens)
    if isinstance(srv, OursServer):
        m = srv.metrics()
        # Where the engine thread's time went in this round (the rest of the wall time it waited).
        for part in ("prefill", "generation"):
            key = f"llava_kv_{part}_seconds_total"
            out[f"engine_{part}_s"] = m[key] - before[key]
        out["mean_sequences_per_step"] = (m["llava_kv_batched_step_sequences_total"] /
                                          max(1.0, m["llava_kv_batched_steps_total"]))
        out["restores"] = sum(v for k, v in m.items() if k.startswith("llava_kv_restores_total"))
        out["evictions"] = sum(v for k, v in m.items() if k.startswith("llava_kv_evictions_total"))
    return out


class _KeepAlive:
    """POSTs on one persistent HTTP/1.1 connection, as the openai client (httpx's pool) sends them."""

    def __init__(self, base: str) -> None:
        host, port = base.split("//", 1)[1].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)

    def post(self, path: str, raw: bytes) -> bytes:
        self.conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path} answered {r.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def http_overhead(srv: OursServer, model: Any, png: Path, *, system: str, repeats: int) -> dict[str, Any]:
    """What HTTP adds to a request over the in-process call, on a conversation already in its slot.

    The headline figure is a request with ``max_tokens: 0`` (nothing decoded or generated on either
    side: the body's JSON, base64 and image, the match against the slot, the reply), so that what is
    left is the HTTP layer's cost alone. A one-token request is measured too (same conversation): its
    decode (the last prompt chunk again, then one token) varies by tens of ms between calls, far more
    than the HTTP layer costs, so its difference is reported beside it, with its spread, not as the
    figure."""
    messages = [{"role": "system", "content": system},
                openai_chat._user(openai_chat.data_uri(png), "What is in this picture?")]
    call = openai_chat._Caller(srv)
    out: dict[str, Any] = {}
    keep = _KeepAlive(srv.proc.base)
    try:
        with model.session(n_ctx=4096) as s:
            for max_tokens, n in ((0, repeats * 20), (1, repeats * 5)):
                raw = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens,
                                  "temperature": 0.0}).encode()
                call(messages, max_tokens)
                keep.post("/v1/chat/completions", raw)
                s.chat(messages, max_tokens=max_tokens, chat_template="vicuna")
                http, fresh_conn, client, local = [], [], [], []
                for _ in range(n):  # alternated, so that a change in the machine's load hits every path
                    t0 = time.perf_counter()
                    keep.post("/v1/chat/completions", raw)
                    http.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    status, _, _ = srv.proc.post("/v1/chat/completions", raw)
                    fresh_conn.append(time.perf_counter() - t0)
                    assert status == 200, status
                    client.append(call(messages, max_tokens)["seconds"])
                    t0 = time.perf_counter()
                    s.chat(messages, max_tokens=max_tokens, chat_template="vicuna")
                    local.append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in
                       (("http", http), ("fresh", fresh_conn), ("client", client), ("local", local))}
                q = statistics.quantiles(local, n=4) if len(local) >= 4 else [min(local), max(local)]
                out[f"max_tokens_{max_tokens}"] = {
                    "requests": n, "http_s": med["http"], "new_connection_s": med["fresh"],
                    "openai_client_s": med["client"], "in_process_s": med["local"],
                    "overhead_ms": (med["http"] - med["local"]) * 1000,
                    "overhead_new_connection_ms": (med["fresh"] - med["local"]) * 1000,
                    "overhead_with_openai_client_ms": (med["client"] - med["local"]) * 1000,
                    "in_process_iqr_ms": (q[-1] - q[0]) * 1000,
                    "all_http_s": http, "all_new_connection_s": fresh_conn, "all_openai_client_s": client,
                    "all_in_process_s": local}
    finally:
        keep.close()
    zero = out["max_tokens_0"]
    return {"overhead_ms": zero["overhead_ms"], "overhead_new_connection_ms": zero["overhead_new_connection_ms"],
            "overhead_with_openai_client_ms": zero["overhead_with_openai_client_ms"],
            "one_token_overhead_ms": out["max_tokens_1"]["overhead_ms"],
            "one_token_in_process_iqr_ms": out["max_tokens_1"]["in_process_iqr_ms"],
            "body_bytes": len(json.dumps({"messages": messages}).encode()), **out}


def restore_vs_prefill(srv: OursServer, pngs: list[Path], *, system: str, turns: int, max_tokens: int,
                       repeats: int) -> dict[str, Any]:
    """One slot: conversation A (``turns`` turns), then B takes the slot (A is saved to host memory),
    then A's next turn (A restored) against the same request under another system message (nothing
    to restore or reuse: every token prefilled, the images from the embedding cache on both)."""
    call = openai_chat._Caller(srv)

    def conversation(sys_text: str) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = [{"role": "system", "content": sys_text},
                                         openai_chat._user(openai_chat.data_uri(pngs[0]), "Describe it.")]
        for turn in range(turns):
            history += [{"role": "assistant", "content": f"Answer {turn}."},
                        {"role": "user", "content": f"Tell me more about part {turn + 1}."}]
        return history

    other = [{"role": "system", "content": "Another conversation."},
             openai_chat._user(openai_chat.data_uri(pngs[1]), "Describe it.")]
    restore, prefill, calls = [], [], {}
    for k in range(repeats):
        a = conversation(system)
        call(a[:-2], 1)  # A is in the slot
        call(other, 1)  # B takes it: A goes to host memory
        before = srv.metrics()
        r = call(a, max_tokens)  # A comes back: restored
        after = srv.metrics()
        restore.append(r["seconds"])
        calls["restore"] = {**{k2: v for k2, v in r.items() if k2 != "text"},
                            "restores": sum(after.get(n, 0) - before.get(n, 0) for n in after
                                            if n.startswith("llava_kv_restores_total"))}
        call(other, 1)
        r = call(conversation(f"{system} Variant {k}."), max_tokens)  # the same length, nothing to reuse
        prefill.append(r["seconds"])
        calls["prefill"] = {k2: v for k2, v in r.items() if k2 != "text"}
    return {"restore_s": statistics.median(restore), "prefill_s": statistics.median(prefill),
            "all_restore_s": restore, "all_prefill_s": prefill, "calls": calls}


def _alternate(running: dict[str, Any], sides: dict[str, dict[str, Any]], name: str,
               turn: Callable[[str, Any], None]) -> None:
    """One round: ``turn(side, server)`` for every running side in turn, each after a ``settle()``. A
    peer that fails leaves the rounds (its error goes in its results); our side's failure is raised."""
    for side, srv in list(running.items()):
        settle()
        try:
            turn(side, srv)
        except Exception as e:  # ServerError, OSError or an openai.APIError
            if side == "ours":
                raise
            sides[side][f"{name}_error"] = f"{type(e).__name__}: {e}"
            del running[side]


def _single_rounds(ctx: Context, running: dict[str, Any], sides: dict[str, dict[str, Any]], wanted: list[str],
                   pngs: Callable[[], Path], spec: dict[str, Any]) -> None:
    """The one-slot workloads, every side's servers up at once, alternating by repetition: a multi-turn
    chat about a never-seen image (the same image on every side in a round), then the edit and the new
    conversation of ``openai_chat.EditRounds``; our restore measure after (no other side has one)."""
    p = ctx.preset
    if "serve_multi_turn" in wanted:
        for _ in range(ctx.repeat):
            png = pngs()

            def chat(side: str, srv: Any) -> None:
                r = openai_chat.multi_turn(srv, png, system=SYSTEM_MESSAGE, turns=p.turns,
                                           max_tokens=p.answer_tokens, repeats=1)
                mt = sides[side].setdefault("multi_turn", {**r, "runs": []})
                mt["runs"] += r["runs"]
            _alternate(running, sides, "single", chat)
    if any(k in wanted for k in ("serve_replace_first_image", "serve_new_conversation")):
        rounds: dict[str, openai_chat.EditRounds] = {}
        for repetition in range(ctx.repeat):
            def edit(side: str, srv: Any) -> None:
                if side not in rounds:
                    rounds[side] = openai_chat.EditRounds(srv, spec, pngs)  # its warm-up, once
                rounds[side].replace("replace_first_image")
                rounds[side].new_conversation(critic_system(repetition), CRITIC_TEXT)
            _alternate(running, sides, "single", edit)
        for side, r in rounds.items():
            if side in running:
                sides[side]["edits"] = r.result()
    if "ours" in running and "serve_restore" in wanted:
        sides["ours"]["restore"] = restore_vs_prefill(running["ours"], [pngs(), pngs()], system=SYSTEM_MESSAGE,
                                                      turns=p.turns, max_tokens=p.answer_tokens, repeats=ctx.repeat)


def _concurrency_rounds(ctx: Context, running: dict[str, Any], sides: dict[str, dict[str, Any]],
                        pngs: Callable[[], Path]) -> None:
    """``concurrency`` in ``ctx.repeat`` rounds alternating between the sides, after one warm-up round
    each; every round sends the same never-seen images to every side. Per side: the median round's
    requests/s, latency percentiles over every round's requests, and each round."""
    def conversations() -> list[Path]:
        return [pngs() for _ in range(CONCURRENT_CONVERSATIONS)]

    def one_round(results: dict[str, list[dict[str, Any]]]) -> None:
        images = conversations()

        def turn(side: str, srv: Any) -> None:
            results.setdefault(side, []).append(concurrency(srv, images, system=SYSTEM_MESSAGE,
                                                            max_tokens=ctx.preset.answer_tokens))
        _alternate(running, sides, "pool", turn)

    one_round({})  # warm-up
    rounds: dict[str, list[dict[str, Any]]] = {}
    for _ in range(ctx.repeat):
        one_round(rounds)
    for side, outs in rounds.items():
        if side not in running:
            continue
        flat = sorted(x for o in outs for x in o["all_s"])
        rps = [o["requests_per_s"] for o in outs]
        sides[side]["concurrency"] = {
            **{k: v for k, v in outs[-1].items() if k not in ("all_s", "wall_s", "requests_per_s", "p50_s", "p95_s")},
            "requests_per_s": statistics.median(rps), "all_requests_per_s": rps, "rounds": len(outs),
            **_percentiles(flat), "all_wall_s": [o["wall_s"] for o in outs],
            **{f"all_{k}": [o[k] for o in outs] for k in ("engine_prefill_s", "engine_generation_s") if k in outs[0]}}


def run_serve(ctx: Context) -> dict[str, dict[str, Any]]:
    """The chat workloads over HTTP: ``llava-kv serve`` vs llama-cpp-python's server (the peer) and
    llama-server (the workloads above)."""
    p = ctx.preset
    (ctx.work / "serve").mkdir(parents=True, exist_ok=True)
    pngs = never_seen_pngs(ctx.pair, ctx.work / "serve")
    spec = write_peer_spec(ctx.pair, filler=0, repeats=ctx.repeat, folder=ctx.work / "serve-edit",
                           n_ctx=4096)
    wanted = [k for k in SERVE_SCENARIOS if k in p.scenarios]
    sides: dict[str, dict[str, Any]] = {"ours": {}, "peer": {}, "server": {}}
    peer_reason = ctx.peer_reason
    if ctx.peer_py is not None:
        try:
            server_extra(ctx.peer_py, build=not ctx.args.no_peer_build)
        except PeerError as e:
            peer_reason = f"llama-cpp-python's server unavailable: {e}"

    def start(side: str, n_slots: int) -> Any:
        if side == "ours":
            return OursServer(ctx.pair.model_path, ctx.pair.mmproj_path, threads=threads(), parallel=n_slots,
                              n_ctx=4096)
        if side == "peer":  # one Llama, one request at a time: the same server for both
            assert ctx.peer_py is not None
            return PeerServer(ctx.peer_py, ctx.pair.model_path, ctx.pair.mmproj_path, threads=threads(),
                              n_ctx=4096, n_gpu_layers=ctx.n_gpu_layers)
        return ctx.server(parallel=n_slots, n_ctx=4096, cache_ram_mib=0)

    for name, n_slots in (("single", 1), ("pool", SLOTS)):
        with contextlib.ExitStack() as stack:
            running: dict[str, Any] = {}
            for side in ("ours", "peer", "server"):
                needs = (("serve_multi_turn", "serve_replace_first_image", "serve_new_conversation", "serve_restore")
                         if name == "single" else
                         ("serve_concurrency", "serve_http_overhead") if side == "ours" else ("serve_concurrency",))
                if ((side == "server" and ctx.server_bin is None) or (side == "peer" and peer_reason)
                        or not any(k in wanted for k in needs)):
                    continue
                try:
                    running[side] = stack.enter_context(start(side, n_slots))
                    sides[side].setdefault("settings", running[side].settings_used())
                except Exception as e:  # one side failing must not lose the others; the reason goes in the JSON
                    sides[side][f"{name}_error"] = f"{type(e).__name__}: {e}"
                    if side == "ours":
                        raise
            if name == "single":
                _single_rounds(ctx, running, sides, wanted, pngs, spec)
            elif "serve_concurrency" in wanted:
                _concurrency_rounds(ctx, running, sides, pngs)
            if name == "pool" and "ours" in running and "serve_http_overhead" in wanted:
                with lk.Model.load(ctx.pair.model_path, ctx.pair.mmproj_path, **ctx.load_kwargs) as m:
                    sides["ours"]["http_overhead"] = http_overhead(running["ours"], m, pngs(), system=SYSTEM_MESSAGE,
                                                                   repeats=ctx.repeat)
    ours = sides["ours"]

    def each(value: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """``value`` of every side's results, by side."""
        return {name: value(side) for name, side in sides.items()}

    reasons = {}
    for name, unavailable, who in (("peer", peer_reason, "llama-cpp-python server"),
                                   ("server", ctx.server_reason, "llama-server")):
        errors = "; ".join(v for k, v in sides[name].items() if k.endswith("_error"))
        if unavailable or errors:
            reasons[name] = unavailable or f"{who} run failed: " + errors[:300]
    used = each(lambda side: side.get("settings"))

    def med(side: dict[str, Any], *path: str) -> float | None:
        x: Any = side
        for key in path:
            x = (x or {}).get(key)
        return statistics.median(x) if x else None

    def later_turns(side: dict[str, Any]) -> float | None:
        runs = (side.get("multi_turn") or {}).get("runs")
        return statistics.median(statistics.median(r[1:]) for r in runs) if runs else None

    out: dict[str, dict[str, Any]] = {}
    out["serve_multi_turn"] = entry(
        unit="s per turn", repetitions=ctx.repeat, **each(later_turns),
        limit=None, settings=used, reasons={**reasons, "limit": "no in-process floor here: see multi_turn"}, digits=4,
        limit_means="none over HTTP (multi_turn has the in-process floor)",
        details={"what": f"one-image chat over HTTP, turns 2..{p.turns}, {p.answer_tokens}-token greedy answers",
                 **each(lambda side: side.get("multi_turn"))})
    edits = each(lambda side: side.get("edits") or {})
    out["serve_replace_first_image"] = entry(
        unit="ms", repetitions=ctx.repeat, **{name: ms(med(e, "replace_first_image")) for name, e in edits.items()},
        limit=None, settings=used,
        reasons={**reasons, "limit": "see replace_first_image for the in-process floor"}, digits=3,
        limit_means="none over HTTP (replace_first_image has the in-process floor)",
        details={"what": "the 3-image conversation with its first image replaced by a never-seen one, over HTTP "
                         "(max_tokens=1)",
                 "encodes": {name: (e.get("encodes") or {}).get("replace_first_image") for name, e in edits.items()},
                 **{f"{name}_calls": e.get("calls") for name, e in edits.items()}})
    out["serve_new_conversation"] = entry(
        unit="image encodes", repetitions=ctx.repeat,
        **{name: fewest(e, "new_conversation") for name, e in edits.items()}, limit=0, settings=used, reasons=reasons, digits=0,
        limit_means="0: the image's embedding was computed before",
        details={"what": "an image seen before in a brand-new conversation (other system message), over HTTP",
                 "ms": {name: ms(med(e, "new_conversation")) for name, e in edits.items()}})
    conc = each(lambda side: side.get("concurrency") or {})
    out["serve_concurrency"] = entry(
        unit="requests/s", better="higher", repetitions=ctx.repeat,
        **{name: c.get("requests_per_s") for name, c in conc.items()}, limit=None, settings=used,
        reasons={**reasons, "limit": "none: a throughput figure"}, digits=4,
        limit_means="none: a throughput figure",
        details={"what": f"{CONCURRENT_CONVERSATIONS} one-image conversations x "
                         f"{CONCURRENT_TURNS} turns from as many client threads into "
                         f"{SLOTS} slots, {p.answer_tokens}-token answers; the median of {ctx.repeat} rounds "
                         "alternating between the sides (each round new images, the same on every side), after "
                         "a warm-up round each",
                 "p50_s": {name: c.get("p50_s") for name, c in conc.items()},
                 "p95_s": {name: c.get("p95_s") for name, c in conc.items()}, **conc})
    ho = ours.get("http_overhead") or {}
    out["serve_http_overhead"] = entry(
        unit="ms per request", repetitions=ctx.repeat * 20, ours=ho.get("overhead_ms"), peer=None, server=None,
        limit=5.0, settings=used, limit_means="the issue's target: under 5 ms over the in-process call",
        reasons={**reasons, "peer": "not applicable: measures our HTTP layer against our in-process call",
                 "server": "not applicable: llama-server has no in-process call to compare with"},
        digits=3, details={"what": "a request with max_tokens 0 on a conversation already in its slot (nothing "
                                   "decoded on either side): an HTTP POST on a kept-alive connection (the JSON body "
                                   "prepared) minus Session.chat in-process (same messages, image as a data: URI on "
                                   "both); on a new connection per request in overhead_new_connection_ms, with the "
                                   "openai client (its request building and response models) in "
                                   "overhead_with_openai_client_ms; the same for a one-token request in "
                                   "one_token_overhead_ms (its decode's spread, one_token_in_process_iqr_ms, is "
                                   "larger than the HTTP layer's cost)", **ho})
    rs = ours.get("restore") or {}
    out["serve_restore"] = entry(
        unit="ms", repetitions=ctx.repeat, ours=ms(rs.get("restore_s")), peer=None, server=None,
        limit=ms(rs.get("prefill_s")), settings=used,
        limit_means="the same request prefilled from nothing (every token decoded, images from the embedding "
                    "cache): a restore must beat it",
        reasons={**reasons, "peer": "not applicable: llama-cpp-python's server saves no conversation out of its "
                                    "context (every request evaluates the whole prompt)",
                 "server": "not measured: llama-server runs these scenarios with --cache-ram 0 (its "
                           "host-memory prompt cache off)"},
        digits=3, details={"what": f"one slot; a {p.turns}-turn conversation moved out by another, then its next "
                                   "turn (restored from host memory) vs the same turn under another system message",
                           **rs})
    return {k: v for k, v in out.items() if k in wanted} | {
        k: skipped(unit="", reason="skipped: not in this preset's scenarios", limit_means="")
        for k in SERVE_SCENARIOS if k not in wanted}
