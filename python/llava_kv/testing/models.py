"""Making a test pair on disk: ``make_test_model`` (and ``make_test_projector`` for a projector alone)
writes a preset's files under a folder, by default :func:`default_cache_dir`, and reuses them while a
stamp file says they were written for the same preset, seed and ``FORMAT_VERSION``; ``TestModel``
holds the resulting paths.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..paths import cache_dir
from .presets import PRESETS, Preset
from .projector import _write_projector
from .text_model import _write_text_model

# Bump when the files written for the same preset and seed change.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TestModel:
    model_path: Path
    mmproj_path: Path
    preset: Preset = field(compare=False)
    seed: int = 0


def default_cache_dir() -> Path:
    """Where generated test models go by default: ``test-models`` in llava-kv's cache (:mod:`llava_kv.paths`)."""
    return cache_dir() / "test-models"


def make_test_model(out_dir: str | os.PathLike[str] | None = None, preset: str | Preset = "tiny-llava", *,
                    seed: int = 0, overwrite: bool = False) -> TestModel:
    """Write (or reuse) the random-weight GGUF pair of ``preset`` under ``out_dir``.

    ``preset`` is a name from PRESETS or a Preset (e.g. ``dataclasses.replace(PRESETS["tiny-llava"],
    name="wide", n_embd=96)``). Returns the paths. Files are written to a temporary name and
    renamed, so an interrupted run never leaves a half-written model that a later call would reuse.
    """
    if isinstance(preset, Preset):
        p = preset
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{p.name}-s{seed}"
    model_path = out / f"{stem}.gguf"
    mmproj_path = out / f"{stem}-mmproj.gguf"
    stamp = out / f"{stem}.json"
    # Through JSON and back, so that tuples compare equal to the lists the stamp file holds.
    wanted = json.loads(json.dumps({"format": FORMAT_VERSION, "preset": asdict(p), "seed": seed}))
    fresh = (not overwrite and model_path.exists() and mmproj_path.exists() and stamp.exists()
             and json.loads(stamp.read_text()) == wanted)
    if not fresh:
        for target, writer in ((model_path, _write_text_model), (mmproj_path, _write_projector)):
            tmp = target.with_name(target.name + ".tmp")
            writer(tmp, p, seed)
            tmp.replace(target)
        stamp.write_text(json.dumps(wanted, indent=1))
    return TestModel(model_path, mmproj_path, p, seed)


def make_test_projector(text_width: int, out_dir: str | os.PathLike[str] | None = None,
                        preset: str | Preset = "tiny-gemma3", *, seed: int = 0) -> Path:
    """Write (or reuse) only the random-weight projector of ``preset``, sized for a text model of
    width ``text_width``: the projector half of a pair whose text model is a real GGUF (e.g. a
    Gemma 3 projector of width 640 for Gemma 3 270M). Returns its path."""
    import dataclasses

    base = preset if isinstance(preset, Preset) else PRESETS[preset]
    if text_width < 1:
        raise ValueError(f"text_width must be >= 1, got {text_width}")
    p = dataclasses.replace(base, name=f"{base.name}-w{text_width}", n_embd=text_width)
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{p.name}-s{seed}-mmproj.gguf"
    stamp = path.with_name(path.name + ".json")
    wanted = json.loads(json.dumps({"format": FORMAT_VERSION, "preset": asdict(p), "seed": seed}))
    if not (path.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted):
        tmp = path.with_name(path.name + ".tmp")
        _write_projector(tmp, p, seed)
        tmp.replace(path)
        stamp.write_text(json.dumps(wanted, indent=1))
    return path
