"""The ``serve`` scenarios: the same chat workloads over HTTP against ``llava-kv serve`` and llama.cpp's
``llama-server``, both started on 127.0.0.1 with the same model pair, threads, flash attention, KV
cells per slot, batch size and chat template (vicuna), both driven by the official ``openai`` client.

- ``serve_multi_turn``: a chat with one image, turns 2..N (each server reuses its slot's prefix).
- ``serve_replace_first_image``: the 3-image conversation of edit_bench.py with its FIRST image
  replaced by a never-seen one (llama-server re-encodes the two later images; we take them from
  the embedding cache).
- ``serve_new_conversation``: a seen image in a brand-new conversation (encodes counted).
- ``serve_concurrency``: 16 conversations of 2 turns from 16 client threads into 4 slots
  (requests/s, p50/p95 latency of a request).
- ``serve_http_overhead``: the same one-token request through HTTP and as the in-process call
  (``Session.chat``) on a conversation already in the slot: the difference is what the HTTP layer
  (JSON, base64, the event loop, the engine thread) costs per request.

The workloads are server_bench.py's: ``OursServer`` gives our server the interface they drive
llama-server through (a client, image encodes read from /metrics).
"""
from __future__ import annotations

import concurrent.futures
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from llava_kv.server.process import ServerProcess

from benchmarks import server_bench

CONCURRENT_CONVERSATIONS = 16
CONCURRENT_TURNS = 2
SLOTS = 4


class OursServer:
    """``llava-kv serve`` with the llama-server peer's settings, shaped like server_peer.LlamaServer."""

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


def _latencies(call: Callable[[list[dict[str, Any]], int], dict[str, Any]], convs: list[list[dict[str, Any]]],
               max_tokens: int) -> dict[str, Any]:
    """CONCURRENT_TURNS turns of every conversation, one client thread per conversation."""

    def converse(messages: list[dict[str, Any]]) -> list[float]:
        history = list(messages)
        seconds = []
        for turn in range(CONCURRENT_TURNS):
            r = call(history, max_tokens)
            seconds.append(r["seconds"])
            history += [{"role": "assistant", "content": r["text"]},
                        {"role": "user", "content": f"And what about detail {turn + 1}?"}]
        return seconds

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(convs)) as ex:
        per_conv = list(ex.map(converse, convs))
    wall = time.perf_counter() - t0
    flat = sorted(s for conv in per_conv for s in conv)
    return {"wall_s": wall, "requests": len(flat), "requests_per_s": len(flat) / wall,
            "p50_s": statistics.median(flat), "p95_s": flat[min(len(flat) - 1, int(round(0.95 * (len(flat) - 1))))],
            "all_s": flat}


def concurrency(srv: Any, pngs: list[Path], *, system: str, max_tokens: int) -> dict[str, Any]:
    call = server_bench._Caller(srv)
    convs = [[{"role": "system", "content": system}, server_bench._user(server_bench.data_uri(p), "Describe it.")]
             for p in pngs]
    call(convs[0], 1)  # warm-up (its image is encoded once on each side)
    out = _latencies(call, convs, max_tokens)
    if isinstance(srv, OursServer):
        m = srv.metrics()
        out["mean_sequences_per_step"] = (m["llava_kv_batched_step_sequences_total"] /
                                          max(1.0, m["llava_kv_batched_steps_total"]))
        out["restores"] = sum(v for k, v in m.items() if k.startswith("llava_kv_restores_total"))
        out["evictions"] = sum(v for k, v in m.items() if k.startswith("llava_kv_evictions_total"))
    return out


def http_overhead(srv: OursServer, model: Any, png: Path, *, system: str, repeats: int) -> dict[str, Any]:
    """One-token requests on a conversation already in its slot: HTTP vs the in-process call."""
    messages = [{"role": "system", "content": system},
                server_bench._user(server_bench.data_uri(png), "What is in this picture?")]
    call = server_bench._Caller(srv)
    call(messages, 1)
    body = {"model": "m", "messages": messages, "max_tokens": 1, "temperature": 0.0}
    raw = json.dumps(body).encode()
    http, client, local = [], [], []
    with model.session(n_ctx=4096) as s:
        s.chat(messages, max_tokens=1, chat_template="vicuna")
        for _ in range(repeats * 5):  # alternated, so that a change in the machine's load hits all three
            t0 = time.perf_counter()
            status, _, _ = srv.proc.post("/v1/chat/completions", raw)
            http.append(time.perf_counter() - t0)
            assert status == 200, status
            client.append(call(messages, 1)["seconds"])
            t0 = time.perf_counter()
            s.chat(messages, max_tokens=1, chat_template="vicuna")
            local.append(time.perf_counter() - t0)
    return {"http_s": statistics.median(http), "openai_client_s": statistics.median(client),
            "in_process_s": statistics.median(local),
            "overhead_ms": (statistics.median(http) - statistics.median(local)) * 1000,
            "overhead_with_openai_client_ms": (statistics.median(client) - statistics.median(local)) * 1000,
            "body_bytes": len(raw), "all_http_s": http, "all_openai_client_s": client, "all_in_process_s": local}


def restore_vs_prefill(srv: OursServer, pngs: list[Path], *, system: str, turns: int, max_tokens: int,
                       repeats: int) -> dict[str, Any]:
    """One slot: conversation A (``turns`` turns), then B takes the slot (A is saved to host memory),
    then A's next turn (A restored) against the same request under another system message (nothing
    to restore or reuse: every token prefilled, the images from the embedding cache on both)."""
    call = server_bench._Caller(srv)

    def conversation(sys_text: str) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = [{"role": "system", "content": sys_text},
                                         server_bench._user(server_bench.data_uri(pngs[0]), "Describe it.")]
        for turn in range(turns):
            history += [{"role": "assistant", "content": f"Answer {turn}."},
                        {"role": "user", "content": f"Tell me more about part {turn + 1}."}]
        return history

    other = [{"role": "system", "content": "Another conversation."},
             server_bench._user(server_bench.data_uri(pngs[1]), "Describe it.")]
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
