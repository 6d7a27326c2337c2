"""Edits anywhere in a session equal a fresh run of the resulting timeline, and cost only the suffix.

Self-contained (no conftest fixtures): every fixture here is prefixed ``_edits_``. Every tiny
preset (conftest.TINY_PRESETS) is covered through the module-scoped, parametrized ``_edits_env`` fixture.

The shift-mode test runs its edit in a child process: an abort inside llama.cpp must fail that
test, not kill the whole pytest run.
"""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llava_kv as lk
from llava_kv.images import load_image
from llava_kv.testing import make_test_model, random_image

from conftest import TINY_PRESETS as PRESETS, feed_timeline, write_to_terminal
N_CTX = 2048
N_BATCH = 64
# Every model here runs on CPU (Model.load's default n_gpu_layers=0), where an edited session's
# logits equal a fresh run's bit for bit: comparisons are np.array_equal, the max |diff| is reported.

# Long enough that the gemma3 conversation (9 image tokens + 2 markers per image) runs well past
# its 64-token sliding window, so that edits also exercise windowed attention.
TEXT_A = [
    "USER: look at these pictures and describe them",
    " first the red car on the left of the house",
    " second the green tree under the blue sky",
    " third the white dog near the water\nASSISTANT:",
]
TEXT_B = [
    " this is the first picture of a cat",
    " and here is the second one with a dog",
    " then a photo of a car near the tree",
]

# (preset, label, max |logits - fresh logits|) for every comparison made in this module.
_DIFFS: list[tuple[str, str, float]] = []
# (preset, outcome, divergence or None, detail)
_SHIFT: list[tuple[str, str, float | None, str]] = []

# Seeds never used by anything else in this module: each gives an image no session has seen.
_NEW_SEEDS = itertools.count(10_000)


# --- fixtures and helpers ----------------------------------------------------------------------


class _Env:
    def __init__(self, preset: str, model_path: Any, mmproj_path: Any, model: lk.Model) -> None:
        self.preset = preset
        self.model_path = model_path
        self.mmproj_path = mmproj_path
        self.model = model
        self.pixels: dict[str, np.ndarray] = {}  # digest -> the array passed for it

    def image(self, seed: int) -> np.ndarray:
        arr = random_image(seed)
        self.pixels[load_image(arr, self.model.projector_id).digest] = arr
        return arr

    def new_image(self) -> np.ndarray:
        return self.image(next(_NEW_SEEDS))

    def session(self, n_ctx: int = N_CTX) -> lk.Session:
        return self.model.session(n_ctx=n_ctx, n_batch=N_BATCH)

    def build(self, items: list[Any], n_ctx: int = N_CTX) -> lk.Session:
        s = self.session(n_ctx)
        for it in items:
            if isinstance(it, str):
                s.append_text(it)
            else:
                s.append_image(it)
        return s

    def conversation(self, name: str, seeds: tuple[int, ...] | None = None) -> list[Any]:
        """A: text-first, text-final; B: image-first (BOS on an image chunk), image-final."""
        if name == "A":
            a, b, c = (self.image(x) for x in (seeds or (0, 1, 2)))
            return [TEXT_A[0], a, TEXT_A[1], b, TEXT_A[2], c, TEXT_A[3]]
        a, b, c, d = (self.image(x) for x in (seeds or (0, 1, 2, 3)))
        return [a, TEXT_B[0], b, TEXT_B[1], c, TEXT_B[2], d]


@pytest.fixture(scope="module", params=PRESETS)
def _edits_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tm = make_test_model(tmp_path_factory.mktemp("edits-models"), request.param)
    with lk.Model.load(tm.model_path, tm.mmproj_path) as m:
        yield _Env(request.param, tm.model_path, tm.mmproj_path, m)


