"""Many threads editing many sessions of one model; closing the model under running edits.

Self-contained (no conftest fixtures): every fixture here is prefixed ``_threads_``.
"""
from __future__ import annotations

import faulthandler
import threading
import time
from typing import Any

import numpy as np
import pytest

import llava_kv as lk
from llava_kv._core import _testing
from llava_kv.testing import make_test_model, random_image

N_THREADS = 8
SESSIONS_PER_THREAD = 2
N_CTX = 1024
N_BATCH = 64
JOIN_TIMEOUT = 60.0
# Calls every worker has made before the model is closed under them.
PROGRESS_BEFORE_CLOSE = 6

# Images shared by every thread (seeds 0..3) and one pair per session (seeds 100 + ...).
_SHARED = {i: random_image(i) for i in range(4)}


def _unique(t: int, j: int, k: int) -> np.ndarray:
    return random_image(100 + 10 * (SESSIONS_PER_THREAD * t + j) + k)


@pytest.fixture(scope="module")
def _threads_pair(tmp_path_factory: pytest.TempPathFactory):
    return make_test_model(tmp_path_factory.mktemp("threads-models"), "tiny-llava")


@pytest.fixture(scope="module")
def _threads_model(_threads_pair):
    with lk.Model.load(_threads_pair.model_path, _threads_pair.mmproj_path) as m:
        yield m


def _session(model: lk.Model) -> lk.Session:
    # One compute thread per session: 16 sessions on 2 cores must not oversubscribe the CPU.
    return model.session(n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1)


def _script(t: int, j: int) -> list[tuple[Any, ...]]:
    """A deterministic edit script for session ``j`` of thread ``t``: shared and unique images."""
    a, b, c = (_SHARED[(t + j + i) % 4] for i in range(3))
    u0, u1, u2 = (_unique(t, j, k) for k in range(3))
    return [
        ("text", f"USER: thread {t} session {j} look at"),
        ("image", a),
        ("text", " this picture and"),
        ("image", u0),
        ("text", " that one"),
        ("replace", 0, u1),  # images[0] = a new image
        ("image", b),
        ("text", " and more"),
        ("remove", 1),  # the unique image in the middle
        ("insert", 0, c),  # images.insert(0, ...): before the first chunk
        ("text", " then"),
        ("replace", -1, a),
        ("image", u2),
        ("truncate", -1),  # drop the trailing image again
        ("remove", 0),
        ("text", "\nASSISTANT:"),
    ]


def _apply(s: lk.Session, op: tuple[Any, ...]) -> np.ndarray | None:
    kind = op[0]
    if kind == "text":
        s.append_text(op[1])
    elif kind == "image":
        s.append_image(op[1])
    elif kind == "replace":
        s.replace_image(s.images[op[1]], op[2])
    elif kind == "remove":
        s.remove_image(s.images[op[1]])
    elif kind == "insert":
        s.images.insert(op[1], op[2])
    elif kind == "truncate":
        s.truncate(len(s.timeline) + op[1])
    else:
        raise AssertionError(kind)
    if s.timeline[-1].kind == "text":
        logits = s.logits()
        assert logits.shape == (s.model.n_vocab,) and np.all(np.isfinite(logits))
        return logits
    return None


def _layout(s: lk.Session) -> list[tuple]:
    return [(c.kind, c.n_tokens, c.pos0, c.pos1, c.text, c.image.digest if c.image else None)
            for c in s.timeline]


