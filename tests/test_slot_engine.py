"""The one native step every generation path runs on (cpp/slot_step.h, cpp/reply.h), and the native
loops that take Python out of the per-token path: ``Session.advance`` for a lone session and
``step_sessions_until`` for a pool's slots (the server's engine loop).

What they must keep: a reply equal token for token to one generated a step per call, stop strings,
token limits and log-probabilities applied in the core as Python applied them, a failed step leaving
every slot as before it (raised by the next call when earlier steps succeeded), a cancel stopping a
lone reply after the steps done, and a loop that returns when another thread sets its signal.
"""
from __future__ import annotations

import threading

import pytest

import llava_kv as lk
from llava_kv import _core
from llava_kv._core import _testing
from llava_kv.pool import Generation

from conftest import session_state

PROMPT = "Describe the picture in detail, please."


@pytest.fixture(autouse=True)
def _disarm():
    yield
    _testing.arm_decode_fault(0, "none")


def _generated(s: lk.Session) -> tuple:
    """What generation put in a session: its timeline, position and logits (not the cache counters)."""
    return session_state(s)[:3]


def _prompt(s: lk.Session, image, text: str = PROMPT) -> None:
    s.append_text("USER: ")
    s.append_image(image)
    s.append_text(f"\n{text}\nASSISTANT:")


class _Counting:
    """A session's native object, counting the generation calls Python makes on it."""

    def __init__(self, core: _core.Session) -> None:
        self._core = core
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):
        attr = getattr(self._core, name)
        if name in ("advance", "generate_step"):
            def counted(*args, **kwargs):
                self.calls[name] = self.calls.get(name, 0) + 1
                return attr(*args, **kwargs)
            return counted
        return attr


def _step_by_step(core: _core.Session, max_tokens: int, stop: list[str], logprobs: int = -1):
    """The reply one generate_step() per token makes: (token ids, text bytes, finish reason, entries)."""
    core.begin_generation(_core.SamplingParams(temperature=0.0, seed=0), max_tokens, stop, logprobs)
    ids, raw, entries = [], b"", []
    while True:
        step = core.generate_step()
        if step.n_tokens:
            ids.append(step.token)
        raw += step.text
        entries += step.logprobs
        if step.done:
            return ids, raw, step.finish_reason, entries


def test_a_gathered_reply_is_one_native_call_and_equals_step_by_step(model, images):
    with model.session(n_ctx=1024) as a, model.session(n_ctx=1024) as b:
        for s in (a, b):
            _prompt(s, images[0])
        ids, raw, reason, _ = _step_by_step(a._core, 40, [])
        counting = _Counting(b._core)
        b._core = counting  # type: ignore[assignment]
        text = b.generate(40)
        b._core = counting._core
        assert counting.calls == {"advance": 1}  # the whole reply: no Python per token
        assert text == raw.decode("utf-8", "replace") and b.last_finish_reason == reason
        assert list(b.timeline[-1].tokens) == ids
        assert b.stats["tokens_generated"] == len(ids)
        assert _generated(b) == _generated(a)


def test_a_stream_returns_at_each_piece_of_text_and_equals_the_gathered_reply(model, images):
    with model.session(n_ctx=1024) as a, model.session(n_ctx=1024) as b:
        for s in (a, b):
            _prompt(s, images[1])
        whole = a.generate(30, stop=["e"])
        counting = _Counting(b._core)
        b._core = counting  # type: ignore[assignment]
        pieces = list(b.generate(30, stop=["e"], stream=True))
        b._core = counting._core
        assert "".join(pieces) == whole and "e" not in whole
        assert all(pieces) and counting.calls["advance"] >= len(pieces)
        assert a.last_finish_reason == b.last_finish_reason
        assert _generated(b) == _generated(a)


