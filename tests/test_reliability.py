"""Nothing a caller does kills the process or loses a conversation.

Every rollback path is made to run with the native fault hook (``_testing.arm_decode_fault``: the
n-th decode call from now fails with a bad status or a C++ exception, receives a real cancel() or
close(), or pauses until the test lets it go on). Threads are ordered with that pause, never with
sleeps. Whatever must not crash the interpreter runs in a subprocess, so a crash is a failed test
with its exit code, not a dead test run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import llava_kv as lk
from llava_kv import _core
from llava_kv._core import _testing
from llava_kv.images import load_image
from llava_kv import testing
from llava_kv.testing import random_image

from conftest import feed_timeline, session_state

# Chunks the edit of the first image re-decodes: image 0, text, image 1, text.
EDIT_DECODES = 4
# Presets whose projector attends over a whole image at once (it must fit one batch).
NON_CAUSAL = ("tiny-gemma3",)


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    _testing.arm_decode_fault(0, "none")


def _conversation(s: lk.Session, images: list[np.ndarray]) -> None:
    s.append_text("USER: ")
    s.append_image(images[0])
    s.append_text(" and ")
    s.append_image(images[1])
    s.append_text("\nWhat differs?\nASSISTANT:")


def _fresh_logits(model: lk.Model, s: lk.Session, images: list[np.ndarray]) -> np.ndarray:
    """Logits of a new session fed the same chunks as ``s``."""
    by_digest = {load_image(img, model.projector_id).digest: img for img in images}
    with model.session(n_ctx=s.n_ctx) as fresh:
        feed_timeline(fresh, s.timeline, by_digest)
        return fresh.logits()


def _run_in_subprocess(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_image_session(pair: testing.TestModel) -> str:
    """Script lines making ``model`` and ``s`` (text, an image, text) for a subprocess test."""
    return f"""
        import llava_kv as lk
        from llava_kv._core import _testing
        from llava_kv.testing import random_image
        model = lk.Model.load({str(pair.model_path)!r}, {str(pair.mmproj_path)!r})
        s = model.session(n_ctx=1024)
        s.append_text("USER: ")
        s.append_image(random_image(0))
        s.append_text(" what?")
