"""A session's generation: ``generate`` (text, optionally held to a grammar or JSON schema) and
``chat`` (OpenAI-style messages in, a ``chat.completion`` out), as a part of :class:`Session`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence, TypedDict, overload

from . import _core
from ._core import SamplingParams
from .arguments import check_int, check_sampling, check_stops, sampling_params
from .chat import ChatReply, plan_edit, render_conversation
from .errors import CancelledError, GrammarError
from .structured import Constraint, constraint, parse_json, response_format_constraint

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .model import Model
    from .timeline import Chunk


class SamplingOptions(TypedDict, total=False):
    """The keyword arguments generate and chat share (see :meth:`Generating.generate`)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float] | None
    seed: int | None
    stop: str | Sequence[str] | None


class GenerateOptions(SamplingOptions, total=False):
    grammar: str | None
    json_schema: Any


class ChatOptions(SamplingOptions, total=False):
    max_tokens: int
    response_format: Any
    chat_template: str | None

__all__ = ["Generating"]


def core_item(x: Any) -> str | _core.MediaItem:
    """A rendered chat item as the core takes it: text, or a MediaItem."""
    from .audio import LoadedAudio

    if isinstance(x, str):
        return x
    return _core.MediaItem(x.samples if isinstance(x, LoadedAudio) else x.pixels, x.digest, x.source)


