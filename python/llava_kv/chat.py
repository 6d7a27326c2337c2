"""OpenAI-style chat messages -> the timeline a session should hold.

A conversation is rendered with the model's chat template (llama.cpp's template engine) with the
media marker standing in for each image, then split at the markers into text and images. The
session then edits its timeline to match: a new turn only appends; a changed earlier message or
image is an edit from the first difference on.

A GGUF without ``tokenizer.chat_template`` (base models, some conversions) still chats when its
architecture names one chat format: gemma3 is always Gemma's turn format, so llama.cpp's built-in
"gemma" template is used, and said so (a log line, and the name in the reply). Architectures shared
by families with different formats (llama: Llama 2, Llama 3, Vicuna, Mistral, SmolVLM...) name none;
those need ``chat_template=``.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, Union
from urllib.parse import unquote, urlparse

from .audio import AUDIO_FORMATS, LoadedAudio, load_audio
from .errors import AudioError, ImageError, LlavaKVError
from .gguf import architecture
from .images import LoadedImage, load_image

__all__ = ["ARCH_CHAT_TEMPLATES", "ChatTemplate", "choose_chat_template", "apply_chat_template", "render_segments",
           "render_messages",
           "render_conversation", "plan_edit", "ChatReply"]

Item = Union[str, LoadedImage, LoadedAudio]
Media = (LoadedImage, LoadedAudio)

log = logging.getLogger("llava_kv")

# general.architecture -> the name of llama.cpp's built-in template (src/llama-chat.cpp) for the
# architectures llava-kv loads whose every released chat model uses one format. Left out on purpose:
# llama (Llama 2/3, Vicuna, Mistral, SmolVLM...), phi3 (Phi-3 and Phi-4 differ), chatglm, deepseek2
# (V2 and V3 differ), gemma4 (a format of its own llama.cpp has no built-in for), granite's hybrids.
ARCH_CHAT_TEMPLATES: dict[str, str] = {
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3n"), "gemma"),
    **dict.fromkeys(("qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "qwen3next", "qwen3vl",
                     "qwen3vlmoe"), "chatml"),
    "llama4": "llama4",
    "mistral3": "mistral-v7-tekken",
    "command-r": "command-r", "cohere2": "command-r",
    "deepseek": "deepseek", "deepseek2-ocr": "deepseek-ocr",
    "exaone": "exaone3", "exaone4": "exaone4", "exaone-moe": "exaone-moe",
    "granite": "granite",
    "hunyuan-moe": "hunyuan-moe", "hunyuan-dense": "hunyuan-dense", "hunyuan_vl": "hunyuan-vl",
    "gpt-oss": "gpt-oss",
    "seed_oss": "seed_oss",
}


class ChatTemplate(NamedTuple):
    """The template a conversation is rendered with and where it came from."""

    template: str  # what llama.cpp is given: "" for the model's own, else a built-in name or a template
    name: str  # for people: the built-in name, "custom" for a template string, "model" for the GGUF's own
    source: str  # "argument" (chat_template=), "model" (tokenizer.chat_template) or "architecture"


_announced: set[tuple[str, str]] = set()


def choose_chat_template(model: Any, chat_template: str | None = None) -> ChatTemplate:
    """``chat_template`` when given, else the model's own, else the built-in template its
    architecture names (logged once per model file). Raises LlavaKVError when there is none."""
    if chat_template:
        name = chat_template if "\n" not in chat_template and "{" not in chat_template else "custom"
        return ChatTemplate(chat_template, name, "argument")
    if model.chat_template:
        return ChatTemplate("", "model", "model")
    arch = architecture(model.path)
    builtin = ARCH_CHAT_TEMPLATES.get(arch or "")
    if builtin is None:
        raise LlavaKVError(f"the model '{model.path}' has no chat template (tokenizer.chat_template) and its "
                           f"architecture {arch!r} does not name one; pass chat_template=... (a llama.cpp name "
                           "such as 'chatml', 'llama3', 'gemma', 'vicuna', or a template string)")
    if (model.path, builtin) not in _announced:
        _announced.add((model.path, builtin))
        log.info("%s has no chat template; using llama.cpp's built-in %r, the format of its "
                 "architecture %r (pass chat_template= to choose another)", model.path, builtin, arch)
    return ChatTemplate(builtin, builtin, "architecture")


def apply_chat_template(model: Any, messages: Sequence[tuple[str, str]], add_assistant: bool = True,
                        chat_template: str | None = None) -> tuple[str, ChatTemplate]:
    """Render ``(role, content)`` pairs with the template :func:`choose_chat_template` picks."""
    chosen = choose_chat_template(model, chat_template)
    return model.render_chat(list(messages), add_assistant=add_assistant, template=chosen.template), chosen


def _media_from_part(part: dict[str, Any], model: Any) -> LoadedImage | LoadedAudio:
    if part.get("type") == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise ValueError("an input_audio part needs input_audio={'data': <base64>, 'format': 'wav'}")
        fmt = spec.get("format", "wav")
        if fmt not in AUDIO_FORMATS:
            raise ValueError(f"input_audio format must be one of {', '.join(AUDIO_FORMATS)}, not {fmt!r}")
        try:
            data = base64.b64decode(spec["data"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise AudioError(f"invalid base64 in input_audio data: {e}") from e
        return load_audio(data, model)
    return _image_from_part(part, model.projector_id)


def _image_from_part(part: dict[str, Any], projector_id: str) -> LoadedImage:
    kind = part.get("type")
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise ValueError("an image_url part needs image_url={'url': ...}")
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise ValueError("only base64 data: URIs are supported for images")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageError(f"invalid base64 in data: URI: {e}") from e
            return load_image(data, projector_id)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise ValueError(f"remote image URLs are not fetched ({url}); download the image and pass its path")
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// image URLs must name a file on this machine (no host, or localhost), "
                             f"not host {parsed.netloc!r}: {url}")
        if parsed.scheme not in ("", "file") and len(parsed.scheme) > 1 and not os.path.isfile(url):
            raise ValueError(f"image URL scheme {parsed.scheme!r} is not supported ({url}): use a path, a "
                             "file:// URL or a base64 data: URI")
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if not os.path.isfile(path):
            raise ImageError(f"image file not found: {path}")
        return load_image(path, projector_id)
    if kind == "image":
        image = part.get("image")
        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
            raise ImageError(f"image file not found: {image}")
        return load_image(image, projector_id)
    raise ValueError(f"unknown message part type {kind!r}: use 'text', 'image_url', 'image' or 'input_audio'")


def render_segments(model: Any, messages: Sequence[tuple[str, str]], n_media: int, *, add_assistant: bool = True,
                    chat_template: str | None = None) -> tuple[list[str], ChatTemplate]:
    """Render ``(role, content)`` pairs holding ``n_media`` media markers and split the prompt at
    them: the ``n_media + 1`` texts around the images and clips, and the template used."""
    prompt, chosen = apply_chat_template(model, messages, add_assistant, chat_template)
    segments = prompt.split(model.media_marker)
    if len(segments) != n_media + 1:
        raise ValueError("the chat template dropped or duplicated a media marker")
    return segments, chosen


def render_messages(model: Any, messages: Sequence[dict[str, Any]], *, add_assistant: bool = True,
                    chat_template: str | None = None) -> list[Item]:
    """Render ``messages`` with the chat template and return the items (text / images / audio) in order.

    Every image and audio clip is loaded here, before anything changes, so a bad message leaves a
    session as it was.
    """
    return render_conversation(model, messages, add_assistant=add_assistant, chat_template=chat_template)[0]


def render_conversation(model: Any, messages: Sequence[dict[str, Any]], *, add_assistant: bool = True,
                        chat_template: str | None = None) -> tuple[list[Item], ChatTemplate]:
    """:func:`render_messages`, and the template it rendered them with."""
    marker = model.media_marker
    rendered: list[tuple[str, str]] = []
    images: list[LoadedImage | LoadedAudio] = []
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            if marker in content:
                raise ValueError(f"message {i} contains the media marker {marker!r} as text")
            text = content
        elif isinstance(content, (list, tuple)):
            pieces = []
            for part in content:
                if not isinstance(part, dict):
                    raise ValueError(f"message {i}: content parts must be dicts, not {type(part).__name__}")
                if part.get("type") == "text":
                    if marker in part.get("text", ""):
                        raise ValueError(f"message {i} contains the media marker {marker!r} as text")
                    pieces.append(str(part.get("text", "")))
                else:
                    images.append(_media_from_part(part, model))
                    pieces.append(marker)
            text = "".join(pieces)
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        rendered.append((str(message["role"]), text))
    segments, chosen = render_segments(model, rendered, len(images), add_assistant=add_assistant,
                                       chat_template=chat_template)
    items: list[Item] = []
    for k, seg in enumerate(segments):
        if seg:
            items.append(seg)
        if k < len(images):
            items.append(images[k])
    return items, chosen


class ChatReply:
    """Shapes one answer as OpenAI's (and llama-cpp-python's) ``chat.completion`` or its stream of
    ``chat.completion.chunk`` dicts, for :meth:`Session.chat` and the server alike. ``finish_reason``
    is read when the answer is complete, unless the caller gives it. ``text=True`` shapes the legacy
    completions API's ``text_completion`` instead (the server's ``/v1/completions``): a choice's
    text is ``choices[i]["text"]``, streamed as such too."""

    def __init__(self, model_name: str, finish_reason: Callable[[], str | None] = lambda: None, *,
                 text: bool = False) -> None:
        self.id = f"{'cmpl' if text else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_name = model_name
        self.text = text
        self._finish_reason = finish_reason

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, **extra: Any) -> dict[str, Any]:
        """OpenAI's ``usage`` object, with ``extra`` fields after its own."""
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, **extra}

    def completion(self, content: str, usage: dict[str, Any], *, finish_reason: str | None = None,
                   logprobs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole answer; ``extra`` goes under ``"llava_kv"`` (tokens reused, decoded, ...)."""
        return self.completions([(content, finish_reason or self._finish_reason(), logprobs)], usage, extra=extra)

    def _choice(self, index: int, content: str | None, finish_reason: str | None,
                logprobs: dict[str, Any] | None, *, delta: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.text:
            return {"index": index, "text": content if delta is None else delta.get("content", ""),
                    "finish_reason": finish_reason, "logprobs": logprobs}
        key, value = ("message", {"role": "assistant", "content": content}) if delta is None else ("delta", delta)
        return {"index": index, key: value, "finish_reason": finish_reason, "logprobs": logprobs}

    def completions(self, choices: Sequence[tuple[str, str | None, dict[str, Any] | None]], usage: dict[str, Any], *,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole answer with one choice per (content, finish_reason, logprobs) (``n`` replies)."""
        body: dict[str, Any] = {
            "id": self.id, "object": "text_completion" if self.text else "chat.completion", "created": self.created,
            "model": self.model_name,
            "choices": [self._choice(i, content, reason, lp) for i, (content, reason, lp) in enumerate(choices)],
            "usage": usage,
        }
        if extra is not None:
            body["llava_kv"] = extra
        return body

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, *,
              logprobs: dict[str, Any] | None = None, with_usage: bool = False, index: int = 0) -> dict[str, Any]:
        """One ``chat.completion.chunk`` (choice ``index``); ``with_usage`` (a stream that asked for
        usage) adds ``"usage": None``, as OpenAI sends it on every chunk before :meth:`usage_chunk`."""
        body: dict[str, Any] = {"id": self.id, "object": "text_completion" if self.text else "chat.completion.chunk",
                "created": self.created, "model": self.model_name,
                "choices": [self._choice(index, None, finish_reason, logprobs, delta=delta)]}
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The last chunk of a stream that asked for usage: no choices, the usage."""
        return {"id": self.id, "object": "text_completion" if self.text else "chat.completion.chunk",
                "created": self.created, "model": self.model_name, "choices": [], "usage": usage}

    def chunks(self, pieces: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The answer as it is generated: a role chunk, one chunk per piece, a finish chunk."""
        yield self.chunk({"role": "assistant"})
        for piece in pieces:
            yield self.chunk({"content": piece})
        yield self.chunk({}, self._finish_reason())


