import base64
import io
import threading
import weakref

import numpy as np
import pytest
from PIL import Image

import llava_kv as lk
from llava_kv import _core
from llava_kv._core import _testing

from conftest import session_state


def _prompt(s, images):
    s.append_text("USER: ")
    s.append_image(images[0])
    s.append_text(" describe the picture\nASSISTANT:")


def test_greedy_is_deterministic_and_follows_the_logits(model, images):
    texts, firsts = [], []
    for _ in range(2):
        with model.session(n_ctx=1024) as s:
            _prompt(s, images)
            argmax = int(np.argmax(s.logits()))
            n_past = s.n_past
            texts.append(s.generate(12))
            gen = s.timeline[-1]
            assert gen.generated and gen.kind == "text"
            firsts.append(s.timeline[-1].tokens[0])
            assert firsts[-1] == argmax
            # each generated token is in the timeline and the KV cache
            assert s.n_past == n_past + gen.n_tokens == n_past + s.stats["tokens_generated"]
            assert s.last_finish_reason in ("length", "stop")
    assert texts[0] == texts[1] and firsts[0] == firsts[1]


def test_streaming_equals_non_streaming(model, images):
    with model.session(n_ctx=1024) as a, model.session(n_ctx=1024) as b:
        _prompt(a, images)
        _prompt(b, images)
        whole = a.generate(20)
        pieces = list(b.generate(20, stream=True))
        assert all(isinstance(p, str) and p for p in pieces)
        assert "".join(pieces) == whole
        assert np.array_equal(a.logits(), b.logits())


