"""One prompt over many images, at C++ speed.

``run(model, images, prompt)`` renders the prompt once with the model's chat template (a user
message holding the image, then the prompt text), and hands the images to the native batch runner:
images are decoded here on a loader thread, encoded ahead by the runner (duplicates come from the
embedding cache), and decoded as up to ``parallel`` sequences of one context that share the
prompt's prefix. A corrupt or missing image fails its own record; the rest go on.

With ``json_schema=`` (or a GBNF ``grammar=``) every answer is held to it; a record's ``json`` is
the parsed answer, and one whose answer ran out of ``max_tokens`` before the JSON closed fails
alone (finish reason "length", its text kept).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .arguments import INT32_MAX, check_int, check_sampling, sampling_params
from .chat import render_segments
from .errors import CancelledError, ClosedError, LlavaKVError
from .images import ImageInput, describe_image, load_image
from .structured import constraint, parse_json

if TYPE_CHECKING:
    from .model import Model

__all__ = ["BatchRecord", "Runner", "run", "iter_run", "render_prompt"]


# Per-record timings (ms) the native runner reports, in the order they happen.
TIMINGS = ("load_ms", "encode_ms", "wait_ms", "prefill_ms", "generate_ms", "total_ms")

@dataclass(frozen=True)
class BatchRecord:
    """The outcome for one image: its text, or the error that stopped it."""

    index: int
    image: str
    text: str | None
    tokens: int
    finish_reason: str | None
    cached: bool
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    json: Any = None  # the parsed answer of a run held to a JSON schema (None where it did not parse)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = {"image": self.image, "text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
               "cached": self.cached, "timings": dict(self.timings), "error": self.error}
        if self.json is not None:
            out["json"] = self.json
        return out


def render_prompt(model: "Model", prompt: str, *, system: str | None = None,
                  chat_template: str | None = None) -> tuple[str, str]:
    """The text before and after the image once ``[image, prompt]`` is rendered as a user message,
    exactly as :meth:`Session.chat` renders it."""
    marker = model.media_marker
    if marker in prompt or (system and marker in system):
        raise ValueError(f"the prompt contains the media marker {marker!r} as text")
    messages = ([("system", system)] if system else []) + [("user", marker + prompt)]
    (before, after), _ = render_segments(model, messages, 1, chat_template=chat_template)
    return before, after


class _Feeder(threading.Thread):
    """Decodes images (Pillow) and submits them; the runner's queue bounds how far it runs ahead."""

    def __init__(self, runner: Any, images: Iterable[ImageInput], projector_id: str) -> None:
        super().__init__(name="llava-kv-batch-loader", daemon=True)
        self.runner = runner
        self.images = images
        self.projector_id = projector_id
        self.sources: dict[int, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i, image in enumerate(self.images):
                source = describe_image(image)
                self.sources[i] = source
                t0 = time.perf_counter()
                try:
                    loaded = load_image(image, self.projector_id)
                except (LlavaKVError, OSError, ValueError, TypeError) as e:
                    message = f"{type(e).__name__}: {e}"
                    self.runner.submit(i, None, "", source, error=message, load_ms=1000 * (time.perf_counter() - t0))
                    continue
                self.runner.submit(i, loaded.pixels, loaded.digest, source, load_ms=1000 * (time.perf_counter() - t0))
        except (ClosedError, CancelledError):
            pass  # the consumer stopped early
        except BaseException as e:  # the images iterable itself failed: hand it to the consumer
            self.error = e
        finally:
            self.runner.finish()


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]  # tqdm ships no stubs
    except ImportError:  # pragma: no cover - tqdm is a dependency; stay usable without it
        return None
    return tqdm(total=total, unit="img", desc="llava-kv batch", dynamic_ncols=True)


