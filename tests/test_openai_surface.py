"""n replies from one prefill (Session.generate(n=k), the server's ``n``), the completions API with
raw and multimodal prompts, /tokenize and /detokenize, the OpenAPI document, and every server reply
shaped as the protocol models say."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import llava_kv as lk
from llava_kv.pool import Generation
from llava_kv.server import protocol
from llava_kv.server.process import ServerProcess
from llava_kv.testing import random_image

from conftest import session_state


def _prompt(s: lk.Session, image: np.ndarray) -> None:
    s.append_text("USER: ")
    s.append_image(image)
    s.append_text("\nwhat is it?\nASSISTANT:")


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen25vl", "tiny-gemma3"])
def test_n_replies_share_one_prefill_and_equal_a_pools(models_dir, preset, images):
    """n=4 decodes nothing (the prompt's cells are shared), leaves the session as it was, and at
    temperature 0 each reply is what a 4-slot pool's greedy generation gives."""
    from llava_kv.testing import make_test_model

    pair = make_test_model(models_dir, preset)
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model, model.session(n_ctx=1024) as s:
        _prompt(s, images[0])
        before = session_state(s)
        decoded = s.stats["tokens_decoded"]
        replies = s.generate(24, n=4)
        assert s.stats["tokens_decoded"] == decoded  # the prompt was decoded once, before
        assert session_state(s)[:3] == before[:3] and s.exact
        assert len(replies) == 4 and len(s.last_finish_reasons) == 4
        with model.session_pool(4, n_ctx=1024) as pool:
            for slot in pool:
                _prompt(slot, images[0])
            gens = [Generation(slot, 24) for slot in pool]
            while not all(g.done for g in gens):
                pool.step(gens)
            assert [g.text for g in gens] == replies
            assert [g.finish_reason for g in gens] == s.last_finish_reasons


def test_n_sampled_replies_use_seed_plus_i(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, model.session(n_ctx=1024) as s:
        _prompt(s, images[1])
        base = len(s.timeline)
        replies = s.generate(20, n=3, temperature=1.0, seed=40)
        assert len(set(replies)) > 1
        for i, reply in enumerate(replies):
            assert s.generate(20, temperature=1.0, seed=40 + i) == reply
            s.truncate(base)
        schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"],
                  "additionalProperties": False}
        parsed = s.generate(40, n=3, temperature=1.0, seed=1, json_schema=schema)
        assert [json.loads(t) for t in parsed] == s.last_json
        with pytest.raises(ValueError, match="n and stream"):
            s.generate(8, n=2, stream=True)
        with pytest.raises(ValueError, match="n must be in"):
            s.generate(8, n=17)
        with model.session_pool(2, n_ctx=256) as pool:
            pool[0].append_text("x")
            with pytest.raises(ValueError, match="context of its own"):
                pool[0].generate(4, n=2)


@pytest.fixture(scope="module")
def server(models_dir):
    from llava_kv.testing import make_test_model

    pair = make_test_model(models_dir, "tiny-llava")
    with ServerProcess(pair.model_path, pair.mmproj_path, args=["--slots", "4", "--n-ctx", "1024"]) as srv:
        yield srv, pair


def _png(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(random_image(seed, (48, 48))).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_server_n_replies_decode_the_prompt_once(server):
    srv, pair = server
    body = {"messages": [{"role": "user", "content": "Tell me something new."}], "n": 3, "temperature": 1.0,
            "seed": 9, "max_tokens": 12}
    before = srv.metrics()
    status, _, raw = srv.post("/v1/chat/completions", body)
    assert status == 200, raw
    reply = protocol.ChatCompletion.model_validate_json(raw)
    after = srv.metrics()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    decoded = after["llava_kv_tokens_decoded_total"] - before["llava_kv_tokens_decoded_total"]
    assert decoded == reply.usage.prompt_tokens  # once, not three times
    # The engine thread's time, split between bringing the slot to the prompt and generating.
    for counter in ("llava_kv_prefill_seconds_total", "llava_kv_generation_seconds_total"):
        assert after[counter] > before.get(counter, 0.0), counter
    assert len({c.message.content for c in reply.choices}) > 1  # seeds 9, 10, 11
    greedy = json.loads(srv.post("/v1/chat/completions", {**body, "temperature": 0})[2])
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model, model.session(n_ctx=1024) as s:
        want = s.chat(body["messages"], max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    assert [c["message"]["content"] for c in greedy["choices"]] == [want] * 3
    # Streamed: each choice's chunks carry its index and add up to the same texts.
    status, _, raw = srv.post("/v1/chat/completions", {**body, "stream": True})
    texts = ["", "", ""]
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            chunk = protocol.ChatCompletionChunk.model_validate_json(line[6:])
            for c in chunk.choices:
                texts[c.index] += c.delta.get("content") or ""
    assert texts == [c.message.content for c in reply.choices]


def test_completions_raw_and_multimodal_prompts(server):
    srv, pair = server
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model:
        marker = model.media_marker
        with model.session(n_ctx=1024) as s:
            s.append_text("Once upon a time")
            want_text = s.generate(10)
        with model.session(n_ctx=1024) as s:
            s.append_text("Look: ")
            s.append_image(Image.open(io.BytesIO(base64.b64decode(_png(3)))))
            s.append_text(" says")
            want_media = s.generate(10)
    status, _, raw = srv.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0})
    assert status == 200, raw
    reply = protocol.Completion.model_validate_json(raw)
    assert reply.choices[0].text == want_text and reply.object == "text_completion"
    status, _, raw = srv.post("/v1/completions", {
        "prompt": {"prompt_string": f"Look: {marker} says", "multimodal_data": [_png(3)]},
        "max_tokens": 10, "temperature": 0})
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["text"] == want_media
    status, _, raw = srv.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0,
                                                  "stream": True, "logprobs": 2})
    text, tokens = "", []
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"]
            if chunk["choices"][0]["logprobs"]:
                lp = chunk["choices"][0]["logprobs"]
                assert len(lp["top_logprobs"]) == len(lp["tokens"])
                tokens += lp["tokens"]
    assert text == want_text and "".join(tokens).startswith(want_text[:3])
    for bad, param in ((f"two {marker} {marker}", "prompt"), ({"prompt_string": "x", "multimodal_data": ["@@"]}, None)):
        status, _, raw = srv.post("/v1/completions", {"prompt": bad, "max_tokens": 2})
        assert status == 400, raw
        if param:
            assert json.loads(raw)["error"]["param"] == param
    status, _, raw = srv.post("/v1/completions", {"prompt": "x", "echo": True})
    assert status == 400 and json.loads(raw)["error"]["param"] == "echo"


