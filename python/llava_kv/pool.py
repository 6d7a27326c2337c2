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

import numpy as np

from . import _core
from .arguments import check_sampling, check_stops, sampling_params
from .drift import log_softmax
from .errors import GrammarError
from .session import Session
from .text_stream import TextStream

if TYPE_CHECKING:
    from .model import Model


MAX_TOP_LOGPROBS = 20  # as OpenAI's API


def _token_entry(core: _core.Session, token: int, logprob: float) -> dict[str, Any]:
    piece = core.detokenize([token])
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece), "id": token}


def token_logprobs(core: _core.Session, logits: np.ndarray, token: int, top: int) -> dict[str, Any]:
    """OpenAI's log-probability entry for ``token`` sampled from ``logits``, with the ``top``
    likeliest tokens there (likeliest first; ties by token id)."""
    lp = log_softmax(logits)
    entry = _token_entry(core, token, float(lp[token]))
    best: list[int] = []
    if top:
        candidates = np.argpartition(-lp, top - 1)[:top] if top < lp.size else np.arange(lp.size)
        best = sorted(candidates.tolist(), key=lambda t: (-lp[t], t))
    entry["top_logprobs"] = [_token_entry(core, t, float(lp[t])) for t in best]
    return entry


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
        live = [g for g in generations if not g.done]
        for g in live:
            if g.session not in self.sessions:
                raise ValueError("step(): a generation is on a session of another pool")
        out_of: dict[int, str | None] = {}
        full = [g for g in live if g.session._core.n_cells >= g.session.n_ctx]
        for g in full:
            out_of[id(g)] = g._end("length")
        live = [g for g in live if id(g) not in out_of]
        # The logits each token is sampled from, for the generations that report log-probabilities.
        logits = {id(g): g.session._core.logits() for g in live if g.logprobs is not None}
        results = _core.step_sessions([g.session._core for g in live]) if live else []
        for g, step in zip(live, results):
            if step.error:
                out_of[id(g)] = g._fail(GrammarError(step.error))
            else:
                out_of[id(g)] = g._advance(step.token, step.text, step.end_of_generation, logits.get(id(g)))
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
        self._top = logprobs
        self.logprobs: list[dict[str, Any]] | None = None if logprobs is None else []
        self.error: Exception | None = None
        self._text = TextStream(stops)
        params = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, logit_bias=logit_bias, grammar=grammar)
        session._begin_generation(params, seed)
        session._core.flush_generation()
        if max_tokens == 0:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._text.text

    def _advance(self, token: int, raw: bytes, end: bool, logits: np.ndarray | None = None) -> str | None:
        if end or self._text.stopped_by(raw):
            return self._end("stop")
        self.n_tokens += 1
        if self.logprobs is not None and logits is not None:
            self.logprobs.append(token_logprobs(self.session._core, logits, token, self._top or 0))
        piece = self._text.take()
        if self.n_tokens >= self.max_tokens:
            return piece + (self._end("length") or "")
        return piece

    def _fail(self, error: Exception) -> str:
        self.error = error
        return self._end("error")

    def _end(self, reason: str) -> str:
        self.finish_reason = reason
        self.session.last_finish_reason = reason
        return self._text.finish(self.session._core.flush_generation())
