"""mode="blend", allow_drift=True: editing an early image without decoding everything after it (approximate, opt-in).

What must hold: a blend edit decodes much less than the exact one (counters), the session says it
is approximate until recompute(), after which logits equal a fresh run's bit for bit; a failed or
cancelled blend leaves the session exactly as it was; save/load/fork carry the flag; and where the
cache cannot do it (positions that would move on M-RoPE or sliding-window models, a pool slot) the
edit is refused with nothing changed.
"""
from __future__ import annotations

import numpy as np
import pytest

import llava_kv as lk
from llava_kv._core import _testing
from llava_kv.drift import greedy_agreement, logit_drift
from llava_kv.testing import make_test_model, random_image

from conftest import session_state

FAMILIES = ["tiny-llava", "tiny-qwen25vl", "tiny-gemma3"]  # llama; M-RoPE; sliding window + non-causal images


@pytest.fixture(autouse=True)
def _disarm():
    yield
    _testing.arm_decode_fault(0, "none")


@pytest.fixture(scope="module")
def family_models(models_dir):
    models = {}
    for preset in FAMILIES:
        pair = make_test_model(models_dir, preset)
        models[preset] = lk.Model.load(pair.model_path, pair.mmproj_path)
    yield models
    for m in models.values():
        m.close()


@pytest.fixture()
def llava(llava_pair):
    """Counting and shifting tests: the llama family (36-token images; positions can shift)."""
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        yield m


def _chat(s: lk.Session, images: list, words: int = 2) -> list[lk.ImageRef]:
    """A three-image conversation: short text around each image (so most of it is image tokens)."""
    refs = []
    s.append_text("USER:")
    for i, im in enumerate(images):
        refs.append(s.append_image(im))
        s.append_text(" look" * words + f" {i}.")
    s.append_text("\nASSISTANT:")
    return refs


def _fresh_logits(model: lk.Model, images: list, **kw) -> np.ndarray:
    with model.session(n_ctx=2048) as fresh:
        _chat(fresh, images, **kw)
        return fresh.logits()


def _index(s: lk.Session, ref: lk.ImageRef) -> int:
    return [c.chunk_id for c in s.timeline].index(ref.chunk_id)


def _decoded(s: lk.Session, edit) -> int:
    before = s.stats["tokens_decoded"]
    edit()
    return s.stats["tokens_decoded"] - before


def test_blend_decodes_less_than_half_of_exact(llava):
    """Replace the first of three images: exact decodes the whole suffix; blend the new image, the
    text and the first k tokens of each later image, keeping the rest of their cells."""
    images = [random_image(i) for i in range(3)]
    new = random_image(10)
    with llava.session(n_ctx=2048) as ex, llava.session(n_ctx=2048) as bl:
        refs_ex, refs_bl = _chat(ex, images, words=0), _chat(bl, images, words=0)
        exact = _decoded(ex, lambda: ex.replace_image(refs_ex[0], new))
        blend = _decoded(bl, lambda: bl.replace_image(refs_bl[0], new, mode="blend", allow_drift=True, k=2))
        n_img = refs_bl[0].n_tokens
        assert blend < exact / 2, (blend, exact)
        text = sum(c.n_tokens for c in bl.timeline[_index(bl, bl.images[0]) + 1:] if c.kind == "text")
        assert blend == n_img + text + 2 * 2  # the new image, every later text token, 2 tokens per later image
        report = bl.last_blend
        assert report == {"tokens_decoded": blend, "tokens_kept": 2 * (n_img - 2), "exact_tokens": exact, "k": 2,
                          "k_applied": 2, "exact_fallback": False}
        assert bl.stats["blend_edits"] == 1 and bl.stats["blend_tokens_kept"] == 2 * (n_img - 2)
        got = bl.stats["images_encoded"] + bl.stats["embed_cache_hits"]
        assert got == ex.stats["images_encoded"] + ex.stats["embed_cache_hits"] == 4  # 3 + the new one, no more
        assert ex.exact and not bl.exact
        assert [c.media.digest if c.media else c.text for c in bl.timeline] == \
            [c.media.digest if c.media else c.text for c in ex.timeline]
        drift = logit_drift(ex.logits(), bl.logits())
        assert np.isfinite(drift["kl"]) and drift["max_abs"] > 0  # approximate, and said so


