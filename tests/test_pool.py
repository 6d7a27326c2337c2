"""Session pools: slots of one shared context, each a full session, generating in one batched decode.

What a slot must be: a lone session's equal (bitwise logits after prefill and edits, since its KV
stream is laid out as in a context of its own), its generated tokens equal to a lone session's
greedy tokens although they were decoded in a batch with other slots, and every failure of a
batched step leaving every slot exactly as it was.
"""
from __future__ import annotations

import numpy as np
import pytest

import llava_kv as lk
from llava_kv import _core
from llava_kv._core import _testing
from llava_kv.pool import Generation

from conftest import TINY_PRESETS, session_state


@pytest.fixture(autouse=True)
def _disarm():
    yield
    _testing.arm_decode_fault(0, "none")


def _prompt(s: lk.Session, image, text: str) -> None:
    s.append_text("USER: ")
    s.append_image(image)
    s.append_text(f"\n{text}\nASSISTANT:")


def _layout(s: lk.Session) -> list[tuple]:
    """The timeline without chunk ids (which count the edits a session has seen)."""
    return [(c.kind, c.n_tokens, c.pos0, c.pos1, c.text, c.media.digest if c.media else None) for c in s.timeline]


def _run_together(pool: lk.pool.SessionPool, gens: list[Generation]) -> list[str]:
    texts = ["" for _ in gens]
    while not all(g.done for g in gens):
        for i, piece in enumerate(pool.step(gens)):
            if piece:
                texts[i] += piece
    return texts


def test_slot_prefill_equals_lone_session_bitwise(model, images):
    with model.session(n_ctx=1024) as lone, model.session_pool(3, n_ctx=1024) as pool:
        _prompt(lone, images[1], "What is it?")
        for i, slot in enumerate(pool):
            _prompt(slot, images[i], f"question {i}")
        # Slot 1 brought to the lone session's conversation by an edit, while slots 0 and 2 hold others.
        slot = pool[1]
        slot.replace_image(slot.images[0], images[1])
        slot.edit(2, 3, ["\nWhat is it?\nASSISTANT:"])
        assert _layout(slot) == _layout(lone)
        assert np.array_equal(slot.logits(), lone.logits())


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-gemma3", "tiny-qwen25vl"])
@pytest.mark.parametrize("order", ["slots", "reversed"])
def test_batched_generation_equals_lone_greedy(models_dir, preset, order, images):
    from llava_kv.testing import make_test_model

    pair = make_test_model(models_dir, preset)
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model:
        lone_texts, lone_logits = [], []
        for i in range(3):
            with model.session(n_ctx=1024) as s:
                _prompt(s, images[i], f"describe {i}")
                lone_texts.append(s.generate(12 + 4 * i))
                lone_logits.append(s.logits())
        with model.session_pool(3, n_ctx=1024) as pool:
            for i, slot in enumerate(pool):
                _prompt(slot, images[i], f"describe {i}")
            gens = [Generation(slot, 12 + 4 * i) for i, slot in enumerate(pool)]
            # The step decodes its slots in sequence order whatever order they are listed in (one
            # ubatch, not one per slot): each reply must still get its own slot's logits.
            listed = gens if order == "slots" else gens[::-1]
            texts = _run_together(pool, listed)
            if order == "reversed":
                texts = texts[::-1]
            assert texts == lone_texts
            for i, slot in enumerate(pool):
                assert slot.stats["batched_steps"] > 0
                assert slot.stats["tokens_generated"] == gens[i].n_tokens
                # Batched matrix products may round differently from one-row ones: close, not bitwise.
                np.testing.assert_allclose(slot.logits(), lone_logits[i], rtol=0, atol=1e-3)