def plan_edit(timeline: Iterable[Any], items: Sequence[Item]) -> tuple[int, list[Item]]:
    """Where the session's timeline first departs from ``items``, and what must follow from there.

    Text may be split over several chunks (a generated reply, then the template's end-of-turn
    text); it matches while the chunks' text is a prefix of the wanted text. A generated reply
    also matches when the template puts whitespace before it ("ASSISTANT: " + reply): the reply
    stays in the KV cache as the model produced it, rather than being decoded again.
    """
    chunks = list(timeline)
    i, offset = 0, 0
    k = 0
    for k, chunk in enumerate(chunks):
        if i >= len(items):
            break
        want = items[i]
        if chunk.media is not None:
            if offset == 0 and isinstance(want, Media) and chunk.media.digest == want.digest:
                i += 1
                continue
            break
        if not isinstance(want, str):
            break
        if chunk.generated and not chunk.text:
            continue  # a reply of tokens without text (e.g. control tokens) renders as nothing
        if not chunk.text:
            break
        if want.startswith(chunk.text, offset):
            offset += len(chunk.text)
        elif chunk.generated and want[offset:].lstrip().startswith(chunk.text.lstrip()) and chunk.text.lstrip():
            rest_of_want = want[offset:]
            offset += len(rest_of_want) - len(rest_of_want.lstrip()) + len(chunk.text.lstrip())
        else:
            break
        if offset == len(want):
            i, offset = i + 1, 0
    else:
        k = len(chunks)
    rest: list[Item] = []
    if i < len(items):
        head = items[i]
        rest.append(head[offset:] if isinstance(head, str) else head)
        rest.extend(items[i + 1:])
    return k, rest
