"""lk.batch: many images, one prompt, parallel sequences of one context."""
from __future__ import annotations

import gc
import io
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

import llava_kv as lk
from llava_kv import batch
from llava_kv.testing import random_image

PROMPT = "Describe this image."


def chat_reply(model: lk.Model, image, *, max_tokens: int, prompt: str = PROMPT, **kw) -> str:
    """What a fresh session answers for one image: the reference every batch record must match."""
    with model.session(n_ctx=1024) as s:
        out = s.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": prompt}]}], max_tokens=max_tokens, **kw)
        return out["choices"][0]["message"]["content"]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_each_record_equals_a_fresh_session(model, parallel):
    images = [random_image(i) for i in range(7)]
    stats: dict = {}
    records = batch.run(model, images, PROMPT, max_tokens=10, parallel=parallel, progress=False, stats=stats)
    assert [r.index for r in records] == list(range(len(images)))
    for image, record in zip(images, records):
        assert record.ok and record.error is None
        assert record.text == chat_reply(model, image, max_tokens=10)
        assert record.tokens <= 10
        assert record.finish_reason in ("stop", "length")
    assert 1 <= stats["max_sequences"] <= parallel
    # The prompt prefix is decoded once and copied into every sequence.
    assert stats["prefix_copies"] == len(images)
    assert stats["jobs_done"] == len(images) and stats["jobs_failed"] == 0


def queued_first(model: lk.Model, monkeypatch: pytest.MonkeyPatch, n_jobs: int) -> None:
    """Make batch.run queue every job before its worker takes one, so which sequences share a step
    does not depend on how fast the loader thread submits (a starved loader feeds one at a time)."""
    start = model._start_batch_runner

    def start_queued(**params):
        return start(**params, queue_size=n_jobs, start_after_finish=True)

    monkeypatch.setattr(model, "_start_batch_runner", start_queued)


def test_parallel_sequences_share_decode_steps(model, monkeypatch):
    images = [random_image(i) for i in range(8)]
    one: dict = {}
    many: dict = {}
    batch.run(model, images, PROMPT, max_tokens=12, parallel=1, progress=False, stats=one)
    queued_first(model, monkeypatch, len(images))
    records = batch.run(model, images, PROMPT, max_tokens=12, parallel=4, progress=False, stats=many)
    assert one["tokens_generated"] == many["tokens_generated"] == sum(r.tokens for r in records)
    assert many["max_sequences"] == 4
    # Sequential: one step per generated token or prompt; parallel: four sequences per step.
    assert many["decode_steps"] < one["decode_steps"] / 2


def test_a_runner_started_after_finish_refuses_a_job_past_its_queue(model):
    runner = model._start_batch_runner(prefix="", suffix=PROMPT, queue_size=2, start_after_finish=True)
    try:
        pixels = random_image(0)
        runner.submit(0, pixels, "a", "a")
        runner.submit(1, pixels, "b", "b")
        with pytest.raises(ValueError, match="queue of 2 jobs is full"):
            runner.submit(2, pixels, "c", "c")
        assert runner.stats().jobs_submitted == 2 and runner.stats().decode_steps == 0
        runner.finish()
        results = [runner.next(), runner.next()]
        assert sorted(r.id for r in results) == [0, 1] and all(not r.error for r in results)
        assert runner.next() is None
    finally:
        runner.close()


def test_duplicates_are_encoded_once(model):
    a, b = random_image(41), random_image(42)
    images = [a, b, a, png_bytes(a), b, a]
    stats: dict = {}
    model._core.clear_cache()
    records = batch.run(model, images, PROMPT, max_tokens=6, parallel=2, progress=False, stats=stats)
    assert all(r.ok for r in records)
    assert stats["images_encoded"] == 2
    assert stats["embed_cache_hits"] == 4
    assert [r.cached for r in records[:2]] == [False, False]
    assert len({r.text for r in records if r.text is not None}) <= 2
    assert records[0].text == records[2].text == records[3].text == records[5].text
    assert records[1].text == records[4].text
    for r in records:
        assert (r.timings["encode_ms"] == 0.0) == r.cached


