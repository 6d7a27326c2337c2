"""The server's request and response bodies as typed models (pydantic v2, strict: "0.5" is not a
number, 1 is not a boolean), and the OpenAPI document built from them.

Every field a client may send is declared; any other is refused (400 naming it), so a setting the
server would otherwise ignore silently never is. :func:`parse` turns a validation failure into the
OpenAI-style error object naming the field. Checks that need the model (a grammar, token ids in
``logit_bias``, the model's name) are made by the app after parsing.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..arguments import INT32_MAX, UINT32_MAX
from ..pool import MAX_TOP_LOGPROBS
from .media import RequestError

__all__ = ["ChatCompletionRequest", "CompletionRequest", "TokenizeRequest", "DetokenizeRequest",
           "ChatCompletion", "ChatCompletionChunk", "Completion", "TokenizeResponse", "DetokenizeResponse",
           "ErrorResponse", "parse", "openapi"]

M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """The fields of a generation request, chat and completions alike."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0, le=INT32_MAX - 1)
    max_completion_tokens: Optional[int] = Field(None, ge=0, le=INT32_MAX - 1,
                                                 description="OpenAI's newer name for max_tokens (wins over it)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=INT32_MAX)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=100.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    seed: Optional[int] = Field(None, ge=0, le=UINT32_MAX)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=64, description="replies from one prefill (at most the server's slots)")
    response_format: Optional[dict[str, Any]] = Field(
        None, description="OpenAI's: {'type': 'text' | 'json_object' | 'json_schema', 'json_schema': {...}}")
    grammar: Optional[str] = Field(None, description="a GBNF grammar (llama-server's field)")
    json_schema: Optional[dict[str, Any]] = Field(None, description="a JSON Schema (llama-server's field)")
    user: Optional[str] = None
    cache_prompt: bool = Field(True, description="llama-server's: reuse the slot's matching prefix. Either value "
                               "gives the same reply here: reuse is an exact edit, equal to a fresh prefill")

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop: Union[str, list[str], None]) -> Union[str, list[str], None]:
        if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def reply_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(_Generation):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Any]] = Field(None, description="refused unless empty: this server has no tool calling")
    functions: Optional[list[Any]] = Field(None, description="refused unless empty")
    tool_choice: Optional[Union[str, dict[str, Any]]] = Field(None, description="only 'none'")


class MultimodalPrompt(_Body):
    """llama-server's multimodal prompt: the text with one media marker per item of
    ``multimodal_data`` (base64 images), in order."""

    prompt_string: str
    multimodal_data: list[str] = Field(default_factory=list)


class CompletionRequest(_Generation):
    prompt: Union[str, MultimodalPrompt]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="the likeliest tokens listed per place (the legacy API's integer)")
    echo: bool = Field(False, description="only false")


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# -- responses (what the server sends; the tests validate its bodies against these) --------------


class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(_Reply):
    role: Literal["assistant"]
    content: Optional[str]


class ChatChoice(_Reply):
    index: int
    message: ChatMessage
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletion(_Reply):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(_Reply):
    index: int
    delta: dict[str, Any]
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletionChunk(_Reply):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(_Reply):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class Completion(_Reply):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TokenPiece(_Reply):
    id: int
    piece: str


class TokenizeResponse(_Reply):
    tokens: list[Union[int, TokenPiece]]


class DetokenizeResponse(_Reply):
    content: str


class ErrorBody(_Reply):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(_Reply):
    error: ErrorBody


def parse(model: type[M], body: Any) -> M:
    """``body`` (parsed JSON) as ``model``; RequestError (400) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        field = loc[0] if loc else None
        if first["type"] == "extra_forbidden":
            message = f"'{'.'.join(loc)}' is not a field this server accepts"
        elif first["type"] == "missing":
            message = f"'{'.'.join(loc)}' is required"
        else:
            message = f"'{'.'.join(loc)}': {first['msg']}"
        raise RequestError(400, message, param=field) from None


_ROUTES: list[tuple[str, str, Optional[type[BaseModel]], type[BaseModel], str]] = [
    ("/v1/chat/completions", "post", ChatCompletionRequest, ChatCompletion,
     "A chat completion (stream: server-sent chat.completion.chunk events)"),
    ("/v1/completions", "post", CompletionRequest, Completion, "A completion of a raw prompt (no chat template)"),
    ("/tokenize", "post", TokenizeRequest, TokenizeResponse, "The model's tokens for a text"),
    ("/detokenize", "post", DetokenizeRequest, DetokenizeResponse, "The text of token ids"),
]


def openapi(title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the generation routes, from the models above."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"description": "an OpenAI-style error", "content": {"application/json": {"schema": ref(ErrorResponse)}}}
    paths: dict[str, Any] = {}
    for path, method, request, response, summary in _ROUTES:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref(response)}}},
                          "400": error, "413": error, "503": error}}
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        paths[path] = {method: operation}
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": schemas}}