"""


# --- rollback: every failure of an edit leaves the session exactly as it was --------------------

EXPECTED = {"status": lk.LlavaKVError, "exception": lk.LlavaKVError, "cancel": lk.CancelledError}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@pytest.mark.parametrize("nth", range(1, EDIT_DECODES + 1))
def test_failed_replace_leaves_session_unchanged(model: lk.Model, images: list[np.ndarray], kind: str,
                                                 nth: int) -> None:
    with model.session(n_ctx=1024) as s:
        _conversation(s, images)
        before = session_state(s)
        _testing.arm_decode_fault(nth, kind)
        with pytest.raises(EXPECTED[kind]) as info:
            s.replace_image(s.images[0], images[2])
        assert type(info.value) is EXPECTED[kind]
        assert "could not be rebuilt" not in str(info.value)
        assert session_state(s) == before
        # The session works on, exactly: the next edit equals a fresh run.
        s.replace_image(s.images[0], images[3])
        assert np.array_equal(s.logits(), _fresh_logits(model, s, images))


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_failed_insert_text_and_remove_leave_session_unchanged(model: lk.Model, images: list[np.ndarray],
                                                               kind: str) -> None:
    with model.session(n_ctx=1024) as s:
        _conversation(s, images)
        before = session_state(s)
        for edit in (lambda: s.insert_text(1, " look: "), lambda: s.remove_image(s.images[0]),
                     lambda: s.truncate(3), lambda: s.append_text(" more")):
            _testing.arm_decode_fault(1, kind)
            with pytest.raises(EXPECTED[kind]):
                edit()
            assert session_state(s) == before


def test_failed_shift_removal_leaves_session_unchanged(llava_pair: testing.TestModel, images: list[np.ndarray]) -> None:
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, model.session(n_ctx=1024) as s:
        _conversation(s, images)
        before = session_state(s)
        for kind, exc in EXPECTED.items():
            _testing.arm_decode_fault(1, kind)
            with pytest.raises(exc):
                s.remove_image(s.images[0], mode="shift")
            assert session_state(s) == before, kind


def test_rollback_restores_generated_tokens_bit_for_bit(model: lk.Model, images: list[np.ndarray]) -> None:
    """A failed edit puts back the KV cells of a reply exactly as generation made them (one decode
    call per token), not as a batch decode of the same tokens (which rounds differently): the next
    tokens and their logits equal those of a twin session that never saw the failed edit. (The soak
    test caught this about once in seven runs.)"""
    with model.session(n_ctx=1024) as s, model.session(n_ctx=1024) as twin:
        for x in (s, twin):
            _conversation(x, images)
            x.generate(24)
            x.append_text(" USER: and then? ASSISTANT:")
            x.generate(16)
        for nth, edit in ((2, lambda: s.insert_text(1, " look: ")), (3, lambda: s.replace_image(s.images[0],
                                                                                               images[2]))):
            _testing.arm_decode_fault(nth, "status")
            with pytest.raises(lk.LlavaKVError):
                edit()
            _testing.arm_decode_fault(0, "none")
        for x in (s, twin):
            x.append_text(" USER: more? ASSISTANT:")
        assert np.array_equal(s.logits(), twin.logits())
        assert s.generate(12) == twin.generate(12)
        assert np.array_equal(s.logits(), twin.logits())


def test_failed_generation_step_keeps_earlier_tokens(model: lk.Model, images: list[np.ndarray]) -> None:
    with model.session(n_ctx=1024) as s:
        _conversation(s, images)
        with s.fork() as reference:
            reference.generate(2)
            expected = session_state(reference)
        for kind, exc in EXPECTED.items():
            with s.fork() as f:
                _testing.arm_decode_fault(3, kind)  # the third generated token fails
                with pytest.raises(exc):
                    f.generate(8)
                assert session_state(f) == expected, kind


def test_close_arriving_during_an_edit_ends_in_closed_error(model: lk.Model, images: list[np.ndarray]) -> None:
    s = model.session(n_ctx=1024)
    _conversation(s, images)
    _testing.arm_decode_fault(2, "close")
    with pytest.raises(lk.ClosedError):
        s.replace_image(s.images[0], images[2])
    s.close()
    with model.session(n_ctx=1024) as other:  # the model is unharmed
        _conversation(other, images)
        assert np.isfinite(other.logits()).all()


# --- threads: cancel, close and getters while another thread edits ----------------------------

def _edit_in_thread(s: lk.Session, image: np.ndarray, nth: int = 2) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            s.replace_image(s.images[0], image)
            outcome["result"] = "done"
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["result"] = e

    _testing.arm_decode_fault(nth, "pause")
    t = threading.Thread(target=run)
    t.start()
    assert _testing.wait_decode_paused(30.0), "the edit never reached its paused decode"
    return t, outcome


def test_cancel_from_another_thread(model: lk.Model, images: list[np.ndarray]) -> None:
    with model.session(n_ctx=1024) as s:
        _conversation(s, images)
        before = session_state(s)
        t, outcome = _edit_in_thread(s, images[2])
        s.cancel()
        _testing.release_decode_pause()
        t.join(30)
        assert isinstance(outcome["result"], lk.CancelledError)
        assert session_state(s) == before


@pytest.mark.parametrize("closer", ["session", "model"])
def test_close_from_another_thread_cancels_the_edit(pair: testing.TestModel, images: list[np.ndarray], closer: str) -> None:
    model = lk.Model.load(pair.model_path, pair.mmproj_path)
    s = model.session(n_ctx=1024)
    _conversation(s, images)
    t, outcome = _edit_in_thread(s, images[2])
    closing = threading.Thread(target=s.close if closer == "session" else model.close)
    closing.start()
    # close() marks the call as closing before it waits for it; then let the paused decode go on.
    marked = threading.Event()
    for _ in range(30000):
        if s._core.closing or marked.wait(0.001):
            break
    assert s._core.closing, "close() never marked the session"
    _testing.release_decode_pause()
    t.join(30)
    closing.join(30)
    assert not t.is_alive() and not closing.is_alive()
    assert isinstance(outcome["result"], lk.ClosedError), outcome
    assert s.closed
    model.close()


def test_getters_do_not_hold_the_interpreter_during_an_edit(llava_pair: testing.TestModel) -> None:
    """repr(s), stats, timeline and memory() wait for an edit in another thread with the GIL released."""
    proc = _run_in_subprocess(_one_image_session(llava_pair) + """
        import threading
        _testing.arm_decode_fault(1, "pause")
        edit = threading.Thread(target=lambda: s.replace_image(s.images[0], random_image(1)))
        edit.start()
        assert _testing.wait_decode_paused(30.0)
        done = []
        readers = [threading.Thread(target=lambda f=f: done.append(f())) for f in
                   (lambda: repr(s), lambda: s.stats, lambda: s.timeline, lambda: s.n_past, model.memory)]
        for r in readers:
            r.start()
        # The interpreter runs Python code while every reader waits for the edit's lock.
        total = sum(i * i for i in range(200000))
        assert all(r.is_alive() for r in readers) and not done
        _testing.release_decode_pause()
        edit.join()
        for r in readers:
            r.join()
        assert len(done) == 5
        model.close()
        print("ok", total > 0)
    """, timeout=60)
    assert proc.returncode == 0 and "ok True" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_ctrl_c_cancels_a_long_edit(llava_pair: testing.TestModel) -> None:
    """SIGINT during a native edit on the main thread: KeyboardInterrupt at the next decode step,
    session unchanged (before, Python saw the signal only after the edit had been applied)."""
    proc = _run_in_subprocess(_one_image_session(llava_pair) + """
        import os, signal, threading
        # Python's own Ctrl-C handler, as in a terminal: a test run started in the background by a
        # non-interactive shell inherits SIGINT ignored, and then there is no Ctrl-C to handle.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        before = (s.timeline, s.logits().tobytes(), s.stats)
        def interrupt():
            assert _testing.wait_decode_paused(30.0)
            os.kill(os.getpid(), signal.SIGINT)
            _testing.release_decode_pause()
        threading.Thread(target=interrupt).start()
        _testing.arm_decode_fault(1, "pause")
        try:
            s.replace_image(s.images[0], random_image(1))
            print("edit applied")
        except KeyboardInterrupt:
            print("interrupted", (s.timeline, s.logits().tobytes(), s.stats) == before)
        s.replace_image(s.images[0], random_image(1))  # Ctrl-C handling is gone after the call
        print("then ok")
    """, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interrupted True" in proc.stdout and "then ok" in proc.stdout, proc.stdout


# --- interpreter exit with native work still running --------------------------------------------

@pytest.mark.parametrize("ending", ["normal", "sys.exit", "exception"])
def test_exit_with_a_running_batch_iterator(llava_pair: testing.TestModel, ending: str) -> None:
    end = {"normal": "pass", "sys.exit": "sys.exit(3)", "exception": "raise RuntimeError('boom')"}[ending]
    proc = _run_in_subprocess(f"""
        import sys
        import llava_kv as lk
        from llava_kv.testing import random_image
        model = lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r})
        s = model.session(n_ctx=1024)
        s.append_text("hello")
        gen = s.generate(64, stream=True)
        next(gen)
        it = lk.batch.iter_run(model, [random_image(i) for i in range(24)], "Describe it.", max_tokens=32,
                               parallel=2, progress=False)
        print(next(it).index, flush=True)
        {end}
    """)
    expected_rc = {"normal": 0, "sys.exit": 3, "exception": 1}[ending]
    assert proc.returncode == expected_rc, (proc.returncode, proc.stderr[-3000:])
    assert "terminate" not in proc.stderr and "Abort" not in proc.stderr
    if ending != "exception":
        assert proc.stderr == ""
    else:
        assert proc.stderr.rstrip().endswith("RuntimeError: boom")


@pytest.mark.parametrize("where", ["session", "pool"])
def test_exit_while_daemon_threads_generate(llava_pair: testing.TestModel, where: str) -> None:
    """sys.exit while daemon threads are inside native generation calls. Exit closes every model,
    which cancels those calls: the cancellation's exception must not meet the thread's end at
    shutdown (that was std::terminate, SIGABRT, in about one run of three). Several runs, the
    exit at a different moment in each."""
    loop = {"session": """
        def work():
            s = model.session(n_ctx=4096)
            s.append_text("USER: ")
            s.append_image(random_image(0))
            s.append_text(" what?")
            while True:
                for _ in s.generate(3000, stream=True):
                    pass
                s.clear()
                s.append_text("again")