@pytest.mark.parametrize("preset", FAMILIES)
def test_same_length_blend_on_every_family_then_recompute_is_bitwise(family_models, preset):
    model = family_models[preset]
    images = [random_image(i) for i in range(3)]
    new = random_image(20)
    want = _fresh_logits(model, [new, *images[1:]])
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, images)
        s.replace_image(refs[0], new, mode="blend", allow_drift=True, k=2)
        assert not s.exact
        report = s.last_blend
        assert report["tokens_decoded"] < report["exact_tokens"]
        assert report["k_applied"] == (0 if preset == "tiny-qwen25vl" else 2)  # M-RoPE: whole images kept
        assert s.recompute() == sum(c.n_tokens for c in s.timeline[_index(s, s.images[0]):])
        assert s.exact
        assert np.array_equal(s.logits(), want)
        assert s.recompute() == 0  # already exact: nothing to do
        with model.session(n_ctx=2048) as fresh:
            _chat(fresh, [new, *images[1:]])
            assert s.generate(8) == fresh.generate(8)


def test_recompute_decodes_from_the_edited_chunk(model):
    images = [random_image(i) for i in range(3)]
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, images)
        index = _index(s, refs[1])  # blend the middle image: the prefix before it stays exact
        s.replace_image(refs[1], random_image(30), mode="blend", allow_drift=True, k=3)
        suffix = sum(c.n_tokens for c in s.timeline[index:])
        assert s.recompute() == suffix
        assert np.array_equal(s.logits(), _fresh_logits(model, [images[0], random_image(30), images[2]]))


def test_exactness_follows_later_edits(model):
    images = [random_image(i) for i in range(3)]
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, images)
        s.replace_image(refs[1], random_image(31), mode="blend", allow_drift=True, k=3)
        s.append_text(" more")  # after the approximate chunks: still approximate
        assert not s.exact
        s.generate(3)
        assert not s.exact
        s.replace_image(s.images[2], random_image(32))  # exact, but after the first approximate chunk
        assert not s.exact
        s.replace_image(s.images[1], random_image(31))  # exact from the first approximate chunk on
        assert s.exact
        s.replace_image(s.images[0], random_image(33), mode="blend", allow_drift=True)
        assert not s.exact
        s.clear()
        assert s.exact


def test_shift_removal_is_approximate_too(llava):
    with llava.session(n_ctx=2048) as s:
        refs = _chat(s, [random_image(i) for i in range(3)])
        s.remove_image(refs[1], mode="shift")
        assert not s.exact
        s.recompute()
        assert s.exact


def test_insert_and_remove_blend_shift_positions_on_llama(llava):
    images = [random_image(i) for i in range(3)]
    with llava.session(n_ctx=2048) as s:
        refs = _chat(s, images)
        s.remove_image(refs[0], mode="blend", allow_drift=True, k=2)
        assert not s.exact and len(s.images) == 2
        assert s.last_blend["tokens_decoded"] < s.last_blend["exact_tokens"]
        layout = [(c.pos0, c.pos1) for c in s.timeline]
        s.insert_image(1, images[0], mode="blend", allow_drift=True, k=2)
        assert [r.digest for r in s.images] == [r.digest for r in refs]
        assert layout != [(c.pos0, c.pos1) for c in s.timeline]
        s.recompute()
        assert np.array_equal(s.logits(), _fresh_logits(llava, images))


