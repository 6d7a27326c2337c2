import numpy as np
import pytest

import llava_kv as lk
from llava_kv.testing import make_test_model

from conftest import session_state


def _conversation(s, images):
    s.append_text("USER: ")
    s.append_image(images[0])
    s.append_text(" and ")
    s.append_image(images[1])
    s.append_text(" compare\nASSISTANT:")
    s.generate(6)


def test_save_load_gives_the_same_logits_and_timeline(model, images, tmp_path):
    with model.session(n_ctx=1024) as s:
        _conversation(s, images)
        s.save(tmp_path / "s.llkv")
        with lk.Session.load(model, tmp_path / "s.llkv") as r:
            assert r.timeline == s.timeline and r.n_past == s.n_past
            assert np.array_equal(r.logits(), s.logits())
            # the restored KV cache is live: continuing gives the same tokens in both
            assert r.generate(8) == s.generate(8)
            assert np.array_equal(r.logits(), s.logits())


def test_a_loaded_session_edits_exactly(model, images, tmp_path):
    def edits(x):
        x.replace_image(x.images[0], images[2])
        x.replace_image(x.images[0], images[0])
        x.remove_image(x.images[1])
        x.append_text(" and now?")

    with model.session(n_ctx=1024) as s:
        _conversation(s, images)
        s.save(tmp_path / "s.llkv")
        edits(s)  # the session that was never saved or loaded
        model._core.clear_cache()
        with lk.Session.load(model, tmp_path / "s.llkv") as r:
            before = r.stats
            edits(r)
            # images[2] is new to the emptied cache; images[0] came back with the saved state
            assert r.stats["images_encoded"] - before["images_encoded"] == 1
            assert r.timeline == s.timeline
            assert np.array_equal(r.logits(), s.logits())


def test_loading_into_another_model_fails_clearly(llava_pair, images, tmp_path):
    other = make_test_model(tmp_path / "other", "tiny-llava", seed=9)
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.session(n_ctx=512) as s:
        _conversation(s, images)
        s.save(tmp_path / "s.llkv")
    with lk.Model.load(other.model_path, other.mmproj_path) as m2:
        with pytest.raises(lk.LlavaKVError, match="different model"):
            lk.Session.load(m2, tmp_path / "s.llkv")
        assert m2._core.n_open_sessions() == 0


def test_corrupt_session_files(model, images, tmp_path):
    with model.session(n_ctx=512) as s:
        _conversation(s, images)
        s.save(tmp_path / "s.llkv")
    data = (tmp_path / "s.llkv").read_bytes()
    (tmp_path / "trunc.llkv").write_bytes(data[: len(data) - 100])
    (tmp_path / "junk.llkv").write_bytes(b"hello\n" + data)
    with pytest.raises(lk.LlavaKVError, match="corrupt|truncated"):
        lk.Session.load(model, tmp_path / "trunc.llkv")
    with pytest.raises(lk.LlavaKVError, match="not a llava-kv session"):
        lk.Session.load(model, tmp_path / "junk.llkv")
    with model.session(n_ctx=2048) as big:
        big.append_text(" word" * 600)
        big.save(tmp_path / "big.llkv")
    with pytest.raises(lk.ContextFullError):
        lk.Session.load(model, tmp_path / "big.llkv", n_ctx=256)
    assert model._core.n_open_sessions() == 0


def test_fork_branches_are_independent(model, images):
    with model.session(n_ctx=1024) as s, model.session(n_ctx=1024) as twin:
        _conversation(s, images)
        _conversation(twin, images)
        base_state = session_state(s)
        with s.fork() as b:
            assert np.array_equal(b.logits(), s.logits()) and b.timeline == s.timeline
            b.replace_image(b.images[1], images[3])
            b.append_text(" really?")
            assert session_state(s) == base_state  # the original did not move
            # the branch equals a session that made the same edits without forking
            twin.replace_image(twin.images[1], images[3])
            twin.append_text(" really?")
            assert np.array_equal(b.logits(), twin.logits())
            s.append_text(" really?")
            assert not np.array_equal(b.logits(), s.logits())