def test_sampling_is_reproducible_per_seed(model, images):
    outs = []
    for seed in (1, 1, 2):
        with model.session(n_ctx=1024) as s:
            _prompt(s, images)
            outs.append(s.generate(16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_stop_strings_end_generation_and_are_not_returned(model, images):
    with model.session(n_ctx=1024) as s:
        _prompt(s, images)
        full = s.generate(24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    expected = full[: full.find(stop)]
    for stream in (False, True):
        with model.session(n_ctx=1024) as s:
            _prompt(s, images)
            out = s.generate(24, stop=["\x00never", stop], stream=stream)
            out = out if isinstance(out, str) else "".join(out)
            assert out == expected
            assert s.last_finish_reason == "stop"
            assert s.stats["tokens_generated"] < 24


def test_leaving_a_stream_stops_native_work(model, images):
    with model.session(n_ctx=1024) as s:
        _prompt(s, images)
        n_past = s.n_past
        it = s.generate(50, stream=True)
        got = [next(it) for _ in range(3)]
        n = s.stats["tokens_generated"]
        # Each token is generated when the stream is asked for it: nothing runs ahead, in no thread.
        assert len(got) == 3 and n <= 4 and s.n_past == n_past + n
        gone = weakref.ref(it)
        del it
        # Dropping the stream finalizes it at once (no thread or pending native step keeps it alive),
        # and the session takes the next call with the tokens generated so far and no more.
        assert gone() is None
        assert s.stats["tokens_generated"] == n and s.n_past == n_past + n
        s.append_text(" next")
        assert s.stats["tokens_generated"] == n and s.timeline[-2].generated and s.timeline[-2].n_tokens == n


def test_cancel_from_another_thread(model, images):
    with model.session(n_ctx=8192) as s:
        _prompt(s, images)
        pieces = s.generate(8000, stream=True)
        next(pieces)  # generation is running; cancel it from another thread while a step decodes
        _testing.arm_decode_fault(2, "pause")
        outcome = {}

        def consume():
            try:
                for _ in pieces:
                    pass
                outcome["result"] = "finished"
            except BaseException as e:  # noqa: BLE001 - inspected below
                outcome["result"] = e

        consumer = threading.Thread(target=consume)
        consumer.start()
        try:
            if not _testing.wait_decode_paused(30.0):
                consumer.join(30)
                pytest.fail(f"generation ended before its third step ({outcome}): this preset's random model "
                            "samples an end-of-generation token at once")
            s.cancel()
        finally:
            _testing.release_decode_pause()
            consumer.join(30)
            _testing.arm_decode_fault(0, "none")
        assert isinstance(outcome["result"], lk.CancelledError), outcome
        n = s.stats["tokens_generated"]
        assert n == 2  # the step that was cancelled left nothing behind
        # what was generated stays; the session remains usable
        assert s.n_past == s.timeline[-1].pos1 and s.timeline[-1].generated
        s.append_text(" more")
        assert s.logits().shape == (model.n_vocab,)


def test_generate_needs_logits(model, images):
    with model.session(n_ctx=512) as s:
        with pytest.raises(lk.LlavaKVError, match="empty"):
            s.generate(4)
        with pytest.raises(ValueError):
            s.generate(-1)


def test_generated_chunks_are_edited_like_any_other(model, images):
    with model.session(n_ctx=1024) as s:
        _prompt(s, images)
        s.generate(8)
        s.append_text("\nUSER: again")
        generated = [c.tokens for c in s.timeline if c.generated]
        image_index = s._core.index_of(s.images[0].chunk_id)
        before = s.stats
        s.replace_image(s.images[0], images[1])  # re-decodes the generated tokens too, as they were
        assert [c.tokens for c in s.timeline if c.generated] == generated
        cells_from_image = sum(c.n_tokens for c in s.timeline[image_index:])  # KV cells, not positions (M-RoPE)
        assert s.stats["tokens_decoded"] - before["tokens_decoded"] == cells_from_image
        s.remove_image(s.images[0])
        assert [c.tokens for c in s.timeline if c.generated] == generated


# -- chat --------------------------------------------------------------------------------------


def _user(text, image=None):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image", "image": image})
    return {"role": "user", "content": parts}


def test_chat_returns_the_openai_shape(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.chat_session(n_ctx=2048) as s:
        r = s.chat([_user("What is this?", images[0])], max_tokens=8)
        assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
        choice = r["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        u = r["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] == s.n_past


def test_multi_turn_never_reencodes_or_redecodes_earlier_turns(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.chat_session(n_ctx=4096) as s:
        messages = [_user("What is this?", images[0])]
        r = s.chat(messages, max_tokens=8)
        assert r["llava_kv"]["images_encoded"] == 1
        for turn in range(3):
            messages += [r["choices"][0]["message"], {"role": "user", "content": f"Tell me more, part {turn}."}]
            n_before = s.n_past
            r = s.chat(messages, max_tokens=8)
            meta = r["llava_kv"]
            assert meta["images_encoded"] == 0
            assert meta["reused_tokens"] == n_before  # the whole previous turn, answer included
            assert meta["decoded_tokens"] == r["usage"]["prompt_tokens"] - n_before
        # the same conversation as a fresh chat of the same messages (a fresh run re-tokenizes the
        # answers' text, so token counts may differ; the text may not)
        with m.chat_session(n_ctx=4096) as f:
            f.chat(messages, max_tokens=0)
            text = "".join(c.text or "" for c in s.timeline)
            assert text.startswith("".join(c.text or "" for c in f.timeline))


def test_chat_with_a_changed_earlier_image_edits_from_there(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.chat_session(n_ctx=4096) as s:
        messages = [_user("First:", images[0]), {"role": "assistant", "content": "ok"}, _user("Second?")]
        s.chat(messages, max_tokens=4)
        image_pos = s.images[0].pos0
        messages[0] = _user("First:", images[1])
        r = s.chat(messages, max_tokens=4)
        assert r["llava_kv"]["reused_tokens"] == image_pos
        assert r["llava_kv"]["images_encoded"] == 1
        assert [ref.digest for ref in s.images] == [lk.images.load_image(images[1], m.projector_id).digest]


def test_chat_image_urls(llava_pair, images, tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(images[2]).save(png)
    buf = io.BytesIO()
    Image.fromarray(images[2]).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    digests = set()
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        for url in (str(png), png.as_uri(), uri):
            with m.chat_session(n_ctx=1024) as s:
                s.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "what?"}]}], max_tokens=1)
                digests.add(s.images[0].digest)
    assert len(digests) == 1


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], ValueError),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such/file.png"}}]}], lk.ImageError),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     lk.ImageError),
    ([{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}], lk.ImageError),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     ValueError),
    ([], ValueError),
    (["hello"], ValueError),
])
def test_bad_messages_leave_the_session_unchanged(llava_pair, images, messages, error):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.chat_session(n_ctx=1024) as s:
        s.chat([_user("hi", images[0])], max_tokens=2)
        before = session_state(s)
        with pytest.raises(error):
            s.chat(messages, max_tokens=2)
        assert session_state(s) == before


