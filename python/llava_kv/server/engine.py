"""The server's engine: one model, a pool of slots on one context, and one thread that does all the
native work, so requests on different slots generate together in one batched decode per step.

A request is rendered (chat template, media vetted and loaded) on the event loop's side; the engine
thread then gives it the slot whose conversation shares the longest prefix with it (text tokens and
media digests), brings that slot to the request's conversation with one exact edit from the first
difference (media after it come from the embedding cache), and adds it to the generation loop.
Between two decode steps new requests join and finished ones leave (continuous batching). A request
for ``n`` replies takes ``n`` slots: its prompt is decoded once, in the first, whose state the others
load (no decoding), and the ``n`` replies are generated together (seeds ``seed``, ``seed + 1``, ...).

A conversation leaving its slot for another is saved (the slot's whole state) in host memory and,
with ``--state-dir``, on disk; when it comes back its state is restored instead of decoded again.
With a state dir every finished reply's conversation is written there too (a new file, then a
rename), so a server killed mid-stream restarts with every conversation as of its last reply.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import _core
from ..chat import ChatReply, ChatTemplate, render_conversation
from ..errors import AudioError, ContextFullError, ImageError, LlavaKVError
from ..model import Model
from ..pool import Generation, SessionPool
from .media import MediaPolicy, RequestError
from .metrics import Metrics
from .store import ConversationStore, reusable_cells, signature


# Most batched steps one native call runs before the engine looks at its queue again anyway.
MAX_STEPS_PER_CALL = 256
# A conversation about to lose at least 1/SAVE_WHEN_LOSING of its cells to another request is saved
# first, so that its next turn restores them instead of decoding them again. A save and a restore
# copy each cell once, far cheaper than decoding it (on a CPU by about a thousand times, over PCIe by
# several); a smaller tail (a regenerated last reply) is not worth the copy. A system prompt that
# every conversation shares is not a reason to drop the rest, however long it is.
SAVE_WHEN_LOSING = 8


@dataclass
class ServerConfig:
    model: str
    mmproj: Optional[str] = None
    slots: int = 4
    n_ctx: int = 4096  # per slot
    n_batch: int = 512
    n_threads: Optional[int] = None
    n_gpu_layers: int = 0
    main_gpu: Optional[str] = None
    mmproj_use_gpu: bool = True
    kv_type: str | tuple[str, str] = "f16"  # K and V, or a (k, v) pair
    flash_attn: str = "auto"
    chat_template: Optional[str] = None
    model_alias: Optional[str] = None
    state_dir: Optional[str] = None
    cache_ram_mib: int = 2048  # host memory for conversations evicted from their slots
    queue_size: int = 64  # requests waiting for a slot; one more is answered 503
    default_max_tokens: int = 512
    seed: int = 0
    policy: MediaPolicy = field(default_factory=MediaPolicy)


# -- requests -----------------------------------------------------------------------------------


@dataclass
class Job:
    """One completion (``n`` replies) on its way through the engine; events go to ``queue`` on
    ``loop``: ("start"), ("delta", (index, text, logprob entries)) while a ``stream`` is generated,
    then ("done", (finish reasons, usage)), ("error", RequestError) or ("cancelled"). A reply that is
    not streamed is gathered in ``texts`` and ``entries`` instead, read once "done" has arrived: the
    event loop is not woken for every token of it."""
    items: list[Any]
    template: ChatTemplate
    sampling: dict[str, Any]
    max_tokens: Optional[int]
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[tuple[str, Any]]"
    arrived: float = field(default_factory=time.perf_counter)
    logprobs: Optional[int] = None  # top alternatives per token when the reply lists log-probabilities
    n: int = 1
    stream: bool = False
    cancelled: bool = False
    checked: float = 0.0  # when the HTTP side last checked that the client is still there
    # Filled in by the engine: the slots (the first holds the conversation), a generation per reply.
    slots: list[int] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)
    prompt_tokens: int = 0
    usage_extra: dict[str, Any] = field(default_factory=dict)
    logprobs_sent: list[int] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)
    entries: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def slot(self) -> int:
        return self.slots[0] if self.slots else -1

    @property
    def done(self) -> bool:
        return all(g.done for g in self.generations)

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:
            pass  # the event loop is gone: the server is stopping


class Engine:
    """Owns the model and the pool; ``submit()`` from the event loop, everything native on one thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model = Model.load(config.model, config.mmproj, n_gpu_layers=config.n_gpu_layers,
                                n_threads=config.n_threads, flash_attn=config.flash_attn, main_gpu=config.main_gpu,
                                mmproj_use_gpu=config.mmproj_use_gpu, kv_type=config.kv_type)
        try:
            self.pool: SessionPool = self.model.session_pool(config.slots, n_ctx=config.n_ctx,
                                                             n_batch=max(config.n_batch, config.slots),
                                                             seed=config.seed, n_threads=config.n_threads)
            self.store = ConversationStore(self.model, config.slots, config.n_ctx,
                                           config.cache_ram_mib * 1024 * 1024, config.state_dir)
        except BaseException:
            self.model.close()
            raise
        self.model_id = config.model_alias or os.path.basename(config.model)
        self.created = int(time.time())
        # Per slot: the conversation key it holds, and when it was last used.
        self._keys: list[Optional[str]] = [None] * config.slots
        self._used: list[float] = [0.0] * config.slots
        self._active: dict[int, Job] = {}
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._signal = _core.StepSignal()  # set when the engine thread should look at its queue
        self._stopping = False
        self.metrics = Metrics({
            "slots": ("slots in the pool", lambda: float(config.slots)),
            "slots_busy": ("slots generating a reply now", lambda: float(len(self._active))),
            "queue_depth": ("requests waiting for a slot", lambda: float(len(self._pending))),
            "stored_conversations": ("conversations saved out of their slots (host memory or disk)",
                                     lambda: float(len(self.store))),
            "stored_host_bytes": ("host memory held by saved conversations", lambda: float(self.store.host_bytes())),
        })
        self._thread = threading.Thread(target=self._run, name="llava-kv-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ----------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]]) -> tuple[list[Any], ChatTemplate]:
        return render_conversation(self.model, messages, chat_template=self.config.chat_template)

    def submit(self, job: Job) -> None:
        if job.n > self.config.slots:
            raise RequestError(400, f"'n' is {job.n}: each reply takes a slot, and this server has "
                                    f"{self.config.slots}", param="n")
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down", type="server_error", code="unavailable")
            if len(self._pending) >= self.config.queue_size:
                self.metrics.inc("rejected_total")
                raise RequestError(503, f"the server is busy: {len(self._pending)} requests are waiting for one of "
                                        f"{self.config.slots} slots; retry shortly",
                                   type="server_error", code="queue_full", headers={"Retry-After": "1"})
            self._pending.append(job)
            self._signal.set()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._signal.set()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._signal.set()
            self._cond.notify()
        self._thread.join(timeout=30)
        self.model.close()

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active:
                    self._cond.wait()
                if self._stopping:
                    jobs = list(self._pending) + self._jobs()
                    self._pending.clear()
                    self._active.clear()
                    break
                self._signal.clear()  # under the lock: a submit() or cancel() from here on sets it again
                admits: list[Job] = []
                taken = len(self._active)
                while self._pending and taken + self._pending[0].n <= self.config.slots:
                    admits.append(self._pending.popleft())
                    taken += admits[-1].n
            try:
                for job in admits:
                    self._admit(job, busy=set(self._active))
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug must fail the requests in flight, not the server
                for job in self._jobs():
                    job.emit("error", _request_error(e))
                self._active.clear()
        for job in jobs:
            job.emit("error", RequestError(503, "the server is shutting down", type="server_error",
                                           code="unavailable"))

    def _jobs(self) -> list[Job]:
        """The jobs holding slots, each once."""
        return list({id(j): j for j in self._active.values()}.values())

    def _admit(self, job: Job, busy: set[int]) -> None:
        if job.cancelled:
            self.metrics.inc("cancelled_total")
            job.emit("cancelled")
            return
        started = time.perf_counter()
        try:
            slot, restored = self._choose_slot(job, busy)
            session = self.pool[slot]
            prompt_tokens, meta = session.prefill_chat(job.items, job.template)
            slots = [slot] + self._copy_slot(slot, job.n - 1, busy | {slot})
            max_tokens = job.max_tokens if job.max_tokens is not None else self.config.default_max_tokens
            seed = job.sampling.get("seed")
            job.generations = [
                Generation(self.pool[s], max_tokens, stop=job.stop, logprobs=job.logprobs,
                           **{**job.sampling, "seed": None if seed is None else (seed + i) & 0xFFFFFFFF})
                for i, s in enumerate(slots)]
        except Exception as e:  # noqa: BLE001 - every failure is this request's, never the server's
            job.emit("error", _request_error(e))
            return
        finally:
            self.metrics.inc("prefill_seconds_total", time.perf_counter() - started)
        now = time.monotonic()
        for s in slots:
            self._used[s] = now
        job.slots = slots
        job.logprobs_sent = [0] * len(slots)
        job.texts = [[] for _ in slots]
        job.entries = [[] for _ in slots]
        job.prompt_tokens = prompt_tokens
        job.usage_extra = {"tokens_reused": meta["reused_tokens"], "tokens_decoded": meta["decoded_tokens"],
                           "images_encoded": meta["images_encoded"], "media_encoded": meta["images_encoded"],
                           "embed_cache_hits": meta["embed_cache_hits"],
                           "slot": slot, "restored_from": restored}
        m = self.metrics
        m.inc("prompt_tokens_total", prompt_tokens)
        m.inc("tokens_reused_total", meta["reused_tokens"])
        m.inc("tokens_decoded_total", meta["decoded_tokens"])
        m.inc("images_encoded_total", meta["images_encoded"])
        m.inc("embed_cache_hits_total", meta["embed_cache_hits"])
        for s in slots:
            self._active[s] = job
        job.emit("start")

    def _copy_slot(self, source: int, count: int, busy: set[int]) -> list[int]:
        """``count`` free slots made copies of ``source``'s conversation (its saved state loaded: the
        prompt is decoded once, in ``source``); their own conversations are saved first."""
        if count <= 0:
            return []
        free = sorted((i for i in range(self.config.slots) if i not in busy),
                      key=lambda i: (bool(self.pool[i].timeline), self._used[i]))[:count]
        blob = self.pool[source].snapshot()
        for i in free:
            self._evict(i, self.pool[i].timeline)
            self.pool[i].clear()
            self.pool[i].restore(blob)
        return free

    def _choose_slot(self, job: Job, busy: set[int]) -> tuple[int, Optional[str]]:
        """The free slot for ``job``: the one whose conversation shares the longest prefix, unless a
        saved conversation shares more (then it is restored into the least useful free slot)."""
        free = [i for i in range(self.config.slots) if i not in busy]
        timelines = {i: self.pool[i].timeline for i in free}
        cells = {i: reusable_cells(timelines[i], job.items) for i in free}
        # The most cells kept; among equals an empty slot, then the least recently used.
        best = max(free, key=lambda i: (cells[i], -self._used[i] if timelines[i] else float("inf"), i))
        stored, stored_cells = self.store.best(job.items, exclude={k for k in self._keys if k})
        restored = None
        if stored is not None and stored_cells > cells[best]:
            # Into an empty slot if there is one, else the least recently used.
            best = min(free, key=lambda i: (bool(timelines[i]), self._used[i]))
            self._evict(best, timelines[best])
            timelines[best], cells[best] = [], 0
            blob, restored = self.store.take(stored.key)
            self.pool[best].clear()  # load_state needs an empty session
            try:
                self.pool[best].restore(blob)
            except LlavaKVError:
                self.store.forget(stored.key)  # unusable (e.g. another pool shape): decode instead
                restored = None
            else:
                self.metrics.inc("restores_total", source=restored)
                self._keys[best] = stored.key
                self.store.forget(stored.key)
                return best, restored
        timeline = timelines[best]
        held = sum(c.n_tokens for c in timeline)
        if timeline and (held - cells[best]) * SAVE_WHEN_LOSING >= held:
            # The edit below would overwrite part of another conversation (or of this one): keep a
            # copy, which its next turn restores instead of decoding the lost part again; the slot
            # keeps its cells, and the edit reuses the common prefix.
            self._evict(best, timeline, clear=False)
        if self._keys[best] is None:
            self._keys[best] = uuid.uuid4().hex
        return best, restored

    def _evict(self, slot: int, timeline: list[Any], clear: bool = True) -> None:
        """Save the conversation in ``slot`` (whose timeline is ``timeline``) to the store; empty the
        slot unless ``clear`` is False."""
        session = self.pool[slot]
        key = self._keys[slot]
        self._keys[slot] = None
        if not timeline or key is None:
            return
        blob = session.snapshot()
        self.store.put(key, signature(timeline), session.n_cells, blob, to_disk=self.store.dir is not None)
        self.metrics.inc("evictions_total", to="disk" if self.store.dir is not None else "memory")
        if clear:
            session.clear()

    def _step(self) -> None:
        jobs = []
        for job in self._jobs():
            if job.cancelled:
                self.metrics.inc("cancelled_total")
                self._finish(job, cancelled=True)
            else:
                jobs.append(job)
        if not jobs:
            return
        steps = [(job, i, g) for job in jobs for i, g in enumerate(job.generations) if not g.done]
        gens = [g for _, _, g in steps]
        before = [g.n_tokens for g in gens]
        # Native steps until a reply ends, a streamed reply has text, or a request arrives or is
        # cancelled (submit() and cancel() set the signal): no Python per token of a gathered reply.
        started = time.perf_counter()
        try:
            pieces = self.pool.run(gens, MAX_STEPS_PER_CALL, streams=[job.stream for job, _, _ in steps],
                                   signal=self._signal)
        except Exception as e:  # noqa: BLE001 - the step failed for all: each request gets the error
            for job in jobs:
                for s in job.slots:
                    del self._active[s]
                job.emit("error", _request_error(e))
            return
        finally:
            self.metrics.inc("generation_seconds_total", time.perf_counter() - started)
        carried = [g.n_tokens - n for g, n in zip(gens, before)]
        self.metrics.inc("batched_steps_total", max(carried, default=0))
        self.metrics.inc("batched_step_sequences_total", sum(carried))
        for (job, i, gen), piece in zip(steps, pieces):
            # Log-probabilities go with the text they produced (a token whose bytes are held back,
            # an incomplete character or a possible stop string, waits for it), the rest at the end.
            entries = gen.logprobs[job.logprobs_sent[i]:] if gen.logprobs is not None else []
            if piece or (entries and gen.done):
                job.logprobs_sent[i] += len(entries)
                if job.stream:
                    job.emit("delta", (i, piece or "", entries))
                else:
                    job.texts[i].append(piece or "")
                    job.entries[i] += entries
        for job in jobs:
            if job.done:
                self._finish(job)

    def _finish(self, job: Job, cancelled: bool = False) -> None:
        for s in job.slots:
            del self._active[s]
        for g in job.generations:
            g.cancel()  # a reply cut short (a cancelled request) ends here; a finished one is unchanged
        for s in job.slots[1:]:
            self._keys[s] = None  # a copy of the conversation: the first slot's key names it
        n_tokens = sum(g.n_tokens for g in job.generations)
        self.metrics.inc("tokens_generated_total", n_tokens)
        usage = ChatReply.usage(job.prompt_tokens, n_tokens, **job.usage_extra)
        failed = next((g for g in job.generations if g.error is not None), None)
        if cancelled:
            job.emit("cancelled")
        elif failed is not None:
            job.emit("error", RequestError(400, f"{failed.error} (after {failed.n_tokens} tokens)",
                                           code="grammar_dead_end"))
        else:
            job.emit("done", ([g.finish_reason for g in job.generations], usage))
        session = self.pool[job.slot]
        key = self._keys[job.slot]
        if self.store.dir is not None and key is not None:
            try:
                self.store.persist(key, signature(session.timeline), session.n_cells, session.snapshot())
            except OSError:
                pass  # a full disk loses the copy, not the conversation (it is still in its slot)


def _request_error(e: BaseException) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, ContextFullError):
        return RequestError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ImageError):
        return RequestError(400, str(e), code="invalid_image")
    if isinstance(e, AudioError):
        return RequestError(400, str(e), code="invalid_audio")
    if isinstance(e, (ValueError, TypeError, KeyError)):
        return RequestError(400, str(e))
    return RequestError(500, f"{type(e).__name__}: {e}", type="server_error", code="internal_error")
