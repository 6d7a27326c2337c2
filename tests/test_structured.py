"""Replies held to a JSON schema or a GBNF grammar, on random-weight models: only the constraint can
make their output valid, so every reply that parses and validates is the constraint's doing.

Five schemas whose strings are bounded (enum, maxLength, pattern, format) and numbers ranged, 200
sampled replies each (temperature 1, seeds 0..199) on each path (a session, the batch runner, the
server): every one ends with "stop", parses, and validates with the jsonschema package.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

import llava_kv as lk
from llava_kv import batch
from llava_kv._core import _testing
from llava_kv.pool import Generation
from llava_kv.structured import constraint

from conftest import session_state

SEEDS = range(200)
# Enough tokens for the longest reply each schema allows (whitespace between tokens is bounded too).
MAX_TOKENS = 400

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", "bird"]}},
        "required": ["name", "age", "kind"], "additionalProperties": False},
    "invoice": {"type": "object", "properties": {
        "number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "total": {"type": "integer", "minimum": -50, "maximum": 5000},
        "paid": {"type": "boolean"},
        "currency": {"const": "EUR"}},
        "required": ["number", "total", "paid", "currency"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
             "minItems": 1, "maxItems": 4},
    "nested": {"type": "object", "properties": {
        "box": {"type": "object", "properties": {
            "w": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
            "h": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["w", "h"], "additionalProperties": False},
        "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
        "when": {"type": "string", "format": "date"}},
        "required": ["box", "label", "when"], "additionalProperties": False},
    "defs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"},
                                         "id": {"type": "string", "format": "uuid"}},
        "required": ["a", "b", "id"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def pair(models_dir):
    from llava_kv.testing import make_test_model

    return make_test_model(models_dir, "tiny-llava")


@pytest.fixture(scope="module")
def model(pair):
    with lk.Model.load(pair.model_path, pair.mmproj_path) as m:
        yield m


def _valid(text: str, schema: dict) -> object:
    """The parsed reply, validated. ``format`` is an annotation in JSON Schema (the validator's
    default); the grammar enforces the shape of date and uuid strings, checked here by their own
    test below."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("name", SCHEMAS)
def test_session_replies_validate(model, name):
    schema = SCHEMAS[name]
    with model.session(n_ctx=1024) as s:
        s.append_text("Fill in the form:")
        base = len(s.timeline)
        for seed in SEEDS:
            text = s.generate(MAX_TOKENS, temperature=1.0, seed=seed, json_schema=schema)
            assert s.last_finish_reason == "stop", (seed, text)
            assert s.last_json == _valid(text, schema)
            if name == "nested":
                assert re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", s.last_json["when"])
            if name == "defs":
                assert re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", s.last_json["id"])
            s.truncate(base)


@pytest.mark.parametrize("name", SCHEMAS)
def test_batch_records_validate(model, images, name):
    schema = SCHEMAS[name]
    stats: dict = {}
    records = batch.run(model, [images[i % len(images)] for i in SEEDS], "Fill in the form.", max_tokens=MAX_TOKENS,
                        parallel=8, temperature=1.0, seed=0, json_schema=schema, progress=False, stats=stats)
    assert len(records) == len(SEEDS)
    for r in records:
        assert r.ok and r.finish_reason == "stop", r
        assert r.json == _valid(r.text, schema)
    assert stats["jobs_failed"] == 0


def test_gbnf_grammar_holds_every_reply(model):
    grammar = 'root ::= [0-9]{3} "-" [a-z]{2,4} (" " ("yes" | "no"))?'
    pattern = re.compile(r"[0-9]{3}-[a-z]{2,4}( (yes|no))?")
    with model.session(n_ctx=512) as s:
        s.append_text("Code:")
        for seed in SEEDS:
            text = s.generate(64, temperature=1.0, seed=seed, grammar=grammar)
            assert s.last_finish_reason == "stop" and pattern.fullmatch(text), (seed, text)
            assert s.last_json is None  # a grammar's reply is not parsed
            s.truncate(1)


