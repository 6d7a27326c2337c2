"""Several conversations on one context: a pool of sessions ("slots") whose generation steps run
together, one batched decode for all of them.

Each slot is a full :class:`~llava_kv.Session` (timeline, edits, chat, save/load) with its own
sequence and ``n_ctx`` KV cells of one shared llama_context; its KV stream is laid out as in a
context of its own, so a slot's prefill and edits give a lone session's logits. What the pool adds
is :meth:`SessionPool.step`: the next token of every listed slot sampled from that slot's logits and
decoded in ONE call (continuous batching: slots join and leave between steps). A slot's saved state
loads into any slot of a pool with the same number of slots.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

from . import _core
from .arguments import check_sampling, check_stops, sampling_params
from .errors import GrammarError
from .session import Session

if TYPE_CHECKING:
    from .model import Model


MAX_TOP_LOGPROBS = 20  # as OpenAI's API


def _token_entry(core: _core.Session, token: int, logprob: float) -> dict[str, Any]:
    piece = core.detokenize([token])
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece), "id": token}


def token_logprobs(core: _core.Session, entry: _core.TokenLogprob) -> dict[str, Any]:
    """OpenAI's log-probability entry (``logprobs.content``, plus the token ``id``) for a token the
    core listed: its log-probability and the likeliest tokens at its place (likeliest first)."""
    out = _token_entry(core, entry.token, entry.logprob)
    out["top_logprobs"] = [_token_entry(core, t, lp) for t, lp in entry.top]
    return out


class SessionPool:
    """``n_slots`` sessions sharing one context (``model.session_pool(...)``); ``close()`` frees it."""

    def __init__(self, model: "Model", cores: Sequence[_core.Session]) -> None:
        self._model = model
        self.sessions: list[Session] = [Session(model, c) for c in cores]

    def __len__(self) -> int:
        return len(self.sessions)

    def __getitem__(self, index: int) -> Session:
        return self.sessions[index]

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions)

    def __repr__(self) -> str:
        return f"<llava_kv.SessionPool slots={len(self.sessions)} closed={self.closed}>"

    @property
    def closed(self) -> bool:
        return all(s.closed for s in self.sessions)

    def close(self) -> None:
        """Close every slot; the shared context is freed with the last one. Idempotent."""
        for s in self.sessions:
            s.close()

    def __enter__(self) -> "SessionPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def step(self, generations: Sequence["Generation"]) -> list[str | None]:
        """One token for each of ``generations`` (of this pool's slots, each at most once) in one
        batched decode. Returns per generation the text that became final (possibly ""; the rest of
        the text when it ends), or None for one that had already ended; ``Generation.done`` and
        ``finish_reason`` say which ended. A generation whose slot has no free KV cell left ends
        ("length") without taking part; the others go on. All or nothing: on failure every slot is
        as before."""
        return self.run(generations, max_steps=1)

    def run(self, generations: Sequence["Generation"], max_steps: int, *, streams: Sequence[bool] | None = None,
            signal: _core.StepSignal | None = None) -> list[str | None]:
        """Up to ``max_steps`` batched steps in one native call (no return to Python per token),
        until a generation ends, one marked in ``streams`` has new text, or ``signal`` is set (by
        another thread: checked between steps). Returns what :meth:`step` does, over all the steps.
        A step that fails is undone and raised at once; steps before it in the same call stay in the
        slots, and their text comes with the next call."""
        live = [g for g in generations if not g.done]
        for g in live:
            if g.session not in self.sessions:
                raise ValueError("step(): a generation is on a session of another pool")
        marks = [] if streams is None else [bool(s) for g, s in zip(generations, streams) if not g.done]
        results = _core.step_sessions_until([g.session._core for g in live], max_steps, marks, signal) if live else []
        out_of = {id(g): g._take(step) for g, step in zip(live, results)}
        return [out_of.get(id(g)) for g in generations]


class Generation:
    """One reply being generated on a slot, step by step, by :meth:`SessionPool.step` (what
    ``Session.generate`` does alone): sampling set up from the session's seed like ``generate``,
    stop strings cut the text, ``max_tokens`` ends it.

    With ``logprobs`` (0 to 20) each token of the reply is listed in :attr:`logprobs` with its
    log-probability under the model (the log-softmax of the logits it was sampled from, before
    temperature and the samplers) and the ``logprobs`` likeliest tokens at its place: OpenAI's
    ``logprobs.content`` entries, plus the token ``id``.

    ``grammar`` is GBNF (``llava_kv.structured`` makes one from a JSON schema); a point where it
    allows no token ends this generation alone: ``finish_reason`` "error", the GrammarError in
    :attr:`error`."""

    def __init__(self, session: Session, max_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: Any = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, logprobs: int | None = None,
                 grammar: str = "") -> None:
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                       seed=seed, max_tokens=max_tokens)
        stops = check_stops(stop)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        self.session = session
        self.max_tokens = max_tokens
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict[str, Any]] | None = None if logprobs is None else []
        self.error: Exception | None = None
        self._parts: list[str] = []
        params = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, logit_bias=logit_bias, grammar=grammar)
        session._begin_generation(params, seed, max_tokens=max_tokens, stops=stops, logprobs=logprobs)
        if max_tokens == 0:
            self._end("length")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _take(self, step: _core.GenerationStep) -> str:
        """What a native step (or run of steps) did for this generation: its new text."""
        piece = step.text.decode("utf-8", errors="replace")
        self._parts.append(piece)
        self.n_tokens += step.n_tokens
        if self.logprobs is not None:
            self.logprobs += [token_logprobs(self.session._core, e) for e in step.logprobs]
        if step.done:
            if step.finish_reason == "error":
                self.error = GrammarError(step.error)
            self._end(step.finish_reason)
        return piece

    def cancel(self) -> None:
        """End this generation now, where it is (``finish_reason`` "cancelled"); the tokens it
        generated stay in the slot's timeline. No-op once it has ended."""
        if not self.done:
            self._end("cancelled")

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.session.last_finish_reason = reason
        self.session._core.flush_generation()
