"""Writes the checked-in seed corpus: ``python -m tests.fuzz.make_corpus`` (deterministic)."""
from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

from .targets import CORPUS, seed_pair


def main() -> None:
    import numpy as np
    from PIL import Image

    import llava_kv as lk

    images = CORPUS / "image"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    for fmt, mode in (("PNG", "RGB"), ("PNG", "P"), ("PNG", "LA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("WEBP", "RGB"), ("ICO", "RGBA"), ("PPM", "RGB")):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
        (images / f"seed-{fmt.lower()}-{mode.lower()}.{fmt.lower()}").write_bytes(buf.getvalue())

    with tempfile.TemporaryDirectory() as tmp:
        pair = seed_pair(tmp)
        for target, src in (("gguf_model", pair.model_path), ("gguf_mmproj", pair.mmproj_path)):
            (CORPUS / target).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, CORPUS / target / f"seed-{src.name}")
        (CORPUS / "session").mkdir(parents=True, exist_ok=True)
        with lk.Model.load(pair.model_path, pair.mmproj_path) as model:
            with model.session(n_ctx=128, n_batch=64) as s:
                s.append_text("USER: ")
                s.append_image(np.full((32, 32, 3), 90, np.uint8))
                s.append_text(" hi")
                s.save(CORPUS / "session" / "seed-image-text.session")
            with model.session(n_ctx=64) as s:
                s.append_text("hello")
                s.save(CORPUS / "session" / "seed-text.session")
    for path in sorted(CORPUS.rglob("seed-*")):
        print(f"{path.relative_to(CORPUS)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
