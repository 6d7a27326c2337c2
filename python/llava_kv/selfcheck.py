"""The exactness checks a user runs on their own checkpoint (``llava-kv selfcheck``).

The test suite proves the project's promises on random-weight models; a user's real checkpoint may
reach code paths those never do (a projector that merges markers differently, a sliding window,
quantized weights, a GPU backend). :func:`run_selfcheck` loads the user's pair and measures, on it:

- **edits**: every exact edit kind (append, insert at the start and in the middle, replace the first
  and the last, remove, clear) against a fresh session fed the resulting timeline from scratch. The
  logits must be bitwise equal, the standard of tests/test_edits.py.
- **reference**: our piecewise evaluation against mtmd's own (``mtmd_tokenize`` +
  ``mtmd_helper_eval_chunks`` on the joined prompt, what llama-cpp-python does): the same tokens and
  positions, and logits bitwise equal where both split the prompt into the same chunks. Where mtmd
  decodes a media marker with the text beside it, the batches differ, and so does the rounding: on
  the f32 test models by nothing (the 1e-3 of tests/test_session.py holds), on quantized weights by
  as much as the same model's logits move when llava-kv's own batches are cut otherwise. That
  re-batching noise is measured on the checkpoint, and the limit is twice it (at least 1e-3).
- **device**: where a device (GPU) holds part of the model, the same conversation on a CPU-only copy:
  max |logit difference| within max(0.1, twice the CPU's re-batching noise), and the same most likely
  token wherever the CPU's top two are further apart than twice that.

Each check records the number it measured and its limit. A check that cannot run (no projector, no
device) is reported as skipped with the reason, never as passed.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import _core
from ._core import _testing
from .audio import load_audio
from .errors import LlavaKVError
from .images import ImageInput, load_image
from .selfcheck_conversation import (APPENDED_TEXT, MediaSet, Plan, append_media, audio_set, build_session,
                                     conversation, feed_timeline, image_set, kind_of, plan_conversation, rebatched,
                                     session_tokens)
from .selfcheck_report import CheckResult, SelfcheckReport

if TYPE_CHECKING:
    from .model import Model
    from .session import Session
    from .timeline import Chunk

__all__ = ["CheckResult", "SelfcheckReport", "run_selfcheck", "device_agreement", "EDIT_LIMIT",
           "REFERENCE_TOLERANCE", "DEVICE_TOLERANCE", "DEVICE_MARGIN", "NOISE_FACTOR"]

# tests/test_edits.py: on one device an edited session's logits equal a fresh run's bit for bit.
EDIT_LIMIT = 0.0
# tests/test_session.py, tests/test_families.py: where mtmd keeps a media marker with the text beside
# it and we keep it with its media, the batches are split differently and the sums round differently.
REFERENCE_TOLERANCE = 1e-3
# A device against the CPU: other kernels, other rounding; a wrong result is off by far more.
DEVICE_TOLERANCE = 0.1
DEVICE_MARGIN = 0.2
# Where batches differ, a limit is never below this multiple of the model's own re-batching noise: the
# largest logit move when the same tokens are decoded in other batches. On the f32 test models that
# noise is 0, so the limits above hold; on quantized weights the kernels a batch size selects round
# differently (Gemma 3 270M Q4_K_M on a CPU: up to 1.0 for one token boundary moved per media edge).
NOISE_FACTOR = 2.0
_EDIT_MEASURE = "max |logit - fresh|"
_REFERENCE_MEASURE = "max |logit - mtmd|"
_DEVICE_MEASURE = "max |logit - CPU|"

Progress = Callable[[str], None]


# -- comparisons ----------------------------------------------------------------------------------


def _max_abs(a: np.ndarray, b: np.ndarray) -> float | None:
    """max |a - b|, None when either holds NaN or infinity (no figure would mean anything)."""
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _layout(timeline: list["Chunk"]) -> list[tuple[Any, ...]]:
    return [(c.kind, c.n_tokens, c.pos0, c.pos1, c.text, c.media.digest if c.media else None) for c in timeline]


def device_agreement(cpu: Sequence[np.ndarray], device: Sequence[np.ndarray], *, tolerance: float = DEVICE_TOLERANCE,
                     margin: float = DEVICE_MARGIN) -> tuple[bool, float | None, str]:
    """Whether a device's logits agree with the CPU's at every compared position: max |difference|
    <= ``tolerance``, and the same most likely token wherever the CPU's top two are more than
    ``margin`` apart (closer than that, a rounding difference may rightly swap them). Returns
    (passed, max |difference| or None when not finite, what was seen)."""
    worst = 0.0
    disagree, near_ties = [], 0
    for i, (c, d) in enumerate(zip(cpu, device)):
        diff = _max_abs(c, d)
        if diff is None:
            return False, None, f"position {i}: logits hold NaN or infinity, or differ in size"
        worst = max(worst, diff)
        if int(np.argmax(c)) != int(np.argmax(d)):
            top2 = np.sort(c)[-2:]
            gap = float(top2[1] - top2[0])
            if gap > margin:
                disagree.append(f"position {i}: most likely token {int(np.argmax(d))} on the device, "
                                f"{int(np.argmax(c))} on the CPU (CPU margin {gap:.3g})")
            else:
                near_ties += 1
    detail = f"{len(cpu)} positions compared"
    if near_ties:
        detail += f"; {near_ties} near tie(s) (CPU top-2 margin <= {margin:g}) ranked differently"
    if disagree:
        detail += "; " + "; ".join(disagree)
    elif not near_ties:
        detail += "; the same most likely token at each"
    return worst <= tolerance and not disagree, worst, detail


def _rebatching_noise(model: "Model", plan: Plan, kind: str | None, parts: list[Any], logits: np.ndarray,
                      tokens: list[int]) -> float | None:
    """How far this model's last logits move when the same tokens are decoded in other batches (None
    when the cut text tokenizes otherwise, or the logits are not finite)."""
    with build_session(model, plan, kind, rebatched(parts)) as s:
        return _max_abs(s.logits(), logits) if session_tokens(s) == tokens else None


def _noisy_limit(floor: float, noise: float | None) -> float:
    return floor if noise is None else max(floor, NOISE_FACTOR * noise)


# -- the checks -----------------------------------------------------------------------------------


def _edit_ops(kind: str) -> list[tuple[str, Callable[["Session", np.ndarray], None]]]:
    """(name, edit) for every exact edit kind; each edit brings in the new item (if any) itself."""
    many = "images" if kind == "image" else "media"

    def append(s: "Session", x: np.ndarray) -> None:
        append_media(s, kind, x)
        s.append_text(APPENDED_TEXT)  # an image-final timeline may have no logits to compare

    def insert(index: Callable[["Session"], int]) -> Callable[["Session", np.ndarray], None]:
        def op(s: "Session", x: np.ndarray) -> None:
            (s.insert_image if kind == "image" else s.insert_audio)(index(s), x)
        return op

    def replace(which: int) -> Callable[["Session", np.ndarray], None]:
        def op(s: "Session", x: np.ndarray) -> None:
            ref = s.media[which]
            (s.replace_image if kind == "image" else s.replace_audio)(ref, x)
        return op

    def remove(s: "Session", x: np.ndarray) -> None:
        (s.remove_image if kind == "image" else s.remove_audio)(s.media[0], mode="exact")

    def clear(s: "Session", x: np.ndarray) -> None:
        (s.images if kind == "image" else s.media).clear()

    return [(f"append_{kind}", append),
            (f"insert_{kind}@start", insert(lambda s: 0)),
            (f"insert_{kind}@middle", insert(lambda s: len(s.timeline) // 2)),
            (f"replace_{kind}@first", replace(0)),
            (f"replace_{kind}@last", replace(-1)),
            (f"remove_{kind}(exact)", remove),
            (f"{many}.clear()", clear)]


def _check_edit(model: "Model", plan: Plan, parts: list[Any], media: MediaSet, name: str,
                op: Callable[["Session", np.ndarray], None]) -> CheckResult:
    measure, t0 = _EDIT_MEASURE, time.perf_counter()

    def result(passed: bool, figure: float | None, detail: str) -> CheckResult:
        return CheckResult(f"edit:{name}", passed, figure, EDIT_LIMIT, measure, detail, time.perf_counter() - t0)

    try:
        # A session of its own, not a fork of one conversation: a loaded state may hold fewer KV cells
        # (a sliding window's), which sends edits down another path than a user's session takes.
        with build_session(model, plan, media.kind, parts) as s:
            before = s.stats
            op(s, media.items[2])
            after, exact = s.stats, s.exact
            timeline, got = s.timeline, s.logits()
            with feed_timeline(model, plan, timeline, media) as fresh:
                fresh_layout, want = _layout(fresh.timeline), fresh.logits()
    except LlavaKVError as e:
        return result(False, None, f"raised {type(e).__name__}: {e}")
    if _layout(timeline) != fresh_layout:
        return result(False, None, "the edited timeline's chunks or positions differ from a fresh session's: "
                      f"{_layout(timeline)} vs {fresh_layout}")
    diff, equal = _max_abs(got, want), bool(np.array_equal(got, want))
    detail = ("bitwise equal to a fresh session" if equal else
              "differs from a fresh session" if diff is not None else "logits hold NaN or infinity")
    detail += (f"; re-decoded {after['tokens_decoded'] - before['tokens_decoded']} of "
               f"{sum(c.n_tokens for c in timeline)} tokens")
    if after["full_redecodes"] > before["full_redecodes"]:
        detail += " (the model's memory refused a partial removal: the whole timeline was decoded again)"
    if not exact:
        detail += "; the session calls itself approximate (exact=False)"
    return result(equal, diff, detail)


def _check_reference(model: "Model", plan: Plan, base: "Session", media: MediaSet,
                     parts: list[Any]) -> CheckResult:
    name = _reference_check_name(media.kind)
    measure, t0 = _REFERENCE_MEASURE, time.perf_counter()
    prompt = "".join(p if isinstance(p, str) else model.media_marker for p in parts)
    inputs = [_core_media(model, media.kind, p) for p in parts if not isinstance(p, str)]
    try:
        ref_eval = _testing.reference_eval(model._core, prompt, inputs, plan.n_ctx, plan.n_batch)
        tokens, n_past, want = ref_eval.tokens, ref_eval.n_past, ref_eval.logits
    except LlavaKVError as e:
        return CheckResult(name, False, None, None, measure, f"mtmd's evaluation raised {type(e).__name__}: {e}",
                           time.perf_counter() - t0)
    ref, ours = list(tokens), session_tokens(base)
    problems = []
    if len(ours) != len(ref):
        problems.append(f"{len(ours)} tokens, mtmd has {len(ref)}")
    else:
        # mtmd keeps a media item's marker tokens (e.g. <start_of_image>) with the text beside it; we
        # keep them with the item: where we hold media, mtmd may hold a marker, nowhere else may differ.
        wrong = [i for i, (o, r) in enumerate(zip(ours, ref)) if o != r and not (o == -1 and r != -1)]
        if wrong:
            problems.append(f"{len(wrong)} tokens differ from mtmd's, first at position {wrong[0]} "
                            f"({ours[wrong[0]]} vs {ref[wrong[0]]})")
    if base.n_past != n_past:
        problems.append(f"n_past {base.n_past}, mtmd's {n_past}")
    same_chunks = ours == ref
    got = base.logits()
    noise = None if same_chunks else _rebatching_noise(model, plan, media.kind, parts, got, ours)
    limit = EDIT_LIMIT if same_chunks else _noisy_limit(REFERENCE_TOLERANCE, noise)
    diff = _max_abs(got, want)
    if diff is None:
        problems.append("logits hold NaN or infinity")
    elif diff > limit:
        problems.append(f"logits differ by {diff:.3g}")
    markers = sum(o == -1 and r != -1 for o, r in zip(ours, ref))
    detail = f"{len(ref)} tokens, n_past {n_past}"
    if same_chunks:
        detail += "; the same chunks as mtmd's"
    elif markers:
        detail += (f"; {markers} media marker token(s) kept with their media, where mtmd keeps them with the text, "
                   "so its batches differ: " + _noise_words(noise, REFERENCE_TOLERANCE))
    if problems:
        detail = "; ".join(problems) + "; " + detail
    return CheckResult(name, not problems, diff, limit, measure, detail, time.perf_counter() - t0)


def _core_media(model: "Model", kind: str, x: np.ndarray) -> _core.MediaItem:
    """A media item as the native core takes it."""
    if kind == "audio":
        clip = load_audio(x, model)
        return _core.MediaItem(clip.samples, clip.digest, clip.source)
    image = load_image(x, model.projector_id)
    return _core.MediaItem(image.pixels, image.digest, image.source)


def _devices_used(model: "Model") -> list[str]:
    """The devices other than the CPU that hold any of the weights or the projector (host buffers,
    mapped files included, are reported as "CPU")."""
    mem = model.memory()
    return sorted({d for part in ("weights", "projector") for d, n in mem[part].items() if n > 0 and d != "CPU"})


def _check_device(cpu_model: "Model", plan: Plan, media: MediaSet | None, on_device: list[np.ndarray],
                  devices: list[str]) -> CheckResult:
    name, kind, t0 = _device_check_name(kind_of(media)), kind_of(media), time.perf_counter()
    parts = conversation(media, plan.question)
    on_cpu: list[np.ndarray] = []
    try:
        with build_session(cpu_model, plan, kind, parts, on_cpu) as s:
            tokens = session_tokens(s)
        noise = _rebatching_noise(cpu_model, plan, kind, parts, on_cpu[-1], tokens)
    except LlavaKVError as e:
        return CheckResult(name, False, None, DEVICE_TOLERANCE, _DEVICE_MEASURE,
                           f"the CPU run raised {type(e).__name__}: {e}", time.perf_counter() - t0)
    limit = _noisy_limit(DEVICE_TOLERANCE, noise)
    # A clear winner (top two further apart than twice the limit) cannot change within the limit.
    passed, figure, detail = device_agreement(on_cpu, on_device, tolerance=limit,
                                              margin=max(DEVICE_MARGIN, 2 * limit))
    return CheckResult(name, passed, figure, limit, _DEVICE_MEASURE,
                       f"{', '.join(devices)} vs CPU, {detail}; on the CPU, "
                       + _noise_words(noise, DEVICE_TOLERANCE), time.perf_counter() - t0)


def _noise_words(noise: float | None, floor: float) -> str:
    if noise is None:
        return (f"this model's re-batching noise is not measured (text cut at a space tokenizes otherwise), "
                f"limit {floor:g}")
    return (f"this model's logits move by {noise:.3g} when the same tokens are batched otherwise, "
            f"limit max({floor:g}, {NOISE_FACTOR:g} x that)")


def _reference_check_name(kind: str) -> str:
    return "reference:mtmd" + ("(audio)" if kind == "audio" else "")


def _device_check_name(kind: str | None) -> str:
    return "device:vs_cpu" + ("(audio)" if kind == "audio" else "")


def _skipped(kind: str, why: str) -> list[CheckResult]:
    """The edit and reference checks of ``kind``, reported as not run."""
    return ([CheckResult(f"edit:{name}", None, None, None, _EDIT_MEASURE, why) for name, _ in _edit_ops(kind)]
            + [CheckResult(_reference_check_name(kind), None, None, None, _REFERENCE_MEASURE, why)])


def run_selfcheck(model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None, *,
                  images: Sequence[ImageInput] | None = None, n_gpu_layers: int = 0, main_gpu: str | None = None,
                  mmproj_use_gpu: bool = True, n_ctx: int | None = None, n_batch: int | None = None,
                  n_threads: int | None = None, flash_attn: str = "auto", kv_type: str | tuple[str, str] = "f16", verbose: bool = False,
                  progress: Progress | None = None) -> SelfcheckReport:
    """Load ``model_path`` + ``mmproj_path`` and check that edits equal fresh sessions, that our
    evaluation equals mtmd's, and (where a device holds part of the model) that the device agrees
    with the CPU. ``images`` (paths or anything ``append_image`` takes; the first three are used) are
    shown in the conversation; without them generated images are, and generated audio clips too when
    the projector has an audio encoder. ``n_ctx``/``n_batch`` None: sized to the conversation.

    Raises what :meth:`Model.load` raises for files that cannot be loaded, ValueError for images
    given to a projector without vision. A failed check is a result, not an exception.
    """
    import llava_kv as lk

    t_start = time.perf_counter()
    say = progress or (lambda message: None)
    # main_gpu only when given: a build without device selection still runs every other check.
    placement: dict[str, Any] = {"n_gpu_layers": n_gpu_layers, "mmproj_use_gpu": mmproj_use_gpu}
    if main_gpu is not None:
        placement["main_gpu"] = main_gpu
    settings: dict[str, Any] = {"n_threads": n_threads, "flash_attn": flash_attn, "verbose": verbose}
    if kv_type != "f16":
        settings["kv_type"] = kv_type
    report = SelfcheckReport(str(model_path), None if mmproj_path is None else str(mmproj_path), n_gpu_layers,
                             main_gpu)
    images = list(images or [])
    on_device: dict[str | None, list[np.ndarray]] = {}  # logits after each text part, per media kind

    say(f"loading {model_path}")
    with lk.Model.load(model_path, mmproj_path, **placement, **settings) as model:
        if images and not model.has_vision:
            raise ValueError(f"images were given, but the projector {mmproj_path} has no vision encoder")
        media: list[MediaSet] = []
        if model.has_vision:
            media.append(image_set(model, images))
        if model.has_audio and not images:
            media.append(audio_set(model))
        if mmproj_path is None:
            report.checks += _skipped("image", "no projector given")
        elif model.has_audio and images:
            report.checks += _skipped("audio", "images were given: the audio checks run only without them")
        report.media = [source for m in media for source in m.sources]
        report.devices = _devices_used(model)
        say("sizing the context")
        plan = plan_conversation(model, media, n_ctx, n_batch, report.notes)
        report.n_ctx, report.n_batch = plan.n_ctx, plan.n_batch
        # Without a projector the conversation is text alone: only the device check has it to compare.
        sets: list[MediaSet | None] = list(media) or [None]
        for m in sets:
            parts = conversation(m, plan.question)
            if m is not None:
                for name, op in _edit_ops(m.kind):
                    say(f"edit:{name}")
                    report.checks.append(_check_edit(model, plan, parts, m, name, op))
            positions = on_device.setdefault(kind_of(m), [])
            with build_session(model, plan, kind_of(m), parts, positions) as base:
                if m:
                    say(_reference_check_name(m.kind))
                    report.checks.append(_check_reference(model, plan, base, m, parts))

    # The device's copy is closed first: the CPU copy may need the memory.
    if not report.devices:
        why = (f"nothing ran on a device: no device holds weights or the projector (n_gpu_layers {n_gpu_layers}; "
               f"this build's backends: {', '.join(lk.build_info().get('backends', [])) or 'CPU only'})")
        report.checks += [CheckResult(_device_check_name(kind_of(m)), None, None, None, _DEVICE_MEASURE, why)
                          for m in sets]
    else:
        say("loading a CPU-only copy")
        with lk.Model.load(model_path, mmproj_path, n_gpu_layers=0, mmproj_use_gpu=False, **settings) as cpu_model:
            for m in sets:
                say(_device_check_name(kind_of(m)))
                report.checks.append(_check_device(cpu_model, plan, m, on_device[kind_of(m)], report.devices))
    report.seconds = time.perf_counter() - t_start
    return report