@pytest.fixture(scope="module", autouse=True)
def _edits_summary(request: pytest.FixtureRequest):
    yield
    lines = ["", "test_edits.py: max |logits - fresh| per preset and edit kind"]
    per: dict[tuple[str, str], float] = {}
    for preset, label, diff in _DIFFS:
        kind = label.split("@")[0]
        per[(preset, kind)] = max(per.get((preset, kind), 0.0), diff)
    for (preset, kind), diff in sorted(per.items()):
        lines.append(f"  {preset:12s} {kind:28s} {diff:.3e}")
    if _DIFFS:
        lines.append(f"  overall max: {max(d for _, _, d in _DIFFS):.3e} over {len(_DIFFS)} comparisons")
    lines.append("test_edits.py: shift-mode remove_image (approximate) divergence vs fresh")
    for preset, outcome, div, detail in _SHIFT:
        lines.append(f"  {preset:12s} {outcome:9s} "
                     f"{'-' if div is None else f'{div:.3e}'}  {detail}")
    write_to_terminal(request, lines)


def _layout(timeline: list[lk.Chunk]) -> list[tuple]:
    return [(c.kind, c.n_tokens, c.pos0, c.pos1, c.text, c.image.digest if c.image else None)
            for c in timeline]


def _state(s: lk.Session) -> tuple:
    """Everything a failed call must leave as it was."""
    try:
        logits: bytes | None = s.logits().tobytes()
    except lk.LlavaKVError:
        logits = None
    return (tuple(s.timeline), s.n_past, logits, tuple(sorted(s.stats.items())))


def _fresh(env: _Env, timeline: list[lk.Chunk]) -> tuple[list[tuple], np.ndarray | None, int]:
    """Feeds ``timeline`` to a new session from scratch: its layout, logits (None if refused), n_past."""
    with env.session() as f:
        feed_timeline(f, timeline, env.pixels)
        try:
            logits: np.ndarray | None = f.logits()
        except lk.LlavaKVError:
            logits = None
        return _layout(f.timeline), logits, f.n_past


def _check_consistent(s: lk.Session) -> list[lk.Chunk]:
    tl = s.timeline
    pos = 0
    for c in tl:
        assert c.pos0 == pos
        assert c.pos1 >= c.pos0
        pos = c.pos1
        if c.kind == "image":
            assert c.image is not None and c.text is None
            assert (c.image.pos0, c.image.pos1, c.image.n_tokens, c.image.chunk_id) == \
                (c.pos0, c.pos1, c.n_tokens, c.chunk_id)
        else:
            assert c.kind == "text" and c.image is None and c.text
    assert s.n_past == pos
    assert list(s.images) == [c.image for c in tl if c.image is not None]
    assert len(s.images) == sum(c.kind == "image" for c in tl)
    return tl


def _check_fresh(env: _Env, s: lk.Session, label: str) -> bool:
    """Asserts ``s`` equals a fresh run of its timeline (layout, n_past, logits bit for bit, or
    both refusing logits). Returns whether the fresh run has logits."""
    tl = _check_consistent(s)
    layout, ref, n_past = _fresh(env, tl)
    assert _layout(tl) == layout
    assert s.n_past == n_past
    if ref is None:
        assert not tl or tl[-1].kind == "image"
        with pytest.raises(lk.LlavaKVError):
            s.logits()
        return False
    try:
        got = s.logits()
    except lk.LlavaKVError as e:
        pytest.fail(f"[{env.preset}] {label}: the edited session's logits() raised {e!r}, but a fresh session "
                    f"fed the same timeline (last chunk: {tl[-1].kind}) returns logits")
    assert got.dtype == np.float32 and got.shape == ref.shape == (env.model.n_vocab,)
    assert np.all(np.isfinite(got))
    diff = float(np.max(np.abs(got - ref)))
    _DIFFS.append((env.preset, label, diff))
    print(f"[{env.preset}] {label}: max |logits - fresh| = {diff:.3e}")
    assert np.array_equal(got, ref), f"{label}: logits differ from a fresh run by {diff}"
    return True


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _first_changed(old: list[lk.Chunk], new: list[lk.Chunk]) -> int:
    k = 0
    while k < min(len(old), len(new)) and old[k].chunk_id == new[k].chunk_id:
        k += 1
    return k