def test_stop_strings_and_limits_in_the_core_end_the_reply_as_python_did(model, images):
    with model.session(n_ctx=1024) as s:
        _prompt(s, images[2])
        base = len(s.timeline)
        ids, raw, reason, _ = _step_by_step(s._core, 12, [])
        assert reason in ("length", "stop") and len(ids) <= 12
        s._core.flush_generation()
        text = raw.decode("utf-8", "replace")
        s.truncate(base)
        stop = text[1:3]
        if len(stop) == 2 and "\ufffd" not in stop:
            ids2, raw2, reason2, _ = _step_by_step(s._core, 12, [stop])
            assert reason2 == "stop" and raw2 == raw[:raw.index(stop.encode())]
            assert ids2 == ids[:len(ids2)]  # the token that completed the stop string is in the timeline
            s._core.flush_generation()
            s.truncate(base)
        ids3, _, reason3, _ = _step_by_step(s._core, 3, [])
        assert ids3 == ids[:3] and reason3 == ("length" if len(ids) >= 3 else "stop")


def test_logprobs_come_from_the_core_for_the_tokens_drawn(model, images):
    with model.session(n_ctx=1024) as s:
        _prompt(s, images[0])
        base = len(s.timeline)
        logits, ids = [], []
        s._core.begin_generation(_core.SamplingParams(temperature=0.0, seed=0), 6, [], 3)
        entries = []
        while True:
            lg = s.logits().astype("float64")
            step = s._core.generate_step()
            if step.n_tokens:
                logits.append(lg)
                ids.append(step.token)
            entries += step.logprobs
            if step.done:
                break
        assert [e.token for e in entries] == ids
        for e, lg in zip(entries, logits):
            lp = lg - (lg.max() + __import__("numpy").log(__import__("numpy").exp(lg - lg.max()).sum()))
            assert e.logprob == pytest.approx(lp[e.token], abs=1e-9)
            assert [t for t, _ in e.top] == sorted(range(lg.size), key=lambda t: (-lg[t], t))[:3]
        s.truncate(base)


def test_a_failed_step_is_raised_at_once_and_loses_nothing(model, images):
    with model.session(n_ctx=1024) as ref, model.session(n_ctx=1024) as s:
        for x in (ref, s):
            _prompt(x, images[3])
        expected = ref.generate(20)
        n_expected = ref.stats["tokens_generated"]
        fault_at = min(3, n_expected)  # a step that decodes a token (the reply may end early)
        s._begin_generation(_core.SamplingParams(temperature=0.0), 0, max_tokens=20)
        _testing.arm_decode_fault(fault_at, "status")
        with pytest.raises(lk.LlavaKVError):
            s._core.advance(20)
        # the steps before the failed one stay (tokens and counters); the failed one left nothing
        assert s.stats["tokens_generated"] == fault_at - 1
        assert len(s.timeline[-1].tokens) == fault_at - 1 or fault_at == 1
        rest = s._core.advance(20)
        assert rest.done and rest.n_tokens == n_expected  # the earlier steps' tokens come with this call
        assert rest.text.decode("utf-8", "replace") == expected
        s._core.flush_generation()
        assert _generated(s) == _generated(ref)


def test_cancel_stops_a_native_reply_after_the_steps_done(model, images):
    with model.session(n_ctx=2048) as s:
        _prompt(s, images[0])
        _testing.arm_decode_fault(3, "pause")  # the 3rd step's decode waits until released
        out: dict = {}

        def run() -> None:
            try:
                s.generate(1000)
            except lk.CancelledError as e:
                out["error"] = e

        t = threading.Thread(target=run)
        t.start()
        assert _testing.wait_decode_paused(30)
        s.cancel()  # aborts the paused decode: that step is undone, the two before it stay
        _testing.release_decode_pause()
        t.join(30)
        assert not t.is_alive() and isinstance(out.get("error"), lk.CancelledError)
        assert s.stats["tokens_generated"] == 2 and len(s.timeline[-1].tokens) == 2
        assert s.generate(3)  # the session goes on


def _pool_reply(pool, prompts, images, **kw) -> list[Generation]:
    gens = []
    for i, (slot, text) in enumerate(zip(pool, prompts)):
        _prompt(slot, images[i], text)
        gens.append(Generation(slot, **kw))
    return gens


