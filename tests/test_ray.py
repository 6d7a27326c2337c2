"""llava_kv.ray: map_batches over a local Ray runtime gives what lk.batch gives in-process."""
from __future__ import annotations

import pytest
import ray
from PIL import Image

import llava_kv as lk
from llava_kv import batch
from llava_kv.ray import ImagePrompter, prompt_dataset
from llava_kv.testing import random_image

PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture()
def image_files(tmp_path):
    paths = []
    for i in range(7):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(random_image(100 + i)).save(p)
        paths.append(str(p))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    paths.insert(3, str(broken))
    return paths


def test_actor_pool_matches_in_process_batch(local_ray, llava_pair, image_files):
    ds = ray.data.from_items([{"image": p, "row": i} for i, p in enumerate(image_files)])
    out = prompt_dataset(ds, llava_pair.model_path, llava_pair.mmproj_path, PROMPT, concurrency=2, batch_size=3,
                         num_cpus=1, max_tokens=6, parallel=2, n_threads=1).take_all()
    rows = sorted(out, key=lambda r: r["row"])
    assert [r["image"] for r in rows] == image_files
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model:
        expected = batch.run(model, image_files, PROMPT, max_tokens=6, progress=False)
    for row, rec in zip(rows, expected):
        assert row["text"] == rec.text
        assert row["tokens"] == rec.tokens
        assert (row["error"] is None) == rec.ok
    broken = rows[3]
    assert broken["text"] is None and "ImageError" in broken["error"]
    assert sum(r["error"] is None for r in rows) == len(image_files) - 1


def test_prompter_in_process_and_bad_column(llava_pair, image_files):
    prompter = ImagePrompter(llava_pair.model_path, llava_pair.mmproj_path, PROMPT, max_tokens=4)
    try:
        out = prompter({"image": image_files[:2], "extra": [1, 2]})
        assert list(out["extra"]) == [1, 2]
        expected = batch.run(prompter.model, image_files[:2], PROMPT, max_tokens=4, progress=False)
        assert list(out["text"]) == [r.text for r in expected]
        assert list(out["tokens"]) == [r.tokens for r in expected]
        with pytest.raises(KeyError, match="image"):
            prompter({"path": image_files[:1]})
    finally:
        prompter.close()
    assert prompter.model.closed