def _check_counters(old: list[lk.Chunk], new: list[lk.Chunk], d: dict[str, int], k: int,
                    n_images_in: int, last_has_logits: bool) -> None:
    """The work an exact edit whose first changed chunk is ``k`` must do, and no more.

    ``last_has_logits``: whether a fresh run of ``new`` has logits (a text-final timeline always;
    an image-final one when the projector ends images with marker text, as gemma3 does).
    """
    assert [(c.chunk_id, c.pos0, c.pos1, c.n_tokens) for c in old[:k]] == \
        [(c.chunk_id, c.pos0, c.pos1, c.n_tokens) for c in new[:k]]
    first = k
    if k == len(new) and k > 0 and last_has_logits:
        first = k - 1  # a pure truncation re-decodes the new last chunk to refresh the logits
    assert d["tokens_decoded"] == sum(c.n_tokens for c in new[first:]), d
    assert d["text_tokens_decoded"] + d["image_tokens_decoded"] == d["tokens_decoded"], d
    assert d["kv_cells_removed"] == sum(c.n_tokens for c in old[first:]), d
    assert d["images_decoded"] == sum(c.kind == "image" for c in new[first:]), d
    assert d["images_encoded"] + d["embed_cache_hits"] == n_images_in, d
    assert d["embed_cache_misses"] == d["images_encoded"], d
    assert d["full_redecodes"] == 0 and d["shift_edits"] == 0, d


# --- 1 + 2: every edit kind at head, middle and tail ------------------------------------------