def test_bad_constraints_are_refused_before_anything_is_decoded(model):
    with model.session(n_ctx=512) as s:
        s.append_text("Hello")
        before = session_state(s)
        decoded = s.stats["tokens_decoded"]
        cases = [
            ({"grammar": "root ::= ("}, "grammar"),
            ({"grammar": "other ::= \"x\""}, "grammar"),
            ({"grammar": "root ::= \"a\"", "json_schema": {"type": "object"}}, "grammar and json_schema"),
            ({"json_schema": {"type": "integer", "multipleOf": 3}}, "'multipleOf'"),
            ({"json_schema": {"type": "number", "minimum": 0}}, "'minimum' on a number"),
            ({"json_schema": {"type": "string", "format": "email"}}, "format 'email'"),
            ({"json_schema": {"type": "string", "pattern": "^a$", "maxLength": 3}}, "pattern and maxLength"),
            ({"json_schema": {"type": "string", "pattern": "^(?=a)b$"}}, "not supported"),
            ({"json_schema": {"$ref": "#/$defs/missing"}}, "converter rejects"),
            ({"json_schema": "{not json"}, "not JSON"),
            ({"json_schema": {"properties": {"a": {"type": "wizard"}}}}, "unknown type"),
        ]
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                s.generate(8, **kwargs)
            if list(kwargs) == ["json_schema"]:  # the same schema through chat's response_format
                fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": kwargs["json_schema"]}}
                with pytest.raises(ValueError, match=re.escape(message)):
                    s.chat([{"role": "user", "content": "again"}], max_tokens=8, response_format=fmt)
            assert session_state(s) == before and s.stats["tokens_decoded"] == decoded
        with pytest.raises(ValueError, match="logit_bias"):  # a token id outside the vocabulary
            s.chat([{"role": "user", "content": "again"}], max_tokens=8, logit_bias={10**6: 1.0})
        for bad in ({"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema", "json_schema": {
                "schema": {}, "extra": 1}}):
            with pytest.raises(ValueError, match="response_format"):
                s.chat([{"role": "user", "content": "x"}], response_format=bad)
        assert session_state(s) == before and s.stats["tokens_decoded"] == decoded


def test_a_refused_grammar_leaves_the_next_seed_as_it_was(model):
    """A generation the core refuses is not counted: the next seedless generation samples as a twin
    session's first one does."""
    with model.session(n_ctx=512, seed=3) as s, model.session(n_ctx=512, seed=3) as twin:
        for x in (s, twin):
            x.append_text("Hello")
        with pytest.raises(ValueError, match="grammar"):
            s.generate(8, temperature=1.0, grammar="root ::= (")
        assert s.generate(16, temperature=1.0) == twin.generate(16, temperature=1.0)
        with model.session_pool(1, n_ctx=512, seed=3) as pool:
            pool[0].append_text("Hello")
            with pytest.raises(ValueError, match="grammar"):
                Generation(pool[0], 8, temperature=1.0, grammar="root ::= (")
            assert pool[0]._generations == 0  # the refused generation was not counted


def test_a_grammar_no_token_can_continue_raises_and_keeps_the_session(model):
    """A code point past U+10FFFF (its UTF-8 lead byte would be F5) is in no valid UTF-8 text: the
    grammar allows no token at the first step, and the session is as before. U+D800 (a surrogate)
    dead-ends one byte in: the tokens before the dead end stay, as after a cancel."""
    with model.session(n_ctx=512) as s:
        s.append_text("Hello")
        before = session_state(s)
        with pytest.raises(lk.GrammarError, match="allows no token"):
            s.generate(8, grammar="root ::= [\\U00150000]")
        assert session_state(s) == before
        with pytest.raises(lk.GrammarError):
            s.generate(8, grammar='root ::= "ab" [\\uD800]')
        generated = "".join(c.text for c in s.timeline if c.generated)
        assert generated.startswith("ab")


