"""Shared fixtures: the generated GGUF pairs are built once per test session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import llava_kv as lk
from llava_kv.testing import TestModel, make_test_model, random_image, rss_bytes  # noqa: F401

TINY_PRESETS = ["tiny-llava", "tiny-gemma3"]


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
    return (tuple(s.timeline), s.n_past, logits, tuple(sorted(s.stats.items())))
