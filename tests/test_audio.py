"""Audio clips in the timeline, on the tiny-qwen2a preset (qwen2 + Qwen2-Audio whisper encoder).

A clip is one media chunk of the same registry as images: ``<|audio_bos|>``, 750 embeddings (mtmd pads
every clip under 30 s to 3000 mel frames; conv stride 2 and an average pool of 2 leave 750) and
``<|audio_eos|>``. Every edit is checked against a fresh session fed the same chunk layout, logits
compared bit for bit, with the work it did counted exactly.

The preset has no vision encoder, so ``session.media`` is checked with audio clips only; mixing images
and audio in one timeline needs a projector of both modalities (e.g. Qwen2.5-Omni), which no preset
writes yet.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import llava_kv as lk
from llava_kv.audio import load_audio
from llava_kv.chat import apply_chat_template
from llava_kv.cli import main
from llava_kv.testing import PRESETS, make_test_model, random_audio, random_image, wav_bytes

from conftest import session_state

PRESET = "tiny-qwen2a"
CLIP_TOKENS = PRESETS[PRESET].audio_tokens + 2  # with <|audio_bos|> and <|audio_eos|>
N_CTX = 4096
TURN = "<|im_start|>user\n"


@pytest.fixture(scope="module")
def audio_pair(models_dir: Path):
    return make_test_model(models_dir, PRESET)


@pytest.fixture()
def model(audio_pair):
    """A model of its own per test: its embedding cache starts empty, so counters are exact. One thread:
    these shapes gain nothing from more, and on a busy machine spinning worker threads make each 750-token
    clip ~10x slower."""
    with lk.Model.load(audio_pair.model_path, audio_pair.mmproj_path, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [random_audio(i, seconds=0.5) for i in range(5)]


def _layout(s: lk.Session) -> list[tuple]:
    return [(c.kind, c.n_tokens, c.pos0, c.pos1, c.text, c.media.digest if c.media else None)
            for c in s.timeline]


def _build(m: lk.Model, items: list, **kw) -> lk.Session:
    s = m.session(n_ctx=N_CTX, **kw)
    for it in items:
        s.append_text(it) if isinstance(it, str) else s.append_audio(it)
    return s


def _assert_fresh(s: lk.Session, by_digest: dict[str, np.ndarray]) -> None:
    """``s`` holds what a new session fed the same chunks holds: layout, n_past, logits to the bit."""
    items = [by_digest[c.media.digest] if c.media is not None else c.text for c in s.timeline]
    with _build(s.model, items) as fresh:
        assert _layout(s) == _layout(fresh)
        assert s.n_past == fresh.n_past
        assert np.array_equal(s.logits(), fresh.logits())


def _digests(m: lk.Model, clips: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {load_audio(c, m).digest: c for c in clips}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# --- the preset ------------------------------------------------------------------------------


def test_preset_writes_the_qwen2a_layout(audio_pair):
    import gguf

    r = gguf.GGUFReader(str(audio_pair.mmproj_path))
    keys = {f.name: f.contents() for f in r.fields.values()}
    assert keys["clip.has_audio_encoder"] is True and "clip.has_vision_encoder" not in keys
    assert keys["clip.projector_type"] == "qwen2a"
    p = PRESETS[PRESET]
    assert (keys["clip.audio.num_mel_bins"], keys["clip.audio.embedding_length"], keys["clip.audio.block_count"],
            keys["clip.audio.projection_dim"]) == (128, p.v_width, p.v_layers, p.n_embd)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # ggml order (ne0 first)
    assert shapes["a.conv1d.1.weight"] == (3, 128, p.v_width) and shapes["a.conv1d.1.bias"] == (1, p.v_width)
    assert shapes["a.conv1d.2.weight"] == (3, p.v_width, p.v_width)
    assert shapes["a.position_embd.weight"] == (p.v_width, 1500)
    assert shapes["mm.a.fc.weight"] == (p.v_width, p.n_embd) and shapes["mm.a.fc.bias"] == (p.n_embd,)
    for i in range(p.v_layers):
        assert f"a.blk.{i}.attn_q.bias" in shapes and f"a.blk.{i}.attn_v.bias" in shapes
        assert f"a.blk.{i}.attn_k.bias" not in shapes  # whisper-enc.cpp asserts k has no bias
        assert {f"a.blk.{i}.ln1.bias", f"a.blk.{i}.ln2.bias"} <= set(shapes)
    assert not any(name.startswith("v.") for name in shapes)


def test_model_reports_audio(model):
    assert model.has_audio is True and model.has_vision is False and model.audio_sample_rate == 16000
    # The family's chat template (ChatML, as Qwen2-Audio's) carries mtmd's media marker through to the prompt.
    marker = model._core.media_marker
    prompt, chosen = apply_chat_template(model, [("user", f"Audio 1: {marker}\nWhat is it?")])
    assert chosen.source == "model" and prompt.count(marker) == 1
    assert prompt == f"<|im_start|>user\nAudio 1: {marker}\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"


def test_a_clip_is_one_chunk_between_the_audio_markers(model, clips):
    with model.session(n_ctx=N_CTX) as s:
        s.append_text(TURN)
        before = s.stats
        ref = s.append_audio(clips[0])
        d = _delta(before, s.stats)
        assert (ref.kind, ref.n_tokens, ref.pos0, ref.pos1) == ("audio", CLIP_TOKENS, 3, 3 + CLIP_TOKENS)
        chunk = s.timeline[1]
        assert chunk.kind == "audio" and chunk.audio == ref and chunk.image is None and chunk.media == ref
        assert list(s.images) == [] and list(s.media) == [ref]
        assert d["images_encoded"] == 1 and d["embed_cache_misses"] == 1 and d["embed_cache_hits"] == 0
        assert d["image_tokens_decoded"] == CLIP_TOKENS - 2 and d["text_tokens_decoded"] == 2  # the markers
        assert d["tokens_decoded"] == CLIP_TOKENS
        # The markers are single special tokens of the vocabulary, as in Qwen2-Audio.
        assert len(s.tokenize("<|audio_bos|><|audio_eos|>")) == 2


def test_a_clip_over_30_seconds_is_one_chunk_of_two_windows(model):
    """mtmd cuts the mel spectrogram into 30 s windows: two encoder passes, still one timeline chunk."""
    long_clip = random_audio(9, seconds=31.0)
    with model.session(n_ctx=N_CTX) as s:
        s.append_text(TURN)
        ref = s.append_audio(long_clip)
        s.append_text(" and?")
        assert ref.n_tokens == 2 * (CLIP_TOKENS - 2) + 2
        assert [c.kind for c in s.timeline] == ["text", "audio", "text"]
        _assert_fresh(s, {ref.digest: long_clip})


# --- inputs ------------------------------------------------------------------------------------


def test_path_bytes_and_array_of_one_clip_are_one_embedding(model, clips, tmp_path):
    """The test clip survives a 16-bit WAV round trip exactly, so all three inputs are the same clip:
    the same digest, one encode, and the same logits to the bit."""
    wav = wav_bytes(clips[0])
    path = tmp_path / "clip.wav"
    path.write_bytes(wav)
    assert np.array_equal(model.decode_audio(wav), clips[0])
    results = []
    for x in (path, str(path), wav, clips[0]):
        with model.session(n_ctx=N_CTX) as s:
            s.append_text(TURN)
            before = s.stats
            ref = s.append_audio(x)
            s.append_text(" what is it?<|im_end|>\n")
            results.append((ref, _delta(before, s.stats), s.logits()))
    (r_path, d_path, l_path), *others = results
    assert r_path.path == str(path)
    assert d_path["images_encoded"] == 1
    for ref, d, logits in others:
        assert ref.digest == r_path.digest and ref.n_tokens == CLIP_TOKENS
        assert d["images_encoded"] == 0 and d["embed_cache_hits"] == 1, d
        assert np.array_equal(logits, l_path)


def test_a_wav_at_another_rate_is_resampled(model, clips):
    samples = model.decode_audio(wav_bytes(clips[0], rate=8000))  # 0.5 s at 8 kHz
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - 2 * clips[0].size) <= 2  # 0.5 s at 16 kHz
    assert load_audio(wav_bytes(clips[0], rate=8000), model).digest != load_audio(clips[0], model).digest


def test_the_digest_names_the_projector(model, clips, models_dir):
    other = make_test_model(models_dir, PRESET, seed=1)
    with lk.Model.load(other.model_path, other.mmproj_path, n_threads=1) as m2:
        assert m2.projector_id != model.projector_id
        assert load_audio(clips[0], m2).digest != load_audio(clips[0], model).digest
    assert load_audio(clips[0], model).digest == load_audio(clips[0].copy(), model).digest
    assert load_audio(clips[0], model).digest != load_audio(clips[1], model).digest


# --- edits -------------------------------------------------------------------------------------


def test_append_then_text_equals_a_fresh_run(model, clips):
    with _build(model, [TURN, clips[0], " first", clips[1], " second<|im_end|>\n"]) as s:
        _assert_fresh(s, _digests(model, clips))
        assert [r.kind for r in s.media] == ["audio", "audio"]


def test_insert_audio_in_the_middle(model, clips):
    with _build(model, [TURN, clips[0], " one", " two"]) as s:
        tail = s.timeline[3]
        before = s.stats
        ref = s.insert_audio(3, clips[1])
        d = _delta(before, s.stats)
        assert [c.kind for c in s.timeline] == ["text", "audio", "text", "audio", "text"]
        assert list(s.media) == [s.timeline[1].audio, ref] and ref.pos0 == tail.pos0
        # Only what follows the insertion point is decoded: the clip and the text after it.
        assert d["tokens_decoded"] == CLIP_TOKENS + tail.n_tokens, d
        assert d["kv_cells_removed"] == tail.n_tokens and d["images_encoded"] == 1, d
        assert d["full_redecodes"] == 0
        _assert_fresh(s, _digests(model, clips))


EDIT_AT = {"head": 0, "middle": 2, "tail": 4}


def _three_clips(model: lk.Model, clips: list[np.ndarray]) -> lk.Session:
    # qwen2 adds no BOS, so a clip can be the very first chunk.
    return _build(model, [clips[0], " text a", clips[1], " text b", clips[2]])


@pytest.mark.parametrize("where", sorted(EDIT_AT))
def test_replace_audio(model, clips, where):
    with _three_clips(model, clips) as s:
        i = EDIT_AT[where]
        old = s.timeline[i].audio
        suffix = sum(c.n_tokens for c in s.timeline[i:])
        before, logits = s.stats, s.logits()
        new = s.replace_audio(old, clips[3])
        d = _delta(before, s.stats)
        assert not np.array_equal(s.logits(), logits)  # the clip reaches the logits
        assert s.timeline[i].audio == new and new.digest != old.digest and new.pos0 == old.pos0
        assert old.digest not in {r.digest for r in s.media}
        assert d["tokens_decoded"] == suffix and d["kv_cells_removed"] == suffix, d
        assert d["images_encoded"] == 1 and d["embed_cache_hits"] == 0, d
        _assert_fresh(s, _digests(model, clips))
        with pytest.raises(KeyError):
            s.replace_audio(old, clips[4])  # the old ref is gone


@pytest.mark.parametrize("where", sorted(EDIT_AT))
def test_remove_audio(model, clips, where):
    with _three_clips(model, clips) as s:
        i = EDIT_AT[where]
        gone = s.timeline[i].audio
        after_it = sum(c.n_tokens for c in s.timeline[i + 1:])
        before, n_past = s.stats, s.n_past
        s.remove_audio(gone)
        d = _delta(before, s.stats)
        assert gone.digest not in {r.digest for r in s.media} and len(s.media) == 2
        assert s.n_past == n_past - CLIP_TOKENS
        if where == "tail":
            # Nothing followed the clip: the text before it is decoded again for its logits.
            assert d["tokens_decoded"] == s.timeline[-1].n_tokens, d
            assert d["kv_cells_removed"] == CLIP_TOKENS + s.timeline[-1].n_tokens, d
        else:
            assert d["tokens_decoded"] == after_it and d["kv_cells_removed"] == CLIP_TOKENS + after_it, d
        assert d["images_encoded"] == 0 and d["embed_cache_hits"] == 0, d
        _assert_fresh(s, _digests(model, clips))
        with pytest.raises(KeyError):
            s.remove_audio(gone)


def test_image_and_audio_calls_keep_to_their_kind(model, clips):
    with _build(model, [TURN, clips[0], " x"]) as s:
        ref = s.media[0]
        state = session_state(s)
        with pytest.raises(KeyError):
            s.remove_image(ref)  # an audio ref is not an image
        with pytest.raises(KeyError):
            s.replace_image(ref, random_image(0))
        with pytest.raises(KeyError):
            s.remove_audio(s.timeline[0].chunk_id)  # a text chunk
        assert session_state(s) == state


# --- the media view (audio only: the preset has no vision encoder) ------------------------------


def test_media_view_lists_clips_in_timeline_order(model, clips):
    with _build(model, [TURN, clips[0], " a", clips[1], " b"]) as s:
        first = s.insert_audio(1, clips[2])  # before clips[0]
        by_digest = _digests(model, clips)
        assert [by_digest[r.digest] is c for r, c in zip(s.media, (clips[2], clips[0], clips[1]))] == [True] * 3
        assert s.media[0] == first and all(r.kind == "audio" for r in s.media) and list(s.images) == []
        assert [r.pos0 for r in s.media] == sorted(r.pos0 for r in s.media)
        assert len(s.media) == 3 and len(s.images) == 0

        del s.media[1]  # clips[0]
        assert [by_digest[r.digest] is c for r, c in zip(s.media, (clips[2], clips[1]))] == [True, True]
        s.media[1] = clips[3]  # a clip stays a clip
        assert s.media[1].kind == "audio" and by_digest[s.media[1].digest] is clips[3]
        s.media.append(clips[4])
        assert s.timeline[-1].kind == "audio" and by_digest[s.media[-1].digest] is clips[4]
        _assert_fresh(s, by_digest)
        s.media.clear()
        assert list(s.media) == [] and [c.kind for c in s.timeline] == ["text"] * 3
        _assert_fresh(s, by_digest)


# --- the embedding cache -------------------------------------------------------------------------


def test_a_repeated_clip_is_an_embedding_cache_hit(model, clips):
    with model.session(n_ctx=N_CTX) as s:
        s.append_text(TURN)
        first = s.append_audio(clips[0])
        s.append_text(" again:")
        before = s.stats
        second = s.append_audio(wav_bytes(clips[0]))  # same samples, given as a WAV file
        d = _delta(before, s.stats)
        assert second.digest == first.digest and second.chunk_id != first.chunk_id
        assert {k: v for k, v in d.items() if v and k != "decode_calls"} == {
            "tokens_decoded": CLIP_TOKENS, "image_tokens_decoded": CLIP_TOKENS - 2, "text_tokens_decoded": 2,
            "images_decoded": 1, "embed_cache_hits": 1}, d
        # Another session of the same model shares the cache.
        with model.session(n_ctx=N_CTX) as other:
            b2 = other.stats
            other.append_audio(clips[0])
            d2 = _delta(b2, other.stats)
            assert d2["images_encoded"] == 0 and d2["embed_cache_hits"] == 1, d2
        _assert_fresh(s, _digests(model, clips))


# --- state -------------------------------------------------------------------------------------


def test_save_load_and_fork_keep_audio_chunks(model, clips, tmp_path):
    with _build(model, [TURN, clips[0], " hear", clips[1], " this<|im_end|>\n"]) as s:
        path = tmp_path / "audio.session"
        s.save(path)
        with lk.Session.load(model, path) as loaded, s.fork() as forked:
            for other in (loaded, forked):
                assert _layout(other) == _layout(s) and other.n_past == s.n_past
                assert [(r.kind, r.digest) for r in other.media] == [(r.kind, r.digest) for r in s.media]
                assert np.array_equal(other.logits(), s.logits())
            replies = [x.generate(max_tokens=6, temperature=0.0) for x in (s, loaded, forked)]
            assert replies[0] == replies[1] == replies[2]
            for other in (loaded, forked):
                assert np.array_equal(other.logits(), s.logits())
            # An edit of a loaded session reuses the saved embeddings: nothing is encoded again.
            before = loaded.stats
            loaded.remove_audio(loaded.media[0])
            assert _delta(before, loaded.stats)["images_encoded"] == 0
            s.remove_audio(s.media[0])
            assert np.array_equal(loaded.logits(), s.logits())


# --- bad input ---------------------------------------------------------------------------------

BAD_AUDIO = {
    "garbage-wav": (b"RIFF\x10\x00\x00\x00WAVEjunk-not-a-wav", lk.AudioError),
    "not-audio-bytes": (b"plain text, not a sound", lk.AudioError),
    "empty-array": (np.zeros(0, np.float32), lk.AudioError),
    "nan-samples": (np.array([0.0, np.nan, 0.1] * 100, np.float32), lk.AudioError),
    "inf-samples": (np.array([0.0, np.inf] * 100, np.float32), lk.AudioError),
    "2-d-array": (np.zeros((2, 800), np.float32), lk.AudioError),
    "int-array": (np.zeros(800, np.int16), lk.AudioError),
    "missing-path": ("/nonexistent/clip.wav", FileNotFoundError),
    "list": ([0.0] * 800, TypeError),
    "number": (3, TypeError),
}


@pytest.mark.parametrize("name", sorted(BAD_AUDIO))
def test_bad_audio_raises_and_leaves_the_session_unchanged(model, clips, name):
    bad, error = BAD_AUDIO[name]
    with _build(model, [TURN, clips[0], " x"]) as s:
        state = session_state(s)
        for call in (lambda: s.append_audio(bad), lambda: s.insert_audio(1, bad),
                     lambda: s.replace_audio(s.media[0], bad)):
            with pytest.raises(error):
                call()
            assert session_state(s) == state


def test_a_directory_is_not_a_clip(model, clips, tmp_path):
    with _build(model, [TURN, clips[0]]) as s:
        state = session_state(s)
        with pytest.raises(FileNotFoundError):
            s.append_audio(tmp_path)
        assert session_state(s) == state


def test_a_model_without_audio_refuses_clips(llava_pair, clips):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, n_threads=1) as m, m.session(n_ctx=512) as s:
        assert m.has_audio is False and m.audio_sample_rate is None
        s.append_text("USER: ")
        s.append_image(random_image(0))
        state = session_state(s)
        for x in (clips[0], wav_bytes(clips[0])):
            with pytest.raises(lk.AudioError, match="audio"):
                s.append_audio(x)
            assert session_state(s) == state
        with pytest.raises(lk.AudioError, match="audio"):
            m.decode_audio(wav_bytes(clips[0]))


def test_an_audio_only_model_refuses_images(model, clips):
    with _build(model, [TURN, clips[0]]) as s:
        state = session_state(s)
        with pytest.raises(lk.ImageError, match="vision"):
            s.append_image(random_image(0))
        assert session_state(s) == state


def test_a_bad_clip_is_an_audio_error_and_a_bad_image_an_image_error(model, llava_pair, clips):
    assert issubclass(lk.ImageError, lk.MediaError) and issubclass(lk.AudioError, lk.MediaError)
    assert issubclass(lk.MediaError, lk.LlavaKVError)
    assert not issubclass(lk.ImageError, lk.AudioError) and not issubclass(lk.AudioError, lk.ImageError)
    with _build(model, [TURN, clips[0]]) as s:
        # Refused in Python (NaN samples) and in the core (a RIFF header mtmd cannot read): both
        # are the clip's kind, and one except clause catches either kind of bad media.
        for bad in (np.array([0.0, np.nan] * 100, np.float32), b"RIFF\x10\x00\x00\x00WAVEjunk-not-a-wav"):
            with pytest.raises(lk.MediaError) as caught:
                s.append_audio(bad)
            assert type(caught.value) is lk.AudioError, caught.value
        with pytest.raises(lk.AudioError, match="not a readable audio file"):
            model.decode_audio(b"RIFF\x10\x00\x00\x00WAVEjunk-not-a-wav")
        # An image on a model without a vision encoder stays an ImageError.
        with pytest.raises(lk.MediaError) as caught:
            s.append_image(random_image(0))
        assert type(caught.value) is lk.ImageError, caught.value
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, n_threads=1) as m, m.session(n_ctx=512) as s:
        s.append_text("USER: ")
        for bad in (b"definitely not an image", np.zeros((0, 5, 3), np.uint8)):
            with pytest.raises(lk.MediaError) as caught:
                s.append_image(bad)
            assert type(caught.value) is lk.ImageError, caught.value


def test_media_encoded_counts_images_and_clips_as_images_encoded_does(model, llava_pair, clips):
    with _build(model, [TURN]) as s:
        s.append_audio(clips[0])
        s.append_audio(clips[0])  # a cache hit: counted by neither
        st = s.stats
        assert st["media_encoded"] == st["images_encoded"] == 1
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, n_threads=1) as m, m.session(n_ctx=512) as s:
        s.append_text("USER: ")
        s.append_image(random_image(0))
        st = s.stats
        assert st["media_encoded"] == st["images_encoded"] == 1


def test_a_clip_that_does_not_fit_is_refused(model, clips):
    with model.session(n_ctx=CLIP_TOKENS + 8) as s:  # room for one clip and a few tokens
        s.append_text(TURN)
        s.append_audio(clips[0])
        state = session_state(s)
        with pytest.raises(lk.ContextFullError):
            s.append_audio(clips[1])
        assert session_state(s) == state


# --- shift removal (approximate) ---------------------------------------------------------------

# In a child process: an abort inside llama.cpp must fail this test, not the test run.
_SHIFT_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import llava_kv as lk
    from llava_kv.testing import random_audio

    clips = [random_audio(i, seconds=0.5) for i in range(3)]

    def layout(s):
        return [[c.kind, c.n_tokens, c.pos0, c.pos1, c.chunk_id, c.text, c.media.digest if c.media else None]
                for c in s.timeline]

    with lk.Model.load(sys.argv[1], sys.argv[2], n_threads=1) as m:
        s = m.session(n_ctx=4096)
        for it in ["<|im_start|>user\n", clips[0], " a", clips[1], " b", clips[2], " c"]:
            s.append_text(it) if isinstance(it, str) else s.append_audio(it)
        ref = s.media[1]
        out = {"ref": [ref.chunk_id, ref.n_tokens],
               "before": {"layout": layout(s), "n_past": s.n_past, "stats": s.stats}}
        try:
            s.remove_audio(ref, mode="shift")
            out["outcome"] = "ok"
        except lk.LlavaKVError as e:
            out["outcome"] = f"refused: {e}"
        out["after"] = {"layout": layout(s), "n_past": s.n_past, "stats": s.stats}
        out["finite"] = bool((abs(s.logits()) < float("inf")).all())
    print("RESULT " + json.dumps(out))
""")