def test_slots_join_and_leave_between_steps(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, \
            model.session_pool(2, n_ctx=1024) as pool, model.session(n_ctx=1024) as lone:
        _prompt(lone, images[3], "late")
        expected = lone.generate(10)
        _prompt(pool[0], images[2], "early")
        early = Generation(pool[0], 30)
        for _ in range(5):
            pool.step([early])
        _prompt(pool[1], images[3], "late")  # joins while slot 0 is mid-reply
        late = Generation(pool[1], 10)
        text = ""
        while not late.done:
            text += pool.step([early, late])[1] or ""
        assert text == expected
        assert pool.step([late]) == [None]  # an ended generation takes no step


def test_failed_step_leaves_every_slot_unchanged(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, \
            model.session_pool(3, n_ctx=512) as pool:
        for i, slot in enumerate(pool):
            _prompt(slot, images[i], "x")
        gens = [Generation(slot, 20) for slot in pool]
        pool.step(gens)
        before = [session_state(s) for s in pool]
        for kind in ("status", "exception"):
            _testing.arm_decode_fault(1, kind)
            with pytest.raises(lk.LlavaKVError, match="batched step failed"):
                pool.step(gens)
            assert [session_state(s) for s in pool] == before


def test_failed_step_then_same_tokens(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model:
        with model.session(n_ctx=512) as lone:
            _prompt(lone, images[0], "x")
            expected = lone.generate(12)
        with model.session_pool(2, n_ctx=512) as pool:
            for slot in pool:
                _prompt(slot, images[0], "x")
            gens = [Generation(slot, 12) for slot in pool]
            texts = ["", ""]
            for step in range(20):
                if all(g.done for g in gens):
                    break
                if step in (2, 5):
                    _testing.arm_decode_fault(1, "status")
                    with pytest.raises(lk.LlavaKVError):
                        pool.step(gens)
                for i, piece in enumerate(pool.step(gens)):
                    texts[i] += piece or ""
            assert texts == [expected, expected]


def test_a_full_slot_ends_alone(llava_pair, images):
    """A slot whose KV cells are all used ends its reply ("length"); the other slot goes on to the
    reply a lone session gives."""
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model:
        with model.session(n_ctx=512) as lone:
            _prompt(lone, images[1], "y")
            expected = lone.generate(24)
        with model.session_pool(2, n_ctx=512) as pool:
            _prompt(pool[0], images[0], "x")
            per_pad = len(pool[0]._core.tokenize(" pad" * 8, False)) // 8
            pool[0].append_text(" pad" * ((512 - pool[0]._core.n_cells - 6) // per_pad))
            room = 512 - pool[0]._core.n_cells
            assert 0 < room < 24
            _prompt(pool[1], images[1], "y")
            gens = [Generation(pool[0], 24), Generation(pool[1], 24)]
            texts = _run_together(pool, gens)
            assert gens[0].finish_reason == "length" and pool[0].last_finish_reason == "length"
            assert pool[0]._core.n_cells == 512
            assert gens[0].n_tokens == room  # every free cell used, then the end
            assert texts[1] == expected and gens[1].n_tokens == 24


def test_generation_logprobs_are_the_lone_sessions(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, \
            model.session_pool(2, n_ctx=1024) as pool, model.session(n_ctx=1024) as lone:
        _prompt(lone, images[0], "which?")
        lone._core.begin_generation(_core.SamplingParams(temperature=0.0, seed=0))
        ids, logits = [], []
        for _ in range(10):
            logits.append(lone.logits().astype(np.float64))
            step = lone._core.generate_step()
            if step.end_of_generation:
                break
            ids.append(step.token)
        _prompt(pool[0], images[0], "which?")
        _prompt(pool[1], images[1], "other")
        listed, plain = Generation(pool[0], 10, logprobs=2), Generation(pool[1], 10)
        _run_together(pool, [listed, plain])
        assert plain.logprobs is None
        assert [e["id"] for e in listed.logprobs] == ids and listed.n_tokens == len(ids)
        for e, lg in zip(listed.logprobs, logits):
            logp = lg - (lg.max() + np.log(np.exp(lg - lg.max()).sum()))
            assert e["logprob"] == pytest.approx(logp[e["id"]], abs=1e-3)  # batched: not bitwise
            assert e["bytes"] == list(lone._core.detokenize([e["id"]]))
            assert [t["id"] for t in e["top_logprobs"]] == list(np.argsort(-lg, kind="stable")[:2])
            assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        for bad in (21, -1, True, 1.5):
            with pytest.raises(ValueError, match="logprobs"):
                Generation(pool[0], 4, logprobs=bad)


def test_step_arguments_are_checked(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, \
            model.session_pool(2, n_ctx=512) as a, model.session_pool(2, n_ctx=512) as b, \
            model.session(n_ctx=512) as lone:
        for s in (a[0], b[0], lone):
            _prompt(s, images[0], "x")
        with pytest.raises(ValueError, match="another pool"):
            a.step([Generation(b[0], 4)])
        with pytest.raises(ValueError, match="same pool"):
            _core.step_sessions([a[0]._core, lone._core])
        with pytest.raises(ValueError, match="twice"):
            _core.step_sessions([a[0]._core, a[0]._core])
        with pytest.raises(lk.LlavaKVError, match="empty"):
            a.step([Generation(a[1], 4)])  # slot 1 holds nothing to continue
        with pytest.raises(ValueError):
            model.session_pool(0)
        with pytest.raises(ValueError):
            model.session_pool(4, n_batch=2)  # a step carries one token per slot


def test_slot_state_moves_between_slots_not_into_lone_sessions(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, \
            model.session_pool(2, n_ctx=512) as pool, model.session(n_ctx=512) as lone:
        _prompt(pool[0], images[4], "saved")
        blob = pool[0]._core.save_state()
        pool[1]._core.load_state(blob)
        assert _layout(pool[1]) == _layout(pool[0])
        assert np.array_equal(pool[1].logits(), pool[0].logits())
        assert pool[1].generate(8) == pool[0].generate(8)
        with pytest.raises(lk.LlavaKVError, match="same number of slots"):
            lone._core.load_state(blob)
        assert lone.timeline == []


def test_closing_slots_and_the_model(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model:
        pool = model.session_pool(3, n_ctx=512)
        for slot in pool:
            _prompt(slot, images[0], "x")
        report = model.memory()["sessions"]
        assert [sid for sid in report] == [pool[0]._core.id]  # the shared context, reported once
        pool[0].close()
        assert list(model.memory()["sessions"]) == [pool[1]._core.id]
        assert pool[1].generate(4)  # the others go on
        with pytest.raises(lk.ClosedError):
            pool[0].append_text("x")
        pool.close()
        assert pool.closed and model.memory()["sessions"] == {}
        again = model.session_pool(2, n_ctx=512)
    assert again.closed  # closing the model closed the pool's slots
    with pytest.raises(lk.ClosedError):
        again[0].append_text("x")


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_family_in_a_pool(models_dir, preset, images):
    from llava_kv.testing import make_test_model

    pair = make_test_model(models_dir, preset)
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model:
        with model.session(n_ctx=1024) as lone:
            _prompt(lone, images[0], "q")
            want_logits = lone.logits()
            want = lone.generate(6)
        with model.session_pool(2, n_ctx=1024) as pool:
            _prompt(pool[1], images[1], "other")
            _prompt(pool[0], images[0], "q")
            assert np.array_equal(pool[0].logits(), want_logits)
            gens = [Generation(pool[0], 6), Generation(pool[1], 6)]
            assert _run_together(pool, gens)[0] == want