def _img_index(s: lk.Session, where: str) -> int:
    n = len(s.images)
    return {"head": 0, "middle": n // 2, "tail": n - 1}[where]


def _chunk_index(s: lk.Session, where: str) -> int:
    n = len(s.timeline)
    return {"head": 0, "middle": n // 2, "tail": n}[where]


def _chunk_of(s: lk.Session, ref: lk.ImageRef) -> int:
    return [c.chunk_id for c in s.timeline].index(ref.chunk_id)


# Each op edits ``s`` and returns the index of the first chunk it changes.
Op = Callable[[lk.Session, str, Any], int]


def _op_append_text(s, where, img):
    k = len(s.timeline)
    s.append_text(" and what else is there")
    return k


def _op_append_image(s, where, img):
    k = len(s.timeline)
    ref = s.append_image(img)
    assert s.timeline[-1].image == ref
    return k


def _op_insert_image(s, where, img):
    k = _chunk_index(s, where)
    ref = s.insert_image(k, img)
    assert s.timeline[k].image == ref
    return k


def _op_insert_text(s, where, img):
    k = _chunk_index(s, where)
    s.insert_text(k, " some inserted words here")
    assert s.timeline[k].text == " some inserted words here"
    return k


def _op_images_insert(s, where, img):
    n = len(s.images)
    i = {"head": 0, "middle": n // 2, "tail": n}[where]
    k = _chunk_of(s, s.images[i]) if i < n else len(s.timeline)
    s.images.insert(i, img)
    assert s.images[i].chunk_id == s.timeline[k].chunk_id
    return k


def _op_replace_image(s, where, img):
    ref = s.images[_img_index(s, where)]
    k = _chunk_of(s, ref)
    new = s.replace_image(ref, img)
    assert new.chunk_id != ref.chunk_id and s.timeline[k].image == new
    return k


def _op_images_setitem(s, where, img):
    i = _img_index(s, where)
    k = _chunk_of(s, s.images[i])
    s.images[i] = img
    return k


def _op_remove_image(s, where, img):
    ref = s.images[_img_index(s, where)]
    k = _chunk_of(s, ref)
    s.remove_image(ref, mode="exact")
    assert ref.chunk_id not in [c.chunk_id for c in s.timeline]
    return k


def _op_images_delitem(s, where, img):
    i = _img_index(s, where)
    k = _chunk_of(s, s.images[i])
    del s.images[i]
    return k


def _op_truncate(s, where, img):
    n = len(s.timeline)
    keep = {"head": 1, "middle": n // 2, "tail": n - 1}[where]
    s.truncate(keep)
    assert len(s.timeline) == keep
    return keep


def _op_edit(s, where, img):
    n = len(s.timeline)
    b = {"head": 0, "middle": n // 2, "tail": n - 1}[where]
    e = min(n, b + 2)
    s.edit(b, e, [" edited text", img])
    return b


def _op_images_clear(s, where, img):
    k = _chunk_of(s, s.images[0])
    s.images.clear()
    assert len(s.images) == 0
    return k


_OPS: dict[str, tuple[Op, tuple[str, ...], bool]] = {
    # name: (op, positions, inserts an image)
    "append_text": (_op_append_text, ("tail",), False),
    "append_image": (_op_append_image, ("tail",), True),
    "insert_image": (_op_insert_image, ("head", "middle", "tail"), True),
    "insert_text": (_op_insert_text, ("head", "middle", "tail"), False),
    "images.insert": (_op_images_insert, ("head", "middle", "tail"), True),
    "replace_image": (_op_replace_image, ("head", "middle", "tail"), True),
    "images[i]=": (_op_images_setitem, ("head", "middle", "tail"), True),
    "remove_image(exact)": (_op_remove_image, ("head", "middle", "tail"), False),
    "del images[i]": (_op_images_delitem, ("head", "middle", "tail"), False),
    "truncate": (_op_truncate, ("head", "middle", "tail"), False),
    "edit": (_op_edit, ("head", "middle", "tail"), True),
    "images.clear": (_op_images_clear, ("all",), False),
}

_CASES = [
    pytest.param(conv, name, where, src, id=f"{conv}-{name}-{where}" + (f"-{src}" if src else ""))
    for conv in ("A", "B")
    for name, (_, positions, with_image) in _OPS.items()
    for where in positions
    for src in (("new", "seen") if with_image else (None,))
]


@pytest.mark.parametrize("conv,name,where,src", _CASES)
def test_edit_equals_fresh_run_and_costs_only_the_suffix(_edits_env, conv, name, where, src):
    env = _edits_env
    op, _, with_image = _OPS[name]
    with env.build(env.conversation(conv)) as s:
        _check_fresh(env, s, f"build-{conv}")
        # "seen": the conversation's first image, already encoded; "new": one no session has seen.
        img = env.new_image() if src == "new" else env.image(0)
        old, before = s.timeline, s.stats
        k = op(s, where, img)
        new, d = s.timeline, _delta(s.stats, before)

        assert _first_changed(old, new) == k
        has_logits = _check_fresh(env, s, f"{name}@{conv}-{where}")
        _check_counters(old, new, d, k, n_images_in=1 if with_image else 0, last_has_logits=has_logits)
        if src == "new":
            assert d["images_encoded"] == 1 and d["embed_cache_hits"] == 0
        elif src == "seen":
            assert d["images_encoded"] == 0 and d["embed_cache_hits"] == 1
        else:
            assert d["images_encoded"] == 0 and d["embed_cache_hits"] == 0

        # The session keeps working after the edit: one more append still equals a fresh run.
        if s.timeline:
            s.append_text(" ok")
            _check_fresh(env, s, f"{name}+append@{conv}-{where}")


def test_truncate_to_nothing_and_rebuild(_edits_env):
    env = _edits_env
    with env.build(env.conversation("A")) as s:
        old, before = s.timeline, s.stats
        s.truncate(0)
        d = _delta(s.stats, before)
        assert s.timeline == [] and s.n_past == 0 and len(s.images) == 0
        assert d["tokens_decoded"] == 0 and d["kv_cells_removed"] == sum(c.n_tokens for c in old)
        with pytest.raises(lk.LlavaKVError):
            s.logits()
        for it in env.conversation("A"):
            s.append_text(it) if isinstance(it, str) else s.append_image(it)
        _check_fresh(env, s, "truncate(0)+rebuild@A")


def test_noop_edits_do_no_work(_edits_env):
    env = _edits_env
    with env.build(env.conversation("A")) as s:
        st0 = _state(s)
        s.truncate(len(s.timeline))
        s.edit(2, 2, [])
        s.insert_text(3, "")  # empty text makes no chunk
        assert _state(s) == st0


# --- 3: random edit sequences -----------------------------------------------------------------

_POOL_SEEDS = (0, 1, 2, 3)
_WORDS = [" red", " car", " the blue sky", " a dog", "\nASSISTANT:", " USER: what is this", " tree"]


@settings(max_examples=15, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_edit_sequences_match_fresh_runs(_edits_env, data):
    env = _edits_env
    pool = [env.image(x) for x in _POOL_SEEDS]
    img = st.sampled_from(range(len(pool)))
    text = st.sampled_from(_WORDS)
    start = data.draw(st.sampled_from(["A", "B", "empty"]), label="start")
    items = [] if start == "empty" else env.conversation(start)
    with env.build(items) as s:
        for step in range(data.draw(st.integers(1, 6), label="n_steps")):
            tl = s.timeline
            n, n_img = len(tl), len(s.images)
            kinds = ["append_text", "append_image", "insert_image", "insert_text"]
            if n:
                kinds += ["truncate", "edit"]
            if n_img:
                kinds += ["replace_image", "remove_image", "images[i]=", "del images[i]", "images.clear"]
            kind = data.draw(st.sampled_from(kinds), label=f"op{step}")
            before = s.stats
            n_in = 0
            if kind == "append_text":
                s.append_text(data.draw(text))
            elif kind == "append_image":
                s.append_image(pool[data.draw(img)])
                n_in = 1
            elif kind == "insert_image":
                s.insert_image(data.draw(st.integers(0, n)), pool[data.draw(img)])
                n_in = 1
            elif kind == "insert_text":
                s.insert_text(data.draw(st.integers(0, n)), data.draw(text))
            elif kind == "truncate":
                s.truncate(data.draw(st.integers(0, n - 1)))
            elif kind == "edit":
                b = data.draw(st.integers(0, n))
                e = data.draw(st.integers(b, min(n, b + 3)))
                new_items = data.draw(st.lists(st.one_of(text, img.map(lambda i: pool[i])), min_size=1,
                                               max_size=3))
                s.edit(b, e, new_items)
                n_in = sum(not isinstance(x, str) for x in new_items)
            elif kind == "replace_image":
                s.replace_image(s.images[data.draw(st.integers(0, n_img - 1))], pool[data.draw(img)])
                n_in = 1
            elif kind == "images[i]=":
                s.images[data.draw(st.integers(-n_img, n_img - 1))] = pool[data.draw(img)]
                n_in = 1
            elif kind == "remove_image":
                s.remove_image(s.images[data.draw(st.integers(0, n_img - 1))])
            elif kind == "del images[i]":
                del s.images[data.draw(st.integers(-n_img, n_img - 1))]
            elif kind == "images.clear":
                s.images.clear()
            new, d = s.timeline, _delta(s.stats, before)
            has_logits = _check_fresh(env, s, f"random:{kind}")
            if [c.chunk_id for c in new] == [c.chunk_id for c in tl]:
                assert d["tokens_decoded"] == 0 and d["kv_cells_removed"] == 0
            else:
                _check_counters(tl, new, d, _first_changed(tl, new), n_in, has_logits)


# --- 4: shift mode ----------------------------------------------------------------------------

# Runs in a child process: prints one JSON line with what happened.
_SHIFT_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import llava_kv as lk
    from llava_kv.testing import random_image

    texts = json.loads(sys.argv[3])
    imgs = [random_image(x) for x in (0, 1, 2)]
    items = [texts[0], imgs[0], texts[1], imgs[1], texts[2], imgs[2], texts[3]]

    def layout(s):
        return [[c.kind, c.n_tokens, c.pos0, c.pos1, c.chunk_id, c.text,
                 c.image.digest if c.image else None] for c in s.timeline]

    def build(m, items):
        s = m.session(n_ctx=2048, n_batch=64)
        for it in items:
            s.append_text(it) if isinstance(it, str) else s.append_image(it)
        return s

    out = {}
    with lk.Model.load(sys.argv[1], sys.argv[2]) as m:
        s = build(m, items)
        ref = s.images[1]
        out["ref"] = [ref.chunk_id, ref.n_tokens, ref.digest]
        out["before"] = {"layout": layout(s), "n_past": s.n_past, "stats": s.stats,
                         "logits": s.logits().tolist()}
        print("shift: calling remove_image(mode='shift')", file=sys.stderr, flush=True)
        try:
            s.remove_image(ref, mode="shift")
            out["outcome"] = "ok"
        except lk.LlavaKVError as e:
            out["outcome"] = "refused"
            out["error"] = f"{type(e).__name__}: {e}"
        print("shift: returned " + out["outcome"], file=sys.stderr, flush=True)
        try:
            logits = s.logits()
        except lk.LlavaKVError as e:
            logits = None
            out["logits_error"] = f"{type(e).__name__}: {e}"
        out["after"] = {"layout": layout(s), "n_past": s.n_past, "stats": s.stats,
                        "logits": None if logits is None else logits.tolist()}
        fresh = build(m, [texts[0], imgs[0], texts[1], texts[2], imgs[2], texts[3]])
        out["fresh"] = {"layout": layout(fresh), "n_past": fresh.n_past, "logits": fresh.logits().tolist()}
        # The session still takes exact edits after a shift (or a refusal).
        s.append_text(" ok")
        out["after_append_logits_finite"] = bool(np.all(np.isfinite(s.logits())))
    print("RESULT " + json.dumps(out))
""")


def test_shift_remove_middle_image(_edits_env):
    env = _edits_env
    proc = subprocess.run(
        [sys.executable, "-c", _SHIFT_SCRIPT, str(env.model_path), str(env.mmproj_path), json.dumps(TEXT_A)],
        capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()
        cause = [ln for ln in lines if "GGML_ASSERT" in ln or "Error" in ln or ln.startswith("shift:")]
        _SHIFT.append((env.preset, "CRASHED", None, f"rc={proc.returncode}: {' | '.join(cause[-4:])}"))
        pytest.fail(f"[{env.preset}] remove_image(ref, mode='shift') on a middle image killed the process "
                    f"(exit code {proc.returncode}) instead of succeeding or raising LlavaKVError:\n"
                    + "\n".join(cause[-10:] or lines[-20:]))
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    before, after, fresh = result["before"], result["after"], result["fresh"]
    ref_id, ref_n, ref_digest = result["ref"]
    d = {k: after["stats"][k] - before["stats"][k] for k in before["stats"]}
    assert result["after_append_logits_finite"]

    if result["outcome"] == "refused":
        _SHIFT.append((env.preset, "refused", None, result["error"]))
        print(f"[{env.preset}] shift refused: {result['error']}")
        assert after == before, "a refused shift edit changed the session"
        return

    old = before["layout"]
    i = [c[4] for c in old].index(ref_id)
    assert after["n_past"] == before["n_past"] - ref_n
    assert ref_id not in [c[4] for c in after["layout"]]
    assert ref_digest not in [c[6] for c in after["layout"]]
    # Same chunks (ids, text, digests) minus the removed one; later ones shifted down by its span.
    expected = [c[:2] + ([c[2] - ref_n, c[3] - ref_n] if j > i else c[2:4]) + c[4:]
                for j, c in enumerate(old) if j != i]
    assert after["layout"] == expected
    assert [c[:4] + c[5:] for c in after["layout"]] == [c[:4] + c[5:] for c in fresh["layout"]]
    assert after["n_past"] == fresh["n_past"]
    assert 0 <= d["tokens_decoded"] <= 1, d
    assert d["images_encoded"] == 0 and d["images_decoded"] == 0, d
    assert d["kv_cells_removed"] in (ref_n, ref_n + 1), d
    assert after["stats"]["shift_edits"] == 1 and d["shift_edits"] == 1
    assert after["logits"] is not None
    got, ref = np.asarray(after["logits"], np.float32), np.asarray(fresh["logits"], np.float32)
    assert np.all(np.isfinite(got))
    div = float(np.max(np.abs(got - ref)))
    assert math.isfinite(div)
    _SHIFT.append((env.preset, "ok", div, f"removed {ref_n} cells, tokens_decoded +{d['tokens_decoded']}"))
    print(f"[{env.preset}] shift-mode removal: max |logits - fresh| = {div:.3e} (approximation, not asserted)")


def test_shift_removal_of_the_first_chunk(_edits_env):
    """A first chunk that carries BOS cannot be shifted away; without BOS (qwen, SmolVLM, ...) it
    can, where the memory can shift at all."""
    env = _edits_env
    with env.build(env.conversation("B")) as s:  # chunk 0 is an image (carrying BOS where the model adds one)
        first = s.timeline[0]
        assert first.kind == "image" and first.pos0 == 0
        mrope = env.model._core.uses_mrope
        if mrope:
            assert first.pos1 < first.n_tokens  # M-RoPE: an image takes fewer positions than KV cells
        else:
            assert first.pos1 == first.n_tokens
        adds_bos = len(s._core.tokenize("x", True)) > len(s._core.tokenize("x", False))
        s.append_text(" end")
        st0 = _state(s)
        if adds_bos or mrope:
            with pytest.raises(lk.LlavaKVError):
                s.remove_image(s.images[0], mode="shift")
            assert _state(s) == st0
            return
        old = s.timeline
        s.remove_image(s.images[0], mode="shift")
        new = s.timeline
        assert [c.chunk_id for c in new] == [c.chunk_id for c in old[1:]]
        assert [(c.pos0, c.pos1) for c in new] == [(c.pos0 - first.pos1, c.pos1 - first.pos1) for c in old[1:]]
        assert s.n_past == st0[1] - first.n_tokens and np.all(np.isfinite(s.logits()))


def test_invalid_mode_is_a_value_error(_edits_env):
    env = _edits_env
    with env.build(env.conversation("A")) as s:
        st0 = _state(s)
        for mode in ("fast", "EXACT", "", None):
            with pytest.raises(ValueError):
                s.remove_image(s.images[1], mode=mode)  # type: ignore[arg-type]
        assert _state(s) == st0


# --- 5: images.clear() ------------------------------------------------------------------------


def test_images_clear_keeps_text_and_the_cache(_edits_env):
    env = _edits_env
    seeds = tuple(next(_NEW_SEEDS) for _ in range(3))
    with env.build(env.conversation("A", seeds)) as s:
        assert s.stats["images_encoded"] == 3
        old, before = s.timeline, s.stats
        digests = [r.digest for r in s.images]
        s.images.clear()
        new, d = s.timeline, _delta(s.stats, before)
        assert len(s.images) == 0 and list(s.images) == []
        assert all(c.kind == "text" for c in new)
        assert [c.text for c in new] == TEXT_A
        assert s.n_past == sum(c.n_tokens for c in new) == sum(c.n_tokens for c in old if c.kind == "text")
        _check_counters(old, new, d, 1, 0, True)
        with env.build(TEXT_A) as f:
            got, ref = s.logits(), f.logits()
            diff = float(np.max(np.abs(got - ref)))
            assert _layout(f.timeline) == _layout(new)
        _DIFFS.append((env.preset, "images.clear(text-only)@A", diff))
        print(f"[{env.preset}] images.clear vs fresh text-only session: {diff:.3e}")
        assert np.array_equal(got, ref), f"images.clear: logits differ from a fresh text-only session by {diff}"

        # The embeddings stay in the model's cache for other sessions.
        with env.session() as s2:
            s2.append_text("USER: ")
            ref = s2.append_image(env.pixels[digests[1]])
            assert ref.digest == digests[1]
            st2 = s2.stats
            assert st2["embed_cache_hits"] == 1 and st2["images_encoded"] == 0
            assert st2["embed_cache_misses"] == 0 and st2["images_decoded"] == 1

        # And the cleared session can take images again (cache hits, no encode).
        before = s.stats
        s.images.insert(0, env.pixels[digests[0]])
        d = _delta(s.stats, before)
        assert d["embed_cache_hits"] == 1 and d["images_encoded"] == 0
        _check_fresh(env, s, "images.clear+insert@A")


def test_images_clear_without_images_is_a_noop(_edits_env):
    env = _edits_env
    with env.build(TEXT_A) as s:
        st0 = _state(s)
        s.images.clear()
        assert _state(s) == st0


# --- 6: bad input leaves the session unchanged -------------------------------------------------


def test_stale_ref_raises_key_error(_edits_env):
    env = _edits_env
    with env.build(env.conversation("A")) as s:
        gone = s.images[1]
        s.remove_image(gone)
        st0 = _state(s)
        with pytest.raises(KeyError):
            s.replace_image(gone, env.image(0))
        assert _state(s) == st0
        with pytest.raises(KeyError):
            s.remove_image(gone)
        assert _state(s) == st0
        with pytest.raises(KeyError):
            s.remove_image(gone, mode="shift")
        assert _state(s) == st0
        # A replaced image's old ref is stale too.
        old = s.images[0]
        s.replace_image(old, env.image(1))
        st1 = _state(s)
        with pytest.raises(KeyError):
            s.remove_image(old)
        assert _state(s) == st1
        _check_fresh(env, s, "after-stale-refs@A")


@pytest.mark.parametrize("call", ["append", "insert", "replace", "setitem", "images.insert", "edit"])
def test_corrupt_image_bytes_raise_image_error(_edits_env, call):
    env = _edits_env
    bad = b"not an image"
    with env.build(env.conversation("A")) as s:
        st0 = _state(s)
        with pytest.raises(lk.ImageError):
            if call == "append":
                s.append_image(bad)
            elif call == "insert":
                s.insert_image(1, bad)
            elif call == "replace":
                s.replace_image(s.images[1], bad)
            elif call == "setitem":
                s.images[0] = bad
            elif call == "images.insert":
                s.images.insert(1, bad)
            else:
                s.edit(1, 2, [" text", bad])
        assert _state(s) == st0


@pytest.mark.parametrize("call", ["append", "insert", "replace", "edit"])
def test_missing_image_path_raises_file_not_found(_edits_env, tmp_path, call):
    env = _edits_env
    missing = tmp_path / "no-such-image.png"
    with env.build(env.conversation("A")) as s:
        st0 = _state(s)
        # edit() takes every str as text, so only a Path names a file there.
        for path in (missing,) if call == "edit" else (missing, str(missing)):
            with pytest.raises(FileNotFoundError):
                if call == "append":
                    s.append_image(path)
                elif call == "insert":
                    s.insert_image(2, path)
                elif call == "replace":
                    s.replace_image(s.images[0], path)
                else:
                    s.edit(0, 1, [path])
            assert _state(s) == st0


@pytest.mark.parametrize("where", ["insert-middle", "append", "replace-with-longer-text"])
def test_context_overflow_raises_context_full(_edits_env, where):
    env = _edits_env
    with env.build(["USER: ", env.image(0), " hi"], n_ctx=128) as s:
        n_ctx = s.n_ctx
        assert n_ctx >= 128
        err = None
        for i in range(1, 200):
            st0 = _state(s)
            cells = sum(c.n_tokens for c in s.timeline)
            try:
                if where == "insert-middle":
                    s.insert_image(1, env.new_image())
                elif where == "append":
                    s.append_image(env.new_image())
                else:
                    s.edit(2, 3, [" hi" + " the red car near the tree" * (4 * i)])
            except lk.ContextFullError as e:
                err = e
                break
        assert err is not None, "never overflowed"
        assert isinstance(err, lk.LlavaKVError)
        assert err.needed is not None and err.available is not None
        assert err.needed > err.available
        assert err.available == n_ctx
        assert cells <= n_ctx < err.needed
        assert _state(s) == st0
        _check_fresh(env, s, f"after-context-full@{where}")
