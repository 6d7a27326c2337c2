import dataclasses
import gc
import os
import re

import numpy as np
import pytest

import llava_kv as lk
from llava_kv.testing import PRESETS, make_test_model, random_image


def test_load_reports_shapes(llava_pair):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        p = llava_pair.preset
        assert (m.n_embd, m.n_vocab, m.has_vision) == (p.n_embd, p.n_vocab, True)
        assert not m.closed
        assert "n_embd=64" in repr(m)
    assert m.closed and "closed" in repr(m)


def test_text_only_model_refuses_images(llava_pair):
    with lk.Model.load(llava_pair.model_path) as m, m.session() as s:
        assert not m.has_vision
        s.append_text("hello")
        before = s.logits()
        with pytest.raises(lk.ImageError, match="no vision projector"):
            s.append_image(random_image(0))
        assert (s.logits() == before).all() and len(s.timeline) == 1


def test_missing_files_raise_file_not_found(llava_pair, tmp_path):
    with pytest.raises(FileNotFoundError):
        lk.Model.load(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        lk.Model.load(llava_pair.model_path, tmp_path / "nope-mmproj.gguf")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_gguf_raises_model_load_error(llava_pair, tmp_path, damage):
    data = llava_pair.model_path.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"truncated": data[: len(data) // 3], "garbage": os.urandom(4096), "empty": b""}[damage])
    # refused by the validation before llama.cpp opens it; the message names the file
    with pytest.raises(lk.ModelLoadError, match=re.escape(bad.name)):
        lk.Model.load(bad)
    # and the projector side
    bad_proj = tmp_path / f"{damage}-mmproj.gguf"
    proj = llava_pair.mmproj_path.read_bytes()
    bad_proj.write_bytes({"truncated": proj[: len(proj) // 3], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(lk.ModelLoadError, match=re.escape(bad_proj.name)):
        lk.Model.load(llava_pair.model_path, bad_proj)


def test_projector_width_mismatch_names_both_widths(llava_pair, tmp_path):
    wide = make_test_model(tmp_path, dataclasses.replace(PRESETS["tiny-llava"], name="wide", n_embd=96))
    with pytest.raises(lk.ModelLoadError) as err:
        lk.Model.load(llava_pair.model_path, wide.mmproj_path)
    assert "64" in str(err.value) and "96" in str(err.value)


def test_bad_arguments_are_value_errors(llava_pair):
    with pytest.raises(ValueError):
        lk.Model.load(llava_pair.model_path, n_threads=0)
    with lk.Model.load(llava_pair.model_path) as m:
        with pytest.raises(ValueError):
            m.session(n_ctx=0)
        with pytest.raises(ValueError):
            m.session(n_batch=0)


def test_close_is_idempotent_and_closes_sessions_first(llava_pair):
    m = lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path)
    s1, s2 = m.session(n_ctx=256), m.session(n_ctx=256)
    s1.append_text("USER: ")
    s1.append_image(random_image(0))
    m.close()
    m.close()
    assert m.closed and s1.closed and s2.closed
    for call in (lambda: s1.append_text("x"), lambda: s1.logits(), lambda: s1.n_past, lambda: s1.timeline,
                 lambda: m.session(), lambda: m.memory(), lambda: s2.append_image(random_image(1)),
                 lambda: s1.images.clear()):
        with pytest.raises(lk.ClosedError):
            call()
    with pytest.raises(ValueError):  # ClosedError is also a ValueError, like a closed file
        s1.append_text("x")
    s1.close()  # closing a session of a closed model is a no-op
    assert "closed" in repr(s1)


def test_session_close_and_context_manager(llava_pair):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        with m.session(n_ctx=256) as s:
            s.append_text("hi")
            assert m._core.n_open_sessions() == 1
        assert s.closed and m._core.n_open_sessions() == 0
        with pytest.raises(lk.ClosedError):
            s.logits()
        s.close()


def test_memory_reports_components_per_device(llava_pair):
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m:
        mem = m.memory()
        weights = mem["weights"]["CPU"]
        # the tensors are most of the file
        assert 0.8 * llava_pair.model_path.stat().st_size < weights <= llava_pair.model_path.stat().st_size
        assert mem["projector"]["CPU"] > 0
        assert mem["sessions"] == {}
        assert mem["devices"]["CPU"].total > 0 and mem["devices"]["CPU"].type == "cpu"
        s = m.session(n_ctx=1024)
        s.append_image(random_image(0))
        mem = m.memory()
        (sid,) = mem["sessions"]
        kv = mem["sessions"][sid]["kv"]["CPU"]
        # KV: 2 layers x (k + v) x n_ctx x n_kv_heads x head_dim x f16
        p = llava_pair.preset
        assert kv == 2 * p.n_layer * 1024 * p.n_head_kv * (p.n_embd // p.n_head) * 2
        assert mem["sessions"][sid]["compute"]["CPU"] > 0
        assert mem["embedding_cache"]["CPU"] >= 36 * 64 * 4
        assert mem["total"]["CPU"] == sum(
            v["CPU"] for k, v in mem.items() if k in ("weights", "projector", "embedding_cache")
        ) + kv + mem["sessions"][sid]["compute"]["CPU"]
        # The device ledger saw the session's buffers being made: its KV cache among them.
        ledger = {(e.component, e.session_id): e.bytes for e in lk.device_ledger() if e.device == "CPU"}
        assert ledger[("kv", sid)] >= kv and ledger[("compute", sid)] == mem["sessions"][sid]["compute"]["CPU"]
        s.close()
        assert m.memory()["sessions"] == {}
        assert not [e for e in lk.device_ledger() if e.session_id == sid]
    assert lk.device_ledger() == []


def test_dropping_references_frees_without_close(llava_pair):
    m = lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path)
    s = m.session(n_ctx=256)
    s.append_text("hi")
    gc.collect()  # objects other tests left to the cyclic collector
    live = lk._core.native_objects()
    assert live["models"] >= 1 and live["sessions"] >= 1
    del m
    gc.collect()
    # the session keeps its model alive...
    assert lk._core.native_objects() == live
    del s
    gc.collect()
    # ...and with the last reference both are freed, no close() needed
    after = lk._core.native_objects()
    assert after == dict(live, models=live["models"] - 1, sessions=live["sessions"] - 1)


def test_flash_attention_setting(llava_pair, images):
    """"auto" is llama.cpp's choice (on for CPU); "on" gives the same logits to the bit, "off" is the
    other kernel (what llama-cpp-python's Llama() uses by default)."""
    logits = {}
    for setting in ("auto", "on", "off"):
        with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, flash_attn=setting) as m:
            assert m.flash_attn == setting
            with m.session(n_ctx=512) as s:
                s.append_text("USER: ")
                s.append_image(images[0])
                s.append_text(" what is it?")
                logits[setting] = s.logits()
    assert np.array_equal(logits["auto"], logits["on"])
    assert np.isfinite(logits["off"]).all() and not np.array_equal(logits["off"], logits["on"])
    with pytest.raises(ValueError, match="flash_attn"):
        lk.Model.load(llava_pair.model_path, flash_attn="yes")


def test_device_choice_is_checked(llava_pair):
    with pytest.raises(ValueError, match="no device named 'Nowhere0'; this build sees: .*CPU"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, main_gpu="Nowhere0")
    with pytest.raises(ValueError, match="n_gpu_layers=0 and mmproj_use_gpu=False"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, main_gpu="CPU")
    with pytest.raises(TypeError, match="main_gpu"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, main_gpu=0)  # type: ignore[arg-type]
    assert lk.device_ledger() == []


def test_quantized_kv_cache(llava_pair, images, tmp_path):
    with pytest.raises(ValueError, match="kv_type must be one of 'f16', 'q8_0', 'q4_0'"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, kv_type="q5_1")
    with pytest.raises(ValueError, match="a q8_0 V cache \\(kv_type='q8_0'\\) needs flash attention, and "
                                         "flash_attn='off'"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, kv_type="q8_0", flash_attn="off")
    with pytest.raises(ValueError, match="kv_type='f16/q4_0'\\) needs flash attention"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, kv_type=("f16", "q4_0"), flash_attn="off")
    for bad in (("q8_0",), ("q8_0", "q5_1"), ["f16", 8], 8):
        with pytest.raises(ValueError, match="or a \\(k, v\\) pair of them"):
            lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, kv_type=bad)
    # tiny-llava's heads hold 16 values, fewer than a q8_0 block: refused at load, nothing left behind
    with pytest.raises(ValueError, match="does not divide this model's attention heads of 16 values"):
        lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path, kv_type="q8_0")
    assert lk.device_ledger() == []
    pair = make_test_model(tmp_path, dataclasses.replace(PRESETS["tiny-llava"], name="heads32", n_head=2, n_head_kv=1))
    got = {}
    for kv_type in ("f16", "q8_0", "q4_0", ("q8_0", "f16")):
        # a quantized K cache alone works without flash attention
        flash_attn = "off" if kv_type == ("q8_0", "f16") else "auto"
        with lk.Model.load(pair.model_path, pair.mmproj_path, kv_type=kv_type, flash_attn=flash_attn) as m, \
                m.session(n_ctx=512) as s:
            assert m.kv_type == kv_type
            s.append_text("USER: ")
            s.append_image(images[0])
            s.append_text(" describe it\nASSISTANT:")
            (sid,) = m.memory()["sessions"]
            got[kv_type] = (m.memory()["sessions"][sid]["kv"]["CPU"], s.logits())
    # q8_0 packs 32 values in 34 bytes, q4_0 in 18: the cache shrinks by exactly that much.
    assert got["q8_0"][0] * 64 == got["f16"][0] * 34 and got["q4_0"][0] * 64 == got["f16"][0] * 18
    assert got[("q8_0", "f16")][0] * 128 == got["f16"][0] * (34 + 64)  # K at q8_0's size, V at f16's
    assert np.abs(got["q8_0"][1] - got["f16"][1]).max() < np.abs(got["q4_0"][1] - got["f16"][1]).max() < 0.5
