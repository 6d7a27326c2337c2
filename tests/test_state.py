import os
import subprocess
import sys

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


# -- what wrote a state ---------------------------------------------------------------------------

_SAVE_ELSEWHERE = """
import sys
import llava_kv as lk
from llava_kv.testing import random_image

with lk.Model.load(sys.argv[1], sys.argv[2]) as m, m.session(n_ctx=512) as s:
    s.append_text("USER: ")
    s.append_image(random_image(1))
    s.append_text(" what is it?\\nASSISTANT:")
    s.save(sys.argv[3])
print(lk.build_info()["cpu_variant"])
"""


def _same_conversation(s):
    from llava_kv.testing import random_image

    s.append_text("USER: ")
    s.append_image(random_image(1))
    s.append_text(" what is it?\nASSISTANT:")


def test_a_state_records_what_wrote_it(llava_pair, tmp_path):
    from llava_kv import saved

    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.session(n_ctx=512) as s:
        _same_conversation(s)
        s.save(tmp_path / "s.llkv")
        _, blob = saved.read(tmp_path / "s.llkv", m)
        header = lk._core.inspect_state(m._core, blob)
    build = lk.build_info()
    assert (header.llama_cpp_commit, header.kv_type, header.placement, header.cpu_variant) == (
        build["llama_cpp_commit"], "f16", "CPU", build["cpu_variant"])


def test_a_state_from_other_cpu_kernels_is_refused_or_loaded_as_approximate(llava_pair, tmp_path):
    build = lk.build_info()
    if build["cpu_variants_built"] != "all":
        pytest.skip("a host-only build has one CPU variant: no state can come from other kernels")
    path = tmp_path / "elsewhere.llkv"
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_KV_CPU_VARIANT"}  # the variant this CPU gets
    result = subprocess.run([sys.executable, "-c", _SAVE_ELSEWHERE, llava_pair.model_path, llava_pair.mmproj_path,
                             str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = result.stdout.split()[-1]
    if theirs == build["cpu_variant"]:
        pytest.skip(f"this CPU's best variant is the suite's own ({theirs}): nothing differs")
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        with pytest.raises(lk.LlavaKVError, match=rf"with the CPU kernels {theirs} \(now {build['cpu_variant']}\)"):
            lk.Session.load(m, path)
        assert m._core.n_open_sessions() == 0  # nothing left behind
        with lk.Session.load(m, path, allow_drift=True) as s, m.session(n_ctx=512) as fresh:
            _same_conversation(fresh)
            assert not s.exact and s.timeline == fresh.timeline
            assert not np.array_equal(s.logits(), fresh.logits())  # computed by the other kernels
            s.recompute()
            assert s.exact and np.array_equal(s.logits(), fresh.logits())


def test_a_state_from_another_llama_cpp_is_refused_unless_drift_is_allowed(llava_pair, tmp_path):
    from llava_kv import saved
    from llava_kv._core import _testing

    commit = lk.build_info()["llama_cpp_commit"]
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        with m.session(n_ctx=512) as s:
            _same_conversation(s)
            s.save(tmp_path / "s.llkv")
        header, blob = saved.read(tmp_path / "s.llkv", m)
        assert blob.count(commit.encode()) == 1
        other = bytes(_testing.seal_state(blob.replace(commit.encode(), b"f" * len(commit))))
        saved.write(tmp_path / "other.llkv", header, other)
        with pytest.raises(lk.LlavaKVError, match=rf"written by llama.cpp ffffffffffff \(now {commit[:12]}\)"):
            lk.Session.load(m, tmp_path / "other.llkv")
        with lk.Session.load(m, tmp_path / "other.llkv", allow_drift=True) as s:
            assert not s.exact


def test_a_state_with_another_kv_type_is_refused_even_with_drift_allowed(tmp_path):
    import dataclasses

    from llava_kv.testing import PRESETS

    # heads of 32 values: a q8_0 block fits (tiny-llava's hold 16)
    pair = make_test_model(tmp_path, dataclasses.replace(PRESETS["tiny-llava"], name="heads32", n_head=2, n_head_kv=1))
    with lk.Model.load(pair.model_path, pair.mmproj_path, kv_type="q8_0", flash_attn="on") as m:
        with m.session(n_ctx=512) as s:
            _same_conversation(s)
            s.save(tmp_path / "q8.llkv")
    with lk.Model.load(pair.model_path, pair.mmproj_path) as m:
        for allow_drift in (False, True):
            with pytest.raises(lk.LlavaKVError, match="has a q8_0 KV cache and this model's is f16"):
                lk.Session.load(m, tmp_path / "q8.llkv", allow_drift=allow_drift)