def test_step_until_equals_single_steps_and_returns_when_a_reply_ends(model, images):
    prompts = ["What is it?", "Say more.", "Colours?"]
    with model.session_pool(3, n_ctx=1024) as a, model.session_pool(3, n_ctx=1024) as b:
        ga = _pool_reply(a, prompts, images, max_tokens=24, logprobs=1)
        gb = _pool_reply(b, prompts, images, max_tokens=24, logprobs=1)
        texts_a = ["" for _ in ga]
        while not all(g.done for g in ga):
            for i, piece in enumerate(a.step(ga)):
                texts_a[i] += piece or ""
        texts_b = ["" for _ in gb]
        calls = 0
        while not all(g.done for g in gb):
            ended_before = sum(g.done for g in gb)
            pieces = b.run(gb, 1000)
            calls += 1
            assert sum(g.done for g in gb) > ended_before  # each call runs until a reply ends
            for i, piece in enumerate(pieces):
                texts_b[i] += piece or ""
        assert calls <= len(gb)
        assert texts_b == texts_a
        assert [g.finish_reason for g in gb] == [g.finish_reason for g in ga]
        assert [g.n_tokens for g in gb] == [g.n_tokens for g in ga]
        assert [[e["id"] for e in g.logprobs] for g in gb] == [[e["id"] for e in g.logprobs] for g in ga]
        for x, y in zip(a, b):
            assert _generated(x) == _generated(y)


def test_step_until_returns_at_a_streamed_slots_text_and_at_the_signal(model, images):
    with model.session_pool(2, n_ctx=1024) as pool:
        gens = _pool_reply(pool, ["What is it?", "Say more."], images, max_tokens=50)
        signal = _core.StepSignal()
        signal.set()  # set before the call: exactly one step runs
        pool.run(gens, 1000, signal=signal)
        assert [g.n_tokens for g in gens] == [1, 1]
        signal.clear()
        before = [g.n_tokens for g in gens]
        pieces = pool.run(gens, 1000, streams=[True, False])
        grown = [g.n_tokens - n for g, n in zip(gens, before)]
        assert grown[0] >= 1
        if not any(g.done for g in gens):
            assert pieces[0] and grown[0] == grown[1]  # returned at the streamed slot's first new text


def test_step_until_raises_a_failed_step_at_once_and_reports_the_earlier_ones_next(model, images):
    prompts = ["What is it?", "Say more."]
    with model.session_pool(2, n_ctx=1024) as ref, model.session_pool(2, n_ctx=1024) as pool:
        expected = _pool_reply(ref, prompts, images, max_tokens=16)
        while not all(g.done for g in expected):
            ref.step(expected)
        gens = _pool_reply(pool, prompts, images, max_tokens=16)
        texts = ["", ""]
        _testing.arm_decode_fault(3, "status")  # the 3rd batched step fails
        raised = 0
        while not all(g.done for g in gens):
            counts = [g.n_tokens for g in gens]
            generated = [s.stats["tokens_generated"] for s in pool]
            try:
                pieces = pool.run(gens, 1000)
            except lk.LlavaKVError as e:
                assert "batched step failed" in str(e)
                raised += 1
                assert [g.n_tokens for g in gens] == counts  # nothing reported by the failed call
                made = [s.stats["tokens_generated"] - n for s, n in zip(pool, generated)]
                if counts == [0, 0]:
                    assert made == [2, 2]  # its first two steps stay in the slots
                continue
            for i, p in enumerate(pieces):
                texts[i] += p or ""
        assert raised == (1 if max(g.n_tokens for g in expected) >= 3 else 0)  # a 3rd step decodes something
        assert texts == [g.text for g in expected]
        assert [g.n_tokens for g in gens] == [g.n_tokens for g in expected]
        for x, y in zip(ref, pool):
            assert _generated(x) == _generated(y)


def test_a_full_slot_ends_alone_in_the_core(model, images):
    with model.session_pool(2, n_ctx=160) as pool:
        gens = _pool_reply(pool, ["What is it?", "Say more."], images, max_tokens=400)
        free = [pool[i].n_ctx - pool[i]._core.n_cells for i in range(2)]
        while not all(g.done for g in gens):
            pool.run(gens, 1000)
        for g, room in zip(gens, free):
            assert g.finish_reason in ("length", "stop")
            if g.finish_reason == "length":
                assert g.n_tokens == room  # every free cell used, then ended without a failed step
