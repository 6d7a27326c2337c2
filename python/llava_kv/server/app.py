"""The HTTP side: an ASGI app (Starlette) with OpenAI's chat completions API over the engine.

Starlette rather than FastAPI: the API is five routes whose request bodies are checked by hand (so
every malformed field gets an OpenAI-style error naming it, never a framework's), and Starlette is
what FastAPI is built on, without pydantic. uvicorn serves it.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..arguments import UINT32_MAX
from ..chat import ChatReply
from ..pool import MAX_TOP_LOGPROBS
from .engine import Engine, Job
from .media import RequestError, vet_messages

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


def _number(body: dict[str, Any], name: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def parse_request(body: Any, engine: Engine) -> dict[str, Any]:
    """The chat completion request's fields, checked; RequestError names the first bad one."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != engine.model_id:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")
    _number(body, "n", 1, 1, 1, integer=True)
    for name in ("tools", "functions"):
        if body.get(name):
            raise RequestError(400, f"'{name}' is not supported by this server", param=name)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(400, "'logprobs' must be a boolean", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(400, "'response_format' other than {'type': 'text'} is not supported by this server",
                           param="response_format")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError(400, "'stop' must be a string or an array of strings", param="stop")
    if any(not s for s in stops):
        raise RequestError(400, "'stop' strings must not be empty", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 0, 2**31 - 1, integer=True)
    sampling = {"temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0)),
                "top_k": int(_number(body, "top_k", 40, 0, 2**31 - 1, integer=True)),
                "min_p": float(_number(body, "min_p", 0.05, 0.0, 1.0)),
                "repeat_penalty": float(_number(body, "repeat_penalty", 1.0, 0.0, 100.0)),
                "seed": _number(body, "seed", None, 0, UINT32_MAX, integer=True)}
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return {"messages": vet_messages(body.get("messages"), engine.config.policy), "stop": stops,
            "max_tokens": max_tokens, "sampling": sampling, "stream": bool(body.get("stream", False)),
            "logprobs": (top_logprobs or 0) if logprobs else None,
            "include_usage": bool(stream_options.get("include_usage", False))}


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

    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        status = 200
        try:
            self._check_auth(request)
            req = parse_request(await self._body(request), self.engine)
            loop = asyncio.get_running_loop()
            # Images are decoded and the template applied off the event loop (and off the engine thread).
            items, template = await loop.run_in_executor(None, self.engine.render, req["messages"])
            job = Job(items, template, req["sampling"], req["max_tokens"], req["stop"], loop, asyncio.Queue(),
                      logprobs=req["logprobs"], checked=time.monotonic())
            self.engine.submit(job)
        except RequestError as e:
            status = e.status
            self._count(status, started)
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - rendering errors are the request's
            from .engine import _request_error

            err = _request_error(e)
            self._count(err.status, started)
            return error_response(err)
        reply = ChatReply(self.engine.model_id)
        if req["stream"]:
            return StreamingResponse(self._stream(request, job, reply, req["include_usage"], started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts: list[str] = []
        entries: list[dict[str, Any]] = []
        try:
            while True:
                kind, payload = await self._next(request, job)
                if kind == "delta":
                    parts.append(payload[0])
                    entries += payload[1]
                elif kind == "error":
                    status = payload.status
                    return error_response(payload)
                elif kind == "cancelled":
                    status = 499
                    return Response(status_code=499)
                elif kind == "done":
                    reason, usage = payload
                    return JSONResponse(reply.completion("".join(parts), usage, finish_reason=reason,
                                                         logprobs=_logprobs(job, entries)))
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
        def chunk(delta: dict[str, Any], finish: Optional[str],
                  entries: Optional[list[dict[str, Any]]] = None) -> bytes:
            body = reply.chunk(delta, finish, logprobs=_logprobs(job, entries) if entries else None,
                               with_usage=include_usage)
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        status = 200
        finished = False
        try:
            first = True
            while True:
                kind, payload = await self._next(request, job)
                if kind == "start":
                    continue
                if first and kind in ("delta", "done"):
                    first = False
                    yield chunk({"role": "assistant", "content": ""}, None)
                if kind == "delta":
                    yield chunk({"content": payload[0]}, None, entries=payload[1])
                elif kind == "done":
                    reason, usage = payload
                    yield chunk({}, reason)
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

    def _count(self, status: int, started: float) -> None:
        self.engine.metrics.inc("requests_total", code=str(status))
        self.engine.metrics.observe_latency(time.perf_counter() - started)


def _logprobs(job: Job, entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A choice's ``logprobs`` object: None unless the request asked for them."""
    return None if job.logprobs is None else {"content": entries, "refusal": None}


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
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed,
                                                         500: server_error, Exception: server_error})