class Runner:
    """One prompt over the images of many calls, on one native context kept between them.

    :func:`run` creates its context (one KV stream per sequence) and decodes the prompt's text
    before the image on every call. A Runner does both once, at its first image, and every
    :meth:`run` / :meth:`iter_run` after that reuses them, so a loop over chunks of images (a Ray
    actor's batches, a queue consumer) pays that setup once. Each call's records are those of a
    fresh :func:`run` with the same settings (each image's seed is ``seed`` + its index in the call).
    The context stays allocated, and in ``model.memory()``, until :meth:`close` or the model's
    close; use it as a context manager. One call at a time (RuntimeError otherwise).

    Settings are :func:`iter_run`'s, fixed for the runner's life: ``max_tokens``, ``parallel``,
    the sampling options, ``stop``, ``grammar`` / ``json_schema``, ``system``, ``n_ctx``,
    ``n_batch``, ``n_threads`` and ``chat_template``.
    """

    def __init__(self, model: "Model", prompt: str, *, max_tokens: int = 64, parallel: int = 4,
                 temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, seed: int = 0, stop: str | Sequence[str] | None = None,
                 grammar: str | None = None, json_schema: Any = None, system: str | None = None,
                 n_ctx: int | None = None, n_batch: int = 512, n_threads: int | None = None,
                 chat_template: str | None = None) -> None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                       seed=seed, max_tokens=max_tokens, min_tokens=1, seed_optional=False)
        check_int("parallel", parallel, 1, 255)
        check_int("n_batch", n_batch)
        if n_batch < parallel:  # each step decodes one token of every sequence
            raise ValueError(f"n_batch ({n_batch}) must be >= parallel ({parallel})")
        check_int("n_ctx", n_ctx, allow_none=True)
        check_int("n_threads", n_threads, allow_none=True)
        # the runner's context holds parallel + 1 sequences (the shared prompt and one per image)
        per_sequence = max(max_tokens, n_ctx or 0)
        if (parallel + 1) * per_sequence > INT32_MAX:
            raise ValueError(f"max_tokens={max_tokens} / n_ctx={n_ctx} with parallel={parallel} needs more than "
                             f"{INT32_MAX} KV cells; lower them")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._held = constraint(grammar=grammar, json_schema=json_schema)
        params = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                                 grammar=self._held.grammar, seed=seed)
        prefix, suffix = render_prompt(model, prompt, system=system, chat_template=chat_template)
        self._model = model
        self._max_tokens = max_tokens
        self._native = model._start_batch_runner(
            prefix=prefix, suffix=suffix, n_parallel=parallel, max_tokens=max_tokens, n_ctx=n_ctx or 0,
            n_batch=n_batch, n_threads=n_threads or 0, sampling=params, stop=stops)
        self._runs = 0
        self._busy = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def close(self) -> None:
        """Stop any run and free the context; idempotent."""
        self._native.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, images: Iterable[ImageInput], *, progress: bool = True,
            stats: dict[str, Any] | None = None) -> list[BatchRecord]:
        """The records of every image, in input order (see :meth:`iter_run`)."""
        return list(self.iter_run(images, ordered=True, progress=progress, stats=stats))

    def iter_run(self, images: Iterable[ImageInput], *, ordered: bool = True, progress: bool = True,
                 stats: dict[str, Any] | None = None) -> Iterator[BatchRecord]:
        """Yield a :class:`BatchRecord` per image: in input order (``ordered=True``) or as each completes.

        Closing the iterator early stops this call's work; the runner stays usable. ``stats``, when
        given, is filled with this call's counters at the end (``context_reused`` says whether the
        context and the shared prompt came from an earlier call).
        """
        if isinstance(images, (str, bytes, os.PathLike)):
            raise TypeError("images must be an iterable of images (wrap a single image in a list)")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this batch Runner is already running a call (one at a time)")
        try:
            if self._runs:
                self._native.restart()  # ClosedError once closed (or the model was)
            self._runs += 1
            yield from self._records(images, ordered, progress, stats)
        finally:
            self._busy.release()

    def _records(self, images: Iterable[ImageInput], ordered: bool, progress: bool,
                 stats: dict[str, Any] | None) -> Iterator[BatchRecord]:
        runner = self._native
        total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
        feeder = _Feeder(runner, images, self._model.projector_id)
        bar = _progress(total, progress)
        feeder.start()
        waiting: dict[int, BatchRecord] = {}
        next_index = 0
        complete = False
        try:
            while True:
                r = runner.next()
                if r is None:
                    complete = True
                    break
                record = self._record(r, feeder)
                if bar is not None:
                    bar.update(1)
                if not ordered:
                    yield record
                    continue
                waiting[record.index] = record
                while next_index in waiting:
                    yield waiting.pop(next_index)
                    next_index += 1
            if feeder.error is not None:
                raise feeder.error
        finally:
            if not complete and not runner.closed:
                runner.cancel_run()  # stopped early: the next call starts clean on the same context
            feeder.join()
            if stats is not None:
                stats.update(runner.stats().as_dict())
            if bar is not None:
                bar.close()

    def _record(self, r: Any, feeder: "_Feeder") -> BatchRecord:
        index = int(r.id)
        error = r.error or None
        parsed = None
        if self._held.json and not error:
            ok, parsed = parse_json(r.text)
            if not ok:
                error = (f"the answer ran out of max_tokens={self._max_tokens} before its JSON closed"
                         if r.finish_reason == "length" else "the answer is not JSON (a stop string cut it?)")
        return BatchRecord(index=index, image=feeder.sources.get(index, r.source),
                           text=r.text if not r.error else None, tokens=r.n_tokens,
                           finish_reason=r.finish_reason or None, cached=r.cached,
                           timings={k: round(getattr(r, k), 3) for k in TIMINGS}, error=error, json=parsed)