@pytest.mark.parametrize("preset", ["tiny-qwen25vl", "tiny-gemma3"])
def test_blend_that_moves_positions_is_refused_where_the_cache_cannot_shift(family_models, preset):
    model = family_models[preset]
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, [random_image(i) for i in range(3)])
        before = session_state(s)
        with pytest.raises(lk.LlavaKVError, match="mode='blend' here moves what follows"):
            s.remove_image(refs[0], mode="blend", allow_drift=True)
        assert session_state(s) == before


def test_blend_is_refused_on_a_pool_slot(model):
    with model.session_pool(2, n_ctx=1024) as pool:
        refs = _chat(pool[0], [random_image(i) for i in range(2)])
        before = session_state(pool[0])
        with pytest.raises(lk.LlavaKVError, match="slot of a session pool"):
            pool[0].replace_image(refs[0], random_image(9), mode="blend", allow_drift=True)
        assert session_state(pool[0]) == before


def test_blend_arguments_are_checked(model):
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, [random_image(0)])
        for kwargs, exc in (({"mode": "blend", "k": -1}, ValueError), ({"mode": "blend", "k": 1.5}, ValueError),
                            ({"mode": "blend", "k": True}, ValueError), ({"mode": "exact", "k": 3}, ValueError), ({"mode": "exact", "allow_drift": True}, ValueError),
                            ({"mode": "fast"}, ValueError), ({"mode": "shift"}, ValueError)):
            with pytest.raises(exc):
                s.replace_image(refs[0], random_image(1), **kwargs)
        assert s.exact


@pytest.mark.parametrize("already_approximate", [False, True])
@pytest.mark.parametrize("kind", ["status", "exception", "cancel"])
def test_failed_blend_leaves_the_session_unchanged(model, kind, already_approximate):
    """A fault at every decode call of the blend in turn (until the edit has fewer calls than the
    fault's number): the session (timeline, logits, counters, exact flag) is as before, and so is
    its KV cache (recompute then gives a fresh run's logits)."""
    images = [random_image(i) for i in range(3)]
    failures = 0
    for nth in range(1, 40):
        with model.session(n_ctx=2048) as s:
            refs = _chat(s, images)
            if already_approximate:
                s.replace_image(refs[2], random_image(41), mode="blend", allow_drift=True, k=2)
            before = session_state(s)
            _testing.arm_decode_fault(nth, kind)
            try:
                s.replace_image(s.images[0], random_image(40), mode="blend", allow_drift=True, k=2)
            except (lk.CancelledError if kind == "cancel" else lk.LlavaKVError):
                failures += 1
            else:
                break  # the edit made fewer decode calls than nth: every one of them has failed once
            finally:
                _testing.arm_decode_fault(0, "none")
            assert session_state(s) == before, nth
            s.recompute()
            want = [images[0], images[1], random_image(41) if already_approximate else images[2]]
            assert np.array_equal(s.logits(), _fresh_logits(model, want)), nth
    assert failures >= 5  # the new image, three text chunks, two partial images


def test_failed_recompute_leaves_the_session_unchanged(model):
    images = [random_image(i) for i in range(3)]
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, images)
        s.replace_image(refs[0], random_image(50), mode="blend", allow_drift=True, k=2)
        before = session_state(s)
        for kind in ("status", "cancel"):
            _testing.arm_decode_fault(2, kind)
            with pytest.raises(lk.CancelledError if kind == "cancel" else lk.LlavaKVError):
                s.recompute()
            assert session_state(s) == before
        _testing.arm_decode_fault(0, "none")
        s.recompute()
        assert np.array_equal(s.logits(), _fresh_logits(model, [random_image(50), *images[1:]]))