def test_chat_stream_matches_non_stream(llava_pair, images):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        with m.chat_session(n_ctx=1024) as a, m.chat_session(n_ctx=1024) as b:
            whole = a.chat([_user("hi", images[0])], max_tokens=10)
            chunks = list(b.chat([_user("hi", images[0])], max_tokens=10, stream=True))
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
            assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert text == whole["choices"][0]["message"]["content"]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_template_whitespace_before_a_reply_does_not_force_a_redecode(llava_pair, images):
    # the Vicuna template renders "ASSISTANT: " + reply; the reply was generated after "ASSISTANT:"
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.chat_session(n_ctx=2048) as s:
        messages = [_user("What is this?", images[0])]
        r = s.chat(messages, max_tokens=6, chat_template="vicuna")
        n_before = s.n_past
        messages += [r["choices"][0]["message"], {"role": "user", "content": "more"}]
        r = s.chat(messages, max_tokens=6, chat_template="vicuna")
        assert r["llava_kv"]["reused_tokens"] == n_before


def test_nul_characters_in_messages_are_rendered_not_cut(llava_pair):
    # llama.cpp's template engine reads C strings: a content used to end at its first NUL, silently
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        rendered = m.render_chat([("user", "a\0b"), ("assistant", "c\0"), ("user", "\0d")], template="chatml")
        assert rendered == ("<|im_start|>user\na\0b<|im_end|>\n<|im_start|>assistant\nc\0<|im_end|>\n"
                            "<|im_start|>user\n\0d<|im_end|>\n<|im_start|>assistant\n")
        with m.chat_session(n_ctx=1024) as s:
            s.chat([{"role": "user", "content": "x\0 tail"}], max_tokens=1, chat_template="chatml")
            assert "x\0 tail" in "".join(c.text or "" for c in s.timeline)
            before = session_state(s)
            with pytest.raises(ValueError, match="NUL"):
                s.chat([{"role": "us\0er", "content": "hi"}], max_tokens=1)
            with pytest.raises(ValueError, match="NUL"):
                s.chat([{"role": "user", "content": "hi"}], max_tokens=1, chat_template="chat\0ml")
            assert session_state(s) == before


def test_a_reply_holding_a_nul_is_reused_on_the_next_turn(llava_pair):
    # the random model generates NUL now and then; such a reply, sent back as history, must match
    # the generated tokens still in the KV cache (it rendered cut at the NUL, so the turn was decoded
    # again from the start of the reply's chunk, or of the image before it, re-tokenized)
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.chat_session(n_ctx=2048) as s:
        for k in range(64):
            messages = [{"role": "user", "content": f"Client {k} turn 0."}]
            r = s.chat(messages, max_tokens=48, chat_template="chatml")
            if "\0" in r["choices"][0]["message"]["content"]:
                break
        else:
            pytest.fail("no greedy reply of 64 held a NUL: pick other prompts")
        n_before = s.n_past
        messages += [r["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        r = s.chat(messages, max_tokens=4, chat_template="chatml")
        assert r["llava_kv"]["reused_tokens"] == n_before  # the whole previous turn, NUL and all
        assert r["llava_kv"]["decoded_tokens"] == r["usage"]["prompt_tokens"] - n_before


def test_session_seed_makes_sampling_reproducible(model, images):
    """model.session(seed=...) is real: the same calls on sessions of one seed give the same text,
    consecutive calls differ, another seed differs, and a fork samples on as its source would."""
    def sample(seed):
        with model.session(n_ctx=1024, seed=seed) as s:
            _prompt(s, images)
            first = s.generate(12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
            with s.fork() as f:
                forked = f.generate(12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
            second = s.generate(12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
            return first, second, forked
    a, b = sample(5), sample(5)
    assert a == b
    assert a[1] == a[2]  # the fork drew the seed its source drew next
    assert a[0] != a[1] and sample(6)[0] != a[0]


def test_stop_strings_split_across_pieces():
    """The one stop-string matcher of sessions and the batch runner: a stop string split over
    pieces is found, text that may still become one is held back, never half a character."""
    m = _core.StopStrings(["STOP", "zz"])
    assert not m.feed(b"hello S") and m.safe_size == 4  # "hell": "o S" could begin "STOP"
    assert not m.feed(b"TO") and m.safe_size == 6
    assert m.feed(b"P and more") and m.text == b"hello " and m.safe_size == 6 and m.stopped
    assert m.feed(b"STOP") and m.text == b"hello "  # nothing changes once stopped
    u = _core.StopStrings(["zz"])
    assert not u.feed("é".encode()) and u.safe_size == 0  # one byte held back would split the character
    assert not u.feed(b"a") and u.text[: u.safe_size].decode() == "é"
    with pytest.raises(ValueError):
        _core.StopStrings([""])