def iter_run(model: "Model", images: Iterable[ImageInput], prompt: str, *, ordered: bool = True,
             progress: bool = True, stats: dict[str, Any] | None = None, **settings: Any) -> Iterator[BatchRecord]:
    """Yield a :class:`BatchRecord` per image: in input order (``ordered=True``) or as each completes.

    ``settings`` are :class:`Runner`'s: ``max_tokens`` (64), ``parallel`` (4), ``temperature`` (0),
    ``top_k``, ``top_p``, ``min_p``, ``repeat_penalty``, ``presence_penalty``,
    ``frequency_penalty``, ``logit_bias``, ``seed`` (0), ``stop``, ``grammar`` / ``json_schema``
    (every answer held to a GBNF grammar or a JSON schema; see the module's docstring), ``system``,
    ``n_ctx`` (the context one image may use: prompt, image tokens and answer; default: what the
    first image needs, plus a quarter; an image that needs more fails its record), ``n_batch``,
    ``n_threads`` and ``chat_template``. Closing the iterator early stops the native work and frees
    the context. ``stats``, when given, is filled with the runner's counters at the end (images
    encoded, cache hits, decode steps, ...). A loop of calls with the same settings is faster on
    one :class:`Runner`.
    """
    with Runner(model, prompt, **settings) as runner:
        yield from runner.iter_run(images, ordered=ordered, progress=progress, stats=stats)


def run(model: "Model", images: Iterable[ImageInput], prompt: str, *, max_tokens: int = 64, parallel: int = 4,
        progress: bool = True, **kwargs: Any) -> list[BatchRecord]:
    """Run ``prompt`` on every image; the records come back in input order.

    Keyword arguments as for :func:`iter_run` (temperature, top_k, top_p, min_p, repeat_penalty,
    presence_penalty, frequency_penalty, logit_bias, seed, stop, grammar, json_schema, system, n_ctx,
    n_batch, n_threads, chat_template, stats).
    """
    return list(iter_run(model, images, prompt, max_tokens=max_tokens, parallel=parallel, progress=progress,
                         ordered=True, **kwargs))