def test_a_bad_image_fails_only_its_record(model, tmp_path):
    missing = tmp_path / "missing.png"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    good = [random_image(1), random_image(2)]
    images = [good[0], b"\x00garbage", str(missing), str(not_an_image), np.zeros((5, 5), np.float32), good[1]]
    records = batch.run(model, images, PROMPT, max_tokens=5, parallel=2, progress=False)
    assert [r.index for r in records] == list(range(6))
    assert records[0].ok and records[5].ok
    assert records[0].text == chat_reply(model, good[0], max_tokens=5)
    assert records[5].text == chat_reply(model, good[1], max_tokens=5)
    assert "ImageError" in records[1].error
    assert "FileNotFoundError" in records[2].error and str(missing) in records[2].error
    assert records[2].image == str(missing)
    assert "ImageError" in records[3].error
    assert "TypeError" in records[4].error and "uint8" in records[4].error
    for r in records[1:5]:
        assert r.text is None and r.tokens == 0 and r.finish_reason is None and not r.ok
        assert set(r.to_dict()) == {"image", "text", "tokens", "finish_reason", "cached", "timings", "error"}


def test_unordered_streams_every_record_once(model):
    images = [random_image(i) for i in range(9)]
    seen = [r.index for r in batch.iter_run(model, images, PROMPT, max_tokens=4, parallel=3, ordered=False,
                                            progress=False)]
    assert sorted(seen) == list(range(9))


def test_unsized_iterables_and_paths(model, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(random_image(i)).save(p)
        paths.append(p)
    records = batch.run(model, (p for p in paths), PROMPT, max_tokens=4, progress=False)
    assert [r.image for r in records] == [str(p) for p in paths]
    assert [r.text for r in records] == [chat_reply(model, str(p), max_tokens=4) for p in paths]


def test_an_iterable_that_raises_stops_the_run_with_its_error(model):
    def images():
        yield random_image(1)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        batch.run(model, images(), PROMPT, max_tokens=4, progress=False)
    assert model.session(n_ctx=256).n_past == 0  # the model is still usable


def test_max_tokens_and_stop_strings(model):
    image = random_image(3)
    full = batch.run(model, [image], PROMPT, max_tokens=12, progress=False)[0]
    assert full.finish_reason == "length" and full.tokens == 12
    assert full.text == chat_reply(model, image, max_tokens=12)
    # A stop string from the middle of the reply, of plain ASCII (random weights also write broken UTF-8).
    starts = [i for i in range(len(full.text) // 3, len(full.text) - 2)
              if full.text[i:i + 3].isascii() and full.text[i:i + 3].strip()]
    assert starts, f"no ASCII stop string to pick in {full.text!r}"
    stop = full.text[starts[0]:starts[0] + 3]
    cut = batch.run(model, [image], PROMPT, max_tokens=12, stop=[stop], progress=False)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.text == chat_reply(model, image, max_tokens=12, stop=[stop])


def test_sampling_is_reproducible_per_image(model):
    images = [random_image(i) for i in range(4)]
    kw = dict(max_tokens=8, temperature=0.9, top_k=20, seed=7, progress=False)
    a = batch.run(model, images, PROMPT, parallel=1, **kw)
    b = batch.run(model, images, PROMPT, parallel=4, **kw)
    # The seed follows the image's index, not the sequence that happens to run it.
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.text for r in a] != [r.text for r in batch.run(model, images, PROMPT, parallel=1,
                                                              **dict(kw, temperature=0.0))]


def test_breaking_out_stops_native_work(model):
    gc.collect()
    runners = lk._core.native_objects()["batch_runners"]
    images = [random_image(i) for i in range(40)]
    stats: dict = {}
    it = batch.iter_run(model, images, PROMPT, max_tokens=32, parallel=2, progress=False, stats=stats)
    first = next(it)
    assert first.index == 0
    it.close()
    assert stats["jobs_done"] < len(images)
    del it
    assert lk._core.native_objects()["batch_runners"] == runners
    # The model stays usable.
    assert batch.run(model, images[:1], PROMPT, max_tokens=4, progress=False)[0].ok


def test_model_close_during_a_run_raises_closed_error(pair):
    model = lk.Model.load(pair.model_path, pair.mmproj_path)
    images = [random_image(i) for i in range(200)]
    got: list = []
    first_record = threading.Event()

    def closer() -> None:
        assert first_record.wait(60), "no record arrived"
        model.close()

    t = threading.Thread(target=closer)
    t.start()
    with pytest.raises(lk.ClosedError):
        for r in batch.iter_run(model, images, PROMPT, max_tokens=64, parallel=2, progress=False):
            got.append(r)
            first_record.set()
    t.join(60)
    assert not t.is_alive()
    assert model.closed
    assert len(got) < len(images)
    with pytest.raises(lk.ClosedError):
        batch.run(model, images[:1], PROMPT, progress=False)


def test_the_gil_is_released_while_it_runs(llava_pair):
    """While the consumer waits inside the runner's native next(), another Python thread runs Python
    code, and the run can only finish if it does: the loader thread must produce the second image
    then. Ordered by an event, not by time: with a switch interval of an hour the interpreter never
    takes the GIL from a thread, so the loader runs only if next() gives the GIL up itself. If it did
    not, the run would deadlock: it runs in a child process, so that is a failed test, not a hang."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import linecache, sys, threading
        import llava_kv as lk
        from llava_kv import batch
        from llava_kv.testing import random_image

        main_thread = threading.get_ident()
        consumer_waiting = threading.Event()
        seen = []

        def images():
            yield random_image(0)
            consumer_waiting.wait()  # set by the consumer just before it asks for the second record
            frame = sys._current_frames()[main_thread]  # Python code, run while the consumer waits
            seen.append((frame.f_code.co_name, linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()))
            yield random_image(1)

        model = lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r})
        sys.setswitchinterval(3600)
        records = batch.iter_run(model, images(), "Describe this image.", max_tokens=4, parallel=2, progress=False)
        first = next(records)
        consumer_waiting.set()
        second = next(records)
        sys.setswitchinterval(0.005)
        print("records", first.index, second.index, first.ok, second.ok)
        (function, line), = seen
        print("consumer was in", function, "at a native next():", line.endswith("runner.next()"))
        records.close()
        model.close()
        """)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "records 0 1 True True" in proc.stdout, proc.stdout
    # The loader saw the consumer inside the runner's next(), the only call there that waits.
    assert "consumer was in _records at a native next(): True" in proc.stdout, proc.stdout


