"""What each mtmd family's preset puts in the KV cache, M-RoPE positions (qwen2.5-vl, qwen3-vl) and
Qwen3-VL's deepstack slices.

The edit, batch, state and chat suites run on every preset in conftest.TINY_PRESETS; this file checks
what is particular to a family: how many KV cells and positions one image takes (several slices or
tiles where the projector makes them), and, under M-RoPE, that positions are recorded apart from cells
and agree with mtmd's own evaluation.

tiny-pixtral is kept out of TINY_PRESETS: the pinned llama.cpp's Pixtral graph
(tools/mtmd/models/pixtral.cpp) builds each [IMG_BREAK] row as ``ggml_scale(uninitialised, 0) +
img_break``, so an encode that lands on a buffer holding NaN bits yields NaN embeddings (seen on the
first encode in a process, not on later ones; llava-kv then refuses the non-finite logits). Its
layout and chat template are checked here; its logits and replies are not.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import llava_kv as lk
from llava_kv.testing import PRESETS, make_test_model, random_image

from conftest import mtmd_reference

TOL = 1e-3

# A 96 px test image after text: (KV cells, positions) and how the count comes about.
LAYOUT = {
    "tiny-qwen25vl": (11, 5),  # <|vision_start|> + 3x3 merged tokens on 3 M-RoPE positions + <|vision_end|>
    "tiny-qwen3vl": (11, 5),  # the same, under interleaved M-RoPE
    "tiny-smolvlm": (58, 58),  # 2x2 tiles + overview, 9 tokens each, 13 marker tokens
    "tiny-pixtral": (42, 42),  # 6x6 patches + 5 [IMG_BREAK] + [IMG_END]
    "tiny-minicpmv": (51, 51),  # overview + 2x2 slices, 8 queries each, 11 marker tokens
    "tiny-internvl": (47, 47),  # 2x2 tiles + thumbnail, 9 tokens each, <img> ... </img>
    "tiny-llava-next": (45, 45),  # overview + 2x2 tiles of 3x3 patches
}
MULTI_TILE = {"tiny-smolvlm", "tiny-minicpmv", "tiny-internvl", "tiny-llava-next"}
MROPE = ["tiny-qwen25vl", "tiny-qwen3vl"]


@pytest.fixture(scope="module")
def families_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("families")


def _load(families_dir, preset) -> lk.Model:
    tm = make_test_model(families_dir, preset)
    return lk.Model.load(tm.model_path, tm.mmproj_path)


@pytest.mark.parametrize("preset", sorted(LAYOUT))
def test_an_image_takes_the_family_layout(families_dir, preset):
    cells, positions = LAYOUT[preset]
    with _load(families_dir, preset) as m, m.session(n_ctx=1024, n_batch=64) as s:
        s.append_text("USER: look")
        try:
            ref = s.append_image(random_image(0))
        except lk.ImageError as e:
            # The pinned llama.cpp's Pixtral graph reads a buffer it never wrote (README: Supported
            # models): when that memory holds NaN the projector's output is refused, never decoded.
            assert preset == "tiny-pixtral" and "non-finite" in str(e), e
            assert len(s.timeline) == 1
            ref = None
        if ref is not None:
            assert (ref.n_tokens, ref.pos1 - ref.pos0) == (cells, positions)
        if preset in MULTI_TILE:
            # Several slices: far more than one tile's worth of embeddings.
            assert ref is not None and ref.n_tokens >= 5 * PRESETS[preset].image_tokens
        # The family's chat template renders the media marker where the image goes.
        prompt = m.render_chat([("user", m.media_marker + "what is it")])
        # (chat() itself runs on every TINY_PRESETS preset in test_batch.py.)
        assert prompt.count(m.media_marker) == 1


@pytest.mark.parametrize("preset", MROPE)
def test_mrope_spans_are_recorded_in_positions_and_cells(families_dir, preset):
    with _load(families_dir, preset) as m, m.session(n_ctx=1024, n_batch=64) as s:
        assert m.uses_mrope
        for part in ("USER: look", random_image(0), " and", random_image(1), " describe"):
            s.append_text(part) if isinstance(part, str) else s.append_image(part)
        tl = s.timeline
        assert [c.pos0 for c in tl[1:]] == [c.pos1 for c in tl[:-1]]
        images = [c for c in tl if c.kind == "image"]
        assert all(c.pos1 - c.pos0 < c.n_tokens for c in images)
        assert all(c.pos1 - c.pos0 == c.n_tokens for c in tl if c.kind == "text")
        assert s._core.n_cells == sum(c.n_tokens for c in tl)
        assert s.n_past == tl[-1].pos1 == s._core.n_cells - sum(c.n_tokens - (c.pos1 - c.pos0) for c in images)
        _, n_past, ref = mtmd_reference(m, ["USER: look", random_image(0), " and", random_image(1), " describe"])
        assert s.n_past == n_past
        assert np.abs(s.logits() - ref).max() <= TOL


@pytest.mark.parametrize("preset", MROPE)
@pytest.mark.parametrize("edit", ["edit-text-after-image", "insert-image-after-image", "replace-first-image",
                                  "remove-first-image"])
def test_mrope_edits_after_an_image_keep_positions_right(families_dir, edit, preset):
    a, b, c = random_image(0), random_image(1), random_image(2)
    parts = ["USER: look", a, " and this", b, " describe"]
    expected = {"edit-text-after-image": ["USER: look", a, " other words here", b, " describe"],
                "insert-image-after-image": ["USER: look", a, c, " and this", b, " describe"],
                "replace-first-image": ["USER: look", c, " and this", b, " describe"],
                "remove-first-image": ["USER: look", " and this", b, " describe"]}[edit]
    with _load(families_dir, preset) as m, m.session(n_ctx=1024, n_batch=64) as s:
        for part in parts:
            s.append_text(part) if isinstance(part, str) else s.append_image(part)
        if edit == "edit-text-after-image":
            s.edit(2, 3, [" other words here"])
        elif edit == "insert-image-after-image":
            s.insert_image(2, c)
        elif edit == "replace-first-image":
            s.replace_image(s.images[0], c)
        else:
            s.remove_image(s.images[0])
        tl = s.timeline
        assert [x.pos0 for x in tl[1:]] == [x.pos1 for x in tl[:-1]]
        assert all(x.pos1 - x.pos0 == 5 and x.n_tokens == 11 for x in tl if x.kind == "image")
        assert s._core.n_cells == sum(x.n_tokens for x in tl)
        if edit == "remove-first-image":
            # Two text chunks meet: mtmd would tokenize the joined text differently, so the
            # reference is a fresh session with the same chunks.
            with m.session(n_ctx=1024, n_batch=64) as f:
                for part in expected:
                    f.append_text(part) if isinstance(part, str) else f.append_image(part)
                n_past, ref = f.n_past, f.logits()
        else:
            # mtmd computes the positions itself: a registry that got them wrong would differ here.
            _, n_past, ref = mtmd_reference(m, expected)
        assert s.n_past == n_past
        assert np.abs(s.logits() - ref).max() <= TOL


def test_a_wrong_position_layout_is_detected(families_dir):
    """The same weights as a 1-D RoPE model (qwen2): images then take one position per KV cell, as a
    registry that counted cells instead of positions would place them. Text alone agrees within TOL;
    with an image the logits differ by far more than the edit tests allow."""
    mrope = PRESETS["tiny-qwen25vl"]
    flat = dataclasses.replace(mrope, name="tiny-qwen25vl-1d", arch="qwen2", rope_sections=())
    got = {}
    for p in (mrope, flat):
        with _load(families_dir, p) as m, m.session(n_ctx=1024, n_batch=64) as s:
            s.append_text("USER: look at this")
            text_only = s.logits()
            s.append_image(random_image(0))
            s.append_text(" describe it")
            got[p.name] = (m._core.uses_mrope, s.n_past, s._core.n_cells, text_only, s.logits())
    (m1, past1, cells1, t1, l1), (m2, past2, cells2, t2, l2) = got[mrope.name], got[flat.name]
    assert m1 and not m2
    assert cells1 == cells2 and past1 < cells1 and past2 == cells2
    assert np.abs(t1 - t2).max() <= TOL
    assert np.abs(l1 - l2).max() > 100 * TOL


def test_deepstack_slices_reach_the_text_model(families_dir):
    """Qwen3-VL: the projector's output is 1 + n_deepstack slices wide per token and the text model adds
    slice k+1 after its layer k. The same weights without the deepstack mergers (and without the text
    model's n_deepstack_layers) agree on text alone but not once an image is in the context, so the
    slices are decoded, not dropped; and mtmd's own evaluation of the wide embeddings agrees."""
    deep = PRESETS["tiny-qwen3vl"]
    assert deep.deepstack_layers == (0, 1) and deep.n_layer > len(deep.deepstack_layers)
    flat = dataclasses.replace(deep, name="tiny-qwen3vl-flat",
                               vision_keys=(("clip.vision.is_deepstack_layers", [False] * deep.v_layers),))
    parts = ["USER: look", random_image(0), " describe"]
    got = {}
    for p in (deep, flat):
        with _load(families_dir, p) as m, m.session(n_ctx=1024, n_batch=64) as s:
            s.append_text(parts[0])
            text_only = s.logits()
            s.append_image(parts[1])
            s.append_text(parts[2])
            got[p.name] = (text_only, s.logits())
            if p is deep:
                _, n_past, ref = mtmd_reference(m, parts)
                assert s.n_past == n_past and np.abs(s.logits() - ref).max() <= TOL
    (t1, l1), (t2, l2) = got[deep.name], got[flat.name]
    assert np.array_equal(t1, t2)
    assert np.abs(l1 - l2).max() > 100 * TOL
