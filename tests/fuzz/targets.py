"""The fuzz targets: bytes in, and every outcome but the documented exceptions is a finding.

``python -m tests.fuzz.targets TARGET [libFuzzer options] [corpus dirs]`` runs one target under
atheris; :mod:`tests.fuzz.run` runs them in child processes with a time budget. A native crash
(abort, segfault) ends the process, and libFuzzer writes the input that caused it
(``-artifact_prefix``); an unexpected Python exception is reported the same way.

- ``image``: :func:`llava_kv.images.load_image` on the bytes: ImageError (or the ValueError of an
  image Pillow decodes to an unsupported shape) is expected.
- ``gguf_model``: the bytes as a text model, loaded with a fixed small projector;
  ``gguf_mmproj``: the bytes as a projector, with a fixed small text model. ``lk.Model.load``
  (validator, then llama.cpp / mtmd) must load or raise ModelLoadError; what loads also decodes a
  few tokens (and an image) because some bad values only hurt then.
- ``session``: the bytes as a saved session file, through ``lk.Session.load``: LlavaKVError is expected.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
TARGETS = ("image", "gguf_model", "gguf_mmproj", "session")


def smallest_preset():
    """tiny-llava shrunk to the least llama.cpp and mtmd still load: the fuzzers' seeds and companions."""
    from llava_kv.testing import PRESETS

    return dataclasses.replace(PRESETS["tiny-llava"], name="fuzz-seed", n_embd=8, n_head=2, n_head_kv=1, n_ff=8,
                               n_layer=1, n_ctx_train=256, image_size=32, patch_size=16, v_width=8, v_ff=8,
                               v_layers=1, v_heads=2, proj_hidden=8, dtype="f16")


def seed_pair(out_dir: str | os.PathLike[str]):
    from llava_kv.testing import make_test_model

    return make_test_model(out_dir, smallest_preset())


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="llava-kv-fuzz-"))


def _exercise(model, with_image: bool) -> None:
    import numpy as np

    with model.session(n_ctx=128, n_batch=64) as s:
        s.append_text("USER: hi")
        if with_image:
            s.append_image(np.full((32, 32, 3), 100, np.uint8))
        s.logits()


def make_target(name: str):
    """(setup-free) TestOneInput for ``name``; files it needs are made once, here."""
    import llava_kv as lk
    from llava_kv.images import load_image

    work = _scratch()
    if name == "image":
        def one(data: bytes) -> None:
            try:
                load_image(data)
            except (lk.ImageError, ValueError):
                pass
        return one

    if name in ("gguf_model", "gguf_mmproj"):
        pair = seed_pair(work)
        target = work / "input.gguf"

        def one(data: bytes) -> None:
            target.write_bytes(data)
            model_path, mmproj = (target, pair.mmproj_path) if name == "gguf_model" else (pair.model_path, target)
            try:
                model = lk.Model.load(model_path, mmproj)
            except lk.ModelLoadError:
                return
            with model:
                try:
                    _exercise(model, with_image=True)
                except lk.LlavaKVError:
                    pass  # e.g. non-finite logits from weights that are legal but absurd
        return one

    if name == "session":
        pair = seed_pair(work)
        model = lk.Model.load(pair.model_path, pair.mmproj_path)
        target = work / "input.session"

        def one(data: bytes) -> None:
            target.write_bytes(data)
            try:
                s = lk.Session.load(model, target)
            except lk.LlavaKVError:
                return
            with s:
                s.append_text(" more")
                s.logits()
        return one
    raise ValueError(f"unknown fuzz target {name!r}; one of {', '.join(TARGETS)}")


def main(argv: list[str] | None = None) -> None:
    import atheris

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.fuzz.targets {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]")
    name = argv.pop(1)
    with atheris.instrument_imports(include=["llava_kv"]):
        import llava_kv  # noqa: F401  (instrumented for coverage)
        import llava_kv.gguf  # noqa: F401
        import llava_kv.images  # noqa: F401
    one = make_target(name)
    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
