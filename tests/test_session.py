import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import llava_kv as lk
from llava_kv.testing import random_image

from conftest import IMAGE_EMBEDDINGS, mtmd_reference, session_state


@pytest.mark.parametrize("n_batch", [512, 16])
def test_piecewise_session_matches_the_mtmd_reference(model, pair, images, n_batch):
    parts = ["USER: ", images[0], " describe this\nand", images[1], " compare.\nASSISTANT:"]
    ref_tokens, ref_n_past, ref_logits = mtmd_reference(model, parts, n_batch)
    with model.session(n_ctx=4096, n_batch=n_batch) as s:
        for part in parts:
            s.append_text(part) if isinstance(part, str) else s.append_image(part)
        assert s.n_past == ref_n_past
        ours = []
        for chunk in s.timeline:
            if chunk.kind == "text":
                bos = s._core.tokenize("", True) if chunk.pos0 == 0 else []  # BOS where the model adds one
                ours += bos + s.tokenize(chunk.text)
            else:
                ours += [-1] * chunk.n_tokens
        logits = s.logits()
    if pair.preset.projector == "mlp":
        # same chunks, same batch splits: the very same tokens and bitwise the same logits
        assert ours == list(ref_tokens)
        assert np.array_equal(logits, ref_logits)
    else:
        # mtmd merges <start_of_image> into the preceding text chunk; we keep it with its image.
        # Same tokens in the same positions, batch splits differ: float-level agreement.
        flat_ref = [t for t in ref_tokens]
        assert len(ours) == len(flat_ref)
        assert np.abs(logits - ref_logits).max() < 1e-3


def test_image_inputs_of_every_kind_agree(model, tmp_path, images):
    arr = images[2]
    png = tmp_path / "x.png"
    Image.fromarray(arr).save(png)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="BMP")
    inputs = [arr, str(png), png, png.read_bytes(), buf.getvalue(), Image.open(png),
              Image.fromarray(arr).convert("RGBA"), np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])]
    digests, logits = set(), []
    for item in inputs:
        with model.session(n_ctx=512) as s:
            s.append_text("USER: ")
            ref = s.append_image(item)
            s.append_text(" what?")
            digests.add(ref.digest)
            logits.append(s.logits())
    assert len(digests) == 1
    assert all(np.array_equal(logits[0], x) for x in logits[1:])


def test_image_path_is_recorded_and_digest_depends_on_pixels(model, tmp_path, images):
    png = tmp_path / "cat.png"
    Image.fromarray(images[0]).save(png)
    with model.session(n_ctx=512) as s:
        a = s.append_image(str(png))
        b = s.append_image(images[1])
        assert a.path == str(png) and a.digest != b.digest
        assert [r.chunk_id for r in s.images] == [a.chunk_id, b.chunk_id]


@pytest.mark.parametrize("bad, error", [
    (b"definitely not an image", lk.ImageError),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, lk.ImageError),
    (np.zeros((0, 5, 3), np.uint8), lk.ImageError),
    (np.zeros((5, 5, 3), np.float32), TypeError),
    (np.zeros((5, 5, 2), np.uint8), ValueError),
    (12345, TypeError),
])
def test_bad_images_raise_and_leave_the_session_unchanged(model, images, bad, error):
    with model.session(n_ctx=512) as s:
        s.append_text("USER: ")
        s.append_image(images[0])
        s.append_text(" hi")
        before = session_state(s)
        with pytest.raises(error):
            s.append_image(bad)
        with pytest.raises(error):
            s.insert_image(1, bad)
        with pytest.raises(error):
            s.replace_image(s.images[0], bad)
        assert session_state(s) == before


def test_missing_image_file(model, tmp_path):
    with model.session(n_ctx=512) as s:
        s.append_text("hi")
        before = session_state(s)
        with pytest.raises(FileNotFoundError):
            s.append_image(tmp_path / "missing.png")
        assert session_state(s) == before