def test_per_item_context_limit(model):
    records = batch.run(model, [random_image(1), random_image(2)], PROMPT, max_tokens=300, n_ctx=256, progress=False)
    for r in records:
        assert not r.ok
        assert "KV cells" in r.error and "n_ctx=256 per image" in r.error


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(parallel=0), ValueError, "parallel"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(parallel=8, n_batch=4), ValueError, "n_batch"),
    (dict(temperature=0.5, top_p=0.0), ValueError, "top_p"),
    (dict(stop=[""]), ValueError, "stop"),
])
def test_bad_arguments(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        batch.run(model, [random_image(1)], PROMPT, progress=False, **kwargs)


def test_bad_prompt_and_inputs(model):
    with pytest.raises(ValueError, match="prompt"):
        batch.run(model, [random_image(1)], "", progress=False)
    with pytest.raises(ValueError, match="marker"):
        batch.run(model, [random_image(1)], "look " + model._core.media_marker, progress=False)
    with pytest.raises(TypeError, match="iterable"):
        batch.run(model, "one.png", PROMPT, progress=False)


def test_a_text_only_model_is_refused(pair):
    with lk.Model.load(pair.model_path) as text_only:
        with pytest.raises(lk.ImageError, match="projector"):
            batch.run(text_only, [random_image(1)], PROMPT, progress=False)


def test_progress_bar_counts_images(model, capsys):
    batch.run(model, [random_image(i) for i in range(3)], PROMPT, max_tokens=2, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err


@pytest.mark.parametrize("parallel", [1, 8])
def test_a_repeat_is_cached_however_the_encoder_groups_images(model, parallel):
    a, b = random_image(51), random_image(52)
    model._core.clear_cache()
    stats: dict = {}
    records = batch.run(model, [a, a, b, a], PROMPT, max_tokens=3, parallel=parallel, progress=False, stats=stats)
    assert [r.cached for r in records] == [False, True, False, True]
    assert stats["images_encoded"] == 2