def test_shift_removal_of_a_clip(audio_pair):
    proc = subprocess.run([sys.executable, "-c", _SHIFT_SCRIPT, str(audio_pair.model_path),
                           str(audio_pair.mmproj_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    before, after = out["before"], out["after"]
    if out["outcome"] != "ok":  # a refusal must say why and change nothing
        assert "shift" in out["outcome"].lower() and after == before, out
        return
    ref_id, n = out["ref"]
    old = before["layout"]
    i = [c[4] for c in old].index(ref_id)
    # Same chunks minus the clip; the ones after it moved down by its span, without re-decoding.
    assert after["layout"] == [c[:2] + ([c[2] - n, c[3] - n] if j > i else c[2:4]) + c[4:]
                               for j, c in enumerate(old) if j != i]
    assert after["n_past"] == before["n_past"] - n
    d = {k: after["stats"][k] - before["stats"][k] for k in before["stats"]}
    assert d["shift_edits"] == 1 and d["images_encoded"] == 0 and d["images_decoded"] == 0, d
    assert d["tokens_decoded"] <= 1 and d["kv_cells_removed"] in (n, n + 1), d
    assert out["finite"]


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_info_and_make_test_model_name_the_audio_projector(audio_pair, capsys, tmp_path):
    assert main(["info", "--model", str(audio_pair.model_path), "--mmproj", str(audio_pair.mmproj_path)]) == 0
    info = json.loads(capsys.readouterr().out)["model"]
    assert info["family"] == "qwen2" and info["projector_type"] == "qwen2a" and info["has_vision"] is False
    assert main(["make-test-model", "--preset", PRESET, "--out", str(tmp_path)]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["preset"] == PRESET and made["audio_tokens"] == 750 and made["image_tokens"] == 0
    assert Path(made["mmproj"]).read_bytes() == audio_pair.mmproj_path.read_bytes()  # deterministic


def _audio_part(clip: np.ndarray, rate: int) -> dict:
    import base64

    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(clip, rate)).decode(),
                                                   "format": "wav"}}


def test_chat_with_input_audio_parts(model, clips):
    """OpenAI's input_audio parts: the clip goes through the registry like an image part. A new turn
    appends only; changing the clip of an earlier message re-decodes from it, nothing before."""
    rate = model.audio_sample_rate
    messages = [{"role": "user", "content": [_audio_part(clips[0], rate), {"type": "text", "text": "What is it?"}]}]
    with model.chat_session(n_ctx=N_CTX) as s:
        reply = s.chat(messages, max_tokens=4)
        assert reply["llava_kv"]["images_encoded"] == 1
        assert [c.kind for c in s.timeline].count("audio") == 1
        with model.chat_session(n_ctx=N_CTX) as fresh:  # the same conversation from scratch
            assert fresh.chat(messages, max_tokens=4)["choices"][0]["message"] == reply["choices"][0]["message"]
        messages += [reply["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        again = s.chat(messages, max_tokens=4)
        assert again["llava_kv"]["images_encoded"] == 0
        assert again["llava_kv"]["reused_tokens"] >= reply["usage"]["total_tokens"] - 1
        audio_pos = s.media[0].pos0
        messages[0]["content"][0] = _audio_part(clips[1], rate)
        edited = s.chat(messages, max_tokens=4)
        assert edited["llava_kv"]["images_encoded"] == 1
        assert edited["llava_kv"]["reused_tokens"] == audio_pos
    with pytest.raises(ValueError, match="format"):
        with model.chat_session(n_ctx=N_CTX) as s:
            s.chat([{"role": "user", "content": [{"type": "input_audio",
                                                  "input_audio": {"data": "AAAA", "format": "ogg"}}]}])