def test_context_full_names_needed_and_available(model, images):
    with model.session(n_ctx=64, n_batch=64) as s:
        assert s.n_ctx >= 64  # llama.cpp may pad the context; n_ctx reports what it holds
        s.append_text("USER: hello there")
        before = session_state(s)
        with pytest.raises(lk.ContextFullError) as err:
            s.append_text(" word" * s.n_ctx)
        assert err.value.needed > err.value.available == s.n_ctx
        assert str(err.value.needed) in str(err.value) and str(err.value.available) in str(err.value)
        assert session_state(s) == before
        with pytest.raises(lk.ContextFullError):
            for i in range(s.n_ctx):  # fill with images until one does not fit
                s.append_image(images[i % len(images)])
                filled = session_state(s)
        assert session_state(s) == filled
        assert s.n_past <= s.n_ctx


def test_logits_need_text_at_the_end(model, pair, images):
    with model.session(n_ctx=512) as s:
        with pytest.raises(lk.LlavaKVError, match="empty"):
            s.logits()
        s.append_text("USER: ")
        s.append_image(images[0])
        if pair.preset.projector != "mlp":
            # the image ends with a text token (<end_of_image>, <|vision_end|>, </img>, ...), whose
            # logits exist (as in mtmd)
            assert s.logits().shape == (model.n_vocab,)
        else:
            with pytest.raises(lk.LlavaKVError, match="ends with an image"):
                s.logits()
        s.append_text(" ok")
        assert s.logits().dtype == np.float32


def test_stats_count_the_work(model, pair, images):
    with model.session(n_ctx=1024) as s:
        s.append_text("USER: ")
        ref = s.append_image(images[0])
        s.append_text(" hi")
        st = s.stats
        # KV cells; positions (n_past) are fewer under M-RoPE
        assert st["tokens_decoded"] == s._core.n_cells == sum(c.n_tokens for c in s.timeline)
        assert s.n_past == s.timeline[-1].pos1 <= s._core.n_cells
        assert st["image_tokens_decoded"] == IMAGE_EMBEDDINGS[pair.preset.name]
        assert st["images_encoded"] + st["embed_cache_hits"] == 1
        s.append_image(images[0])  # same pixels: cache hit, no encode
        st2 = s.stats
        assert st2["images_encoded"] == st["images_encoded"] and st2["embed_cache_hits"] == st["embed_cache_hits"] + 1
        assert ref.n_tokens == s.timeline[1].n_tokens


def test_logging_is_silent_unless_verbose(llava_pair):
    script = textwrap.dedent(f"""
        import llava_kv as lk
        from llava_kv.testing import random_image
        m = lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r}, verbose=VERBOSE)
        s = m.session(n_ctx=256)
        s.append_image(random_image(0)); s.append_text(" hi"); s.logits()
        m.close()
    """)
    quiet = subprocess.run([sys.executable, "-c", script.replace("VERBOSE", "False")], capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-c", script.replace("VERBOSE", "True")], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    assert loud.returncode == 0 and "llama_model_load" in loud.stderr


def test_repr_shows_state(model, images):
    s = model.session(n_ctx=256)
    s.append_text("a")
    s.append_image(images[0])
    assert "images=1" in repr(s) and "n_ctx=256" in repr(s)
    s.close()
    assert repr(s) == "<llava_kv.Session closed>"


def test_several_new_images_in_one_edit_encode_each_once(model, pair, images):
    with model.session(n_ctx=1024) as s:
        s.append_text("USER: ")
        model._core.clear_cache()
        s.edit(1, 1, [images[3], " and ", images[4], " and ", images[3], " end"])
        st = s.stats
        assert st["images_encoded"] == 2 and st["embed_cache_misses"] == 2 and st["embed_cache_hits"] == 1
        # of the test projectors only InternVL's takes mtmd batch encoding (its tiles together)
        assert st["batched_encodes"] == (pair.preset.projector == "internvl")
        with model.session(n_ctx=1024) as f:
            f.append_text("USER: ")
            for x in [images[3], " and ", images[4], " and ", images[3], " end"]:
                f.append_text(x) if isinstance(x, str) else f.append_image(x)
            assert np.array_equal(f.logits(), s.logits())
            assert f.stats["images_encoded"] == 0
