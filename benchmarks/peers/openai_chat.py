"""The scenarios against llama-server (the second peer), driven with the official ``openai`` client
as a user of the server drives it: images as base64 data URIs inside OpenAI chat messages, the
server's own prompt cache (``cache_prompt``, on by default) and, for batches, its ``--parallel`` slots
with continuous batching.

- ``multi_turn``: a chat with one image, turn after turn in one slot; the server reuses the longest
  common prefix of the slot's tokens, image included (its ``timings.cache_n`` says how many).
- ``edits``: the 3-image conversation of scenarios/edits.py; replacing the FIRST image with a never-seen one
  (the server keeps the prefix before it, then must encode the new image and every later one again:
  it has no embedding cache) and the last one (keeps everything before it, encodes one);
  ``EditRounds`` gives its repetitions one at a time, for a scenario that alternates them with its own.
- ``new_conversation``: an image seen before, in a brand-new conversation whose text before the image
  differs (another system message): the server encodes it again, we take it from the embedding cache.
- ``batch``: N images captioned by N concurrent requests into ``--parallel N`` slots.

Image encodes are counted from the server's log: mtmd's helper logs one "encoding image slice..." line
per image chunk it encodes (the server's /metrics has no such counter); ``timings`` of each response
give the prompt tokens it decoded (``prompt_n``) and reused from its cache (``cache_n``).

The ``serve_*`` scenarios (scenarios/serve.py) drive llama-cpp-python's server and ours with the same
calls, through servers shaped like ``LlamaServer``.
"""
from __future__ import annotations

import base64
import concurrent.futures
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness.llama_server import LlamaServer


def data_uri(path: Path | str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _user(uri: str, text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                        {"type": "text", "text": text}]}


class _Caller:
    """Chat calls into one server: seconds, usage, timings and image encodes per call."""

    def __init__(self, srv: LlamaServer) -> None:
        self.srv = srv
        self.client = srv.client

    def __call__(self, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        before = self.srv.image_encodes()
        t0 = time.perf_counter()
        r = self.client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                seed=0, extra_body={"repeat_penalty": 1.0, "cache_prompt": True})
        seconds = time.perf_counter() - t0
        timings = dict(getattr(r, "timings", None) or {})
        return {"seconds": seconds, "text": r.choices[0].message.content or "",
                "prompt_tokens": r.usage.prompt_tokens if r.usage else None,
                "completion_tokens": r.usage.completion_tokens if r.usage else None,
                "prompt_decoded": timings.get("prompt_n"), "prompt_reused": timings.get("cache_n"),
                "encodes": self.srv.image_encodes() - before}


