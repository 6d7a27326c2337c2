"""lk.batch.Runner: one context and the shared prompt's KV cells kept across calls."""
from __future__ import annotations

import gc

import pytest

import llava_kv as lk
from llava_kv import batch
from llava_kv.testing import random_image

PROMPT = "Describe this image."


def same_records(got: list[batch.BatchRecord], want: list[batch.BatchRecord]) -> bool:
    return [(r.index, r.text, r.tokens, r.finish_reason, r.error) for r in got] == \
           [(r.index, r.text, r.tokens, r.finish_reason, r.error) for r in want]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 7}])
def test_every_call_equals_a_fresh_run(model, sampling):
    calls = [[random_image(i) for i in range(5)], [random_image(i) for i in range(10, 13)],
             [random_image(i) for i in range(20, 27)]]
    settings = dict(max_tokens=10, parallel=3, **sampling)
    with batch.Runner(model, PROMPT, **settings) as runner:
        for k, images in enumerate(calls):
            fresh_stats: dict = {}
            fresh = batch.run(model, images, PROMPT, progress=False, stats=fresh_stats, **settings)
            stats: dict = {}
            got = runner.run(images, progress=False, stats=stats)
            assert same_records(got, fresh)
            assert stats["context_reused"] == (k > 0) and not fresh_stats["context_reused"]
            assert stats["n_ctx"] == fresh_stats["n_ctx"]
            assert stats["jobs_submitted"] == stats["jobs_done"] == len(images)  # counters are per call
            # A reused context skips exactly the shared prompt's tokens.
            skipped = stats["prefix_tokens"] if k > 0 else 0
            assert stats["tokens_decoded"] == fresh_stats["tokens_decoded"] - skipped
            assert stats["prefix_tokens"] > 0 and stats["prefix_copies"] == len(images)


def test_a_call_stopped_early_leaves_the_runner_usable(model):
    images = [random_image(i) for i in range(30)]
    with batch.Runner(model, PROMPT, max_tokens=24, parallel=2) as runner:
        stats: dict = {}
        it = runner.iter_run(images, progress=False, stats=stats)
        assert next(it).index == 0
        it.close()
        assert stats["jobs_done"] < len(images)
        again: dict = {}
        got = runner.run(images[:4], progress=False, stats=again)
        assert same_records(got, batch.run(model, images[:4], PROMPT, max_tokens=24, parallel=2, progress=False))
        assert again["context_reused"] and again["jobs_submitted"] == 4


def test_one_call_at_a_time(model):
    images = [random_image(i) for i in range(6)]
    with batch.Runner(model, PROMPT, max_tokens=8, parallel=2) as runner:
        it = runner.iter_run(images, progress=False)
        next(it)
        with pytest.raises(RuntimeError, match="already running"):
            runner.run(images[:1], progress=False)
        rest = list(it)
        assert len(rest) == len(images) - 1
        assert runner.run(images[:1], progress=False)[0].ok


def test_the_context_is_reported_while_held_and_freed_at_close(model):
    def batches() -> dict:
        return model.memory()["batches"]

    def allocated() -> int:
        return sum(d.allocated for d in model.memory()["devices"].values())

    batch.run(model, [random_image(0)], PROMPT, max_tokens=1, progress=False)  # the projector's buffers
    before = allocated()
    runner = batch.Runner(model, PROMPT, max_tokens=8, parallel=2)
    assert batches() == {}  # the context is made with the first image
    runner.run([random_image(0)], progress=False)
    held = batches()
    assert len(held) == 1
    (entry,) = held.values()
    kv = sum(entry["kv"].values())
    compute = sum(entry["compute"].values())
    assert kv > 0 and compute > 0
    assert allocated() - before >= kv + compute
    runner.run([random_image(1)], progress=False)
    assert batches() == held  # the same context, not a second one
    runner.close()
    assert runner.closed and batches() == {}
    assert allocated() == before


def test_closing_the_model_closes_a_held_runner(pair):
    model = lk.Model.load(pair.model_path, pair.mmproj_path)
    runner = batch.Runner(model, PROMPT, max_tokens=4, parallel=2)
    assert runner.run([random_image(0)], progress=False)[0].ok
    model.close()
    assert runner.closed
    with pytest.raises(lk.ClosedError):
        runner.run([random_image(0)], progress=False)
    runner.close()  # idempotent


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (("",), {}, ValueError, "prompt"),
    ((PROMPT,), {"parallel": 0}, ValueError, "parallel"),
    ((PROMPT,), {"parallel": 8, "n_batch": 4}, ValueError, "n_batch"),
    ((PROMPT,), {"max_tokens": 0}, ValueError, "max_tokens"),
    ((PROMPT,), {"stats": {}}, TypeError, "stats"),
])
def test_bad_settings_are_refused_when_it_is_made(model, args, kwargs, exc, match):
    gc.collect()
    runners = lk._core.native_objects()["batch_runners"]
    with pytest.raises(exc, match=match):
        batch.Runner(model, *args, **kwargs)
    gc.collect()
    assert lk._core.native_objects()["batch_runners"] == runners  # refused before a native runner started


def test_a_single_path_is_refused(model):
    with batch.Runner(model, PROMPT, max_tokens=4) as runner:
        with pytest.raises(TypeError, match="iterable of images"):
            runner.run("picture.png", progress=False)  # type: ignore[arg-type]
        assert runner.run([random_image(0)], progress=False)[0].ok


def test_the_native_runner_refuses_a_restart_mid_run_and_a_job_after_a_cancel(model):
    runner = model._start_batch_runner(prefix="", suffix=PROMPT, n_parallel=2, max_tokens=4)
    try:
        runner.submit(0, random_image(0), "a", "a")
        with pytest.raises(RuntimeError, match="still going on"):
            runner.restart()
        runner.cancel_run()
        with pytest.raises(lk.CancelledError):
            runner.submit(1, random_image(1), "b", "b")
        runner.restart()  # after a cancel: no result has to be taken
        runner.submit(0, random_image(2), "c", "c")
        runner.finish()
        r = runner.next()
        assert r is not None and r.id == 0 and not r.error
        assert runner.next() is None
        assert runner.stats().jobs_submitted == 1
    finally:
        runner.close()
    with pytest.raises(lk.ClosedError):
        runner.restart()