def test_save_load_and_fork_carry_the_flag(model, tmp_path):
    images = [random_image(i) for i in range(3)]
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, images)
        s.replace_image(refs[0], random_image(60), mode="blend", allow_drift=True, k=2)
        s.save(tmp_path / "s.llkv")
        with s.fork() as f, s.fork() as g:
            assert not f.exact
            assert np.array_equal(f.logits(), s.logits())
            assert f.generate(6) == g.generate(6)
        with lk.Session.load(model, tmp_path / "s.llkv") as loaded:
            assert not loaded.exact
            loaded.recompute()
            assert np.array_equal(loaded.logits(), _fresh_logits(model, [random_image(60), *images[1:]]))
        s.recompute()
        s.save(tmp_path / "exact.llkv")
        with lk.Session.load(model, tmp_path / "exact.llkv") as loaded:
            assert loaded.exact


def test_drift_figures(model):
    images = [random_image(i) for i in range(3)]
    with model.session(n_ctx=2048) as ex, model.session(n_ctx=2048) as bl:
        refs_ex, refs_bl = _chat(ex, images), _chat(bl, images)
        ex.replace_image(refs_ex[0], random_image(70))
        bl.replace_image(refs_bl[0], random_image(70), mode="blend", allow_drift=True, k=4)
        same = logit_drift(ex.logits(), ex.logits())
        assert same == {"max_abs": 0.0, "top1_agree": True, "kl": 0.0}
        d = logit_drift(ex.logits(), bl.logits())
        assert d["max_abs"] > 0 and d["kl"] >= 0
        g = greedy_agreement(ex, bl, n=16)
        assert g["n"] == 16 and 0 <= g["leading"] <= g["same_positions"] <= 16
        assert greedy_agreement(ex, ex, n=8)["leading"] == len(greedy_agreement(ex, ex, n=8)["reference_tokens"])
        with pytest.raises(ValueError):
            logit_drift(ex.logits(), ex.logits()[:-1])
        assert len(ex.timeline) == len(bl.timeline)  # the forks left both sessions as they were


def test_sliding_window_state_after_fork_edits_exactly(family_models):
    """llama.cpp saves only each window's cells of a sliding-window cache, so a forked (or loaded)
    Gemma 3 session lacks the cells an edit further back would read: the exact edit decodes from
    the start (it used to read the missing cells as absent: logits off by several units), and a
    blend falls back to that exact edit, saying so."""
    model = family_models["tiny-gemma3"]  # a 64-token window; the conversation is several times longer
    images = [random_image(i) for i in range(3)]
    new = random_image(80)
    want = _fresh_logits(model, [new, *images[1:]], words=40)
    with model.session(n_ctx=2048) as s:
        _chat(s, images, words=40)
        assert s.n_past > 2 * 64
        with s.fork() as f:
            before = f.stats["full_redecodes"]
            f.replace_image(f.images[0], new)
            assert f.stats["full_redecodes"] == before + 1
            assert np.array_equal(f.logits(), want)
        with s.fork() as f:
            f.replace_image(f.images[0], new, mode="blend", allow_drift=True, k=2)
            assert f.last_blend["exact_fallback"] and f.exact
            assert np.array_equal(f.logits(), want)
        s.replace_image(s.images[0], new, mode="blend", allow_drift=True, k=2)  # the open session has every cell: a real blend
        assert not s.last_blend["exact_fallback"] and not s.exact
        s.recompute()
        assert np.array_equal(s.logits(), want)


def test_blend_is_refused_on_sliding_window_models_unless_drift_is_allowed(family_models):
    """The drift measured on real Gemma 3 weights is too large to be useful (README): refused there
    by default, with nothing changed; allow_drift=True runs it (the tests above do)."""
    model = family_models["tiny-gemma3"]
    with model.session(n_ctx=2048) as s:
        refs = _chat(s, [random_image(i) for i in range(3)])
        before = session_state(s)
        with pytest.raises(lk.LlavaKVError, match="refused for sliding-window models"):
            s.replace_image(refs[0], random_image(90), mode="blend")
        assert session_state(s) == before
    with family_models["tiny-llava"].session(n_ctx=2048) as s:  # elsewhere no flag is needed
        refs = _chat(s, [random_image(i) for i in range(3)])
        s.replace_image(refs[0], random_image(90), mode="blend")
        assert not s.exact
