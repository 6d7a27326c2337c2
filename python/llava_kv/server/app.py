"""The HTTP side: an ASGI app (Starlette) with OpenAI's chat completions and completions APIs,
llama-server's /tokenize and /detokenize, over the engine.

Request bodies are typed models (:mod:`.protocol`, pydantic): a malformed or unknown field gets an
OpenAI-style error naming it, and /openapi.json describes every route. uvicorn serves it.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, AsyncIterator, Optional, Union

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..arguments import check_logit_bias
from ..chat import ChatReply, ChatTemplate
from ..images import load_image
from ..structured import Constraint, constraint, response_format_constraint
from . import protocol
from .engine import Engine, Job, _request_error
from .media import RequestError, b64_image, vet_messages
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

MAX_BODY_BYTES = 64 * 1024 * 1024
# A body over the limit is still read (and dropped) up to this many bytes before the 413 goes out:
# a server that answers while the client is still sending closes the socket under it, and the
# client sees a broken pipe instead of the answer. A larger body is answered at once.
DRAIN_BYTES = 128 * 1024 * 1024
# How often a request whose reply is on its way checks that its client is still there (a gone
# client's generation is cancelled): a non-blocking look at the connection, cheap beside a token step
# (0.2 s let ~300 tokens of a small model through after the client left).
DISCONNECT_CHECK_S = 0.05


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


RAW_PROMPT = ChatTemplate("", "none", "raw prompt")  # /v1/completions: the prompt as given


def _constraint(req: protocol._Generation) -> tuple[Constraint, Optional[str]]:
    """What ``response_format`` (OpenAI's), or llama-server's ``grammar`` / ``json_schema``, hold the
    reply to, and the field that said so; only one of them may be given."""
    given = [k for k in ("response_format", "grammar", "json_schema") if getattr(req, k) is not None]
    if len(given) > 1:
        raise RequestError(400, f"{' and '.join(repr(k) for k in given)} were both given; send one", param=given[1])
    field = given[0] if given else None
    try:
        if req.response_format is not None:
            return response_format_constraint(req.response_format), field
        return constraint(grammar=req.grammar, json_schema=req.json_schema), field
    except ValueError as e:
        raise RequestError(400, str(e), param=field) from None


def generation_settings(req: protocol._Generation, engine: Engine) -> dict[str, Any]:
    """The engine's sampling settings for ``req``, checked against the model (the grammar, token
    ids in ``logit_bias``) before anything is queued or decoded; RequestError naming the field."""
    if req.model is not None and req.model != engine.model_id:
        raise RequestError(404, f"the model {req.model!r} does not exist; this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")
    held, held_by = _constraint(req)
    try:
        bias = check_logit_bias(req.logit_bias)
    except (TypeError, ValueError) as e:
        raise RequestError(400, str(e), param="logit_bias") from None
    sampling: dict[str, Any] = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "repeat_penalty": req.repeat_penalty, "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty, "logit_bias": bias, "seed": req.seed, "grammar": held.grammar}
    try:
        engine.model.check_sampling(**{**sampling, "seed": 0})
    except ValueError as e:
        raise RequestError(400, str(e), param="logit_bias" if str(e).startswith("logit_bias") else held_by) from None
    return sampling


def parse_chat(body: Any, engine: Engine) -> tuple[ChatCompletionRequest, dict[str, Any]]:
    """The chat completion request, checked; RequestError names the first bad field."""
    req = protocol.parse(ChatCompletionRequest, body)
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise RequestError(400, f"'{name}' is not supported by this server (no tool calling)", param=name)
    if req.tool_choice not in (None, "none"):
        raise RequestError(400, "'tool_choice' other than 'none' is not supported by this server (no tool calling)",
                           param="tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    return req, generation_settings(req, engine)


def parse_completion(body: Any, engine: Engine) -> tuple[CompletionRequest, dict[str, Any]]:
    req = protocol.parse(CompletionRequest, body)
    if req.echo:
        raise RequestError(400, "'echo' is not supported by this server", param="echo")
    return req, generation_settings(req, engine)


def render_prompt(engine: Engine, prompt: Union[str, protocol.MultimodalPrompt]) -> list[Any]:
    """A raw prompt as timeline items: the text split at the model's media marker, each marker
    standing for the next of ``multimodal_data`` (base64 images)."""
    if isinstance(prompt, str):
        text, data = prompt, []
    else:
        text, data = prompt.prompt_string, prompt.multimodal_data
    marker = engine.model.media_marker
    parts = text.split(marker)
    if len(parts) - 1 != len(data):
        raise RequestError(400, f"the prompt holds {len(parts) - 1} media markers ({marker!r}) for {len(data)} "
                                "multimodal_data items", param="prompt")
    items: list[Any] = []
    for i, part in enumerate(parts):
        if part:
            items.append(part)
        if i < len(data):
            image = b64_image(data[i], f"prompt.multimodal_data[{i}]", engine.config.policy)
            items.append(load_image(image, engine.model.projector_id))
    if not items or not isinstance(items[-1], str):
        raise RequestError(400, "the prompt must end with text", param="prompt")
    return items


class Api:
    def __init__(self, engine: Engine, api_key: Optional[str], max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    def _check_auth(self, request: Request) -> None:
        if not self._authorized(request):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "slots": self.engine.config.slots})

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.engine.model_id, "object": "model", "created": self.engine.created, "owned_by": "llava-kv"}]})

    async def metrics(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as e:
            return error_response(e)
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        limit = self.max_body_bytes
        too_big = RequestError(413, f"the request body is {f'{size} bytes, ' if size is not None else ''}more than "
                                    f"this server's limit of {limit} bytes", code="payload_too_large")
        over = size is not None and size > limit
        if size is not None and size > max(limit, DRAIN_BYTES):
            raise too_big
        data = bytearray()
        read = 0
        async for chunk in request.stream():
            read += len(chunk)
            over = over or read > limit
            if not over:
                data += chunk
            elif read > DRAIN_BYTES:
                break
        if over:
            raise too_big
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # e.g. 100,000 nested brackets: Python's parser recurses per level
            raise RequestError(400, "the request body is nested too deeply to parse") from None

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            self._check_auth(request)
            body = await self._body(request)
            loop = asyncio.get_running_loop()
            req: protocol._Generation
            if chat:
                chat_req, sampling = parse_chat(body, self.engine)
                req = chat_req
                # Images are decoded and the template applied off the event loop (and off the engine thread).
                items, template = await loop.run_in_executor(None, self.engine.render,
                                                             vet_messages(chat_req.messages, self.engine.config.policy))
                logprobs = (chat_req.top_logprobs or 0) if chat_req.logprobs else None
            else:
                creq, sampling = parse_completion(body, self.engine)
                req = creq
                items = await loop.run_in_executor(None, render_prompt, self.engine, creq.prompt)
                template, logprobs = RAW_PROMPT, creq.logprobs
            job = Job(items, template, sampling, req.reply_tokens, req.stops, loop, asyncio.Queue(),
                      logprobs=logprobs, n=req.n, stream=req.stream, checked=time.monotonic())
            self.engine.submit(job)
        except Exception as e:  # noqa: BLE001 - every failure here is the request's
            err = _request_error(e)
            self._count(err.status, started)
            return error_response(err)
        reply = ChatReply(self.engine.model_id, text=not chat)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return StreamingResponse(self._stream(request, job, reply, include_usage, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, reply, started)

    async def _whole(self, request: Request, job: Job, reply: ChatReply, started: float) -> Response:
        status = 200
        try:
            while True:
                kind, payload = await self._next(request, job)
                if kind == "error":
                    status = payload.status
                    return error_response(payload)
                elif kind == "cancelled":
                    status = 499
                    return Response(status_code=499)
                elif kind == "done":
                    reasons, usage = payload  # the texts were gathered in the job (not streamed)
                    return JSONResponse(reply.completions(
                        [("".join(p), r, _logprobs(job, e, reply.text))
                         for p, r, e in zip(job.texts, reasons, job.entries)], usage))
        finally:
            self._count(status, started)

    async def _next(self, request: Request, job: Job) -> tuple[str, Any]:
        """The engine's next event for ``job``; cancels it when the client has gone (checked at
        least every DISCONNECT_CHECK_S, also while events keep coming)."""
        while True:
            now = time.monotonic()
            if now - job.checked > DISCONNECT_CHECK_S:
                job.checked = now
                if await request.is_disconnected():
                    self.engine.cancel(job)
                    return "cancelled", None
            try:
                return await asyncio.wait_for(job.queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                continue

    async def _stream(self, request: Request, job: Job, reply: ChatReply, include_usage: bool,
                      started: float) -> AsyncIterator[bytes]:
        def chunk(index: int, delta: dict[str, Any], finish: Optional[str],
                  entries: Optional[list[dict[str, Any]]] = None) -> bytes:
            body = reply.chunk(delta, finish, logprobs=_logprobs(job, entries, reply.text) if entries else None,
                               with_usage=include_usage, index=index)
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        status = 200
        finished = False
        try:
            first = True
            while True:
                kind, payload = await self._next(request, job)
                if kind == "start":
                    continue
                if first and kind in ("delta", "done") and not reply.text:
                    first = False
                    for index in range(job.n):
                        yield chunk(index, {"role": "assistant", "content": ""}, None)
                if kind == "delta":
                    index, piece, listed = payload
                    yield chunk(index, {"content": piece}, None, entries=listed)
                elif kind == "done":
                    reasons, usage = payload
                    for index, reason in enumerate(reasons):
                        yield chunk(index, {}, reason)
                    if include_usage:
                        yield b"data: " + json.dumps(reply.usage_chunk(usage)).encode() + b"\n\n"
                    yield b"data: [DONE]\n\n"
                    finished = True
                    return
                elif kind == "error":
                    status = payload.status
                    yield b"data: " + json.dumps(payload.body()).encode() + b"\n\n"
                    finished = True
                    return
                elif kind == "cancelled":
                    status = 499
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.cancel(job)  # the client went away (the stream was closed under us)
                status = 499
            self._count(status, started)

    async def tokenize(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            req = protocol.parse(TokenizeRequest, await self._body(request))
            model = self.engine.model
            tokens = model.tokenize(req.content, add_special=req.add_special)
            if not req.with_pieces:
                return JSONResponse({"tokens": tokens})
            pieces = model.token_pieces(tokens)
            return JSONResponse({"tokens": [{"id": t, "piece": p.decode("utf-8", "replace")}
                                            for t, p in zip(tokens, pieces)]})
        except Exception as e:  # noqa: BLE001 - the request's
            return error_response(_request_error(e))

    async def detokenize(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            req = protocol.parse(DetokenizeRequest, await self._body(request))
            try:
                return JSONResponse({"content": self.engine.model.detokenize(req.tokens)})
            except ValueError as e:
                raise RequestError(400, str(e), param="tokens") from None
        except Exception as e:  # noqa: BLE001 - the request's
            return error_response(_request_error(e))

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(protocol.openapi("llava-kv serve", __version__))

    def _count(self, status: int, started: float) -> None:
        self.engine.metrics.inc("requests_total", code=str(status))
        self.engine.metrics.observe_latency(time.perf_counter() - started)


def _logprobs(job: Job, entries: Optional[list[dict[str, Any]]], legacy: bool) -> Optional[dict[str, Any]]:
    """A choice's ``logprobs`` object: None unless the request asked for them. Chat's is OpenAI's
    ``{"content": [...]}``; the completions API's is the legacy one (tokens, token_logprobs,
    top_logprobs, text_offset)."""
    if job.logprobs is None:
        return None
    entries = entries or []
    if not legacy:
        return {"content": entries, "refusal": None}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def create_app(engine: Engine, *, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    api = Api(engine, api_key, max_body_bytes)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(404, f"no route {request.method} {request.url.path}",
                                           code="not_found"))

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed"))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(500, f"{type(exc).__name__}: {exc}", type="server_error",
                                           code="internal_error"))

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed,
                                                         500: server_error, Exception: server_error})
