"""Small random-weight GGUF pairs (text model + mmproj projector) for tests, demos and benchmarks.

No model can be downloaded here, so llava-kv writes its own with the ``gguf`` package. Random
weights give gibberish text but real shapes, real code paths and deterministic logits, which is
what edit-equivalence, leak and speed tests need. Files are deterministic for a given preset and
seed, and are cached: asking twice for the same pair returns the existing files.

The package reads bottom-up: :mod:`.presets` names the shapes (``PRESETS``, one per family, with
the list of presets in its docstring); :mod:`.vocab`, :mod:`.towers` and :mod:`.weights` hold what
the writers need (tokenizer and chat templates, the projector layouts clip.cpp loads, random
tensors); :mod:`.text_model` and :mod:`.projector` write the two GGUF files; :mod:`.models` makes
or reuses a pair on disk (``make_test_model``); :mod:`.media` makes test images and audio clips,
:mod:`.memory` measures resident memory, and :mod:`.cli` is ``llava-kv make-test-model``.
"""
from __future__ import annotations

from .cli import main
from .media import random_audio, random_image, wav_bytes
from .memory import rss_bytes
from .models import FORMAT_VERSION, TestModel, default_cache_dir, make_test_model, make_test_projector
from .presets import PRESETS, Preset

__all__ = ["Preset", "PRESETS", "TestModel", "make_test_model", "make_test_projector", "default_cache_dir",
           "random_image", "random_audio", "wav_bytes", "rss_bytes", "main", "FORMAT_VERSION"]
