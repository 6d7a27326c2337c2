"""Shared fixtures: the generated GGUF pairs are built once per test session."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

# The suite runs on the CPU variant the peers are built for (llama.cpp with GGML_NATIVE=OFF on
# x86-64: AVX2, FMA, F16C, BMI2, which is ggml's "haswell" variant), so logits equal theirs and the
# same on every machine; tests/test_cpu_variants.py runs the variant this CPU would get, in
# subprocesses. Set before llava_kv loads (it picks the variant once, at import).
REFERENCE_CPU_VARIANT = "haswell"
_spec = importlib.util.find_spec("llava_kv")
if any((Path(d) / f"libggml-cpu-{REFERENCE_CPU_VARIANT}.so").exists()
       for d in (_spec.submodule_search_locations or []) if _spec):
    os.environ.setdefault("LLAVA_KV_CPU_VARIANT", REFERENCE_CPU_VARIANT)

import llava_kv as lk  # noqa: E402
from llava_kv import _core  # noqa: E402
from llava_kv._core import _testing  # noqa: E402
from llava_kv.images import load_image  # noqa: E402
from llava_kv.testing import TestModel, make_test_model, random_image, rss_bytes  # noqa: E402,F401

# Every CI-sized family. tiny-pixtral is not here: its projector graph reads an uninitialised
# buffer (see tests/test_families.py), so its logits are not reproducible.
TINY_PRESETS = ["tiny-llava", "tiny-gemma3", "tiny-qwen25vl", "tiny-qwen3vl", "tiny-smolvlm", "tiny-minicpmv",
                "tiny-internvl", "tiny-llava-next"]

# Projector output tokens (embeddings, all slices and tiles) of one 96 px test image.
IMAGE_EMBEDDINGS = {"tiny-llava": 36, "tiny-gemma3": 9, "tiny-qwen25vl": 9, "tiny-qwen3vl": 9, "tiny-smolvlm": 45,
                    "tiny-minicpmv": 40, "tiny-internvl": 45, "tiny-llava-next": 45}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llava_pair(models_dir: Path) -> TestModel:
    return make_test_model(models_dir, "tiny-llava")


@pytest.fixture(scope="session")
def gemma_pair(models_dir: Path) -> TestModel:
    return make_test_model(models_dir, "tiny-gemma3")


@pytest.fixture(scope="session", params=TINY_PRESETS)
def pair(request: pytest.FixtureRequest, models_dir: Path) -> TestModel:
    return make_test_model(models_dir, request.param)


@pytest.fixture()
def model(pair: TestModel):
    with lk.Model.load(pair.model_path, pair.mmproj_path) as m:
        yield m


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    return [random_image(i) for i in range(6)]


def session_state(s: lk.Session) -> tuple:
    """Everything a failed call must leave as it was."""
    try:
        logits = s.logits().tobytes()
    except lk.LlavaKVError:
        logits = None
    return (tuple(s.timeline), s.n_past, logits, tuple(sorted(s.stats.items())), s.exact)


def feed_timeline(s: lk.Session, timeline: list, media: dict) -> None:
    """Appends to ``s`` what ``timeline`` holds, chunk by chunk (the same chunk layout), taking
    images and audio clips from ``media`` by digest."""
    for c in timeline:
        if c.kind == "text":
            assert c.text is not None
            s.append_text(c.text)
        elif c.kind == "audio":
            s.append_audio(media[c.audio.digest])
        else:
            assert c.image is not None
            s.append_image(media[c.image.digest])


def mtmd_reference(model: lk.Model, parts: list, n_batch: int = 512, n_ctx: int = 4096) -> tuple:
    """mtmd_tokenize + mtmd_helper_eval_chunks on the joined prompt (what llama-cpp-python does; mtmd
    computes the positions itself): (tokens, n_past, logits)."""
    prompt, imgs = "", []
    for part in parts:
        if isinstance(part, str):
            prompt += part
        else:
            prompt += model._core.media_marker
            loaded = load_image(part, model.projector_id)
            imgs.append(_core.MediaItem(loaded.pixels, loaded.digest, loaded.source))
    r = _testing.reference_eval(model._core, prompt, imgs, n_ctx, n_batch)
    return r.tokens, r.n_past, r.logits


def write_to_terminal(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Writes ``lines`` to the terminal even while pytest captures output."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cm = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or cm is None:
        print("\n".join(lines))
        return
    with cm.global_and_fixture_disabled():
        tr.ensure_newline()
        for line in lines:
            tr.write_line(line)
