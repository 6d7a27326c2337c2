import dataclasses
import hashlib

import numpy as np
import pytest

import llava_kv as lk
from llava_kv.testing import PRESETS, make_test_model, random_image


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-gemma3"])
def test_pairs_are_deterministic_per_seed(tmp_path, preset):
    a = make_test_model(tmp_path / "a", preset, seed=3)
    b = make_test_model(tmp_path / "b", preset, seed=3)
    c = make_test_model(tmp_path / "c", preset, seed=4)
    assert _sha(a.model_path) == _sha(b.model_path) and _sha(a.mmproj_path) == _sha(b.mmproj_path)
    assert _sha(a.model_path) != _sha(c.model_path) and _sha(a.mmproj_path) != _sha(c.mmproj_path)


def test_presets_differ_in_architecture_and_projector():
    assert PRESETS["tiny-llava"].arch != PRESETS["tiny-gemma3"].arch
    assert PRESETS["tiny-llava"].projector != PRESETS["tiny-gemma3"].projector
    assert PRESETS["llava-7b"].image_tokens == 576


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-gemma3"])  # the other families: test_families.py
def test_image_token_counts_match_the_preset(tmp_path, preset):
    pair = make_test_model(tmp_path, preset)
    with lk.Model.load(pair.model_path, pair.mmproj_path) as m, m.session(n_ctx=512) as s:
        ref = s.append_image(random_image(0))
        # gemma3 wraps the image in <start_of_image> ... <end_of_image>; BOS goes first.
        extra = 1 + (2 if pair.preset.projector == "gemma3" else 0)
        assert ref.n_tokens == pair.preset.image_tokens + extra


def test_distinct_seeds_give_distinct_logits(tmp_path):
    logits = []
    for seed in (0, 1):
        tm = make_test_model(tmp_path, "tiny-llava", seed=seed)
        with lk.Model.load(tm.model_path, tm.mmproj_path) as m, m.session() as s:
            s.append_text("hello world")
            logits.append(s.logits())
    assert not np.allclose(logits[0], logits[1])
    # A random model with its own output matrix has a spread of logits, not one repeated token.
    assert logits[0].std() > 0.1


def test_custom_preset_and_unknown_name(tmp_path):
    wide = dataclasses.replace(PRESETS["tiny-llava"], name="wide", n_embd=96)
    tm = make_test_model(tmp_path, wide)
    with lk.Model.load(tm.model_path, tm.mmproj_path) as m:
        assert m.n_embd == 96
    with pytest.raises(ValueError, match="unknown preset"):
        make_test_model(tmp_path, "no-such-preset")


def test_random_image_is_deterministic():
    assert np.array_equal(random_image(5), random_image(5))
    assert not np.array_equal(random_image(5), random_image(6))
    assert random_image(5, (40, 60)).shape == (40, 60, 3)