def multi_turn(srv: LlamaServer, png: Path, *, system: str, turns: int, max_tokens: int,
               repeats: int) -> dict[str, Any]:
    call = _Caller(srv)
    uri = data_uri(png)
    runs, details = [], []
    for _ in range(repeats):
        # A text-only request first replaces the slot's tokens, so that turn 1 (the control row) starts from
        # nothing, as on the other sides; with --cache-ram 0 no saved prompt brings the system message back.
        call([{"role": "user", "content": "Hello."}], 1)
        messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                          _user(uri, "What is in this picture?")]
        times, per_turn = [], []
        for turn in range(turns):
            r = call(messages, max_tokens)
            times.append(r["seconds"])
            per_turn.append({k: r[k] for k in ("prompt_tokens", "prompt_decoded", "prompt_reused", "encodes",
                                                "completion_tokens")})
            messages += [{"role": "assistant", "content": r["text"]},
                         {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]
        runs.append(times)
        details.append(per_turn)
    return {"runs": runs, "calls": details[0], "encodes_per_turn": [d["encodes"] for d in details[0]]}


class EditRounds:
    """llama-server's side of scenarios/edits.py, one repetition at a time, so a scenario can alternate
    them with its own: ``spec`` is edits.write_peer_spec's (system, 3 blocks of [image, text]);
    ``fresh_images()`` returns a never-seen PNG each call. Creating it decodes the conversation once
    (a warm-up: encodes A, B, C); ``result()`` is what ``edits()`` returns."""

    EDITS = {"replace_first_image": 0, "replace_last_image": 2}  # the edit's key, the replaced block

    def __init__(self, srv: LlamaServer, spec: dict[str, Any], fresh_images: Callable[[], Path]) -> None:
        self.call = _Caller(srv)
        self.spec = spec
        self.fresh_images = fresh_images
        self.uris: dict[str, str] = {}
        self.blocks = [tuple(b) for b in spec["blocks"]]
        self.out: dict[str, Any] = {"replace_first_image": [], "replace_last_image": [], "new_conversation": [],
                                    "calls": {}, "encodes_per_repetition": {"new_conversation": []}}
        self.call(self.messages(self.blocks), 1)

    def uri(self, path: str) -> str:
        if path not in self.uris:
            self.uris[path] = data_uri(path)
        return self.uris[path]

    def messages(self, blocks: list[tuple[str, str]], system: str | None = None) -> list[dict[str, Any]]:
        return [{"role": "system", "content": system or self.spec["system"]}] + [_user(self.uri(i), t)
                                                                               for i, t in blocks]

    def replace(self, key: str) -> float:
        """One repetition of the edit ``key`` (one of ``EDITS``): the conversation before the edit back in
        the slot (untimed), then the conversation with that image replaced by a never-seen one (timed);
        returns its seconds."""
        self.call(self.messages(self.blocks), 1)
        edited = list(self.blocks)
        index = self.EDITS[key]
        edited[index] = (str(self.fresh_images()), self.blocks[index][1])
        r = self.call(self.messages(edited), 1)
        self.out[key].append(r["seconds"])
        self.out["calls"][key] = {k: v for k, v in r.items() if k != "text"}
        return float(r["seconds"])

    def new_conversation(self, system: str, text: str) -> None:
        """A brand-new conversation showing image A (seen above) after ``system``: encodes counted."""
        r = self.call([{"role": "system", "content": system}, _user(self.uri(self.blocks[0][0]), text)], 1)
        self.out["new_conversation"].append(r["seconds"])
        self.out["encodes_per_repetition"]["new_conversation"].append(r["encodes"])
        self.out["calls"]["new_conversation"] = {k: v for k, v in r.items() if k != "text"}

    def result(self) -> dict[str, Any]:
        return {**self.out, "encodes": {k: v["encodes"] for k, v in self.out["calls"].items()}}


def edits(srv: LlamaServer, spec: dict[str, Any], fresh_images: Callable[[], Path], *,
          critic_system: Callable[[int], str], critic_text: str, repeats: int) -> dict[str, Any]:
    """``EditRounds``' repetitions back to back: each edit of ``EditRounds.EDITS``, then a new
    conversation under ``critic_system(repetition)``, ``repeats`` times."""
    rounds = EditRounds(srv, spec, fresh_images)
    for repetition in range(repeats):
        for key in rounds.EDITS:
            rounds.replace(key)
        rounds.new_conversation(critic_system(repetition), critic_text)
    return rounds.result()


def batch(srv: LlamaServer, image_sets: list[list[Path]], warm: list[Path], *, system: str, prompt: str,
          max_tokens: int, parallel: int) -> dict[str, Any]:
    """Caption every image of each set with ``parallel`` concurrent requests; one wall time per set
    (each set is distinct images, so nothing comes from the server's prompt cache)."""
    call = _Caller(srv)

    def caption(path: Path) -> dict[str, Any]:
        return call([{"role": "system", "content": system}, _user(data_uri(path), prompt)], max_tokens)

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(caption, warm))
        walls, tokens = [], []
        for images in image_sets:
            t0 = time.perf_counter()
            results = list(pool.map(caption, images))
            walls.append(time.perf_counter() - t0)
            tokens = [r["completion_tokens"] for r in results]
    n = len(image_sets[0])
    return {"wall_s": walls, "images_per_s": n / statistics.median(walls), "tokens_per_image": statistics.mean(tokens),
            "metrics": srv.metrics()}


class TokenStream:
    """Seconds per streamed chunk after the first (as peer_token_overhead.py), one call at a time, so
    a scenario can alternate them with its own repetitions; ``own_timings()``: the server's own
    per-token figure from ``timings`` of a non-streamed call, for comparison."""

    def __init__(self, srv: LlamaServer, png: Path, *, system: str, prompt: str, n_tokens: int) -> None:
        self.client = srv.client
        self.messages = [{"role": "system", "content": system}, _user(data_uri(png), prompt)]
        self.n_tokens = n_tokens

    def per_token(self) -> tuple[float | None, int]:
        stamps = []
        for chunk in self.client.chat.completions.create(model="m", messages=self.messages,
                                                          max_tokens=self.n_tokens, temperature=0.0, seed=0,
                                                          stream=True, extra_body={"repeat_penalty": 1.0}):
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
        if len(stamps) < 2:
            return None, len(stamps)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps)

    def own_timings(self) -> dict[str, Any]:
        r = self.client.chat.completions.create(model="m", messages=self.messages, max_tokens=self.n_tokens,
                                                temperature=0.0, seed=0, extra_body={"repeat_penalty": 1.0})
        return dict(getattr(r, "timings", None) or {})