class Generating:
    """Generation over a session's timeline (mixed into :class:`~llava_kv.Session`)."""

    _core: _core.Session
    _model: "Model"
    _generations: int
    _cancel_requested: bool
    last_finish_reason: str | None

    if TYPE_CHECKING:
        @property
        def timeline(self) -> list[Chunk]: ...

        def _splice(self, begin: int, end: int, items: Sequence[Any]) -> list[int]: ...

    @overload
    def generate(self, max_tokens: int = ..., *, stream: Literal[False] = ...,
                 **options: Unpack[GenerateOptions]) -> str: ...

    @overload
    def generate(self, max_tokens: int = ..., *, n: int, stream: Literal[False] = ...,
                 **options: Unpack[GenerateOptions]) -> list[str]: ...

    @overload
    def generate(self, max_tokens: int = ..., *, stream: Literal[True],
                 **options: Unpack[GenerateOptions]) -> Iterator[str]: ...

    @overload
    def generate(self, max_tokens: int = ..., *, stream: bool,
                 **options: Unpack[GenerateOptions]) -> str | Iterator[str]: ...

    def generate(self, max_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, grammar: str | None = None, json_schema: Any = None,
                 n: int | None = None, stream: bool = False) -> str | Iterator[str] | list[str]:
        """Continue the timeline with up to ``max_tokens`` sampled tokens (greedy at temperature 0).

        Generated tokens become part of the timeline, so later turns and edits reuse them. Returns
        the text, or with ``stream=True`` an iterator of text pieces (whole UTF-8 characters);
        leaving the iterator early stops generating. Generation ends at an end-of-generation token,
        at ``max_tokens``, or when the text contains a ``stop`` string (which is not returned).
        ``last_finish_reason`` is then "stop" or "length".

        ``grammar`` (GBNF, start rule ``root``) or ``json_schema`` (a dict or JSON text) holds every
        token to what they allow; an invalid one is a ValueError before anything is decoded, and a
        point where no token of the vocabulary can continue raises GrammarError. With a schema,
        :attr:`last_json` holds the parsed reply (None where it did not parse: cut by ``max_tokens``).
        ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]) and ``logit_bias`` ({token
        id: bias in [-100, 100]}) shape the draw.

        ``n=k`` returns a list of k replies sampled together from one prefill (the timeline's KV
        cells shared by k sequences, one batched decode per step; reply i with seed ``seed + i``),
        and leaves the session as it was: no reply is appended. ``last_finish_reasons`` and (with a
        schema) ``last_json`` are then lists. A session with a context of its own only (not a pool
        slot), k <= 16, each reply at most ``(n_ctx - n_past) / k`` tokens.

        ``seed=None`` samples with a seed drawn from the session's own (``model.session(seed=...)``)
        and the number of generate calls before this one: the same calls on two sessions opened
        with the same seed give the same text, and consecutive calls differ.
        """
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                       seed=seed, max_tokens=max_tokens)
        stops = check_stops(stop)
        held = constraint(grammar=grammar, json_schema=json_schema)
        params = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, logit_bias=logit_bias, grammar=held.grammar)
        if n is not None:
            check_int("n", n, 1, 16)
            if stream:
                raise ValueError("n and stream=True cannot be combined: n replies come back together")
            return self._branches(n, max_tokens, params, seed, stops, held)
        return self._generate(max_tokens, params, seed, stops, held, stream)

    def _branches(self, n: int, max_tokens: int, params: SamplingParams, seed: int | None, stops: list[str],
                  held: Constraint) -> list[str]:
        params.seed = self._next_seed(seed)
        branches = self._core.generate_branches(n, params, max_tokens, stops)
        self._generations += 1
        failed = next((b for b in branches if b.error), None)
        if failed is not None:
            raise GrammarError(failed.error)
        texts = [b.text.decode("utf-8", errors="replace") for b in branches]
        self.last_finish_reasons = [b.finish_reason for b in branches]
        self.last_finish_reason = self.last_finish_reasons[0]
        self._json = (held.json, [parse_json(t)[1] for t in texts] if held.json else None)
        return texts

    #: The finish reason of each reply of the last ``generate(n=...)``.
    last_finish_reasons: list[str] = []

    def _generate(self, max_tokens: int, params: SamplingParams, seed: int | None, stops: list[str],
                  held: Constraint, stream: bool) -> str | Iterator[str]:
        # A grammar llama.cpp cannot parse fails here, before any step.
        self._begin_generation(params, seed, max_tokens=max_tokens, stops=stops)
        self._cancel_requested = False
        self._json = (False, None)
        pieces = self._pieces(max_tokens, held.json, stream)
        return pieces if stream else "".join(pieces)

    _json: tuple[bool, Any] = (False, None)

    @property
    def last_json(self) -> Any:
        """The parsed reply of the last generation held to a JSON schema (None: there was none, or
        the reply is not JSON, e.g. cut by ``max_tokens``)."""
        return self._json[1]

    def _pieces(self, max_tokens: int, parse: bool, stream: bool) -> Iterator[str]:
        """The reply's text as the core makes it final: the whole reply in one native call, or (a
        ``stream``) a call per piece of text."""
        self.last_finish_reason = "length"
        parts: list[str] = []
        # A pool slot shares its context's lock with the other slots: a step per call lets theirs in.
        steps = max(max_tokens, 1) if self._core.n_slots == 1 else 1
        try:
            done = max_tokens == 0
            while not done:
                if self._cancel_requested:
                    raise CancelledError("generation was cancelled; the tokens generated so far stay in the session")
                step = self._core.advance(steps, until_text=stream)
                done = step.done
                if step.text:
                    parts.append(step.text.decode("utf-8", errors="replace"))
                    yield parts[-1]
                if done:
                    self.last_finish_reason = step.finish_reason
                    if step.finish_reason == "error":
                        raise GrammarError(step.error)
            if parse:
                self._json = parse_json("".join(parts))
        finally:
            self._core.flush_generation()

    def _next_seed(self, seed: int | None) -> int:
        """``seed``, or (None) the one the next generation draws from the session's own seed and the
        number of generations so far."""
        if seed is None:
            seed = (self._core.seed * 1_000_003 + self._generations * 7919 + 17) & 0xFFFFFFFF
        return seed

    def _begin_generation(self, params: SamplingParams, seed: int | None, *, max_tokens: int,
                          stops: Sequence[str] = (), logprobs: int | None = None) -> None:
        """Starts the core's reply (sampler chain seeded by :meth:`_next_seed`, token limit, stop
        strings, log-probabilities) and counts the generation once it has begun: settings the core
        refuses leave the count, and so the next generation's seed, as it was."""
        params.seed = self._next_seed(seed)
        self._core.begin_generation(params, max_tokens, list(stops), -1 if logprobs is None else logprobs)
        self._generations += 1

    def prefill_chat(self, items: Sequence[Any], template: Any) -> tuple[int, dict[str, Any]]:
        """Bring the timeline to a rendered conversation (``llava_kv.chat.render_conversation``'s
        items and template) by one exact edit from the first difference, without generating: what
        :meth:`chat` does before its reply (a server renders on one thread and prefills on another).
        Returns the prompt's token count and what it cost (tokens reused and decoded, images encoded
        and taken from the cache, the template)."""
        timeline = self.timeline
        first, rest = plan_edit(timeline, items)
        before = self._core.stats()
        self._splice(first, len(timeline), [core_item(x) for x in rest])
        reused = timeline[first].pos0 if first < len(timeline) else (timeline[-1].pos1 if timeline else 0)
        after = self._core.stats()
        meta = {"reused_tokens": reused,
                "decoded_tokens": after.tokens_decoded - before.tokens_decoded,
                "images_encoded": after.images_encoded - before.images_encoded,
                "embed_cache_hits": after.embed_cache_hits - before.embed_cache_hits,
                "chat_template": template.name, "chat_template_source": template.source}
        return self._core.n_past, meta

    @overload
    def chat(self, messages: Sequence[dict[str, Any]], *, stream: Literal[False] = ...,
             **options: Unpack[ChatOptions]) -> dict[str, Any]: ...

    @overload
    def chat(self, messages: Sequence[dict[str, Any]], *, stream: Literal[True],
             **options: Unpack[ChatOptions]) -> Iterator[dict[str, Any]]: ...

    @overload
    def chat(self, messages: Sequence[dict[str, Any]], *, stream: bool,
             **options: Unpack[ChatOptions]) -> dict[str, Any] | Iterator[dict[str, Any]]: ...

    def chat(self, messages: Sequence[dict[str, Any]], *, max_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None, response_format: Any = None,
             stream: bool = False, chat_template: str | None = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer OpenAI-style ``messages`` (content: a string, or parts of type "text",
        "image_url" (path, file:// or base64 data: URI) and "image" (path, bytes, PIL, array)).

        The session keeps the conversation: a new turn only appends to the timeline; a changed
        earlier message or image is an edit from the first difference on. Returns a
        ``chat.completion`` dict (or, with ``stream=True``, an iterator of ``chat.completion.chunk``
        dicts) shaped as in the OpenAI / llama-cpp-python APIs.

        ``response_format`` is OpenAI's: ``{"type": "json_object"}`` or ``{"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}}`` holds the reply to it, and the parsed object
        is ``reply["llava_kv"]["parsed"]`` (absent where it did not parse).
        """
        # Everything is checked before the conversation is decoded.
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                       seed=seed, max_tokens=max_tokens)
        stops = check_stops(stop)
        held = response_format_constraint(response_format)
        params = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, logit_bias=logit_bias, grammar=held.grammar)
        self._model._core.check_sampling(params)
        prompt_tokens, meta = self.prefill_chat(*render_conversation(self._model, messages,
                                                                      chat_template=chat_template))
        pieces = self._generate(max_tokens, params, seed, stops, held, stream=True)
        assert not isinstance(pieces, str)
        reply = ChatReply(self._model.path, lambda: self.last_finish_reason)
        if stream:
            return reply.chunks(pieces)
        content = "".join(pieces)
        if held.json and self._json[0]:
            meta["parsed"] = self._json[1]
        return reply.completion(content, ChatReply.usage(prompt_tokens, self._core.n_past - prompt_tokens),
                                extra=meta)