def test_a_dropped_or_cancelled_constrained_stream_leaves_the_next_generation_valid(model):
    """A generation's grammar lives and dies with it: after a stream is dropped half-way (or the
    session is cancelled), the next constrained generation starts from the grammar's root."""
    schema = SCHEMAS["invoice"]
    with model.session(n_ctx=1024) as s:
        s.append_text("Invoice:")
        base = len(s.timeline)
        pieces = s.generate(MAX_TOKENS, temperature=1.0, seed=2, json_schema=schema, stream=True)
        next(pieces)
        next(pieces)
        pieces.close()  # dropped mid-reply: the tokens so far stay, the grammar goes
        assert len(s.timeline) > base
        s.truncate(base)
        assert s.last_json is None
        text = s.generate(MAX_TOKENS, temperature=1.0, seed=2, json_schema=schema)
        assert s.last_json == _valid(text, schema)
        s.truncate(base)
        pieces = s.generate(MAX_TOKENS, temperature=1.0, seed=3, json_schema=schema, stream=True)
        next(pieces)
        s.cancel()
        with pytest.raises(lk.CancelledError):
            list(pieces)
        s.truncate(base)
        _valid(s.generate(MAX_TOKENS, temperature=1.0, seed=3, json_schema=schema), schema)


def test_chat_response_format_parses_and_streams(model):
    schema = SCHEMAS["person"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Who?"}]
    with model.session(n_ctx=1024) as a, model.session(n_ctx=1024) as b:
        reply = a.chat(messages, response_format=fmt, temperature=1.0, seed=3, max_tokens=MAX_TOKENS)
        content = reply["choices"][0]["message"]["content"]
        assert reply["llava_kv"]["parsed"] == _valid(content, schema)
        chunks = list(b.chat(messages, response_format=fmt, temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
                             stream=True))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        obj = a.chat(messages + [{"role": "assistant", "content": content}, {"role": "user", "content": "More"}],
                     response_format={"type": "json_object"}, temperature=1.0, seed=1, max_tokens=MAX_TOKENS)
        assert isinstance(obj["llava_kv"].get("parsed", {}), dict)
        cut = a.chat(messages, response_format=fmt, temperature=1.0, seed=3, max_tokens=3)
        assert cut["choices"][0]["finish_reason"] == "length" and "parsed" not in cut["llava_kv"]


def test_batch_record_cut_by_max_tokens_fails_alone(model, images):
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 40}}, "required": ["note"],
              "additionalProperties": False}
    records = batch.run(model, [images[i % len(images)] for i in range(24)], "Note?", max_tokens=27,
                        temperature=1.0, seed=0, json_schema=schema, progress=False)
    cut = [r for r in records if not r.ok]
    done = [r for r in records if r.ok]
    assert cut and done  # replies of different lengths: some fit 27 tokens, some do not
    for r in cut:
        assert r.finish_reason == "length" and "max_tokens=27" in r.error and r.json is None and r.text
    for r in done:
        assert r.json == _valid(r.text, schema)


def test_pool_grammar_state_survives_a_failed_step(model):
    """A failed batched step puts each slot's grammar back with its sampler: the replies equal
    uninterrupted ones."""
    grammar = constraint(json_schema=SCHEMAS["invoice"]).grammar

    def run(fault_at: set[int]) -> list[str]:
        with model.session_pool(2, n_ctx=512) as pool:
            for slot in pool:
                slot.append_text("Invoice:")
            gens = [Generation(slot, MAX_TOKENS, temperature=1.0, seed=i, grammar=grammar) for i, slot in
                    enumerate(pool)]
            step = 0
            while not all(g.done for g in gens):
                if step in fault_at:
                    _testing.arm_decode_fault(1, "status")
                    with pytest.raises(lk.LlavaKVError):
                        pool.step(gens)
                pool.step(gens)
                step += 1
            return [g.text for g in gens]

    try:
        clean = run(set())
        assert run({1, 4, 9}) == clean
    finally:
        _testing.arm_decode_fault(0, "none")
    for text in clean:
        _valid(text, SCHEMAS["invoice"])


