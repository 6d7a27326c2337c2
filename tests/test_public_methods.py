"""The public methods the server is built on (it reaches into no private session or model part):
Session.snapshot/restore/n_cells/prefill_chat, Generation.cancel, Model.check_sampling/token_pieces."""
from __future__ import annotations

import pytest

import llava_kv as lk
from llava_kv.chat import render_conversation
from llava_kv.pool import Generation

from conftest import session_state


def _messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


def test_snapshot_restores_into_an_empty_session_bit_for_bit(model, images):
    with model.session(n_ctx=1024) as a, model.session(n_ctx=1024) as b:
        a.append_text("USER: ")
        a.append_image(images[0])
        a.append_text("\nDescribe.\nASSISTANT:")
        a.generate(5)
        blob = a.snapshot()
        assert isinstance(blob, bytes) and a.n_cells >= a.n_past > 0
        b.restore(blob)
        assert session_state(b)[:3] == session_state(a)[:3] and b.n_cells == a.n_cells
        with pytest.raises(lk.LlavaKVError):
            b.restore(blob)  # not empty: refused, nothing changed
        assert session_state(b)[:3] == session_state(a)[:3]
        b.clear()
        with pytest.raises(lk.LlavaKVError):
            b.restore(blob[:-8] + b"\0" * 8)  # a damaged blob: refused, the session stays empty
        assert b.timeline == [] and b.n_cells == 0


def test_prefill_chat_is_what_chat_does_before_its_reply(model, images):
    with model.session(n_ctx=2048) as a, model.session(n_ctx=2048) as b:
        reply = a.chat(_messages(images[1]), max_tokens=6)
        prompt_tokens, meta = b.prefill_chat(*render_conversation(model, _messages(images[1])))
        assert prompt_tokens == reply["usage"]["prompt_tokens"] == b.n_past and meta["images_encoded"] == 0
        b.generate(6)
        assert session_state(b)[:3] == session_state(a)[:3]
        again, meta2 = b.prefill_chat(*render_conversation(model, _messages(images[1])))
        # back to the prompt (the reply dropped): the image is not encoded again, the prefix is kept
        assert again == prompt_tokens == b.n_past and meta2["images_encoded"] == 0 and meta2["reused_tokens"] > 0


def test_a_cancelled_generation_ends_where_it_is(model, images):
    with model.session_pool(2, n_ctx=1024) as pool:
        for i, s in enumerate(pool):
            s.append_text("USER: ")
            s.append_image(images[i])
            s.append_text("\nDescribe.\nASSISTANT:")
        gens = [Generation(s, max_tokens=50) for s in pool]
        pool.step(gens)
        pool.step(gens)
        kept = list(pool[0].timeline[-1].tokens)
        gens[0].cancel()
        assert gens[0].done and gens[0].finish_reason == "cancelled" and list(pool[0].timeline[-1].tokens) == kept
        gens[0].cancel()  # no-op once ended
        assert gens[0].finish_reason == "cancelled"
        before = gens[1].n_tokens
        pool.step(gens)  # the other slot goes on alone
        assert gens[1].n_tokens == before + 1 or gens[1].done
        assert list(pool[0].timeline[-1].tokens) == kept


def test_model_checks_sampling_and_lists_token_bytes(model):
    model.check_sampling(temperature=0.7, logit_bias={1: 2.0}, seed=3)
    with pytest.raises(ValueError, match="logit_bias"):
        model.check_sampling(logit_bias={model.n_vocab: 1.0})
    with pytest.raises(ValueError, match="grammar"):
        model.check_sampling(grammar="root ::= (")
    with pytest.raises(ValueError, match="temperature"):
        model.check_sampling(temperature=-1.0)
    tokens = model.tokenize("hello world")
    pieces = model.token_pieces(tokens)
    assert len(pieces) == len(tokens) and b"".join(pieces) == model.token_bytes(tokens)
    with pytest.raises(ValueError):
        model.token_pieces([model.n_vocab])