""", "pool": """
        from llava_kv.pool import Generation
        def work():
            pool = model.session_pool(2, n_ctx=4096)
            while True:
                for slot in pool:
                    slot.clear()
                    slot.append_text("USER: hello")
                gens = [Generation(slot, 3000) for slot in pool]
                while not all(g.done for g in gens):
                    pool.step(gens)
"""}[where]
    for run in range(6):
        proc = _run_in_subprocess(f"""
            import sys, threading, time
            import llava_kv as lk
            from llava_kv.testing import random_image
            model = lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r})
            {textwrap.indent(textwrap.dedent(loop), "            ").strip()}
            for _ in range(2):
                threading.Thread(target=work, daemon=True).start()
            time.sleep({0.2 + 0.13 * run})
            sys.exit(3)
        """, timeout=60)
        assert proc.returncode == 3, (run, proc.returncode, proc.stderr[-3000:])
        assert "terminate" not in proc.stderr, (run, proc.stderr[-3000:])


def test_worker_failure_reaches_the_consumer(model: lk.Model) -> None:
    _testing.arm_decode_fault(1, "exception")
    with pytest.raises(lk.LlavaKVError, match="batch runner failed"):
        lk.batch.run(model, [random_image(i) for i in range(3)], "Describe it.", max_tokens=4, progress=False)
    _testing.arm_decode_fault(0, "none")
    records = lk.batch.run(model, [random_image(1)], "Describe it.", max_tokens=4, progress=False)
    assert records[0].ok
    assert _core.native_objects()["batch_runners"] == 0


# --- sizes: contexts, batches and token limits ------------------------------------------------

def test_small_context_refuses_an_image_it_cannot_hold(llava_pair: testing.TestModel) -> None:
    """llama.cpp pads n_ctx=32 to 256 cells; the check is against the 32 asked for."""
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model, model.session(n_ctx=32) as s:
        assert s.n_ctx == 32
        s.append_text("USER: ")
        before = session_state(s)
        with pytest.raises(lk.ContextFullError) as info:
            s.append_image(random_image(1))
        assert info.value.available == 32 and info.value.needed > 32
        assert session_state(s) == before


def test_session_batch_larger_than_its_context(llava_pair: testing.TestModel) -> None:
    """n_batch > n_ctx: llama.cpp clamps the batch; the image is decoded in batches it takes."""
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model:
        with model.session(n_ctx=64, n_batch=512) as s:
            s.append_text("A ")
            s.append_image(random_image(1))
            s.append_text(" b")
            assert np.isfinite(s.logits()).all()
            assert s.images[0].n_tokens == llava_pair.preset.image_tokens


def test_batch_with_n_batch_one(model: lk.Model) -> None:
    records = lk.batch.run(model, [random_image(1), random_image(2)], "Describe it.", max_tokens=4, parallel=1,
                           n_batch=1, progress=False)
    # A projector that attends over the whole image needs it in one batch: each record says so.
    assert all((r.ok and r.tokens >= 1) or "use n_batch >=" in r.error for r in records), [r.error for r in records]
    assert all(r.ok for r in records) or model.path.endswith(tuple(f"{p}-s0.gguf" for p in NON_CAUSAL))


def test_batch_with_huge_max_tokens_fails_fast_per_record(model: lk.Model) -> None:
    # 2**30 - 1 passes the argument checks (two sequences of it fit llama.cpp's int32 cell count);
    # the context is sized at most to the model's training length, so each record says what to lower.
    records = lk.batch.run(model, [random_image(1), random_image(2)], "Describe it.", max_tokens=2**30 - 1,
                           parallel=1, progress=False)
    assert all(not r.ok and "lower max_tokens" in r.error for r in records), [r.error for r in records]


# --- session files: integrity and sizes checked before anything is allocated -----------------

def _saved(model: lk.Model, images: list[np.ndarray], path: Path) -> tuple[bytes, bytes]:
    with model.session(n_ctx=512) as s:
        _conversation(s, images)
        s.save(path)
    header, blob = path.read_bytes().split(b"\n", 1)
    return header, blob


def _native_header(blob: bytes) -> dict[str, int]:
    fields = np.frombuffer(blob[24:48], dtype="<u4")
    return dict(zip(["n_ctx", "n_batch", "n_ubatch", "n_cells", "n_vocab", "n_embd_inp"], map(int, fields)))


def _with_native_header(blob: bytes, **changes: int) -> bytes:
    fields = _native_header(blob)
    fields.update(changes)
    packed = np.array(list(fields.values()), dtype="<u4").tobytes()
    return bytes(_testing.seal_state(blob[:24] + packed + blob[48:]))


def test_every_byte_flip_in_a_session_file_is_detected(model: lk.Model, images: list[np.ndarray],
                                                       tmp_path: Path) -> None:
    header, blob = _saved(model, images, tmp_path / "a.llkv")
    assert _native_header(blob)["n_ctx"] == 512
    rng = np.random.default_rng(0)
    positions = sorted(set(rng.integers(8, len(blob), 160).tolist()) | {8, 16, 24, 30, len(blob) - 1})
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        (tmp_path / "bad.llkv").write_bytes(header + b"\n" + bytes(bad))
        with pytest.raises(lk.LlavaKVError, match="corrupt session state"):
            lk.Session.load(model, tmp_path / "bad.llkv")
    (tmp_path / "cut.llkv").write_bytes(header + b"\n" + blob[: len(blob) // 2])
    with pytest.raises(lk.LlavaKVError, match="truncated"):
        lk.Session.load(model, tmp_path / "cut.llkv")


@pytest.mark.parametrize("n_ctx", [10**9, 2**31 - 1, 2**32 - 1])
def test_session_file_declaring_a_huge_context_is_refused(model: lk.Model, images: list[np.ndarray],
                                                          tmp_path: Path, n_ctx: int) -> None:
    header, blob = _saved(model, images, tmp_path / "a.llkv")
    (tmp_path / "big.llkv").write_bytes(header + b"\n" + _with_native_header(blob, n_ctx=n_ctx))
    with pytest.raises(lk.LlavaKVError, match="n_ctx"):
        lk.Session.load(model, tmp_path / "big.llkv")


def test_session_file_lying_about_its_sizes_is_refused(model: lk.Model, images: list[np.ndarray],
                                                       tmp_path: Path) -> None:
    header, blob = _saved(model, images, tmp_path / "a.llkv")
    cells = _native_header(blob)["n_cells"]
    for changes, match in (({"n_cells": cells - 1}, "header says"), ({"n_cells": 600}, "inconsistent sizes"),
                           ({"n_vocab": 7}, "not this one"), ({"n_batch": 0}, "inconsistent sizes"),
                           ({"n_ubatch": 4096}, "inconsistent sizes")):
        (tmp_path / "lie.llkv").write_bytes(header + b"\n" + _with_native_header(blob, **changes))
        with pytest.raises(lk.LlavaKVError, match=match):
            lk.Session.load(model, tmp_path / "lie.llkv")


def test_session_file_header_keys_are_checked(model: lk.Model, images: list[np.ndarray], tmp_path: Path) -> None:
    header, blob = _saved(model, images, tmp_path / "a.llkv")
    for key in ("model_fingerprint", "projector_id", "version"):
        fields = json.loads(header)
        del fields[key]
        (tmp_path / "h.llkv").write_bytes(json.dumps(fields).encode() + b"\n" + blob)
        with pytest.raises(lk.LlavaKVError, match=repr(key)):
            lk.Session.load(model, tmp_path / "h.llkv")


def test_session_load_with_an_n_ctx_override(model: lk.Model, images: list[np.ndarray], tmp_path: Path) -> None:
    header, blob = _saved(model, images, tmp_path / "a.llkv")
    cells = _native_header(blob)["n_cells"]
    with pytest.raises(lk.ContextFullError) as info:
        lk.Session.load(model, tmp_path / "a.llkv", n_ctx=cells - 1)
    assert info.value.needed == cells
    for n_ctx in (cells, 4 * cells):
        with lk.Session.load(model, tmp_path / "a.llkv", n_ctx=n_ctx) as s, model.session(n_ctx=512) as fresh:
            _conversation(fresh, images)
            assert s.n_ctx == n_ctx
            assert np.array_equal(s.logits(), fresh.logits())
            if n_ctx > cells:
                s.append_text(" and?")
                fresh.append_text(" and?")
                assert np.array_equal(s.logits(), fresh.logits())
            else:
                with pytest.raises(lk.ContextFullError):
                    s.append_text(" and?")


# --- silent wrong answers -----------------------------------------------------------------------

def _with_nan_tensor(source: Path, tensor: str, dest: Path) -> Path:
    """A copy of the GGUF ``source`` whose ``tensor`` is all NaN (weights pass every file check)."""
    import gguf

    dest.write_bytes(source.read_bytes())
    reader = gguf.GGUFReader(dest, "r+")
    next(t for t in reader.tensors if t.name == tensor).data[...] = np.nan
    del reader
    return dest


def test_non_finite_logits_raise(llava_pair: testing.TestModel, tmp_path: Path) -> None:
    """Weights that give NaN logits: a clear error and the session unchanged, never NaN logits."""
    broken = _with_nan_tensor(llava_pair.model_path, "output.weight", tmp_path / "nan.gguf")
    with lk.Model.load(broken, llava_pair.mmproj_path) as model, model.session(n_ctx=512) as s:
        before = session_state(s)
        with pytest.raises(lk.LlavaKVError, match="non-finite logits"):
            s.append_text("USER: hello")
        assert session_state(s) == before
        records = lk.batch.run(model, [random_image(1)], "Describe it.", max_tokens=4, progress=False)
        assert "non-finite logits" in records[0].error


def test_a_context_whose_cache_cannot_fit_memory_is_refused(llava_pair: testing.TestModel) -> None:
    """Refused before llama.cpp allocates and clears gigabytes (issue: n_ctx 1e9 cost 3.8 GiB and 30 s)."""
    with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as model:
        for n_ctx in (10**9, 2**31 - 1):
            with pytest.raises(lk.LlavaKVError, match="GiB for its cache"):
                model.session(n_ctx=n_ctx)
        assert model.memory()["sessions"] == {}


def test_non_finite_embeddings_are_refused_at_encode(llava_pair: testing.TestModel, tmp_path: Path) -> None:
    """A projector whose output holds NaN: ImageError naming the image, nothing cached or decoded."""
    broken = _with_nan_tensor(llava_pair.mmproj_path, "mm.2.weight", tmp_path / "nan-mmproj.gguf")
    with lk.Model.load(llava_pair.model_path, broken) as model, model.session(n_ctx=512) as s:
        s.append_text("USER: ")
        before = session_state(s)
        with pytest.raises(lk.ImageError, match="non-finite"):
            s.append_image(random_image(1))
        assert session_state(s) == before
        assert model.embedding_cache_stats()["entries"] == 0
        records = lk.batch.run(model, [random_image(1)], "Describe it.", max_tokens=4, progress=False)
        assert "non-finite" in records[0].error