def test_pool_slot_whose_grammar_dead_ends_ends_alone(model):
    with model.session_pool(2, n_ctx=512) as pool:
        for slot in pool:
            slot.append_text("x")
        stuck = Generation(pool[0], 8, grammar='root ::= "a" [\\uD800]')
        other = Generation(pool[1], 8, grammar='root ::= "yes" | "no"')
        while not (stuck.done and other.done):
            pool.step([stuck, other])
        assert stuck.finish_reason == "error" and isinstance(stuck.error, lk.GrammarError)
        assert other.finish_reason == "stop" and other.text in ("yes", "no")


def test_cli_batch_json_schema(tmp_path, pair, images):
    from PIL import Image

    from llava_kv.cli import main

    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(str(path))
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["person"]))
    out = tmp_path / "out.jsonl"
    code = main(["batch", "--model", str(pair.model_path), "--mmproj", str(pair.mmproj_path), "--prompt", "Who?",
                 "--json-schema", str(schema_file), "--temperature", "1", "--max-tokens", str(MAX_TOKENS),
                 "--out", str(out), "--no-progress", *paths])
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line["json"] == _valid(line["text"], SCHEMAS["person"])
    (tmp_path / "bad.json").write_text(json.dumps({"type": "integer", "multipleOf": 2}))
    assert main(["batch", "--model", str(pair.model_path), "--mmproj", str(pair.mmproj_path), "--prompt", "x",
                 "--json-schema", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2.jsonl"), *paths]) == 2


@pytest.fixture(scope="module")
def server(pair):
    from llava_kv.server.process import ServerProcess

    with ServerProcess(pair.model_path, pair.mmproj_path, args=["--slots", "4", "--n-ctx", "1024"]) as srv:
        yield srv


def test_server_replies_validate(server):
    def one(args: tuple[str, int]) -> tuple[str, int, dict]:
        name, seed = args
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}
        status, _, raw = server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Form {seed}"}], "response_format": fmt,
            "temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS})
        assert status == 200, raw
        return name, seed, json.loads(raw)

    jobs = [(name, seed) for name in SCHEMAS for seed in SEEDS]
    with ThreadPoolExecutor(8) as pool:
        for name, seed, body in pool.map(one, jobs):
            choice = body["choices"][0]
            assert choice["finish_reason"] == "stop", (name, seed, choice)
            _valid(choice["message"]["content"], SCHEMAS[name])


def test_server_streams_and_the_openai_client_parses_a_pydantic_model(server):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=30)
        kind: str = Field(pattern="^(cat|dog)$")

    client = server.client()
    model_id = client.models.list().data[0].id
    parsed = client.beta.chat.completions.parse(model=model_id, messages=[{"role": "user", "content": "Pet?"}],
                                                response_format=Pet, temperature=1.0, seed=5, max_tokens=MAX_TOKENS)
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.age <= 30 and pet.kind in ("cat", "dog")
    stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Pet?"}],
                                            response_format={"type": "json_object"}, temperature=1.0, seed=5,
                                            max_tokens=MAX_TOKENS, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number",
                                                                                        "maximum": 3}}}),
    ("grammar", "root ::= ("),
    ("json_schema", {"type": "integer", "multipleOf": 2}),
    ("logit_bias", {"99999999": 1}),
    ("logit_bias", {"5": 500}),
    ("presence_penalty", 3),
    ("frequency_penalty", "x"),
    ("user", 5),
])
def test_server_refuses_bad_fields_by_name(server, field, value):
    before = server.metrics()
    status, _, raw = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                          field: value})
    assert status == 400, raw
    assert json.loads(raw)["error"]["param"] == field
    after = server.metrics()
    assert after["llava_kv_tokens_decoded_total"] == before["llava_kv_tokens_decoded_total"]


def test_server_honours_penalties_bias_and_user(server):
    status, _, raw = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "logit_bias": {"5": -100}, "user": "someone", "max_completion_tokens": 6, "temperature": 0})
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] <= 6


def test_server_deeply_nested_body_is_a_400(server):
    status, _, raw = server.post("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested" in json.loads(raw)["error"]["message"]
