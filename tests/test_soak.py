"""Soak: eight threads, each with its own sessions on one model, doing random edits, generation,
closes and reopens while another thread cancels at random, for a bounded time. Every call ends in
success or a clean error that left the session as it was; at the end each thread's session equals,
to the bit, a single-threaded replay of the calls that succeeded."""
from __future__ import annotations

import random
import threading
import time
from typing import Any

import numpy as np
import pytest

import llava_kv as lk
from llava_kv import testing
from llava_kv.testing import random_image

from conftest import session_state

THREADS = 8
SECONDS = 12.0
MAX_OPS = 400
N_CTX = 1024
POOL = [random_image(i) for i in range(6)]
WORDS = ["red", " cat", " and", " a dog", "\nUSER:", " what", " is", " this?", " ASSISTANT:"]


def _apply(s: lk.Session, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "text":
        s.append_text(op[1])
    elif kind == "image":
        s.append_image(POOL[op[1]])
    elif kind == "replace":
        s.replace_image(s.images[op[1]], POOL[op[2]])
    elif kind == "remove":
        s.remove_image(s.images[op[1]])
    elif kind == "insert_text":
        s.insert_text(op[1], op[2])
    elif kind == "truncate":
        s.truncate(op[1])
    elif kind == "generate":
        s.generate(op[1])
    else:  # pragma: no cover
        raise AssertionError(op)


def _random_op(rng: random.Random, s: lk.Session) -> tuple[Any, ...]:
    n_images = len(s.images)
    n_chunks = len(s.timeline)
    if s.n_past > N_CTX - 200:
        return ("truncate", rng.randrange(0, max(1, n_chunks // 2)))
    choices = ["text", "text", "image", "generate"]
    if n_images:
        choices += ["replace", "replace", "remove"]
    if n_chunks:
        choices += ["insert_text", "truncate"]
    kind = rng.choice(choices)
    if kind == "text":
        return ("text", rng.choice(WORDS))
    if kind == "image":
        return ("image", rng.randrange(len(POOL)))
    if kind == "replace":
        return ("replace", rng.randrange(n_images), rng.randrange(len(POOL)))
    if kind == "remove":
        return ("remove", rng.randrange(n_images))
    if kind == "insert_text":
        return ("insert_text", rng.randrange(n_chunks + 1), rng.choice(WORDS))
    if kind == "truncate":
        return ("truncate", rng.randrange(n_chunks))
    return ("generate", rng.randrange(1, 6))


class Worker(threading.Thread):
    def __init__(self, model: lk.Model, seed: int, deadline: float, sessions: list[lk.Session]) -> None:
        super().__init__(name=f"soak-{seed}")
        self.model, self.rng, self.deadline, self.sessions = model, random.Random(seed), deadline, sessions
        self.log: list[tuple[Any, ...]] = []  # calls that changed the final session, in order
        self.outcomes: dict[str, int] = {}
        self.failure: BaseException | None = None
        self.final: tuple | None = None

    def _open(self) -> lk.Session:
        s = self.model.session(n_ctx=N_CTX, n_threads=1)
        self.sessions.append(s)
        return s

    def run(self) -> None:
        try:
            s = self._open()
            for _ in range(MAX_OPS):
                if time.monotonic() > self.deadline:
                    break
                if self.rng.random() < 0.03:  # close and start over
                    s.close()
                    self.sessions.remove(s)
                    s = self._open()
                    self.log.clear()
                    self.outcomes["reopen"] = self.outcomes.get("reopen", 0) + 1
                    continue
                op = _random_op(self.rng, s)
                before = session_state(s)
                generated = s.stats["tokens_generated"]
                try:
                    _apply(s, op)
                    outcome = "ok"
                except lk.CancelledError:
                    outcome = "cancelled"
                except lk.ContextFullError:
                    outcome = "full"
                except lk.LlavaKVError as e:
                    # e.g. generating after an image (no logits): refused, nothing changed
                    assert "nothing to generate" in str(e), e
                    outcome = "refused"
                if op[0] == "generate":
                    # Cancelled generation keeps the tokens made so far: replay exactly that many.
                    n = s.stats["tokens_generated"] - generated
                    if n:
                        self.log.append(("generate", n))
                elif outcome == "ok":
                    self.log.append(op)
                else:
                    assert session_state(s) == before, (op, outcome)
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self.final = session_state(s)[:3]
            s.close()
            self.sessions.remove(s)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e


@pytest.mark.slow
def test_soak_threads_with_random_edits_cancels_and_closes(llava_pair: testing.TestModel) -> None:
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, n_threads=1) as model:
        deadline = time.monotonic() + SECONDS
        sessions: list[lk.Session] = []
        workers = [Worker(model, seed, deadline, sessions) for seed in range(THREADS)]
        stop = threading.Event()

        def cancel_at_random() -> None:
            rng = random.Random(99)
            while not stop.wait(rng.uniform(0.0005, 0.004)):
                for s in list(sessions):
                    if rng.random() < 0.3:
                        s.cancel()

        canceller = threading.Thread(target=cancel_at_random)
        canceller.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join(SECONDS + 120)
        stop.set()
        canceller.join()
        for w in workers:
            assert not w.is_alive(), f"{w.name} hung"
            if w.failure is not None:
                raise w.failure
        totals: dict[str, int] = {}
        for w in workers:
            for k, v in w.outcomes.items():
                totals[k] = totals.get(k, 0) + v
        print("soak outcomes:", totals)
        assert totals.get("ok", 0) > THREADS * 5 and totals.get("cancelled", 0) > 0, totals

        # Single-threaded replay of what each thread's last session kept.
        for w in workers:
            with model.session(n_ctx=N_CTX, n_threads=1) as replay:
                for op in w.log:
                    _apply(replay, op)
                got = session_state(replay)[:3]
            assert got[0] == w.final[0] and got[1] == w.final[1], w.name
            assert got[2] == w.final[2], f"{w.name}: logits differ from the single-threaded replay"
        assert not sessions  # every worker closed what it opened