def test_tokenize_and_detokenize(server):
    srv, pair = server
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model:
        want = model.tokenize("Hello there", add_special=True)
    status, _, raw = srv.post("/tokenize", {"content": "Hello there", "add_special": True})
    assert status == 200 and protocol.TokenizeResponse.model_validate_json(raw).tokens == want
    status, _, raw = srv.post("/tokenize", {"content": "Hello", "with_pieces": True})
    pieces = json.loads(raw)["tokens"]
    assert "".join(p["piece"] for p in pieces).strip() == "Hello"
    status, _, raw = srv.post("/detokenize", {"tokens": [p["id"] for p in pieces]})
    assert status == 200 and json.loads(raw) == {"content": "Hello"}
    status, _, raw = srv.post("/detokenize", {"tokens": [10**7]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "tokens"
    status, _, raw = srv.post("/tokenize", {"content": "Hello", "text": "Hello"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "text"


def test_openapi_document_names_every_route(server):
    srv, _ = server
    status, _, raw = srv.get("/openapi.json")
    doc = json.loads(raw)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"}
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "response_format", "n", "logit_bias"} <= set(chat["properties"])


def test_tool_calls_are_refused_by_name(server):
    srv, _ = server
    for field, value in (("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto")):
        status, _, raw = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                           field: value})
        assert status == 400 and json.loads(raw)["error"]["param"] == field
    status, _, raw = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "tool_choice": "none", "max_tokens": 2})
    assert status == 200, raw