def test_threads_edit_their_own_sessions_like_a_single_threaded_replay(_threads_model):
    model = _threads_model
    barrier = threading.Barrier(N_THREADS)
    results: dict[tuple[int, int], list[np.ndarray | None]] = {}
    layouts: dict[tuple[int, int], list[tuple]] = {}
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        sessions: list[lk.Session] = []
        try:
            sessions = [_session(model) for _ in range(SESSIONS_PER_THREAD)]
            scripts = [_script(t, j) for j in range(SESSIONS_PER_THREAD)]
            steps: list[list[np.ndarray | None]] = [[] for _ in sessions]
            barrier.wait(timeout=JOIN_TIMEOUT)
            for i in range(len(scripts[0])):
                for j, s in enumerate(sessions):
                    steps[j].append(_apply(s, scripts[j][i]))
            with lock:
                for j, s in enumerate(sessions):
                    results[(t, j)] = steps[j]
                    layouts[(t, j)] = _layout(s)
        except BaseException as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append((t, e))
            barrier.abort()
        finally:
            for s in sessions:
                s.close()

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(t,), name=f"edit-worker-{t}", daemon=True)
               for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(1.0, JOIN_TIMEOUT - (time.monotonic() - start)))
    assert not [th.name for th in threads if th.is_alive()], "worker threads hung"
    assert not errors, f"worker errors: {errors!r}"
    assert len(results) == N_THREADS * SESSIONS_PER_THREAD

    # Single-threaded replay of every script on a fresh session: bitwise the same logits.
    for (t, j), steps in sorted(results.items()):
        with _session(model) as s:
            replay = [_apply(s, op) for op in _script(t, j)]
            assert _layout(s) == layouts[(t, j)]
        assert len(replay) == len(steps)
        for i, (got, want) in enumerate(zip(steps, replay)):
            assert (got is None) == (want is None), (t, j, i)
            if want is not None:
                assert np.array_equal(got, want), (
                    f"thread {t} session {j} step {i}: threaded logits differ from the replay by "
                    f"{float(np.max(np.abs(got - want)))}")
        assert steps[-1] is not None


def test_model_close_under_running_edits(_threads_pair):
    model = lk.Model.load(_threads_pair.model_path, _threads_pair.mmproj_path)
    sessions = [[_session(model) for _ in range(SESSIONS_PER_THREAD)] for _ in range(N_THREADS)]
    barrier = threading.Barrier(N_THREADS + 1)
    progress = [0] * N_THREADS
    # Set when a worker has made PROGRESS_BEFORE_CLOSE calls, or has stopped (an error, say).
    ready = [threading.Event() for _ in range(N_THREADS)]
    closed_seen = [False] * N_THREADS
    errors: list[tuple[int, str, BaseException]] = []
    lock = threading.Lock()

    def call(t: int, what: str, fn: Any) -> bool:
        """Runs one call; False once the model is closed (ClosedError). Anything else is an error."""
        try:
            fn()
        except lk.ClosedError:
            closed_seen[t] = True
            return False
        except BaseException as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append((t, what, e))
            raise
        progress[t] += 1
        if progress[t] >= PROGRESS_BEFORE_CLOSE:
            ready[t].set()
        return True

    def worker(t: int) -> None:
        mine = sessions[t]
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            i = 0
            while True:
                s = mine[i % len(mine)]
                img = _SHARED[i % 4] if i % 3 else _unique(t, i % 2, i % 5)
                ops = [
                    ("append_text", lambda: s.append_text(f" step {i}")),
                    ("append_image", lambda: s.append_image(img)),
                    ("append_text", lambda: s.append_text(" and")),
                    ("logits", lambda: s.logits()),
                    ("replace", lambda: s.replace_image(s.images[0], img)),
                    ("trim", lambda: s.truncate(1) if s.n_past > N_CTX // 2 else s.remove_image(s.images[-1])),
                    ("append_text", lambda: s.append_text(" ok")),
                    ("logits", lambda: s.logits()),
                ]
                for what, fn in ops:
                    if not call(t, what, fn):
                        # Closed: every later call on any of its sessions raises ClosedError too.
                        for other in mine:
                            for fn2 in (lambda: other.append_text("x"), lambda: other.logits(),
                                        lambda: other.timeline):
                                try:
                                    fn2()
                                except lk.ClosedError:
                                    continue
                                except BaseException as e:  # noqa: BLE001
                                    with lock:
                                        errors.append((t, "after-close", e))
                                    return
                                with lock:
                                    errors.append((t, "after-close", AssertionError("call succeeded after close")))
                                return
                        return
                i += 1
        except BaseException as e:  # noqa: BLE001
            with lock:
                if not any(x[0] == t for x in errors):
                    errors.append((t, "worker", e))
        finally:
            ready[t].set()

    threads = [threading.Thread(target=worker, args=(t,), name=f"close-worker-{t}", daemon=True)
               for t in range(N_THREADS)]
    for th in threads:
        th.start()
    barrier.wait(timeout=JOIN_TIMEOUT)
    start = time.monotonic()
    for event in ready:
        event.wait(timeout=max(1.0, JOIN_TIMEOUT - (time.monotonic() - start)))
    assert not errors, errors
    assert min(progress) >= PROGRESS_BEFORE_CLOSE, f"workers made too little progress before close: {progress}"

    # Close from the main thread while the workers keep editing. A hang here must not block the
    # run forever: faulthandler dumps every thread's stack and exits if close() never returns.
    faulthandler.dump_traceback_later(JOIN_TIMEOUT, exit=True)
    try:
        model.close()
    finally:
        faulthandler.cancel_dump_traceback_later()
    after_close = list(progress)
    start = time.monotonic()
    for th in threads:
        th.join(timeout=max(1.0, JOIN_TIMEOUT - (time.monotonic() - start)))
    assert not [th.name for th in threads if th.is_alive()], "worker threads hung after model.close()"
    assert not errors, f"worker errors: {errors!r}"
    assert all(closed_seen), closed_seen
    # A call in flight when close() began finished normally; none succeeded after close() returned
    # (a worker can complete at most the one call it was already inside).
    assert all(p - a <= 1 for p, a in zip(progress, after_close)), (after_close, progress)

    assert model.closed
    for row in sessions:
        for s in row:
            assert s.closed
            assert "closed" in repr(s)
            with pytest.raises(lk.ClosedError):
                s.logits()
            with pytest.raises(lk.ClosedError):
                s.append_image(_SHARED[0])
            s.close()  # idempotent
            assert s.closed
    with pytest.raises(lk.ClosedError):
        model.session(n_ctx=N_CTX, n_batch=N_BATCH)
    model.close()  # idempotent


def test_a_context_rests_its_workers_before_the_projector_computes(_threads_pair):
    """A context's CPU workers poll for its next graph a few ms after each one; before the projector
    encodes (on threads of its own) they are sent to sleep, where they would take a core from it.
    Only an encode rests them: an image from the cache computes nothing on the projector."""
    with lk.Model.load(_threads_pair.model_path, _threads_pair.mmproj_path, n_threads=2) as model:
        with model.session(n_ctx=N_CTX, n_batch=N_BATCH) as a, model.session(n_ctx=N_CTX, n_batch=N_BATCH) as b:
            for s in (a, b):
                s.append_text("USER: look at")  # a graph on the session's own pool first
            before = _testing.threads_rested()
            a.append_image(random_image(900))
            assert a.stats["images_encoded"] == 1
            assert _testing.threads_rested() == before + 1
            b.append_image(random_image(900))  # the same picture: from the cache
            assert b.stats["images_encoded"] == 0 and b.stats["embed_cache_hits"] == 1
            assert _testing.threads_rested() == before + 1
            for s in (a, b):
                s.append_text(" and say what it is.")
            assert a.logits().tolist() == b.logits().tolist()
        with model.session_pool(2, n_ctx=N_CTX, n_batch=N_BATCH) as pool:
            pool[0].append_text("USER: look at")
            before = _testing.threads_rested()
            pool[1].append_image(random_image(901))
            assert _testing.threads_rested() == before + 1
        # The batch runner rests its context before each encode once the context exists (it is sized
        # from the first image): with two sequences and five images, at least the later encodes.
        before = _testing.threads_rested()
        records = lk.batch.run(model, [random_image(910 + i) for i in range(5)], "Describe it.", max_tokens=4,
                               parallel=2, progress=False)
        assert [r.error for r in records] == [None] * 5
        assert _testing.threads_rested() > before
